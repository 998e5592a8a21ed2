"""Evaluation: metrics on hand-computed cases, the end-to-end report on tiny checkpoints (a split, or any dataset
with its lesion-clean check against the training split), multi-seed aggregation."""
from __future__ import annotations

import csv
import json
import shutil
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lesionserve.calibration import Calibration
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.spec import CLASS_NAMES
from lesionserve.training import multiseed
from lesionserve.training.data import DatasetError, load_dataset
from lesionserve.training.evaluate import (
    EvaluationError,
    dataset_samples,
    evaluation_samples,
    lesion_clean_text,
    main,
    recorded_split_file,
    score,
    training_overlap,
)
from lesionserve.training.metrics import (
    binary_auc,
    bootstrap_balanced_accuracy_ci,
    confusion_matrix,
    malignant_balanced_accuracy,
    one_vs_rest_auc,
    rankdata,
    roc_curve,
    sensitivity_specificity_from_confusion,
)
from lesionserve.training.splits import lesion_overlap, load_or_create_splits, make_splits, read_splits, write_splits
from lesionserve.synthetic import generate_dataset

MEL, NV, BCC, AKIEC, BKL, DF, VASC = range(7)


def brute_force_auc(scores, positive) -> float:
    """P(score of a random positive > score of a random negative) + half the ties, by counting pairs."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


# ------------------------------------------------------------------------------------------ metrics


def test_rankdata_averages_ranks_when_values_tie():
    np.testing.assert_array_equal(rankdata([10, 30, 20, 20, 10, 5]), [2.5, 6, 4.5, 4.5, 2.5, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_equals_pairwise_count_when_scores_have_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40) / 5.0  # few distinct values: many ties
    positive = rng.random(40) < 0.4
    assert binary_auc(scores, positive) == pytest.approx(brute_force_auc(scores, positive), abs=1e-12)
    fpr, tpr = roc_curve(scores, positive)
    assert np.trapz(tpr, fpr) == pytest.approx(binary_auc(scores, positive), abs=1e-12)


def test_binary_auc_is_nan_when_only_one_class_present():
    assert np.isnan(binary_auc([0.1, 0.9], [True, True]))


def test_one_vs_rest_auc_scores_each_column_when_given_probabilities():
    y = np.array([0, 0, 1, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    auc = one_vs_rest_auc(y, probs, num_classes=3)
    expected = [brute_force_auc(probs[:, c], y == c) for c in range(3)]
    np.testing.assert_allclose(auc, expected)
    assert auc[2] == 1.0


def test_sensitivity_specificity_match_hand_counts_when_three_classes():
    # true 0: 2 right, 1 called 1; true 1: 1 right; true 2: 1 called 0, 1 right
    cm = confusion_matrix([0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 0, 2], num_classes=3)
    sens, spec = sensitivity_specificity_from_confusion(cm)
    np.testing.assert_allclose(sens, [2 / 3, 1.0, 0.5])
    # class 0: negatives are the 3 non-0 images, one of them (true 2) predicted 0 -> 2/3
    # class 1: 5 negatives, one (true 0) predicted 1 -> 4/5; class 2: 4 negatives, none predicted 2 -> 1
    np.testing.assert_allclose(spec, [2 / 3, 4 / 5, 1.0])


def test_malignant_balanced_accuracy_averages_mel_bcc_akiec_when_others_differ():
    y_true = [MEL, MEL, BCC, BCC, AKIEC, NV, NV, DF]
    y_pred = [MEL, NV, BCC, BCC, NV, NV, MEL, NV]
    # MEL 1/2, BCC 2/2, AKIEC 0/1 -> 0.5; NV and DF recalls must not count
    assert malignant_balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)
    assert malignant_balanced_accuracy([MEL, NV], [MEL, MEL]) == pytest.approx(1.0)  # only classes present
    with pytest.raises(ValueError, match="no MEL, BCC or AKIEC"):
        malignant_balanced_accuracy([NV, DF], [NV, DF])


def test_bootstrap_ci_contains_estimate_and_repeats_when_seed_fixed():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, size=400)
    y_pred = np.where(rng.random(400) < 0.7, y_true, rng.integers(0, 7, size=400))
    point = score(y_true, y_pred, np.eye(7)[y_pred], n_boot=0)["balanced_accuracy"]
    low, high = bootstrap_balanced_accuracy_ci(y_true, y_pred, n_boot=500, seed=3)
    assert low < point < high and high - low < 0.2
    assert bootstrap_balanced_accuracy_ci(y_true, y_pred, n_boot=500, seed=3) == (low, high)
    assert bootstrap_balanced_accuracy_ci(y_true, y_pred, n_boot=500, seed=4) != (low, high)


def test_score_reports_intervals_only_when_bootstrap_requested():
    y = np.array([MEL, NV, BCC, AKIEC, MEL, NV])
    probs = np.eye(7)[[MEL, NV, NV, AKIEC, MEL, NV]]
    without = score(y, probs.argmax(1), probs, n_boot=0)
    assert without["balanced_accuracy_ci"] is None
    assert without["balanced_accuracy"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert without["malignant_balanced_accuracy"] == pytest.approx(2 / 3)
    with_ci = score(y, probs.argmax(1), probs, n_boot=100, seed=0)
    low, high = with_ci["malignant_balanced_accuracy_ci"]
    assert low <= with_ci["malignant_balanced_accuracy"] <= high


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Random-weight resnet50, a calibration and a lesion-grouped split of 21 tiny synthetic images."""
    root = tmp_path_factory.mktemp("evaluate")
    generate_dataset(root / "data", size=(64, 48), seed=0, class_counts={c: 3 for c in CLASS_NAMES},
                     repeat_fraction=0.0, progress=False)
    art = root / "artifacts"
    splits = make_splits(load_dataset(root / "data"), 0.3, 0.3, seed=0)
    write_splits(art / "splits.csv", splits)
    torch.manual_seed(0)
    save_checkpoint(art / "resnet50" / "checkpoint.pt", "resnet50", create_backbone("resnet50"))
    # What training writes beside the checkpoint (the parts evaluation reads).
    (art / "resnet50" / "config.json").write_text(json.dumps(
        {"backbone": "resnet50", "input_size": 224, "splits": str((art / "splits.csv").resolve())}))
    (art / "resnet50" / "metrics.json").write_text(json.dumps(
        {"train_samples": len(splits["train"]), "val_samples": len(splits["val"])}))
    Calibration(weights={"resnet50": 1.0}, thresholds={"AKIEC": 0.15, "MEL": 0.15},
                threshold_order=("AKIEC", "MEL")).save(art / "calibration.json")
    return art


@pytest.fixture(scope="module")
def evaluated(artifacts) -> tuple[Path, dict]:
    out = artifacts.parent / "report"
    argv = ["--artifacts", str(artifacts), "--split", "test", "--views", "2", "--backbones", "resnet50",
            "--out", str(out), "--bootstrap", "200", "--seed", "1", "--no-progress", "--chunk", "4"]
    assert main(argv) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_evaluate_cli_writes_every_report_file_when_run_on_tiny_checkpoint(evaluated):
    out, metrics = evaluated
    for name in ("metrics.json", "report.md", "confusion_matrix.png", "roc.png", "predictions.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["images"] == 7 and metrics["class_counts"] == {c: 1 for c in CLASS_NAMES}
    assert [r["key"] for r in metrics["rows"]] == ["single:resnet50", "tta", "thresholds"]
    assert [r["views"] for r in metrics["rows"]] == [1, 2, 2]
    assert metrics["lesion_overlap"] == {"train": 0, "val": 0}
    report = (out / "report.md").read_text()
    assert "| + thresholds | 2 |" in report and "lesion-clean: yes" in report
    for row in metrics["rows"]:
        low, high = row["balanced_accuracy_ci"]
        assert low <= row["balanced_accuracy"] <= high
        assert np.array(row["confusion_matrix"]).sum() == 7


def test_evaluate_rows_equal_reference_pipeline_outputs_when_compared_per_view_count(artifacts, evaluated):

    from lesionserve.reference import ReferencePipeline
    from lesionserve.training.evaluate import predict

    out, metrics = evaluated
    samples = read_splits(artifacts / "splits.csv")["test"][:3]  # 3 of the 7: the forward passes are the cost
    images = [s.path.read_bytes() for s in samples]
    pipeline = ReferencePipeline.from_artifacts(artifacts, views=1, backbones=["resnet50"])
    one = pipeline.run(images)
    two_views = ReferencePipeline(pipeline.models, pipeline.calibration, views=2)
    two = two_views.run(images)
    # The probabilities themselves: a random network's argmax is nearly constant, so labels alone
    # could not tell a T=1 row from a T=2 row.
    pred = predict(two_views, samples, chunk_size=2, progress=False)
    np.testing.assert_allclose(pred.single, one.backbone_probs, atol=1e-6)
    np.testing.assert_allclose(pred.ensemble, one.probs, atol=1e-6)
    np.testing.assert_allclose(pred.tta, two.probs, atol=1e-6)
    assert not np.allclose(pred.tta, pred.ensemble, atol=1e-6)  # the two view counts really differ
    assert [CLASS_NAMES[i] for i in pred.decided] == two.labels
    with (out / "predictions.csv").open() as handle:
        written = np.array([[float(row[f"p_{c}"]) for c in CLASS_NAMES] for row in csv.DictReader(handle)])
    np.testing.assert_allclose(written[:3], two.probs, atol=2e-6)
    # The report's AUC is computed from those written probabilities.
    all_y = [s.label for s in read_splits(artifacts / "splits.csv")["test"]]
    rows = {r["key"]: r for r in metrics["rows"]}
    assert rows["tta"]["auc"]["MEL"] == pytest.approx(one_vs_rest_auc(all_y, written)[MEL], abs=1e-4)


def test_evaluation_samples_asks_for_split_file_when_test_has_none(tmp_path, artifacts):
    empty = tmp_path / "artifacts"
    empty.mkdir()
    with pytest.raises(EvaluationError, match="no split file at .*splits.csv; pass --splits"):
        evaluation_samples(empty, "test")
    no_test = tmp_path / "no_test.csv"
    write_splits(no_test, {k: v for k, v in read_splits(artifacts / "splits.csv").items() if k != "test"})
    with pytest.raises(EvaluationError, match="has no 'test' rows"):
        evaluation_samples(artifacts, "test", no_test)



def test_evaluation_samples_reads_split_file_recorded_in_config_when_artifacts_have_none(tmp_path, artifacts):
    moved = tmp_path / "artifacts"
    (moved / "resnet50").mkdir(parents=True)
    shutil.copy(artifacts / "resnet50" / "config.json", moved / "resnet50" / "config.json")
    (moved / "resnet50" / "checkpoint.pt").write_bytes(b"")  # only its presence is looked at here
    eval_set = evaluation_samples(moved, "val")
    assert eval_set.source == str((artifacts / "splits.csv").resolve())
    assert eval_set.samples == read_splits(artifacts / "splits.csv")["val"]
    check = eval_set.lesion_clean
    assert check["clean"] is True and "recorded in resnet50/config.json" in check["notes"][0]

# ------------------------------------------------------------------------------ evaluate --data


def write_jpeg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((48, 64, 3), 40 + 25 * shade, dtype=np.uint8))
    return path


def one_hot_row(image: str, label: int) -> list[str]:
    return [image, *("1.0" if i == label else "0.0" for i in range(len(CLASS_NAMES)))]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_official_test(root: Path, labels: list[int]) -> Path:
    """The ISIC 2018 Task 3 test set as distributed: Input folder + loose one-hot GroundTruth CSV."""
    for i, label in enumerate(labels):
        write_jpeg(root / "ISIC2018_Task3_Test_Input" / f"ISIC_9{i:06d}.jpg", label)
    write_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv", ["image", *CLASS_NAMES],
              [one_hot_row(f"ISIC_9{i:06d}", label) for i, label in enumerate(labels)])
    return root


@pytest.fixture(scope="module")
def training_split(artifacts):
    return read_splits(artifacts / "splits.csv")


def test_dataset_samples_reads_each_layout_when_detected_or_given(tmp_path, artifacts):
    official = make_official_test(tmp_path / "isic", [MEL, NV, BCC])
    write_jpeg(tmp_path / "ham" / "HAM10000_images_part_1" / "ISIC_8000001.jpg")
    write_jpeg(tmp_path / "ham" / "HAM10000_images_part_2" / "ISIC_8000002.jpg")
    write_csv(tmp_path / "ham" / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age"],
              [["HAM_8000001", "ISIC_8000001", "bkl", "histo", "60"],
               ["HAM_8000001", "ISIC_8000002", "bkl", "histo", "60"]])
    write_jpeg(tmp_path / "folders" / "df" / "d1.jpg")
    write_jpeg(tmp_path / "folders" / "VASC" / "v1.png")

    expected = {
        official: ("isic2018", [("ISIC_9000000", "MEL", None), ("ISIC_9000001", "NV", None),
                                ("ISIC_9000002", "BCC", None)]),
        tmp_path / "ham": ("ham10000", [("ISIC_8000001", "BKL", "HAM_8000001"),
                                        ("ISIC_8000002", "BKL", "HAM_8000001")]),
        tmp_path / "folders": ("folders", [("v1", "VASC", None), ("d1", "DF", None)]),  # folder name order
        artifacts.parent / "data": ("isic2018", None),  # what lesionserve.synthetic writes
    }
    for path, (layout, rows) in expected.items():
        detected = dataset_samples(path)
        assert detected.layout == layout and f"{layout} layout, detected" in detected.source
        given = dataset_samples(path, layout=layout)
        assert given.samples == detected.samples and f"{layout} layout, given" in given.source
        if rows is not None:
            assert [(s.image_id, CLASS_NAMES[s.label], s.lesion_id) for s in detected.samples] == rows
    assert len(dataset_samples(artifacts.parent / "data").samples) == 21


def test_dataset_samples_lists_what_it_looked_for_when_folder_empty_or_unknown(tmp_path):
    with pytest.raises(DatasetError) as empty:
        dataset_samples(tmp_path)
    message = str(empty.value)
    assert "cannot tell the dataset layout (the folder is empty)" in message
    for expected in ("isic2018: a *_GroundTruth/ folder or *_GroundTruth.csv", "ham10000: a .csv directly",
                     "'dx' column", "folders: sub-folders named after the classes (MEL, NV, BCC"):
        assert expected in message
    (tmp_path / "photos").mkdir()
    (tmp_path / "labels.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout \(found labels.txt, photos/\)"):
        dataset_samples(tmp_path)
    with pytest.raises(FileNotFoundError, match="data path not found: .*nowhere"):
        dataset_samples(tmp_path / "nowhere")


def test_dataset_samples_asks_which_set_when_official_splits_side_by_side(tmp_path):
    make_official_test(tmp_path, [MEL, NV])
    write_jpeg(tmp_path / "ISIC2018_Task3_Training_Input" / "ISIC_0000001.jpg")
    write_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
              ["image", *CLASS_NAMES], [one_hot_row("ISIC_0000001", DF)])
    with pytest.raises(EvaluationError, match=r"several ground-truth sets \(ISIC2018_Task3_Test_GroundTruth.csv, "
                                              r"ISIC2018_Task3_Training_GroundTruth\); pass --isic-split"):
        dataset_samples(tmp_path)
    test_set = dataset_samples(tmp_path, isic_split="test")
    assert [s.image_id for s in test_set.samples] == ["ISIC_9000000", "ISIC_9000001"]
    assert "test set" in test_set.source
    with pytest.raises(EvaluationError, match="--isic-split applies to the isic2018 layout only"):
        dataset_samples(tmp_path, layout="folders", isic_split="test")


def test_training_overlap_finds_every_train_and_val_image_when_evaluating_the_training_data(artifacts, training_split):
    samples = dataset_samples(artifacts.parent / "data").samples
    check = training_overlap(artifacts, ["resnet50"], samples)
    assert check["check"] == "image and lesion ids" and check["clean"] is False
    assert check["against"] == [str((artifacts / "splits.csv").resolve())] and check["notes"] == []
    for name in ("train", "val", "test"):
        assert check["overlap"][name]["images"] == len(training_split[name]) == check["overlap"][name]["split_images"]
        assert check["overlap"][name]["lesions"] == len({s.lesion_id for s in training_split[name]})
    text = lesion_clean_text(check)
    assert text.startswith("**NO**: shared with train: ") and "(not a leak)" in text


def test_training_overlap_catches_other_photograph_of_training_lesion_when_lesion_ids_known(
        tmp_path, artifacts, training_split):
    seen, other_photo = training_split["train"][0], training_split["val"][0]
    shutil.copy(seen.path, tmp_path / f"{seen.image_id}.jpg")  # a training image, same id
    write_jpeg(tmp_path / "ISIC_7000001.jpg")  # another photograph of a validation lesion
    write_jpeg(tmp_path / "ISIC_7000002.jpg")  # an unseen lesion
    rows = [[seen.image_id, CLASS_NAMES[seen.label].lower(), seen.lesion_id],
            ["ISIC_7000001", CLASS_NAMES[other_photo.label].lower(), other_photo.lesion_id],
            ["ISIC_7000002", "nv", "HAM_7000002"]]
    write_csv(tmp_path / "HAM10000_metadata.csv", ["image_id", "dx", "lesion_id"], rows)
    check = training_overlap(artifacts, ["resnet50"], dataset_samples(tmp_path).samples)
    assert check["check"] == "image and lesion ids" and check["clean"] is False
    assert check["overlap"]["train"]["images"] == 1 and check["overlap"]["train"]["lesions"] == 1
    assert check["overlap"]["val"]["images"] == 0 and check["overlap"]["val"]["lesions"] == 1
    assert check["overlap"]["train"]["examples"] == [seen.image_id]
    assert check["overlap"]["val"]["examples"] == [other_photo.lesion_id]  # no shared image: the lesion is named


def test_training_overlap_compares_image_ids_only_when_evaluated_images_have_no_lesion_ids(tmp_path, artifacts):
    data = make_official_test(tmp_path, [MEL, NV, VASC])
    check = training_overlap(artifacts, ["resnet50"], dataset_samples(data).samples)
    assert check["check"] == "image ids only" and check["clean"] is True
    assert "the evaluated images carry no lesion ids" in check["why"]
    assert all(o["images"] == 0 and o["lesions"] is None for o in check["overlap"].values())
    assert lesion_clean_text(check).startswith("yes: no evaluated image is in train (")


def test_training_overlap_says_why_no_check_when_run_records_no_split_file(tmp_path, artifacts):
    art = tmp_path / "artifacts"
    (art / "resnet50").mkdir(parents=True)
    check = training_overlap(art, ["resnet50"], [])
    assert check["check"] == "none" and check["clean"] is None
    assert "resnet50 has no readable config.json and its checkpoint.pt holds no config" in check["why"]
    (art / "resnet50" / "config.json").write_text(json.dumps({"backbone": "resnet50"}))
    check = training_overlap(art, ["resnet50"], [])
    assert "resnet50/config.json records no split file" in check["why"]
    assert lesion_clean_text(check).startswith("unknown: no check was possible (resnet50/config.json records no")


def test_recorded_split_file_falls_back_to_checkpoint_config_and_moved_artifacts_when_needed(tmp_path, artifacts):
    art = tmp_path / "moved"
    (art / "resnet50").mkdir(parents=True)
    shutil.copy(artifacts / "splits.csv", art / "splits.csv")
    # No config.json: the checkpoint's config entry names a split file that moved with the folder.
    torch.save({"format": "ignored here", "config": {"splits": str(tmp_path / "old" / "splits.csv")}},
               art / "resnet50" / "checkpoint.pt")
    source = recorded_split_file(art, "resnet50")
    assert source.path == art / "splits.csv" and source.moved
    assert "resnet50/checkpoint.pt (its config entry) records" in source.note and "which is gone" in source.note
    (art / "resnet50" / "metrics.json").write_text(json.dumps({"train_samples": 1, "val_samples": 2}))
    check = training_overlap(art, ["resnet50"], [])
    assert any("which is gone" in n for n in check["notes"])
    assert any("image counts differ (train 7 in the file, 1 in metrics.json" in n for n in check["notes"])


@pytest.mark.parametrize("layout", ["ham10000", "folders"])
def test_evaluate_cli_scores_dataset_and_reports_training_overlap_when_given_data(tmp_path, artifacts, training_split,
                                                                                  capsys, layout):
    seen = training_split["train"][0]  # a training image among the evaluated ones
    data = tmp_path / "external"
    if layout == "folders":
        (data / CLASS_NAMES[seen.label]).mkdir(parents=True)
        shutil.copy(seen.path, data / CLASS_NAMES[seen.label] / seen.path.name)
        unseen = write_jpeg(data / "NV" / "n1.jpg", 2)
    else:
        data.mkdir()
        shutil.copy(seen.path, data / seen.path.name)
        unseen = write_jpeg(data / "ISIC_7000009.jpg", 2)
        write_csv(data / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx"],
                  [[seen.lesion_id, seen.image_id, CLASS_NAMES[seen.label]], ["HAM_7000009", "ISIC_7000009", "nv"]])
    argv = ["--artifacts", str(artifacts), "--data", str(data), "--views", "1", "--bootstrap", "0", "--no-progress"]
    assert main(argv) == 0
    out = artifacts / "eval_external"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] is None and metrics["data"] == str(data) and metrics["layout"] == layout
    assert metrics["images"] == 2 and [r["key"] for r in metrics["rows"]] == ["single:resnet50", "thresholds"]
    check = metrics["lesion_clean"]
    assert check["check"] == ("image and lesion ids" if layout == "ham10000" else "image ids only")
    assert check["clean"] is False and check["overlap"]["train"]["images"] == 1
    assert metrics["image_overlap"]["train"] == 1
    report = (out / "report.md").read_text()
    assert f"# Evaluation: {data} ({layout} layout)" in report
    assert "lesion-clean: **NO**: shared with train: 1 image" in report and seen.image_id in report
    stdout = capsys.readouterr().out
    assert "lesion-clean: NO: shared with train" in stdout and f"wrote {out / 'report.md'}" in stdout
    with (out / "predictions.csv").open() as handle:
        assert sorted(row["image"] for row in csv.DictReader(handle)) == sorted([seen.image_id, unseen.stem])


def test_evaluate_cli_exits_with_layout_list_when_data_unrecognisable(tmp_path, artifacts, capsys):
    assert main(["--artifacts", str(artifacts), "--data", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "the folder is empty" in err and "isic2018:" in err and "folders:" in err


@pytest.mark.parametrize("extra, message", [
    (["--split", "test"], "argument --split: not allowed with argument --data"),
    (["--splits", "x.csv"], "--splits applies to --split"),
])
def test_evaluate_cli_refuses_split_options_when_data_given(tmp_path, artifacts, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--artifacts", str(artifacts), "--data", str(tmp_path), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_cli_refuses_layout_when_scoring_a_split(artifacts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--artifacts", str(artifacts), "--layout", "folders"])
    assert exit_info.value.code == 2 and "--layout and --isic-split apply to --data only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- multi-seed


def test_parse_passthrough_converts_types_when_options_follow_double_dash():
    options = multiseed.parse_passthrough(
        ["--epochs", "3", "--lr=1e-4", "--config", "r.yaml", "--amp", "--max-steps-per-epoch", "none", "--sizes", "1", "2"])
    assert options == {"epochs": 3, "lr": 1e-4, "config": "r.yaml", "amp": True, "max_steps_per_epoch": None,
                       "sizes": [1, 2]}
    with pytest.raises(ValueError, match="multiseed sets seed, split_seed itself"):
        multiseed.parse_passthrough(["--seed", "1", "--split-seed", "2"])


def fake_result(values: dict[str, tuple[float, float]]) -> dict:
    rows = []
    for key, (bacc, malignant) in values.items():
        rows.append({"key": key, "title": key, "views": 8 if key != "single:resnet50" else 1, "fusion": "weighted",
                     "decision": "argmax", "balanced_accuracy": bacc, "malignant_balanced_accuracy": malignant,
                     "macro_auc": 0.9, "sensitivity": {"MEL": 0.5}})
    return {"split": "test", "views": 8, "rows": rows}


def test_multiseed_reports_mean_and_std_per_row_when_train_and_calibrate_are_mocked(tmp_path, monkeypatch):
    data = tmp_path / "data"
    generate_dataset(data, size=(64, 48), seed=0, class_counts={c: 4 for c in CLASS_NAMES}, progress=False)
    trained, calibrated = [], []

    def fake_train(config):  # what the real one does with the split keys, without the training
        Path(config["out"]).mkdir(parents=True, exist_ok=True)
        load_or_create_splits(config["splits"], load_dataset(config["data"]), val_fraction=config["val_fraction"],
                              test_fraction=config["test_fraction"], seed=config["split_seed"])
        trained.append(config)
        return {}

    monkeypatch.setitem(sys.modules, "lesionserve.training.train", types.SimpleNamespace(train=fake_train))
    monkeypatch.setitem(sys.modules, "lesionserve.training.calibrate",
                        types.SimpleNamespace(calibrate=lambda artifacts, views: calibrated.append((artifacts, views))))
    per_seed = {0: {"single:resnet50": (0.60, 0.50), "thresholds": (0.70, 0.80)},
                1: {"single:resnet50": (0.64, 0.40), "thresholds": (0.74, 0.90)},
                2: {"single:resnet50": (0.68, 0.60), "thresholds": (0.78, 1.00)}}
    evaluated = []

    def fake_evaluate(seed_dir, **kwargs):
        evaluated.append((seed_dir, kwargs))
        return fake_result(per_seed[int(Path(seed_dir).name.split("_")[1])])

    monkeypatch.setattr(multiseed, "evaluate", fake_evaluate)
    out = tmp_path / "ms"
    argv = ["--data", str(data), "--out", str(out), "--seeds", "0", "1", "2", "--backbones", "resnet50",
            "--views", "4", "--bootstrap", "10", "--val", "0.25", "--test", "0.3",
            "--", "--epochs", "2", "--batch-size", "8"]
    assert multiseed.main(argv) == 0

    assert [(c["seed"], c["backbone"], c["epochs"], c["batch_size"]) for c in trained] == \
        [(0, "resnet50", 2, 8), (1, "resnet50", 2, 8), (2, "resnet50", 2, 8)]
    assert all(Path(c["splits"]) == out / f"seed_{c['seed']}" / "splits.csv" for c in trained)
    assert [(c["split_seed"], c["val_fraction"], c["test_fraction"]) for c in trained] == \
        [(0, 0.25, 0.3), (1, 0.25, 0.3), (2, 0.25, 0.3)]
    assert [views for _, views in calibrated] == [4, 4, 4]
    assert all(kwargs["views"] == 4 and kwargs["split"] == "test" for _, kwargs in evaluated)
    # Each seed's split is its own (seeded by the seed), and none leaks a lesion.
    splits = [read_splits(out / f"seed_{s}" / "splits.csv") for s in range(3)]
    assert splits[0] != splits[1] and all(lesion_overlap(split) == {} for split in splits)

    summary = json.loads((out / "summary.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["thresholds"]["balanced_accuracy"]["mean"] == pytest.approx(0.74)
    assert rows["thresholds"]["balanced_accuracy"]["std"] == pytest.approx(0.04)  # sample std of .70 .74 .78
    assert rows["thresholds"]["malignant_balanced_accuracy"]["mean"] == pytest.approx(0.90)
    assert rows["thresholds"]["malignant_balanced_accuracy"]["std"] == pytest.approx(0.10)
    assert rows["single:resnet50"]["balanced_accuracy"]["per_seed"] == [0.60, 0.64, 0.68]
    markdown = (out / "summary.md").read_text()
    assert "0.740 ± 0.040" in markdown and "0.900 ± 0.100" in markdown


def test_multiseed_resume_skips_finished_backbones_when_marker_present(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "lesionserve.training.train", types.SimpleNamespace(
        train=lambda config: (Path(config["out"]).mkdir(parents=True, exist_ok=True), calls.append(config))))
    seed_dir = tmp_path / "seed_0"
    splits = tmp_path / "splits.csv"
    multiseed.train_seed(seed_dir, 0, "data", ["resnet50", "densenet121"], splits, {}, resume=True)
    multiseed.train_seed(seed_dir, 0, "data", ["resnet50", "densenet121"], splits, {}, resume=True)
    assert [c["backbone"] for c in calls] == ["resnet50", "densenet121"]
