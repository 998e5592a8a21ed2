"""The calibration file: fusion weights per backbone and class-specific decision thresholds.

Written by ``lesionserve.training.calibrate``; read by the reference pipeline and the Triton ``fusion``
and ``threshold`` models. Which members and classes it must cover is the pipeline's declaration
(:meth:`Calibration.check`, called at assembly). The decision rule lives here too so every consumer applies the same one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lesionserve.arrays import array_ops
from lesionserve.spec import CLASS_NAMES


class CalibrationError(ValueError):
    """The calibration file is missing, malformed or inconsistent with the pipeline."""


def exceeds(probability: Any, threshold: float) -> Any:
    """THE comparison used for thresholds, in calibration and in decisions alike: strictly greater.

    numpy arrays and floats give numpy booleans; torch tensors give a bool tensor on their device.
    """
    return array_ops(probability).greater(probability, threshold)


@dataclass(frozen=True)
class Calibration:
    """Fusion weights (sum to 1) and per-class thresholds applied in ``threshold_order``.

    Decision: argmax of the fused probabilities, then for each class in ``threshold_order`` whose
    probability exceeds its threshold, that class; later classes win (the seed's order is AKIEC
    then MEL, so MEL wins).
    """

    weights: Mapping[str, float]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    threshold_order: Sequence[str] = ()
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(not np.isfinite(w) or w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise CalibrationError(f"weights must be finite, non-negative and not all zero: {dict(self.weights)}")
        for name, theta in self.thresholds.items():
            if not 0.0 < theta < 1.0:
                raise CalibrationError(f"threshold for {name} must lie in (0, 1), got {theta}")
        if sorted(self.threshold_order) != sorted(self.thresholds):
            raise CalibrationError(
                f"threshold_order {list(self.threshold_order)} must list exactly the thresholded classes "
                f"{sorted(self.thresholds)}"
            )

    def check(self, members: Sequence[str], class_names: Sequence[str] = CLASS_NAMES) -> "Calibration":
        """Refuse a file that does not fit a pipeline: weights for exactly ``members``, thresholds
        only for ``class_names``. Returns self."""
        problems = []
        if set(self.weights) != set(members):
            problems.append(f"weights are for {sorted(self.weights)}, the pipeline's members are {sorted(members)}")
        unknown = sorted(set(self.thresholds) - set(class_names))
        if unknown:
            problems.append(f"thresholds for unknown classes {unknown}; classes: {', '.join(class_names)}")
        if problems:
            raise CalibrationError("calibration does not fit the pipeline: " + "; ".join(problems))
        return self

    def weight_vector(self, backbones: Sequence[str]) -> np.ndarray:
        """Weights for ``backbones`` in that order, normalised to sum to 1."""
        missing = [b for b in backbones if b not in self.weights]
        if missing:
            raise CalibrationError(f"no fusion weight for backbones {missing}")
        w = np.asarray([self.weights[b] for b in backbones], dtype=np.float64)
        return (w / w.sum()).astype(np.float32)

    def decide(self, probs: Any, class_names: Sequence[str] = CLASS_NAMES) -> tuple[Any, Any]:
        """Apply the decision rule to N x C fused probabilities (numpy array or torch tensor);
        ``class_names`` is the class axis (the pipeline's).

        Returns (label indices N int64, fired N x C bool: which class thresholds fired per image),
        of the same kind as ``probs`` and on its device.
        """
        xp = array_ops(probs)
        labels = xp.argmax(probs, axis=1)
        fired = xp.zeros(probs.shape, "bool", like=probs)
        for name in self.threshold_order:
            c = list(class_names).index(name)
            fired[:, c] = exceeds(probs[:, c], self.thresholds[name])
            labels = xp.where(fired[:, c], c, labels)
        return xp.astype(labels, "int64"), fired

    def to_json(self) -> dict:
        return {
            "weights": dict(self.weights),
            "thresholds": dict(self.thresholds),
            "threshold_order": list(self.threshold_order),
            "meta": dict(self.meta),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path}")
        try:
            raw = json.loads(path.read_text())
            return cls(
                weights={k: float(v) for k, v in raw["weights"].items()},
                thresholds={k: float(v) for k, v in raw.get("thresholds", {}).items()},
                threshold_order=tuple(raw.get("threshold_order", ())),
                meta=raw.get("meta", {}),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed calibration file {path}: {exc!r}") from None

    @classmethod
    def uniform(cls, backbones: Sequence[str]) -> "Calibration":
        """Equal weights and no thresholds: the pipeline before any calibration."""
        return cls(weights={b: 1.0 / len(backbones) for b in backbones}, meta={"source": "uniform"})
