"""Turning the accepted image inputs into encoded bytes, including a tiny PNG writer."""
from __future__ import annotations

import os
import struct
import zlib
from typing import Union

import numpy as np

from .errors import InvalidImageError

#: What ``LesionClient.classify`` accepts per image.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC over type+data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray, level: int = 6) -> bytes:
    """Encode an HxWx3 uint8 RGB array as a lossless 8-bit truecolour PNG.

    Pure Python (zlib + struct) so the client needs no imaging library; PNG rather than
    JPEG so the server sees exactly the pixels the caller had.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty HxWx3 uint8 array, got shape {rgb.shape} dtype {rgb.dtype}")
    height, width = rgb.shape[:2]
    # Every scanline is prefixed with filter type 0 (None); a zero column does that in one copy.
    raw = np.zeros((height, 1 + width * 3), dtype=np.uint8)
    raw[:, 1:] = rgb.reshape(height, width * 3)
    # IHDR: width, height, bit depth 8, colour type 2 (RGB), compression 0, filter 0, no interlace.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + _png_chunk(b"IEND", b"")
    )


def to_image_bytes(image: object, index: int) -> bytes:
    """Return the encoded bytes for one input, or raise InvalidImageError naming ``index``."""
    if isinstance(image, (bytes, bytearray)):
        # bytes() because tritonclient serializes anything that is not exactly ``bytes`` via str().
        data = bytes(image)
        if not data:
            raise InvalidImageError(index, "the image bytes are empty")
        return data
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise InvalidImageError(index, f"file not found: {path!r}") from None
        except OSError as exc:
            raise InvalidImageError(index, f"cannot read file {path!r}: {exc.strerror or exc}") from None
        if not data:
            raise InvalidImageError(index, f"file is empty: {path!r}")
        return data
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InvalidImageError(
                index, f"numpy array has shape {image.shape} and dtype {image.dtype}, expected HxWx3 uint8 (RGB)"
            )
        return encode_png(image)
    raise InvalidImageError(index, f"unsupported type {type(image).__name__}")
