"""Triton python model: the detector's layer-8 activations -> one EigenCAM per image at its own size
(lesionserve.detection.explain, the reference's code), padded to the request's largest image."""
import triton_python_backend_utils as pb_utils

from lesionserve.detection.explain import FEATURES_OUTPUT, heatmaps_of_batch
from lesionserve.preprocessing import ERROR_TENSOR, failed_rows
from lesionserve.triton_config import parameter, parse_args_config
from lesionserve.triton_models.tensors import read_host


class TritonPythonModel:
    def initialize(self, args):
        self.imgsz = int(parameter(parse_args_config(args), "imgsz"))

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("heatmap", heatmaps_of_batch(
            read_host(r, FEATURES_OUTPUT), read_host(r, "letterbox"), read_host(r, "image_size"),
            failed_rows(read_host(r, ERROR_TENSOR)), self.imgsz))]) for r in requests]
