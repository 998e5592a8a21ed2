"""Python gRPC client for LesionServe, the Triton skin-lesion classification ensemble.

>>> from lesionserve_client import LesionClient
>>> with LesionClient("localhost:8001") as client:
...     results = client.classify(["lesion.jpg"])
"""
from .client import LesionClient
from .config import ModelInfo
from .credentials import API_KEY_ENV, API_KEY_HEADER, ApiKey
from .encoding import ImageInput, encode_png
from .errors import (
    CredentialError,
    ImageError,
    InvalidImageError,
    LesionServeError,
    ModelConfigError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    UndecodableImageError,
)
from .results import Detection, DetectionResult, HeadPrediction, LesionResult, MelanomaResult, SegmentationResult

__version__ = "0.2.0"

__all__ = [
    "API_KEY_ENV",
    "API_KEY_HEADER",
    "ApiKey",
    "CredentialError",
    "Detection",
    "DetectionResult",
    "ImageError",
    "ImageInput",
    "InvalidImageError",
    "HeadPrediction",
    "LesionClient",
    "LesionResult",
    "LesionServeError",
    "MelanomaResult",
    "SegmentationResult",
    "ModelConfigError",
    "ModelInfo",
    "RequestTimeoutError",
    "ServerError",
    "ServerUnavailableError",
    "UndecodableImageError",
    "encode_png",
]
