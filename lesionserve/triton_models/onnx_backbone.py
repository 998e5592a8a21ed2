"""CPU backbone: ONNX Runtime on ``<version>/model.onnx`` inside the python backend.

Triton's dynamic batcher hands ``execute`` several requests at once; they run as one ORT batch.
"""
import contextlib

import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.core_lock import CoreLock, lock_path
from lesionserve.onnx_session import graph_outputs, make_session, run_outputs_in_chunks
from lesionserve.triton_config import flag, parameter, parse_args_config, version_dir, weights_file


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        path = weights_file(
            args, config, "onnx_file", "model.onnx", "copy exported weights in with `python -m export.assemble --artifacts DIR`"
        )
        self.path = path
        self.threads = int(parameter(config, "intra_op_threads", "1"))
        self.spinning = flag(config, "allow_spinning", True)
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        try:
            self.graph_outputs = graph_outputs(path)
        except Exception as exc:  # any parse failure: the file is not a usable ONNX model
            raise pb_utils.TritonModelException(f"model {config['name']!r}: {path} is not a readable ONNX model ({exc}); "
                                                "export it again (python -m export.onnx_export)") from None
        missing = sorted(set(self.outputs) - set(self.graph_outputs))
        if missing:
            hint = parameter(config, "export_hint", "export it with explanations: python -m export.onnx_export --explain")
            raise pb_utils.TritonModelException(f"model {config['name']!r}: {path} has no output {', '.join(missing)} ({hint})")
        # Classification runs the graph pruned to its first output (logits), so it pays nothing for
        # the maps; the whole graph is loaded when a request first asks for more (explanations).
        self.logits_session = self.open(self.outputs[:1])
        self.full_session = None
        # Rows per ORT run: the dynamic batcher may hand over 64 rows; smaller runs cost less per
        # row on CPU and bound the activation memory (benchmarks/RESULTS.md, "Tuning").
        self.run_batch = int(parameter(config, "run_batch", str(config.get("max_batch_size") or 64)))
        if self.run_batch < 1:
            raise pb_utils.TritonModelException(f"model {config['name']!r}: run_batch must be >= 1, got {self.run_batch}")
        # Optional turn-taking with the repository's other backbones (see lesionserve/core_lock.py).
        lock_name = parameter(config, "core_lock", "")
        self.lock = CoreLock(lock_path(lock_name, version_dir(args).parents[1])) if lock_name else contextlib.nullcontext()

    def open(self, outputs):
        """A session computing ``outputs`` only (the graph as it is when they are all it has)."""
        return make_session(self.path, threads=self.threads, spinning=self.spinning,
                            outputs=None if list(outputs) == self.graph_outputs else outputs)

    def session_for(self, names):
        if names == self.outputs[:1]:
            return self.logits_session
        if self.full_session is None:
            self.full_session = self.open(self.outputs)
        return self.full_session

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        # Only what is asked for runs: classification asks for logits, the explain ensemble for cams too.
        wanted = [[n for n in self.outputs if n in r.requested_output_names()] or self.outputs[:1] for r in requests]
        names = [n for n in self.outputs if any(n in w for w in wanted)]
        with self.lock:
            session = self.session_for(names)
            results = dict(zip(names, run_outputs_in_chunks(session, np.concatenate(arrays), self.run_batch, names)))
        splits = np.cumsum([len(a) for a in arrays])[:-1]
        parts = {n: np.split(v, splits) for n, v in results.items()}
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, parts[n][i]) for n in w])
            for i, w in enumerate(wanted)
        ]
