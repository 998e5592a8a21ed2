"""GPU backbone without TensorRT (``configs/gpu_torch.pbtxt``): PyTorch FP16 + CUDA graphs on the
training checkpoint, inside the python backend. See lesionserve/torch_runtime.py.

On a KIND_CPU instance the same code runs in FP32 without graphs (how it is tested on CPU).
"""
from __future__ import annotations

import torch
import triton_python_backend_utils as pb_utils

from lesionserve.torch_runtime import load_torch_backbone
from lesionserve.triton_config import batch_buckets, device_for, flag, parameter, parse_args_config, weights_file
from lesionserve.triton_models.tensors import read, synchronize, write


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        path = weights_file(
            args, config, "checkpoint_file", "checkpoint.pt", "assemble with --checkpoints for the gpu_torch variant"
        )
        self.device = device_for(args)
        on_gpu = self.device is not None
        if on_gpu and not torch.cuda.is_available():
            raise pb_utils.TritonModelException(f"model {config['name']!r}: KIND_GPU instance but torch sees no CUDA device")
        torch.set_num_threads(int(parameter(config, "intra_op_threads", "1")))
        name, self.runner = load_torch_backbone(
            path,
            device=self.device or "cpu",
            half=on_gpu and parameter(config, "precision", "fp16") == "fp16",
            cuda_graphs=on_gpu and flag(config, "cuda_graphs", True),
            buckets=batch_buckets(config),
        )
        if name != config["name"]:
            raise pb_utils.TritonModelException(f"model {config['name']!r}: {path} holds {name} weights")
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        # Dynamic batching hands over several requests: one forward pass, then one slice per request.
        inputs = [read(r, self.input_name, self.device or "cpu") for r in requests]
        wanted = [[n for n in self.outputs if n in r.requested_output_names()] or self.outputs[:1] for r in requests]
        x = torch.cat(inputs)
        if any(n != self.outputs[0] for w in wanted for n in w):  # cams asked for: the eager explained model
            results = dict(zip(self.outputs, self.runner.explain(x)))
        else:
            results = {self.outputs[0]: self.runner(x)}
        parts = {n: torch.split(v, [len(i) for i in inputs]) for n, v in results.items()}
        responses = [pb_utils.InferenceResponse(output_tensors=[write(n, parts[n][i]) for n in w])
                     for i, w in enumerate(wanted)]
        synchronize(self.device)
        return responses
