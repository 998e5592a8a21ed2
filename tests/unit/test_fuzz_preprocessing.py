"""Property-based fuzzing of decode/preprocess.

Whatever bytes arrive, ``decode_image`` either returns an HxWx3 uint8 RGB array within the pixel
limit or raises ImageDecodeError: no other exception type, no crash, no hang (hypothesis'
per-example deadline), no allocation beyond the limits. Bounded: a fixed number of examples per
strategy, derandomized so CI runs the same inputs every time. Figures: docs/reliability.md.
"""
from __future__ import annotations

import io
import struct
import zlib
from datetime import timedelta

import cv2
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (make setup installs it)")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lesionserve.preprocessing import (  # noqa: E402
    ImageDecodeError,
    decode_image,
    preprocess_batch_rows,
    preprocess_bytes,
)

#: Small limits so a mutated header that declares a large image is refused, not decoded.
MAX_PIXELS = 1_000_000
MAX_BYTES = 200_000

FUZZ = settings(
    max_examples=500,
    deadline=timedelta(seconds=2),  # a hang or a huge allocation shows up as a deadline failure
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def _seed_images() -> dict[str, bytes]:
    """Small valid files of every accepted format, plus GIF, as mutation seeds."""
    from PIL import Image

    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    seeds = {}
    for ext in (".jpg", ".png", ".bmp", ".tiff", ".webp"):
        ok, buf = cv2.imencode(ext, bgr)
        assert ok
        seeds[ext] = buf.tobytes()
    ok, buf = cv2.imencode(".png", (bgr.astype(np.uint16) * 257))
    seeds["png16"] = buf.tobytes()
    out = io.BytesIO()
    Image.fromarray(bgr).convert("CMYK").save(out, "JPEG")
    seeds["cmyk"] = out.getvalue()
    out = io.BytesIO()
    Image.fromarray(bgr).save(out, "GIF")
    seeds["gif"] = out.getvalue()
    return seeds


SEEDS = _seed_images()


#: Message fragment -> kind, for the statistics in docs/reliability.md (first match wins).
ERROR_KINDS = (
    ("empty input", "empty"),
    ("bytes; the limit is", "over max_bytes"),
    ("pixels; the limit is", "over max_pixels (header)"),
    ("images are not accepted", "format not accepted"),
    ("header is corrupt (accepted", "not an accepted format, or corrupt header"),
    ("unreadable header", "unreadable header"),
    ("corrupt or truncated", "corrupt or truncated data"),
    ("unsupported", "unsupported sample type/shape"),
)


def error_kind(message: str) -> str:
    """The kind of an ImageDecodeError message; 'other' for a message no fragment matches."""
    return next((kind for fragment, kind in ERROR_KINDS if fragment in message), "other")


def check_decode(data: bytes) -> None:
    """The property: a bounded RGB array, or ImageDecodeError; anything else fails the test."""
    try:
        rgb = decode_image(data, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)
    except ImageDecodeError as exc:
        assert str(exc), "an error must say what was wrong"
        event(f"ImageDecodeError: {error_kind(str(exc))}")
        return
    event("decoded")
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert 0 < rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS
    # The decoded image must also go through the rest of preprocessing.
    out = preprocess_bytes(data, (32,), max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)
    assert out[32].shape == (3, 32, 32) and np.isfinite(out[32]).all()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid seed with a few byte flips, a truncation, an insertion or a header overwrite."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        if not data:
            break
        # Mostly past the magic number: a destroyed signature only tests "not an image" again.
        pos = draw(st.integers(min(16, len(data) - 1), len(data) - 1))
        if kind == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:  # headers hold the dimensions and formats the parsers trust most
            at = draw(st.integers(min(8, len(data) - 1), min(len(data) - 1, 40)))
            data[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


def png_declaring(width: int, height: int, depth: int, colour: int, payload: bytes) -> bytes:
    """A structurally valid PNG whose IHDR declares any size/depth/colour type, with any IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_image_returns_rgb_or_image_decode_error_when_bytes_are_random(data):
    check_decode(data)


@FUZZ
@given(mutated())
def test_decode_image_returns_rgb_or_image_decode_error_when_valid_files_are_mutated(data):
    check_decode(data)


@FUZZ
@given(
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1),
    # Valid (bit depth, colour type) pairs, and two invalid ones.
    st.sampled_from([(8, 2), (16, 2), (8, 0), (1, 0), (16, 0), (8, 3), (8, 4), (8, 6), (16, 6), (3, 2), (8, 5)]),
    st.binary(max_size=512),
)
def test_decode_image_never_allocates_declared_size_when_png_header_lies(width, height, kind, payload):
    check_decode(png_declaring(width, height, *kind, payload))


@settings(FUZZ, max_examples=100)  # up to 4 images an example: as many decodes as the single-image runs
@given(st.lists(st.one_of(st.binary(max_size=1024), mutated(), st.sampled_from(sorted(SEEDS.values()))), min_size=1, max_size=4))
def test_preprocess_batch_rows_never_raises_and_agrees_with_decode_image_row_by_row_when_batch_is_fuzzed(images):
    # The server's path: a bad row must never fail the batch, and each row says exactly what
    # decode_image says about that image alone.
    batch = preprocess_batch_rows(images, (32,), max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)
    assert len(batch.errors) == len(images) and batch.pixels[32].shape == (len(images), 3, 32, 32)
    for row, data in enumerate(images):
        try:
            alone = preprocess_bytes(data, (32,), max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)[32]
        except ImageDecodeError as exc:
            assert batch.errors[row] == str(exc) and not batch.pixels[32][row].any()
            continue
        assert batch.errors[row] == ""
        np.testing.assert_array_equal(batch.pixels[32][row], alone)
    event(f"{len(batch.failed)} of {len(images)} rows unreadable")


def test_decode_image_decodes_every_seed_except_gif_when_unmutated():
    # The seeds are real files: if they failed to decode, mutation fuzzing would test nothing.
    for name, data in SEEDS.items():
        if name == "gif":
            with pytest.raises(ImageDecodeError, match="GIF images are not accepted"):
                decode_image(data)
        else:
            assert decode_image(data).shape == (24, 32, 3), name
