"""Triton python model: YOLO head outputs -> per image its boxes in original pixels, scores and
classes after NMS (lesionserve.detection.nms, the reference's code). conf, iou and max_det come with
each request; out-of-range values fail that request with a message naming them."""
import triton_python_backend_utils as pb_utils

from lesionserve.detection.nms import detections_of_batch
from lesionserve.detection.spec import DETECTOR_OUTPUT, check_nms_parameters
from lesionserve.preprocessing import ERROR_TENSOR, failed_rows
from lesionserve.triton_models.tensors import read_host


def _scalar(request, name, kind):
    values = read_host(request, name).reshape(-1)
    if len(values) == 0 or (values != values[0]).any():
        raise ValueError(f"{name} must be one value per request (the same in every row), got {values.tolist()}")
    return kind(values[0])


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                conf, iou, max_det = _scalar(request, "conf", float), _scalar(request, "iou", float), _scalar(request, "max_det", int)
                check_nms_parameters(conf, iou, max_det)
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"lesion_detect: {exc}")))
                continue
            out = detections_of_batch(read_host(request, DETECTOR_OUTPUT), read_host(request, "letterbox"),
                                      read_host(request, "image_size"), failed_rows(read_host(request, ERROR_TENSOR)),
                                      conf, iou, max_det)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
