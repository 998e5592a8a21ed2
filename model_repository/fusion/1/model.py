"""Triton python model fusion: the code is lesionserve.triton_models.fusion (this file is generated)."""
from lesionserve.triton_models.fusion import TritonPythonModel  # noqa: F401
