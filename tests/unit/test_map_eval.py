"""Heatmaps scored against lesion masks: the metrics, the baselines, the mask readers and the command."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lesionserve.calibration import Calibration
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.spec import CLASS_NAMES
from lesionserve.synthetic import generate_dataset
from lesionserve.training.data import Sample, load_dataset
from lesionserve.training.map_eval import (centred_gaussian, main, mass_inside, pointing_hit, score_maps,
                                           uniform_map)
from lesionserve.training.masks import MaskError, attach_masks, load_mask_index, load_ph2, read_mask
from lesionserve.training.splits import make_splits, write_splits


def square_mask(h: int = 20, w: int = 30) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[5:15, 10:20] = True  # 100 of 600 pixels
    return mask


# ---------------------------------------------------------------------------------------- metrics


def test_mass_inside_and_pointing_are_one_when_map_lies_in_mask_and_zero_when_outside():
    mask = square_mask()
    inside = mask.astype(np.float32)
    outside = (~mask).astype(np.float32)
    assert mass_inside(inside, mask) == pytest.approx(1.0) and pointing_hit(inside, mask) == 1.0
    assert mass_inside(outside, mask) == pytest.approx(0.0) and pointing_hit(outside, mask) == 0.0


def test_mass_inside_weighs_values_when_map_spreads_over_both_sides():
    mask = square_mask()
    heat = np.where(mask, 1.0, 0.1).astype(np.float32)
    assert mass_inside(heat, mask) == pytest.approx(100 / (100 + 0.1 * 500))


def test_pointing_counts_the_share_of_tied_maxima_inside_when_several_pixels_are_hottest():
    mask = square_mask()
    heat = np.zeros(mask.shape, np.float32)
    heat[10, 12] = heat[0, 0] = heat[1, 1] = heat[19, 29] = 1.0  # one of four maxima inside
    assert pointing_hit(heat, mask) == pytest.approx(0.25)


def test_flat_map_scores_the_mask_area_when_uniform():
    mask = square_mask()
    flat = uniform_map(30, 20)
    assert flat.shape == (20, 30)
    assert mass_inside(flat, mask) == pytest.approx(100 / 600)
    assert pointing_hit(flat, mask) == pytest.approx(100 / 600)


@pytest.mark.parametrize("width,height,area", [(224, 224, 0.25), (765, 574, 0.1), (61, 40, 0.4)])
def test_centred_gaussian_peaks_at_centre_and_its_one_sigma_ellipse_covers_the_area(width, height, area):
    g = centred_gaussian(width, height, area)
    assert g.shape == (height, width) and g.min() == pytest.approx(0.0, abs=1e-6) and g.max() == pytest.approx(1.0)
    y, x = np.unravel_index(int(np.argmax(g)), g.shape)
    assert abs(x - (width - 1) / 2) <= 0.5 and abs(y - (height - 1) / 2) <= 0.5
    raw_min = math.exp(-0.5 * ((0.5 / math.sqrt(area / math.pi)) ** 2) * 2)  # the corner value before scaling
    one_sigma = (math.exp(-0.5) - raw_min) / (1 - raw_min)
    assert (g >= one_sigma).mean() == pytest.approx(area, rel=0.05)


def test_centred_gaussian_refuses_area_outside_unit_interval():
    with pytest.raises(ValueError, match="area_fraction"):
        centred_gaussian(10, 10, 0.0)


def test_score_maps_refuses_map_of_other_size_than_mask():
    with pytest.raises(ValueError, match="map 'x' is 10x20, the mask 30x20"):
        score_maps({"x": np.zeros((20, 10), np.float32)}, square_mask())


# ------------------------------------------------------------------------------------- mask files


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)
    return path


def test_read_mask_reads_0_255_and_0_1_masks_when_binary(tmp_path):
    mask = square_mask()
    a = read_mask(write_png(tmp_path / "a.png", mask.astype(np.uint8) * 255), (30, 20))
    b = read_mask(write_png(tmp_path / "b.png", mask.astype(np.uint8)))
    assert (a == mask).all() and (b == mask).all() and a.dtype == bool


def test_read_mask_names_the_fault_when_missing_resized_grey_or_coloured(tmp_path):
    good = write_png(tmp_path / "m.png", square_mask().astype(np.uint8) * 255)
    with pytest.raises(MaskError, match="mask file not found: .*nope.png"):
        read_mask(tmp_path / "nope.png")
    with pytest.raises(MaskError, match="mask is 30x20, its image 600x450"):
        read_mask(good, (600, 450))
    grey = square_mask().astype(np.uint8) * 255
    grey[0, :3] = (17, 128, 200)
    with pytest.raises(MaskError, match=r"not binary: 5 distinct values \(0, 17, 128, 200, 255\)"):
        read_mask(write_png(tmp_path / "grey.png", grey))
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[..., 2] = 255
    with pytest.raises(MaskError, match="a colour image"):
        read_mask(write_png(tmp_path / "colour.png", colour))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match="not a decodable image"):
        read_mask(tmp_path / "junk.png")


def test_attach_masks_splits_samples_by_mask_and_index_lists_missing_files(tmp_path):
    write_png(tmp_path / "masks" / "A_segmentation.png", square_mask().astype(np.uint8) * 255)
    (tmp_path / "masks.csv").write_text("image,mask_path\nA,masks/A_segmentation.png\n")
    samples = [Sample(tmp_path / "A.jpg", 0, "L1"), Sample(tmp_path / "B.jpg", 1, "L2")]
    with_mask, without = attach_masks(samples, load_mask_index(tmp_path / "masks.csv"))
    assert [m.image_id for m in with_mask] == ["A"] and [s.image_id for s in without] == ["B"]
    assert with_mask[0].mask_path == tmp_path / "masks" / "A_segmentation.png"
    (tmp_path / "bad.csv").write_text("image,mask_path\nA,masks/A_segmentation.png\nC,masks/C.png\n")
    with pytest.raises(MaskError, match=r"1 mask file\(s\) missing, e.g. .*C.png"):
        load_mask_index(tmp_path / "bad.csv")
    (tmp_path / "header.csv").write_text("image,mask\nA,x\n")
    with pytest.raises(ValueError, match="lacks column"):
        load_mask_index(tmp_path / "header.csv")


def test_load_ph2_maps_label7_to_classes_and_refuses_other_labels(tmp_path):
    for name in ("images/P1.jpg", "masks/P1_segmentation.png"):
        write_png(tmp_path / name, square_mask().astype(np.uint8) * 255)
    row = "P1,images/P1.jpg,masks/P1_segmentation.png,melanoma,{}\n"
    header = "image,path,mask_path,diagnosis,label7\n"
    (tmp_path / "ph2.csv").write_text(header + row.format("MEL"))
    [item] = load_ph2(tmp_path / "ph2.csv")
    assert CLASS_NAMES[item.sample.label] == "MEL" and item.sample.lesion_id == "P1"
    (tmp_path / "bad.csv").write_text(header + row.format("melanoma"))
    with pytest.raises(ValueError, match="label7 'melanoma' is not one of MEL, NV"):
        load_ph2(tmp_path / "bad.csv")


# -------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A random-weight resnet50 at 64 px over synthetic lesions that know their masks, scored at T=2."""
    root = tmp_path_factory.mktemp("maps")
    data = generate_dataset(root / "data", size=(96, 72), seed=0, class_counts={c: 4 for c in CLASS_NAMES},
                            repeat_fraction=0.0, progress=False)
    art = root / "artifacts"
    splits = make_splits(load_dataset(root / "data"), 0.25, 0.25, seed=0)
    write_splits(art / "splits.csv", splits)
    torch.manual_seed(0)
    save_checkpoint(art / "resnet50" / "checkpoint.pt", "resnet50", create_backbone("resnet50"),
                    extra={"config": {"input_size": 64}})
    Calibration.uniform(["resnet50"]).save(art / "calibration.json")
    out = root / "report"
    argv = ["--artifacts", str(art), "--masks", str(data.masks_csv), "--views", "2", "--cases", "1",
            "--bootstrap", "50", "--out", str(out), "--no-progress", "--batch-size", "3"]
    assert main(argv) == 0
    return data, splits, out


def test_evaluate_maps_scores_every_masked_test_image_and_baselines_match_mask_areas(scored):
    data, splits, out = scored
    result = json.loads((out / "maps_eval.json").read_text())
    entry = result["summary"]["HAM10000 test"]
    assert entry["images"] == len(splits["test"])  # every synthetic image has a mask
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted(s.image_id for s in splits["test"])
    for r in rows:
        mask = read_mask(data.masks_dir / f"{r['image']}_segmentation.png")
        assert float(r["mask_area"]) == pytest.approx(mask.mean(), abs=1e-4)
        assert float(r["gradcam_uniform_mass"]) == pytest.approx(mask.mean(), abs=1e-4)
        for key in ("gradcam_fused_mass", "gradcampp_resnet50_hit", "gradcam_gaussian_hit"):
            assert 0.0 <= float(r[key]) <= 1.0
    for method in ("gradcam", "gradcampp"):
        assert set(entry["methods"][method]) == {"fused", "resnet50", "gaussian", "uniform"}
    # One member: the fused map is that member's map.
    fused, member = entry["methods"]["gradcam"]["fused"], entry["methods"]["gradcam"]["resnet50"]
    for metric in ("mass", "hit"):
        assert fused[metric]["mean"] == pytest.approx(member[metric]["mean"], abs=1e-6)
    train_area = np.mean([read_mask(data.masks_dir / f"{s.image_id}_segmentation.png").mean() for s in splits["train"]])
    assert f"area fraction {train_area:.3f}: the mean over the train split's {len(splits['train'])} masks" in \
        result["context"]["Gaussian baseline"]


def test_evaluate_maps_writes_report_plot_and_best_and_worst_cases(scored):
    _, _, out = scored
    report = (out / "report.md").read_text()
    assert "| Grad-CAM++ | fused ensemble |" in report and "| baseline | centred Gaussian |" in report
    assert "lesion-clean: yes" in report
    assert cv2.imread(str(out / "localisation.png")) is not None
    cases = sorted(p.name for p in (out / "cases" / "HAM10000 test").iterdir())
    assert len(cases) == 2 and cases[0].startswith("best01_") and cases[1].startswith("worst01_")


def test_evaluate_maps_refuses_to_run_without_a_set(tmp_path, capsys):
    assert main(["--artifacts", str(tmp_path)]) == 2
    assert "give --masks CSV" in capsys.readouterr().err
