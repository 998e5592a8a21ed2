"""Triton python model: fuse the backbones' view logits into class probabilities."""
import triton_python_backend_utils as pb_utils

from lesionserve.calibration import Calibration
from lesionserve.fusion import fuse
from lesionserve.triton_config import parse_args_config, version_dir


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        # logits_<backbone> inputs, in config order: that order is the backbone axis of backbone_probs.
        self.inputs = [i["name"] for i in config["input"] if i["name"].startswith("logits_")]
        backbones = [name.removeprefix("logits_") for name in self.inputs]
        self.weights = Calibration.load(version_dir(args) / "calibration.json").weight_vector(backbones)

    def execute(self, requests):
        responses = []
        for request in requests:
            views = int(pb_utils.get_input_tensor_by_name(request, "num_views").as_numpy()[0])
            logits = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs]
            probs, backbone_probs = fuse(logits, self.weights, views)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("probs", probs), pb_utils.Tensor("backbone_probs", backbone_probs)]
                )
            )
        return responses
