"""Evaluation: metrics on hand-computed cases, the end-to-end report on tiny checkpoints, multi-seed aggregation."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lesionserve.calibration import Calibration
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.spec import CLASS_NAMES
from lesionserve.training import multiseed
from lesionserve.training.data import load_dataset
from lesionserve.training.evaluate import EvaluationError, evaluation_samples, main, score
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
    write_splits(art / "splits.csv", make_splits(load_dataset(root / "data"), 0.3, 0.3, seed=0))
    torch.manual_seed(0)
    save_checkpoint(art / "resnet50" / "checkpoint.pt", "resnet50", create_backbone("resnet50"))
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
    import csv

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
