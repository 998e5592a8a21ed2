"""What the export stages check their output against: served-like inputs and the ONNX Runtime reference.

No torch here: the TensorRT engine builder runs in NVIDIA's TensorRT image, which has no PyTorch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from lesionserve.architectures import IMAGENET, Normalization
from lesionserve.onnx_session import make_session, run_in_chunks
from lesionserve.preprocessing import preprocess_rgb
from lesionserve.spec import CLASS_NAMES


def check_batch(input_size: int, batch: int = 3, seed: int = 0, normalization: Normalization = IMAGENET) -> np.ndarray:
    """Synthetic lesions through the shared preprocessing (the model's own statistics): inputs like the ones served.

    Uniform noise is no good here: trained networks map it to logits in the thousands, where
    float32 summation order alone moves logits by tens and the comparison says nothing.
    """
    from lesionserve.synthetic import render_lesion

    rng = np.random.default_rng(seed)
    images = [render_lesion(CLASS_NAMES[i % len(CLASS_NAMES)], rng, (600, 450)) for i in range(batch)]
    return np.stack([preprocess_rgb(image, input_size, normalization) for image in images])


#: ONNX metadata key (written by onnx_export) holding the normalisation the model was trained with,
#: in Normalization.to_parameter form: later stages check inputs with the same statistics.
NORMALIZATION_KEY = "lesionserve.normalization"


def onnx_normalization(session: ort.InferenceSession) -> Normalization:
    """The statistics an exported model was trained with (its metadata); ImageNet for files
    exported before the metadata existed (every architecture then used ImageNet)."""
    meta = session.get_modelmeta().custom_metadata_map
    value = meta.get(NORMALIZATION_KEY)
    name = meta.get(NORMALIZATION_KEY + ".name", "onnx")
    return Normalization.from_parameter(name, value) if value else IMAGENET


def ort_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """CPU ONNX Runtime session, configured as served; ``threads`` = 0 lets ORT decide."""
    return make_session(path, threads)


def ort_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of ``x`` in batches of at most ``batch`` rows (bounded memory for large check sets)."""
    return run_in_chunks(session, x, batch)
