"""The one way this project opens an ONNX Runtime CPU session.

Used by the Triton backbone models, the export checks and the benchmarks, so that what is measured
standalone is configured exactly like what is served.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort


def graph_outputs(path: str | Path) -> list[str]:
    """The output names of the ONNX graph at ``path``, in order (read without building a session)."""
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def pruned_graph(path: str | Path, outputs: Sequence[str]) -> bytes:
    """The graph at ``path`` keeping only ``outputs`` and the nodes and weights they depend on.

    ORT's inference builds run every node whatever is fetched (microsoft/onnxruntime#16483), so a
    graph that can also explain (output ``cams``) would make every classification pay for the maps;
    pruned, it is the classifier alone again.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    unknown = sorted(set(outputs) - {o.name for o in graph.output})
    if unknown:
        raise ValueError(f"{path} has no output {', '.join(unknown)}; outputs: {', '.join(o.name for o in graph.output)}")
    needed, kept = set(outputs), []
    for node in reversed(graph.node):  # nodes are stored in topological order
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    for container, items in ((graph.node, kept[::-1]),
                             (graph.output, [o for o in graph.output if o.name in outputs]),
                             (graph.initializer, [i for i in graph.initializer if i.name in needed])):
        items = list(items)
        del container[:]
        container.extend(items)
    return model.SerializeToString()


def make_session(path: str | Path, threads: int = 0, spinning: bool = True,
                 outputs: Sequence[str] | None = None) -> ort.InferenceSession:
    """CPU session over ``path`` (over ``pruned_graph(path, outputs)`` when ``outputs`` are named).

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
    model = str(path) if outputs is None else pruned_graph(path, outputs)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_outputs_in_chunks(session: ort.InferenceSession, x: np.ndarray, chunk: int, names: list[str]) -> list[np.ndarray]:
    """The session's outputs ``names`` over ``x``, ``chunk`` rows per run.

    Fewer names means fewer tensors copied out, not less computed: ORT runs the whole graph
    whatever is fetched (a session over ``pruned_graph`` computes less).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    name_in = session.get_inputs()[0].name
    parts = [session.run(names, {name_in: x[i : i + chunk]}) for i in range(0, len(x), chunk)]
    return [p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts)]


def run_in_chunks(session: ort.InferenceSession, x: np.ndarray, chunk: int) -> np.ndarray:
    """The session's first output over ``x``, ``chunk`` rows per run.

    On CPU, per-row cost rises with the batch once activations leave the caches (measured in
    benchmarks/RESULTS.md: EfficientNet-B3@300 is 27% dearer per view at 64 rows than at 4), and
    memory grows with it; small chunks give the same results for less.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    parts = [session.run([name_out], {name_in: x[i : i + chunk]})[0] for i in range(0, len(x), chunk)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
