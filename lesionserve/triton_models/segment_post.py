"""Triton python model: segmenter logits -> per image the lesion's mask at the image's size, its box,
area fraction and found flag (lesionserve.segmentation.postprocess, the reference's code).

Dynamic batching hands over several requests; each is answered on its own, as its masks are
padded to its own largest image.
"""
import triton_python_backend_utils as pb_utils

from lesionserve.preprocessing import ERROR_TENSOR, failed_rows
from lesionserve.segmentation.postprocess import lesions_of_batch
from lesionserve.triton_config import parameter, parse_args_config
from lesionserve.triton_models.tensors import read_host


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        self.threshold = float(parameter(config, "threshold"))
        self.logits_name = config["input"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            out = lesions_of_batch(read_host(request, self.logits_name), read_host(request, "image_size"),
                                   failed_rows(read_host(request, ERROR_TENSOR)), self.threshold)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
