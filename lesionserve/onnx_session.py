"""The one way this project opens an ONNX Runtime CPU session.

Used by the Triton backbone models, the export checks and the benchmarks, so that what is measured
standalone is configured exactly like what is served.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def make_session(path: str | Path, threads: int = 0, spinning: bool = True) -> ort.InferenceSession:
    """CPU session over ``path``.

    ``threads``: intra-op threads; 0 lets ORT use every core. Capped in serving because several
    model instances share few cores and oversubscription costs more than it gains.
    ``spinning``: whether idle intra-op threads busy-wait for work. Off where several sessions
    share the cores, so an idle session's spinning threads do not steal them from a busy one.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = ORT decides), got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
