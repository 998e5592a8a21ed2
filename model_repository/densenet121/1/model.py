"""densenet121 backbone (shared implementation): ONNX Runtime on model.onnx in the CPU variant, PyTorch FP16
on checkpoint.pt in gpu_torch; the config's `runtime` parameter chooses. gpu/gpu_ort do not use this file."""
from lesionserve.triton_models.backbone import TritonPythonModel  # noqa: F401
