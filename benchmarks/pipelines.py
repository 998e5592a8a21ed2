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

from export.checks import ort_logits
from lesionserve.calibration import Calibration
from lesionserve.onnx_session import make_session
from lesionserve.preprocessing import preprocess_batch
from lesionserve.reference import ReferencePipeline
from lesionserve.spec import BACKBONE_NAMES
from lesionserve.views import make_views


def onnx_sessions(artifacts: Path, threads: int, backbones: Sequence[str] = BACKBONE_NAMES) -> dict[str, ort.InferenceSession]:
    """One session per backbone over ``<artifacts>/<backbone>/model.onnx``, configured as served."""
    return {name: make_session(Path(artifacts) / name / "model.onnx", threads) for name in backbones}


def input_size(session: ort.InferenceSession) -> int:
    """The square side length the exported model expects (N x 3 x S x S)."""
    return int(session.get_inputs()[0].shape[-1])


class OrtPipeline(ReferencePipeline):
    """``ReferencePipeline`` with ONNX Runtime sessions in place of the PyTorch modules."""

    @staticmethod
    def prepare(model: ort.InferenceSession) -> ort.InferenceSession:
        return model

    def backbone_logits(self, name: str, views: np.ndarray) -> np.ndarray:
        return ort_logits(self.models[name], views, self.batch_size)

    @classmethod
    def from_onnx(cls, artifacts: Path, views: int, threads: int, batch_size: int = 64) -> "OrtPipeline":
        sessions = onnx_sessions(artifacts, threads)
        sizes = {name: input_size(s) for name, s in sessions.items()}
        calibration = Calibration.load(Path(artifacts) / "calibration.json")
        return cls(sessions, calibration, views=views, input_sizes=sizes, batch_size=batch_size)


class BackboneBound:
    """Seconds per view of each backbone alone, measured on the views a request would produce."""

    def __init__(self, artifacts: Path, threads: int) -> None:
        self.sessions = onnx_sessions(artifacts, threads)

    def seconds_per_view(self, images: Sequence[bytes], views: int, repeats: int = 3) -> dict[str, float]:
        """Median over ``repeats`` of one ORT run over all views of ``images`` (one batch), per view."""
        sizes = {name: input_size(s) for name, s in self.sessions.items()}
        pixels = preprocess_batch(list(images), set(sizes.values()))
        out = {}
        for name, session in self.sessions.items():
            batch = make_views(pixels[sizes[name]], views)
            feed = {session.get_inputs()[0].name: batch}
            session.run(None, feed)  # warm-up: first runs allocate and pick kernels
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t0)
            out[name] = float(np.median(times)) / len(batch)
        return out
