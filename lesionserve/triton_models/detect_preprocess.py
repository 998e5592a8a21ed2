"""Triton python model: encoded images -> letterboxed detector input (lesionserve.detection.preprocess,
the reference's function), each image's letterbox (scale, pad_x, pad_y), size and decode error."""
import numpy as np

import triton_python_backend_utils as pb_utils

from lesionserve.detection.preprocess import letterbox
from lesionserve.detection.spec import DETECTOR_INPUT
from lesionserve.preprocessing import ERROR_TENSOR, ImageDecodeError, decode_image, error_column
from lesionserve.triton_config import parameter, parse_args_config


def letterbox_rows(blobs, imgsz, max_pixels, max_bytes):
    """Per row: letterboxed pixels, (scale, pad_x, pad_y), (width, height), error (zeros and "" where fine)."""
    n = len(blobs)
    x, boxes = np.zeros((n, 3, imgsz, imgsz), np.float32), np.zeros((n, 3), np.float32)
    sizes, errors = np.zeros((n, 2), np.int32), [""] * n
    for i, blob in enumerate(blobs):
        try:
            rgb = decode_image(blob, max_pixels=max_pixels, max_bytes=max_bytes)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
            continue
        x[i], scale, pad = letterbox(rgb, imgsz)
        boxes[i], sizes[i] = (scale, *pad), (rgb.shape[1], rgb.shape[0])
    return x, boxes, sizes, errors


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        self.imgsz = int(parameter(config, "imgsz"))
        self.max_pixels, self.max_bytes = int(parameter(config, "max_pixels")), int(parameter(config, "max_bytes"))

    def execute(self, requests):
        responses = []
        for request in requests:
            blobs = [bytes(b) for b in pb_utils.get_input_tensor_by_name(request, "raw_image").as_numpy().reshape(-1)]
            x, boxes, sizes, errors = letterbox_rows(blobs, self.imgsz, self.max_pixels, self.max_bytes)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(DETECTOR_INPUT, x), pb_utils.Tensor("letterbox", boxes),
                pb_utils.Tensor("image_size", sizes), pb_utils.Tensor(ERROR_TENSOR, error_column(errors))]))
        return responses
