"""Triton python model preprocess: the code is lesionserve.triton_models.preprocess (this file is generated)."""
from lesionserve.triton_models.preprocess import TritonPythonModel  # noqa: F401
