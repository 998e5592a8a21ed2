"""The in-process baselines the served ensemble is compared with.

- ``ReferencePipeline`` (lesionserve.reference): PyTorch eager, the seed's way of running the models.
- ``OrtPipeline``: the same steps with the backbones in ONNX Runtime, what a user without Triton
  would write. Both share preprocessing, views, fusion and decisions with the ensemble.
- ``BackboneBound``: the backbones alone on ready-made views: no decode, no fan-out, no fusion,
  no process boundary. No pipeline running these backbones on these cores can beat it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from lesionserve.calibration import Calibration
from lesionserve.onnx_session import make_session, run_in_chunks
from lesionserve.preprocessing import preprocess_batch
from lesionserve.reference import ReferencePipeline
from lesionserve.pipelines import LESION_ENSEMBLE, EnsemblePipeline
from lesionserve.views import make_views


def onnx_sessions(artifacts: Path, threads: int, backbones: Sequence[str] = LESION_ENSEMBLE.member_names) -> dict[str, ort.InferenceSession]:
    """One session per backbone over ``<artifacts>/<backbone>/model.onnx``, configured as served for
    classification (the graph pruned to its logits)."""
    from lesionserve.spec import BACKBONE_OUTPUT

    return {name: make_session(Path(artifacts) / name / "model.onnx", threads, outputs=[BACKBONE_OUTPUT])
            for name in backbones}


def input_size(session: ort.InferenceSession) -> int:
    """The square side length the exported model expects (N x 3 x S x S)."""
    return int(session.get_inputs()[0].shape[-1])


class OrtPipeline(ReferencePipeline):
    """``ReferencePipeline`` with ONNX Runtime sessions in place of the PyTorch modules."""

    @staticmethod
    def prepare(model: ort.InferenceSession) -> ort.InferenceSession:
        return model

    def backbone_logits(self, name: str, views: np.ndarray) -> np.ndarray:
        return run_in_chunks(self.models[name], views, self.batch_size)

    @classmethod
    def from_onnx(cls, artifacts: Path, views: int, threads: int, batch_size: int = 64,
                  pipeline: EnsemblePipeline = LESION_ENSEMBLE) -> "OrtPipeline":
        sessions = onnx_sessions(artifacts, threads, pipeline.member_names)
        sizes = {name: input_size(s) for name, s in sessions.items()}
        calibration = Calibration.load(Path(artifacts) / "calibration.json")
        return cls(sessions, calibration, views=views, input_sizes=sizes, batch_size=batch_size, pipeline=pipeline)


def seconds_per_view(session: ort.InferenceSession, views: np.ndarray, batch: int, repeats: int) -> float:
    """Median over ``repeats`` of one pass over ``views`` in runs of ``batch`` rows, per view."""
    run_in_chunks(session, views[:batch], batch)  # warm-up: first runs of a shape allocate
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_in_chunks(session, views, batch)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / len(views)


class BackboneBound:
    """Seconds per view of each backbone alone, on the views a request would produce, at the best
    run batch: per-view cost depends on the batch on CPU, so every candidate is timed."""

    #: Run batches tried (those up to the number of views); each is timed on at least MIN_VIEWS views.
    #: 32 and 64 are left out: on CPU they were dearer per view for all three backbones
    #: (benchmarks/RESULTS.md, "Run batch"), and timing them costs the most.
    CANDIDATES = (1, 4, 8, 16)
    MIN_VIEWS = 16

    def __init__(self, artifacts: Path, threads: int) -> None:
        self.sessions = onnx_sessions(artifacts, threads)

    def seconds_per_view(self, images: Sequence[bytes], views: int, repeats: int = 1) -> dict[str, float]:
        """Per backbone: the lowest over candidate run batches of the median over ``repeats`` of
        (seconds for a pass over the views in runs of that batch) / views."""
        sizes = {name: input_size(s) for name, s in self.sessions.items()}
        pixels = preprocess_batch(list(images), set(sizes.values()))
        out = {}
        for name, session in self.sessions.items():
            all_views = make_views(pixels[sizes[name]], views)
            best = float("inf")
            for batch in [b for b in self.CANDIDATES if b <= len(all_views)] or [len(all_views)]:
                x = np.resize(all_views, (max(batch, min(self.MIN_VIEWS, len(all_views))), *all_views.shape[1:]))
                best = min(best, seconds_per_view(session, x, batch, repeats))
            out[name] = best
        return out
