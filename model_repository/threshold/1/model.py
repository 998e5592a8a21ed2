"""Triton python model: apply the calibrated decision rule to fused probabilities."""
import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.calibration import Calibration
from lesionserve.spec import CLASS_NAMES
from lesionserve.triton_config import version_dir

_NAMES = np.array([name.encode() for name in CLASS_NAMES], dtype=np.object_)


class TritonPythonModel:
    def initialize(self, args):
        self.calibration = Calibration.load(version_dir(args) / "calibration.json")

    def execute(self, requests):
        responses = []
        for request in requests:
            probs = pb_utils.get_input_tensor_by_name(request, "probs").as_numpy()
            labels, fired = self.calibration.decide(probs)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("label", _NAMES[labels].reshape(-1, 1)),
                        pb_utils.Tensor("thresholds_fired", fired),
                    ]
                )
            )
        return responses
