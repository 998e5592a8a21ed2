"""The decision rule and threshold calibration on constructed cases where the answer is known."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lesionserve.calibration import Calibration, CalibrationError, exceeds
from lesionserve.spec import CLASS_NAMES
from lesionserve.training.calibrate import THETA_GRID, calibrate_thresholds, fusion_weights, select_threshold, sensitivity_specificity

MEL, NV, AKIEC = (CLASS_NAMES.index(c) for c in ("MEL", "NV", "AKIEC"))
SEED_RULE = dict(
    weights={"resnet50": 1.0, "densenet121": 1.0, "efficientnet_b3": 1.0},
    thresholds={"AKIEC": 0.3, "MEL": 0.2},
    threshold_order=("AKIEC", "MEL"),
)


def _probs(**by_class: float) -> np.ndarray:
    p = np.zeros(7, np.float32)
    for name, value in by_class.items():
        p[CLASS_NAMES.index(name)] = value
    p[NV] += 1.0 - p.sum()
    return p


def test_decide_uses_argmax_when_no_threshold_fires():
    labels, fired = Calibration(**SEED_RULE).decide(np.stack([_probs(MEL=0.1, AKIEC=0.1)]))
    assert labels[0] == NV and not fired.any()


def test_decide_picks_mel_over_akiec_when_both_fire():
    labels, fired = Calibration(**SEED_RULE).decide(np.stack([_probs(MEL=0.25, AKIEC=0.35)]))
    assert labels[0] == MEL and fired[0, MEL] and fired[0, AKIEC]


def test_decide_picks_akiec_when_only_akiec_fires():
    labels, _ = Calibration(**SEED_RULE).decide(np.stack([_probs(MEL=0.05, AKIEC=0.31)]))
    assert labels[0] == AKIEC


def test_decide_does_not_fire_when_probability_equals_threshold():
    labels, fired = Calibration(**SEED_RULE).decide(np.stack([_probs(MEL=0.2)]))
    assert labels[0] == NV and not fired[0, MEL]  # one operator everywhere: strictly greater


def test_exceeds_and_sensitivity_agree_when_score_equals_theta():
    scores, positive = np.array([0.5, 0.5]), np.array([True, False])
    assert sensitivity_specificity(scores, positive, 0.5) == (0.0, 1.0)
    assert not exceeds(0.5, 0.5)


def test_select_threshold_returns_highest_theta_meeting_floors_when_separable():
    # Positives at 0.6..0.9, negatives at 0.1..0.4: every theta in [0.40, 0.60) separates perfectly.
    scores = np.array([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.4])
    positive = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    theta, how = select_threshold(scores, positive, 0.85, 0.85)
    assert how == "met"
    assert theta == pytest.approx(THETA_GRID[THETA_GRID < 0.6].max())


def test_select_threshold_relaxes_specificity_when_floor_unreachable():
    # Sensitivity 1.0 needs theta < 0.2, which leaves specificity 0.6 (< 0.85 but >= 0.50).
    scores = np.array([0.2, 0.9, 0.1, 0.1, 0.1, 0.3, 0.3])
    positive = np.array([1, 1, 0, 0, 0, 0, 0], bool)
    theta, how = select_threshold(scores, positive, 1.0, 0.85)
    assert how.startswith("relaxed")
    assert theta == pytest.approx(THETA_GRID[THETA_GRID < 0.2].max())


def test_select_threshold_falls_back_to_half_when_nothing_qualifies():
    scores = np.array([0.1, 0.9, 0.9, 0.9])
    positive = np.array([1, 0, 0, 0], bool)
    assert select_threshold(scores, positive, 1.0, 0.9) == (0.5, "fallback 0.5 (no theta met the floors)")


def test_calibrate_thresholds_recovers_known_cut_when_distributions_are_constructed():
    rng = np.random.default_rng(0)
    labels = np.array([MEL] * 100 + [NV] * 300)
    probs = np.full((400, 7), 0.01, np.float32)
    probs[:100, MEL] = rng.uniform(0.45, 0.95, 100)  # melanomas score above 0.45
    probs[100:, MEL] = rng.uniform(0.0, 0.40, 300)  # others below 0.40
    thresholds, notes = calibrate_thresholds(probs, labels)
    assert notes["MEL"] == "met"
    # The seed rule keeps the HIGHEST theta with sensitivity >= 0.85: just below the 15th percentile
    # of melanoma scores, giving up (at most) 15% of melanomas for specificity.
    theta = thresholds["MEL"]
    sens = lambda t: float((probs[:100, MEL] > t).mean())  # noqa: E731
    next_theta = THETA_GRID[THETA_GRID > theta].min()
    assert sens(theta) >= 0.85 > sens(next_theta)
    assert float((probs[100:, MEL] <= theta).mean()) == 1.0


def test_fusion_weights_are_proportional_to_bacc_when_given():
    w = fusion_weights({"a": 0.8, "b": 0.6, "c": 0.6})
    assert w == pytest.approx({"a": 0.4, "b": 0.3, "c": 0.3})


def test_calibration_round_trips_when_saved_and_loaded(tmp_path):
    c = Calibration(**SEED_RULE, meta={"views": 8})
    c.save(tmp_path / "c.json")
    loaded = Calibration.load(tmp_path / "c.json")
    assert loaded.thresholds == c.thresholds and tuple(loaded.threshold_order) == ("AKIEC", "MEL")
    np.testing.assert_allclose(loaded.weight_vector(["resnet50", "densenet121", "efficientnet_b3"]), [1 / 3] * 3)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"weights": {"resnet50": -1.0}}, "non-negative"),
        ({"weights": {"resnet50": 1.0}, "thresholds": {"MEL": 1.5}, "threshold_order": ["MEL"]}, r"\(0, 1\)"),
        ({"weights": {"resnet50": 1.0}, "thresholds": {"MEL": 0.5}}, "threshold_order"),
        ({"thresholds": {}}, "malformed"),
    ],
)
def test_calibration_load_raises_precise_error_when_file_is_invalid(tmp_path, payload, fragment):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(CalibrationError, match=fragment):
        Calibration.load(path)


def test_calibration_load_raises_when_file_missing(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        Calibration.load(tmp_path / "nope.json")


def test_calibration_check_refuses_a_file_for_other_members_or_classes_naming_both():
    c = Calibration(weights={"vgg": 1.0}, thresholds={"XYZ": 0.3}, threshold_order=("XYZ",))
    with pytest.raises(CalibrationError) as info:
        c.check(["resnet50", "densenet121"])
    assert "weights are for ['vgg'], the pipeline's members are ['densenet121', 'resnet50']" in str(info.value)
    assert "thresholds for unknown classes ['XYZ']" in str(info.value)
    assert Calibration(weights={"a": 1.0}, thresholds={"X": 0.4}, threshold_order=("X",)).check(["a"], ("X", "Y")).weights == {"a": 1.0}


def test_decide_reads_the_pipelines_class_axis():
    c = Calibration(weights={"a": 1.0}, thresholds={"Y": 0.3}, threshold_order=("Y",))
    labels, fired = c.decide(np.array([[0.6, 0.4], [0.8, 0.2]], dtype=np.float32), class_names=("X", "Y"))
    assert labels.tolist() == [1, 0] and fired.tolist() == [[False, True], [False, False]]
