"""Agreement between a reference and a faster implementation: argmax agreement and probability gap.

Used by the TensorRT engine check (engine vs ONNX Runtime) and the GPU proofs (GPU variant vs the
CPU reference pipeline). Plain numpy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lesionserve.fusion import softmax

#: The issue's target for FP16 engines: at least 99.5 % same top class ...
DEFAULT_MIN_AGREEMENT = 0.995
#: ... and no class probability more than 0.01 away.
DEFAULT_MAX_PROB_DIFF = 1e-2


class ParityError(AssertionError):
    """A candidate disagrees with its reference beyond the stated tolerance."""


@dataclass(frozen=True)
class ParityReport:
    rows: int
    argmax_agreement: float
    max_prob_diff: float
    min_agreement: float
    max_prob_tolerance: float

    @property
    def passed(self) -> bool:
        return self.argmax_agreement >= self.min_agreement and self.max_prob_diff <= self.max_prob_tolerance

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"argmax agreement {self.argmax_agreement:.2%} (>= {self.min_agreement:.1%}), "
            f"max |prob diff| {self.max_prob_diff:.2e} (<= {self.max_prob_tolerance:.0e}) over {self.rows} rows: {verdict}"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def check(self, what: str) -> "ParityReport":
        """Return self, or raise ParityError naming ``what`` when outside tolerance."""
        if not self.passed:
            raise ParityError(f"{what}: {self.summary()}")
        return self


def compare_probabilities(
    reference: np.ndarray,
    candidate: np.ndarray,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_prob_diff: float = DEFAULT_MAX_PROB_DIFF,
) -> ParityReport:
    """Compare two N x C probability arrays row by row."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) == 0:
        raise ValueError(f"expected two equal non-empty N x C arrays, got {reference.shape} and {candidate.shape}")
    return ParityReport(
        rows=len(reference),
        argmax_agreement=float((reference.argmax(1) == candidate.argmax(1)).mean()),
        max_prob_diff=float(np.abs(reference - candidate).max()),
        min_agreement=min_agreement,
        max_prob_tolerance=max_prob_diff,
    )


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_prob_diff: float = DEFAULT_MAX_PROB_DIFF,
) -> ParityReport:
    """Compare two N x C logit arrays through their softmax probabilities."""
    return compare_probabilities(softmax(np.asarray(reference)), softmax(np.asarray(candidate)), min_agreement, max_prob_diff)


#: Share of pixels whose mask (logit above the threshold's logit) must agree, as the segmenter's export check.
DEFAULT_MIN_MASK_AGREEMENT = 0.999


@dataclass(frozen=True)
class MaskParityReport:
    """Agreement of two segmenters' masks (the decision served), with the largest logit gap for information."""

    rows: int
    pixel_agreement: float
    max_logit_diff: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.pixel_agreement >= self.min_agreement

    def summary(self) -> str:
        return (f"masks agree on {self.pixel_agreement:.4%} of pixels (>= {self.min_agreement:.1%}), max |logit diff| "
                f"{self.max_logit_diff:.2e} over {self.rows} images: {'ok' if self.passed else 'FAILED'}")

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_masks(reference: np.ndarray, candidate: np.ndarray, threshold: float,
                  min_agreement: float = DEFAULT_MIN_MASK_AGREEMENT) -> MaskParityReport:
    """Compare two N x 1 x S x S logit arrays through their masks (probability > ``threshold``)."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.ndim != 4 or len(reference) == 0:
        raise ValueError(f"expected two equal non-empty N x 1 x S x S arrays, got {reference.shape} and {candidate.shape}")
    logit = float(np.log(threshold / (1 - threshold)))
    return MaskParityReport(len(reference), float(((reference > logit) == (candidate > logit)).mean()),
                            float(np.abs(reference - candidate).max()), min_agreement)


#: FP16 detector heads against FP32: class scores within this, box coordinates within this share of the canvas.
DEFAULT_MAX_SCORE_DIFF = 2e-2
DEFAULT_MAX_BOX_FRACTION = 1e-2


@dataclass(frozen=True)
class DetectorParityReport:
    """Agreement of two detector heads ((4 + C) x anchors per image): class scores and box coordinates."""

    rows: int
    max_score_diff: float
    max_box_diff: float  # pixels on the letterboxed canvas
    max_score_tolerance: float
    max_box_tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_score_diff <= self.max_score_tolerance and self.max_box_diff <= self.max_box_tolerance

    def summary(self) -> str:
        return (f"max |score diff| {self.max_score_diff:.2e} (<= {self.max_score_tolerance:.0e}), max |box diff| "
                f"{self.max_box_diff:.2f} px (<= {self.max_box_tolerance:.2f}) over {self.rows} images: "
                f"{'ok' if self.passed else 'FAILED'}")

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_detector_heads(reference: np.ndarray, candidate: np.ndarray, imgsz: int,
                           max_score_diff: float = DEFAULT_MAX_SCORE_DIFF,
                           max_box_fraction: float = DEFAULT_MAX_BOX_FRACTION) -> DetectorParityReport:
    """Compare two B x (4 + C) x A head outputs: scores everywhere, boxes where either scores > 0.05
    (boxes of empty anchors are meaningless and may differ freely)."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.ndim != 3 or len(reference) == 0:
        raise ValueError(f"expected two equal non-empty B x (4 + C) x A arrays, got {reference.shape} and {candidate.shape}")
    scores = np.abs(reference[:, 4:] - candidate[:, 4:])
    live = np.maximum(reference[:, 4:].max(1), candidate[:, 4:].max(1)) > 0.05  # B x A
    boxes = np.abs(reference[:, :4] - candidate[:, :4]).max(1)  # B x A
    return DetectorParityReport(len(reference), float(scores.max()), float(boxes[live].max()) if live.any() else 0.0,
                                max_score_diff, max_box_fraction * imgsz)
