"""Preprocessing, views and fusion: the numeric pieces shared by training, reference and Triton."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lesionserve.fusion import fuse, softmax
from lesionserve.preprocessing import (
    ImageDecodeError,
    decode_image,
    normalize,
    preprocess_batch,
    preprocess_bytes,
    preprocess_rgb,
)
from lesionserve.spec import IMAGENET_MEAN, IMAGENET_STD
from lesionserve.views import make_views

RED_RGB = (200, 30, 10)


def _encode(array: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def _red_bgr(h: int = 20, w: int = 30) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = RED_RGB[::-1]
    return img


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff"])
def test_decode_image_returns_rgb_when_file_is_lossless_bgr_encoded(ext):
    rgb = decode_image(_encode(_red_bgr(), ext))
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[5, 5]) == RED_RGB


def test_decode_image_returns_close_rgb_when_jpeg():
    rgb = decode_image(_encode(_red_bgr(), ".jpg"))
    assert np.abs(rgb[10, 15].astype(int) - RED_RGB).max() <= 4


def test_decode_image_replicates_channels_when_grayscale():
    gray = np.arange(600, dtype=np.uint8).reshape(20, 30)
    rgb = decode_image(_encode(gray, ".png"))
    assert rgb.shape == (20, 30, 3)
    assert (rgb[..., 0] == gray).all() and (rgb[..., 2] == gray).all()


def test_decode_image_drops_alpha_when_rgba():
    bgra = np.dstack([_red_bgr(), np.full((20, 30), 7, np.uint8)])
    rgb = decode_image(_encode(bgra, ".png"))
    assert rgb.shape == (20, 30, 3) and tuple(rgb[0, 0]) == RED_RGB


def test_decode_image_scales_to_8_bit_when_png_is_16_bit():
    img16 = (_red_bgr().astype(np.uint16) * 257)
    rgb = decode_image(_encode(img16, ".png"))
    assert rgb.dtype == np.uint8 and tuple(rgb[0, 0]) == RED_RGB


@pytest.mark.parametrize(
    "data, fragment",
    [(b"", "empty input"), (b"not an image at all", "cannot decode"), (_encode(_red_bgr(), ".jpg")[:40], "cannot decode")],
)
def test_decode_image_raises_precise_error_when_bytes_are_bad(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment):
        decode_image(data)


def test_decode_image_refuses_when_pixels_exceed_limit():
    with pytest.raises(ImageDecodeError, match=r"30x20 pixels; the limit is 100 pixels"):
        decode_image(_encode(_red_bgr(), ".png"), max_pixels=100)


def test_normalize_applies_imagenet_statistics_when_given_uint8():
    rgb = np.full((4, 4, 3), 255, np.uint8)
    out = normalize(rgb)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(16, 16), (2, 8, 16)])
def test_normalize_lookup_equals_float_arithmetic_bit_for_bit_for_every_uint8_value(shape):
    # Every value 0..255 in every channel, unbatched and batched: the lookup table must give the
    # exact float32 results of (x - mean) * inv_std that training's transform was defined with.
    values = np.arange(256, dtype=np.uint8)
    rgb = np.stack([values, values[::-1], np.roll(values, 85)], axis=-1).reshape(*shape, 3)
    chw = np.moveaxis(rgb.astype(np.float32), -1, -3)
    mean = (np.asarray(IMAGENET_MEAN, np.float32) * 255.0)[:, None, None]
    inv_std = (1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0))[:, None, None]
    expected = (chw - mean) * inv_std
    got = normalize(rgb)
    assert got.dtype == np.float32 and got.shape == expected.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


def test_preprocess_bytes_resizes_once_per_size_when_sizes_differ():
    out = preprocess_bytes(_encode(_red_bgr(45, 60), ".png"), (224, 300))
    assert out[224].shape == (3, 224, 224) and out[300].shape == (3, 300, 300)
    rgb = decode_image(_encode(_red_bgr(45, 60), ".png"))
    np.testing.assert_array_equal(out[300], preprocess_rgb(rgb, 300))


def test_preprocess_batch_names_index_when_one_image_is_undecodable():
    good = _encode(_red_bgr(), ".png")
    with pytest.raises(ImageDecodeError, match=r"undecodable image at index 2: "):
        preprocess_batch([good, good, b"\x00garbage", good], (32,))


def test_make_views_is_identity_when_one_view():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(make_views(x, 1), x)


def test_make_views_gives_eight_distinct_dihedral_views_image_major_when_t8():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    v = make_views(x, 8)
    assert v.shape == (16, 3, 5, 5)
    expected = [x[1], x[1][..., ::-1], x[1][..., ::-1, :], np.rot90(x[1], 2, (1, 2)), x[1].transpose(0, 2, 1),
                np.rot90(x[1], -1, (1, 2)), np.rot90(x[1], 1, (1, 2)), np.rot90(x[1].transpose(0, 2, 1), 2, (1, 2))]
    for k in range(8):
        np.testing.assert_array_equal(v[8 + k], expected[k])
    assert len({v[k].tobytes() for k in range(8)}) == 8


@pytest.mark.parametrize("views", [0, 3, 16])
def test_make_views_raises_when_view_count_not_allowed(views):
    with pytest.raises(ValueError, match=r"views must be one of \(1, 2, 4, 8\)"):
        make_views(np.zeros((1, 3, 4, 4), np.float32), views)


def test_softmax_matches_definition_when_logits_are_large():
    logits = np.array([[1000.0, 1001.0, 999.0]], np.float32)
    e = np.exp([-1.0, 0.0, -2.0])
    np.testing.assert_allclose(softmax(logits)[0], e / e.sum(), rtol=1e-6)


def test_fuse_averages_views_then_weights_backbones_when_two_backbones():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 7)).astype(np.float32), rng.normal(size=(6, 7)).astype(np.float32)
    probs, per = fuse([a, b], [0.25, 0.75], views=2)
    pa = softmax(a).reshape(3, 2, 7).mean(1)
    pb = softmax(b).reshape(3, 2, 7).mean(1)
    np.testing.assert_allclose(per[:, 0], pa, atol=1e-7)
    np.testing.assert_allclose(probs, 0.25 * pa + 0.75 * pb, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_fuse_raises_when_rows_not_a_multiple_of_views():
    with pytest.raises(ValueError, match="multiple of views=4"):
        fuse([np.zeros((6, 7), np.float32)], [1.0], views=4)


def _png_declaring(width: int, height: int) -> bytes:
    """A 60-odd-byte PNG whose IHDR declares width x height: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _pil_bytes(image, fmt: str, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("side, fragment", [(30000, "900000000 pixels"), (8000, "8000x8000 pixels")])
def test_decode_image_refuses_before_decoding_when_header_declares_too_many_pixels(side, fragment, monkeypatch):
    # imdecode must never run: the bomb would allocate gigabytes.
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageDecodeError, match=rf"{fragment}; the limit is 50000000 pixels"):
        decode_image(_png_declaring(side, side))


def test_decode_image_refuses_when_bytes_exceed_limit():
    data = _encode(_red_bgr(), ".png")
    with pytest.raises(ImageDecodeError, match=rf"image is {len(data)} bytes; the limit is 10 bytes"):
        decode_image(data, max_bytes=10)


def test_decode_image_names_accepted_formats_when_gif():
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    gif = _pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError, match=r"GIF images are not accepted; accepted formats: JPEG, PNG, BMP, TIFF, WebP"):
        decode_image(gif)


def test_decode_image_converts_to_rgb_when_jpeg_is_cmyk():
    from PIL import Image

    cmyk = _pil_bytes(Image.new("RGB", (20, 10), RED_RGB).convert("CMYK"), "JPEG", quality=95)
    rgb = decode_image(cmyk)
    assert rgb.shape == (10, 20, 3) and np.abs(rgb[5, 10].astype(int) - RED_RGB).max() <= 12


def test_preprocess_bytes_resizes_when_image_is_1x1():
    out = preprocess_bytes(_encode(_red_bgr(1, 1), ".png"), (224,))
    assert out[224].shape == (3, 224, 224) and np.ptp(out[224][0]) == 0


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"patient notes: lesion on left arm\n" * 4, "not a JPEG, PNG, BMP, TIFF, WebP file"),
        (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "cannot decode"),
        (_encode(_red_bgr(60, 80), ".jpg")[:300], "cannot decode"),
    ],
    ids=["text", "random", "truncated_jpeg"],
)
def test_decode_image_names_accepted_formats_when_input_is_not_an_image(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment) as info:
        decode_image(data)
    assert "accepted formats" in str(info.value)
