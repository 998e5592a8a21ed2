"""Python-backend backbone: the config's ``runtime`` parameter picks the implementation.

``onnxruntime`` (default; config.pbtxt, the CPU variant) or ``torch`` (configs/gpu_torch.pbtxt).
One ``1/model.py`` serves every variant of a backbone, so the choice lives in the config.
"""
from __future__ import annotations

import triton_python_backend_utils as pb_utils

from lesionserve.triton_config import backbone_runtime, parse_args_config


class TritonPythonModel:
    def initialize(self, args):
        try:
            runtime = backbone_runtime(parse_args_config(args))
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        if runtime == "torch":
            from lesionserve.triton_models.torch_backbone import TritonPythonModel as Implementation
        else:
            from lesionserve.triton_models.onnx_backbone import TritonPythonModel as Implementation
        self.implementation = Implementation()
        self.implementation.initialize(args)

    def execute(self, requests):
        return self.implementation.execute(requests)
