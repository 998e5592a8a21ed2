"""Triton python model: apply the calibrated decision rule to fused probabilities.

Rows whose ``error`` (from preprocess: the image could not be decoded) is non-empty get label b""
and no threshold fired: their probabilities come from zero pixels and mean nothing.

KIND_CPU: numpy on the host. KIND_GPU: the rule runs where probs arrive; label (BYTES) and
thresholds_fired are final outputs, so they leave for the host here.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.arrays import to_numpy
from lesionserve.calibration import Calibration
from lesionserve.preprocessing import ERROR_TENSOR, clear_failed_rows, failed_rows
from lesionserve.triton_config import device_for, parameter, parse_args_config, version_dir
from lesionserve.triton_models.tensors import read, read_host


class TritonPythonModel:
    def initialize(self, args):
        config = parse_args_config(args)
        inputs = {i["name"]: i for i in config["input"]}
        if inputs.get(ERROR_TENSOR, {}).get("data_type") != "TYPE_STRING":
            raise pb_utils.TritonModelException(
                f"threshold: config must declare input {{ name: \"{ERROR_TENSOR}\", data_type: TYPE_STRING, "
                f"dims: [ -1, 1 ] }} (each image's decode error, from preprocess), got {inputs.get(ERROR_TENSOR)}"
            )
        # The class axis of probs, as the pipeline declares it (the generated config carries it).
        self.class_names = tuple(parameter(config, "class_names").split(","))
        self.names = np.array([name.encode() for name in self.class_names], dtype=np.object_)
        self.calibration = Calibration.load(version_dir(args) / "calibration.json")
        unknown = sorted(set(self.calibration.thresholds) - set(self.class_names))
        if unknown:  # refuse at load time, not at the first request
            raise pb_utils.TritonModelException(
                f"threshold: calibration.json has thresholds for {unknown}, not among the classes {', '.join(self.class_names)}")
        self.device = device_for(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            labels, fired = self.calibration.decide(read(request, "probs", self.device), self.class_names)
            labels, fired = clear_failed_rows(
                self.names[to_numpy(labels)].reshape(-1, 1), to_numpy(fired), failed_rows(read_host(request, ERROR_TENSOR))
            )
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("label", labels), pb_utils.Tensor("thresholds_fired", fired)]
                )
            )
        return responses
