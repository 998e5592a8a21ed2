"""Triton python model threshold: the code is lesionserve.triton_models.threshold (this file is generated)."""
from lesionserve.triton_models.threshold import TritonPythonModel  # noqa: F401
