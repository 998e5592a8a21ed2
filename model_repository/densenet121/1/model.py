"""densenet121 backbone, CPU variant: ONNX Runtime on model.onnx (shared implementation)."""
from lesionserve.triton_models.onnx_backbone import TritonPythonModel  # noqa: F401
