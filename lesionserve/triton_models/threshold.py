"""Triton python model: apply the calibrated decision rule to fused probabilities.

KIND_CPU: numpy on the host. KIND_GPU: the rule runs where probs arrive; label (BYTES) and
thresholds_fired are final outputs, so they leave for the host here.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.arrays import to_numpy
from lesionserve.calibration import Calibration
from lesionserve.spec import CLASS_NAMES
from lesionserve.triton_config import device_for, version_dir
from lesionserve.triton_models.tensors import read

_NAMES = np.array([name.encode() for name in CLASS_NAMES], dtype=np.object_)


class TritonPythonModel:
    def initialize(self, args):
        self.calibration = Calibration.load(version_dir(args) / "calibration.json")
        self.device = device_for(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            labels, fired = self.calibration.decide(read(request, "probs", self.device))
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("label", _NAMES[to_numpy(labels)].reshape(-1, 1)),
                        pb_utils.Tensor("thresholds_fired", to_numpy(fired)),
                    ]
                )
            )
        return responses
