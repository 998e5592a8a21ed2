"""Triton python model: the ``lesion_crop`` pipeline as business logic scripting (the ``bls`` mode).

Per request: the segmentation pipeline gives each image's lesion box; each image is cut to it
(+ margin) and re-encoded as PNG (lossless); the crop classifier's ensemble classifies the crops.
Served beside the ensemble mode to measure both (lesionserve/benchmarks/crop.py).
"""
import numpy as np

import triton_python_backend_utils as pb_utils

from lesionserve.preprocessing import ERROR_TENSOR
from lesionserve.segmentation.postprocess import encode_crops
from lesionserve.triton_config import parameter, parse_args_config
from lesionserve.triton_models.tensors import read_host

CLASSIFIER_OUTPUTS = ("probs", "label", "backbone_probs", "thresholds_fired", ERROR_TENSOR)


def _call(model, inputs, outputs):
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=list(outputs)).exec()
    if response.has_error():
        raise pb_utils.TritonModelException(f"{model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        self.segmentation = parameter(config, "segmentation")
        self.classifier = parameter(config, "classifier")
        self.margin = float(parameter(config, "margin"))
        self.limits = {"max_pixels": int(parameter(config, "max_pixels")), "max_bytes": int(parameter(config, "max_bytes"))}

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = read_host(request, "raw_image")
            try:
                lesion = _call(self.segmentation, [pb_utils.Tensor("raw_image", raw)], ("box",))
                crops, rects = encode_crops([bytes(b) for b in raw.reshape(-1)], [tuple(b) for b in lesion["box"].tolist()],
                                            self.margin, **self.limits)
                blobs = np.array(crops, dtype=np.object_).reshape(-1, 1)
                out = _call(self.classifier, [pb_utils.Tensor("raw_image", blobs)], CLASSIFIER_OUTPUTS)
            except pb_utils.TritonModelException as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            found = (lesion["box"][:, :1] >= 0)
            tensors = [pb_utils.Tensor(k, v) for k, v in out.items()]
            tensors += [pb_utils.Tensor("box", rects), pb_utils.Tensor("cropped", found)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
