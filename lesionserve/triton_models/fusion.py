"""Triton python model: fuse the backbones' view logits into class probabilities.

KIND_CPU: numpy on the host. KIND_GPU: the same fusion on the GPU; probs stay there for threshold.
"""
import triton_python_backend_utils as pb_utils

from lesionserve.calibration import Calibration
from lesionserve.fusion import fuse
from lesionserve.triton_config import device_for, parse_args_config, version_dir
from lesionserve.triton_models.tensors import read, read_host, synchronize, write


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        # logits_<backbone> inputs, in config order: that order is the backbone axis of backbone_probs.
        self.inputs = [i["name"] for i in config["input"] if i["name"].startswith("logits_")]
        backbones = [name.removeprefix("logits_") for name in self.inputs]
        self.weights = Calibration.load(version_dir(args) / "calibration.json").weight_vector(backbones)
        self.device = device_for(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            views = int(read_host(request, "num_views")[0])
            logits = [read(request, name, self.device) for name in self.inputs]
            probs, backbone_probs = fuse(logits, self.weights, views)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[write("probs", probs), write("backbone_probs", backbone_probs)])
            )
        synchronize(self.device)
        return responses
