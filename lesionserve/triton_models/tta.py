"""Triton python model: pixel_values_<key> [N,3,S,S] -> views_<key> [N*T,3,S,S] per member input (image-major) + num_views.

KIND_CPU: numpy on the host. KIND_GPU: the same flips and transposes on the GPU (torch, DLPack).
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.spec import check_views
from lesionserve.triton_config import device_for, parameter, parse_args_config
from lesionserve.triton_models.tensors import read, synchronize, write
from lesionserve.views import make_views


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        self.views = check_views(int(parameter(config, "views")))
        # pixel_values_224_imagenet -> views_224_imagenet, ...: one pair per member input in the config.
        self.pairs = [(i["name"], i["name"].replace("pixel_values_", "views_")) for i in config["input"]]
        self.device = device_for(args)

    def execute(self, requests):
        responses = []
        count = pb_utils.Tensor("num_views", np.array([self.views], dtype=np.int32))
        for request in requests:
            tensors = [write(out, make_views(read(request, inp, self.device), self.views)) for inp, out in self.pairs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors + [count]))
        synchronize(self.device)
        return responses
