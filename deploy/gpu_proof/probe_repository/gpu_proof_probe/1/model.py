"""GPU proof probe: what the python stub imports, as JSON (one BYTES element per request).

Each import is tried on its own and its error reported, so one failure does not hide the others.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _executable() -> str:
    try:
        return os.readlink("/proc/self/exe")
    except OSError:
        return ""


def _try(report: dict, key: str, probe) -> None:
    try:
        report.update(probe())
    except Exception as exc:  # reported, not raised: the probe must answer
        report[f"{key}_error"] = f"{type(exc).__name__}: {exc}"


def _cv2() -> dict:
    import cv2

    small = cv2.resize(np.zeros((45, 60, 3), np.uint8), (22, 22), interpolation=cv2.INTER_AREA)
    return {"cv2": cv2.__version__, "cv2_resize_shape": list(small.shape)}


def _torch() -> dict:
    import torch

    out = {"torch": torch.__version__, "torch_cuda": torch.cuda.is_available()}
    if out["torch_cuda"]:
        x = np.arange(4, dtype=np.float32)
        back = torch.from_numpy(x).to("cuda:0").mul(2).cpu().numpy()
        out.update(cuda_device=torch.cuda.get_device_name(0), torch_cuda_roundtrip=bool((back == 2 * x).all()))
    return out


def _lesionserve() -> dict:
    import lesionserve.preprocessing

    return {"lesionserve": os.path.dirname(lesionserve.preprocessing.__file__)}


def report() -> dict:
    out = {
        "python": sys.version.split()[0],
        "executable": _executable(),
        "sys_path": sys.path,
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "numpy": np.__version__,
        "numpy_file": np.__file__,
    }
    _try(out, "cv2", _cv2)
    _try(out, "torch", _torch)
    _try(out, "lesionserve", _lesionserve)
    return out


class TritonPythonModel:
    def initialize(self, args):
        self.report = json.dumps(report()).encode()

    def execute(self, requests):
        tensor = pb_utils.Tensor("REPORT", np.array([self.report], dtype=np.object_))
        return [pb_utils.InferenceResponse(output_tensors=[tensor]) for _ in requests]
