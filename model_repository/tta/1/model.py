"""Triton python model tta: the code is lesionserve.triton_models.tta (this file is generated)."""
from lesionserve.triton_models.tta import TritonPythonModel  # noqa: F401
