"""Python gRPC client for LesionServe, the Triton skin-lesion classification ensemble.

>>> from lesionserve_client import LesionClient
>>> with LesionClient("localhost:8001") as client:
...     results = client.classify(["lesion.jpg"])
"""
from .client import LesionClient
from .config import ModelInfo
from .encoding import ImageInput, encode_png
from .errors import (
    ImageError,
    InvalidImageError,
    LesionServeError,
    ModelConfigError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    UndecodableImageError,
)
from .results import Detection, DetectionResult, LesionResult, SegmentationResult

__version__ = "0.2.0"

__all__ = [
    "Detection",
    "DetectionResult",
    "ImageError",
    "ImageInput",
    "InvalidImageError",
    "LesionClient",
    "LesionResult",
    "LesionServeError",
    "SegmentationResult",
    "ModelConfigError",
    "ModelInfo",
    "RequestTimeoutError",
    "ServerError",
    "ServerUnavailableError",
    "UndecodableImageError",
    "encode_png",
]
