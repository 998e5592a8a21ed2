"""The lesion segmenter without a server: post-processing, metrics, data, recipe, training and resume."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lesionserve.segmentation.data import (SegmentationDataset, joint_augment, kfold, load_pairs, load_task1,
                                           mask_to_grid)
from lesionserve.segmentation.metrics import TASK1_CUT, dice, iou, summary, thresholded_jaccard
from lesionserve.cropping import NO_BOX, grow_box
from lesionserve.segmentation.postprocess import bounding_box, fill_holes, largest_component, lesion_from_probabilities
from lesionserve.segmentation.spec import SEGMENTER, Segmenter
from lesionserve.synthetic import generate_dataset
from lesionserve.training.data import UNKNOWN_LABEL, DatasetError, Sample
from lesionserve.training.masks import MaskError

# ------------------------------------------------------------------------------------ post-processing


def test_largest_component_keeps_the_biggest_blob_and_fill_holes_closes_it():
    mask = np.zeros((40, 50), bool)
    mask[5:25, 5:30] = True  # 500 px lesion...
    mask[10:15, 10:15] = False  # ...with a hole
    mask[30:35, 40:45] = True  # and a speck
    kept = largest_component(mask)
    assert not kept[32, 42] and kept[6, 6]
    filled = fill_holes(kept)
    assert filled[12, 12] and filled.sum() == 20 * 25
    assert not fill_holes(np.zeros((5, 5), bool)).any()


def test_fill_holes_leaves_background_touching_the_border_alone():
    ring = np.zeros((20, 20), bool)
    ring[:, 5] = ring[:, 15] = True  # two walls: the strip between them touches the top and bottom
    assert (fill_holes(ring) == ring).all()


def test_bounding_box_is_inclusive_exclusive_and_empty_mask_has_no_box():
    mask = np.zeros((30, 40), bool)
    mask[3:11, 7:20] = True
    assert bounding_box(mask) == (7, 3, 20, 11)
    assert bounding_box(np.zeros((3, 3), bool)) == NO_BOX


def test_lesion_from_probabilities_maps_to_original_size_and_flags_nothing_found():
    probs = np.zeros((32, 32), np.float32)
    probs[8:24, 8:16] = 0.9  # left half of the centre, in network geometry
    lesion = lesion_from_probabilities(probs, 200, 100)
    assert lesion.found and lesion.mask.shape == (100, 200)
    x0, y0, x1, y1 = lesion.box
    assert abs(x0 - 50) <= 4 and abs(x1 - 100) <= 4 and abs(y0 - 25) <= 3 and abs(y1 - 75) <= 3
    assert lesion.area_fraction == pytest.approx(lesion.mask.mean())
    nothing = lesion_from_probabilities(np.full((32, 32), 0.2, np.float32), 200, 100)
    assert not nothing.found and nothing.box == NO_BOX and nothing.area_fraction == 0.0 and not nothing.mask.any()


def test_crop_box_grows_by_margin_inside_the_image():
    assert grow_box((10, 20, 30, 60), 100, 100, 0.1) == (8, 16, 32, 64)
    assert grow_box((0, 0, 50, 50), 60, 55, 0.5) == (0, 0, 60, 55)
    with pytest.raises(ValueError, match="margin"):
        grow_box((0, 0, 1, 1), 5, 5, -0.1)


# ------------------------------------------------------------------------------------------ metrics


def test_iou_dice_and_the_task1_threshold_match_hand_counts():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True  # 50 px
    b[:, 2:6] = True  # 40 px, 30 shared
    assert iou(a, b) == pytest.approx(30 / 60) and dice(a, b) == pytest.approx(60 / 90)
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert thresholded_jaccard([0.9, 0.64, 0.65, 0.1]) == pytest.approx((0.9 + 0.65) / 4)
    s = summary([0.9, 0.5], [0.95, 0.6])
    assert s["failed_fraction"] == 0.5 and s["images"] == 2 and TASK1_CUT == 0.65
    with pytest.raises(ValueError, match="prediction is 3x2, the mask 2x2"):
        iou(np.zeros((2, 3), bool), np.zeros((2, 2), bool))


# --------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("seg") / "data", size=(96, 72), seed=0,
                            class_counts={c: 3 for c in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")},
                            repeat_fraction=0.0, progress=False)


def test_load_pairs_reads_a_dataset_with_masks_csv_and_counts_images_without_one(synthetic, tmp_path):
    pairs, skipped = load_pairs(synthetic.root)
    assert len(pairs) == 21 and skipped == 0
    lines = synthetic.masks_csv.read_text().splitlines()
    partial = tmp_path / "masks.csv"
    partial.write_text("\n".join(lines[:11]).replace("ISIC2018_Task1", str(synthetic.root / "ISIC2018_Task1")) + "\n")
    pairs, skipped = load_pairs(synthetic.root, masks=partial)
    assert len(pairs) == 10 and skipped == 11


def test_load_task1_reads_the_official_layout_and_names_unpaired_files(synthetic, tmp_path):
    root = tmp_path / "task1"
    (root / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    (root / "ISIC2018_Task1_Training_GroundTruth").mkdir()
    for image in sorted(synthetic.images_dir.iterdir())[:3]:
        (root / "ISIC2018_Task1-2_Training_Input" / image.name).write_bytes(image.read_bytes())
        mask = synthetic.masks_dir / f"{image.stem}_segmentation.png"
        (root / "ISIC2018_Task1_Training_GroundTruth" / mask.name).write_bytes(mask.read_bytes())
    pairs, _ = load_pairs(root)
    assert len(pairs) == 3 and all(p.sample.label == UNKNOWN_LABEL for p in pairs)
    (root / "ISIC2018_Task1-2_Training_Input" / "ISIC_9999999.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"1 image\(s\) without a mask \(e.g. ISIC_9999999\)"):
        load_task1(root)


def test_load_pairs_says_what_it_needs_when_layout_unknown_or_masks_missing(tmp_path):
    (tmp_path / "meta.csv").write_text("image,dx,lesion_id\n")
    with pytest.raises(ValueError, match="pass --masks"):
        load_pairs(tmp_path / "meta.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a HAM10000 metadata CSV"):
        load_pairs(tmp_path / "empty")


def test_dataset_item_is_the_serving_preprocessing_with_the_mask_on_the_same_grid(synthetic):
    from lesionserve.preprocessing import decode_image, preprocess_rgb
    from lesionserve.training.masks import read_mask

    pairs, _ = load_pairs(synthetic.root)
    x, y = SegmentationDataset(pairs, 64)[0]
    rgb = decode_image(pairs[0].sample.path.read_bytes())
    np.testing.assert_array_equal(x.numpy(), preprocess_rgb(rgb, 64, SEGMENTER.normalization))
    np.testing.assert_array_equal(y[0].numpy(), mask_to_grid(read_mask(pairs[0].mask_path), 64))
    assert y.shape == (1, 64, 64) and set(np.unique(y.numpy())) <= {0.0, 1.0}


def test_joint_augment_moves_image_and_mask_together():
    rgb = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:30, 15:40] = True
    rgb[mask] = 200
    for seed in range(5):
        out_rgb, out_mask = joint_augment(rgb, mask, np.random.default_rng(seed))
        bright = out_rgb.mean(axis=2) > 100  # where the painted lesion went (lighting scales all alike)
        assert iou(bright, out_mask) > 0.9, seed


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(synthetic, tmp_path):
    pairs, _ = load_pairs(synthetic.root)
    bad = tmp_path / "small.png"
    cv2.imwrite(str(bad), np.zeros((10, 10), np.uint8))
    from lesionserve.training.masks import MaskedSample

    with pytest.raises(MaskError, match="mask is 10x10, its image 96x72"):
        SegmentationDataset([MaskedSample(pairs[0].sample, bad)], 64)[0]


def test_kfold_puts_each_lesion_in_exactly_one_val_fold():
    samples = [Sample(Path(f"/x/I{i}.jpg"), (i // 2) % 3, f"L{i // 2}") for i in range(30)]
    vals = [kfold(samples, 3, f)[1] for f in range(3)]
    ids = [s.image_id for v in vals for s in v]
    assert sorted(ids) == sorted(s.image_id for s in samples)
    for v in vals:
        train, _ = kfold(samples, 3, vals.index(v))
        assert not {s.lesion_id for s in v} & {s.lesion_id for s in train}
    with pytest.raises(ValueError, match="folds >= 2"):
        kfold(samples, 1, 0)


def test_segmenter_declaration_refuses_sizes_the_unet_cannot_halve():
    with pytest.raises(ValueError, match="multiple of 32"):
        Segmenter(input_size=100)
    assert Segmenter.from_dict(SEGMENTER.to_dict()) == SEGMENTER


# ------------------------------------------------------------------------------------------ training


def test_recipe_refuses_unknown_keys_bad_loss_and_sizes():
    from lesionserve.segmentation.train import resolve

    with pytest.raises(ValueError, match="unknown key"):
        resolve({"data": "d", "out": "o", "learning_rate": 1})
    with pytest.raises(ValueError, match="loss must be one of bce, dice, bce_dice"):
        resolve({"data": "d", "out": "o", "loss": "focal"})
    with pytest.raises(ValueError, match="multiples of 32"):
        resolve({"data": "d", "out": "o", "sizes": [100]})
    assert resolve({"data": "d", "out": "o"})["freeze_bn"] is False  # auto: only with --pretrained


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """A segmenter trained for a few steps at 32 then 64 px on the synthetic lesions."""
    from lesionserve.segmentation.train import main

    out = tmp_path_factory.mktemp("trained") / "seg" / "segmenter"
    argv = ["--data", str(synthetic.root), "--out", str(out), "--sizes", "32", "64", "--frozen-epochs", "1",
            "--unfrozen-epochs", "1", "--batch-size", "4", "--max-steps-per-epoch", "2", "--loss", "bce_dice"]
    assert main(argv) == 0
    return out, argv


def test_training_runs_every_phase_saves_the_best_at_the_last_size_and_resumes(trained, tmp_path):
    from lesionserve.segmentation.model import load_segmenter
    from lesionserve.segmentation.train import main

    out, argv = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(h["size"], h["frozen"]) for h in metrics["history"]] == [(32, True), (32, False), (64, True), (64, False)]
    assert metrics["best"]["size"] == 64 and (out / "curves.png").is_file() and (out / "last.pt").is_file()
    spec, model, size, payload = load_segmenter(out / "checkpoint.pt")
    assert spec == SEGMENTER and size == 64 and payload["config"]["loss"] == "bce_dice"
    # Interrupted after the first phase: resuming runs exactly the three that are left.
    state = torch.load(out / "last.pt", weights_only=False)
    state.update(phase=1, epoch=0, history=state["history"][:1], best=None)
    state.pop("optimizer", None), state.pop("schedule", None)
    torch.save(state, tmp_path / "after_phase1.pt")
    other = tmp_path / "resumed"
    argv = [a if a != str(out) else str(other) for a in argv]
    assert main(argv + ["--resume", str(tmp_path / "after_phase1.pt"), "--splits", str(out.parent / "splits.csv")]) == 0
    again = json.loads((other / "metrics.json").read_text())
    assert len(again["history"]) == 4 and again["history"][0] == metrics["history"][0]
    # A resume under another recipe is refused, naming both plans.
    changed = argv[:argv.index("--sizes")] + ["--sizes", "32", "96"] + argv[argv.index("--sizes") + 3:]
    assert main(changed + ["--resume", str(tmp_path / "after_phase1.pt"), "--splits", str(out.parent / "splits.csv")]) == 2


def test_evaluate_scores_the_checkpoints_test_split_with_task1_metrics(trained, synthetic, tmp_path):
    from lesionserve.segmentation.evaluate import main
    from lesionserve.training.splits import read_splits

    out, _ = trained
    report = tmp_path / "eval"
    argv = ["--checkpoint", str(out / "checkpoint.pt"), str(out / "checkpoint.pt"), "--data", str(synthetic.root),
            "--out", str(report), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((report / "metrics.json").read_text())
    test = read_splits(out.parent / "splits.csv")["test"]
    s = result["summary"]["test split"]
    assert s["images"] == len(test) and 0 <= s["thresholded_jaccard"] <= s["jaccard"] <= 1
    assert "| test split |" in (report / "report.md").read_text() and (report / "iou_hist.png").is_file()
    assert main(["--checkpoint", str(out / "checkpoint.pt")]) == 2


def test_pretrained_encoder_loads_strictly_and_names_what_does_not_fit(tmp_path):
    import torchvision

    from lesionserve.segmentation.model import load_pretrained_encoder

    model = SEGMENTER.create()
    good = torchvision.models.resnet34().state_dict()
    torch.save(good, tmp_path / "r34.pt")
    load_pretrained_encoder(model, tmp_path / "r34.pt")
    torch.testing.assert_close(model.encoder.conv1.weight, good["conv1.weight"])
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="does not fit the ResNetEncoder encoder: missing"):
        load_pretrained_encoder(model, tmp_path / "r18.pt")


def test_export_writes_an_onnx_segmenter_equal_to_pytorch_and_refuses_a_disagreeing_one(trained, tmp_path, monkeypatch):
    import onnxruntime as ort

    from lesionserve.export import segmenter_export
    from lesionserve.export.segmenter_export import SegmenterExportError, export_segmenter

    out, _ = trained
    report = export_segmenter(out / "checkpoint.pt", tmp_path / "model.onnx")
    assert report.input_size == 64 and report.max_abs_diff <= 1e-3 and report.mask_agreement >= 0.999
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["mask_logits"]
    assert session.run(None, {"pixel_values": np.zeros((5, 3, 64, 64), np.float32)})[0].shape == (5, 1, 64, 64)
    monkeypatch.setattr(segmenter_export, "MIN_MASK_AGREEMENT", 1.01)  # an impossible bar: the check must bite
    with pytest.raises(SegmenterExportError, match="masks agree on"):
        export_segmenter(out / "checkpoint.pt", tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists() and not (tmp_path / "refused.onnx.tmp").exists()


def test_lesions_of_a_batch_pad_masks_per_request_and_leave_failed_rows_not_found():
    from lesionserve.segmentation.postprocess import lesions_of_batch

    logits = np.full((3, 1, 32, 32), -5.0, np.float32)
    logits[0, 0, 8:24, 8:24] = 5.0
    logits[1, 0] = 5.0  # a failed row: whatever its logits say, nothing is found
    from lesionserve.preprocessing import failed_rows

    failed = failed_rows(np.array([[b""], [b"bad image"], [b""]], dtype=np.object_))
    out = lesions_of_batch(logits, np.array([[64, 48], [10, 10], [20, 30]]), failed)
    assert out["mask"].shape == (3, 48, 64) and out["mask"].dtype == np.uint8
    assert out["found"][:, 0].tolist() == [True, False, False]
    assert out["box"][1].tolist() == [-1, -1, -1, -1] and not out["mask"][1].any()
    assert out["mask"][0, :48, :64].sum() > 0 and out["area"][0, 0] == pytest.approx(out["mask"][0].mean())
