"""Preprocessing, views and fusion: the numeric pieces shared by training, reference and Triton."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from lesionserve.fusion import fuse, softmax
from lesionserve.preprocessing import (
    ImageDecodeError,
    clear_failed_rows,
    decode_image,
    error_column,
    failed_rows,
    normalize,
    preprocess_batch,
    preprocess_batch_rows,
    preprocess_bytes,
    preprocess_rgb,
    resize_batch,
    resize_batch_rows,
)
from lesionserve.architectures import IMAGENET

IMAGENET_MEAN, IMAGENET_STD = IMAGENET.mean, IMAGENET.std
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


def _mixed_batch() -> tuple[list[bytes], dict[int, str]]:
    """Six images, three of them unreadable for different reasons (limit: max_bytes=20000)."""
    rng = np.random.default_rng(5)
    good = [_encode(rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8), ".png") for i in range(3)]
    big = _encode(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8), ".bmp")  # > 20000 bytes
    images = [good[0], b"\x00garbage", good[1], big, b"", good[2]]
    bad = {1: b"\x00garbage", 3: big, 4: b""}
    reasons = {}
    for row, data in bad.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, max_bytes=20000)
        reasons[row] = str(info.value)
    return images, reasons


def test_preprocess_batch_rows_reports_each_bad_row_with_decode_image_reason_when_images_are_mixed():
    images, reasons = _mixed_batch()
    batch = preprocess_batch_rows(images, (16, 24), max_bytes=20000)
    assert batch.errors == [reasons.get(row, "") for row in range(6)]
    assert batch.errors[3] == f"image is {len(images[3])} bytes; the limit is 20000 bytes"  # no index prefix
    assert batch.errors[4] == "empty input (0 bytes)"
    assert batch.failed == [1, 3, 4]
    good = [0, 2, 5]
    alone = preprocess_batch([images[row] for row in good], (16, 24), max_bytes=20000)
    for size in (16, 24):
        pixels = batch.pixels[size]
        assert pixels.shape == (6, 3, size, size) and pixels.dtype == np.float32 and pixels.flags.c_contiguous
        np.testing.assert_array_equal(pixels[good], alone[size])  # bit-identical to the raising path
        assert not pixels[[1, 3, 4]].any()  # zeros, not normalised black


def test_resize_batch_rows_gives_zero_uint8_rows_for_bad_images_and_same_rows_with_a_thread_pool():
    images, reasons = _mixed_batch()
    plain = resize_batch_rows(images, (16,), max_bytes=20000)
    with ThreadPoolExecutor(2) as pool:
        pooled = resize_batch_rows(images, (16,), max_bytes=20000, map_fn=pool.map)
    assert plain.errors == pooled.errors == [reasons.get(row, "") for row in range(6)]
    np.testing.assert_array_equal(plain.pixels[16], pooled.pixels[16])
    assert plain.pixels[16].dtype == np.uint8 and not plain.pixels[16][[1, 3, 4]].any()
    np.testing.assert_array_equal(plain.pixels[16][[0, 2, 5]], resize_batch([images[r] for r in (0, 2, 5)], (16,))[16])


def test_preprocess_batch_rows_returns_only_zeros_and_errors_when_every_image_is_bad():
    batch = preprocess_batch_rows([b"", b"nope"], (8,))
    assert batch.failed == [0, 1] and batch.errors[0] == "empty input (0 bytes)"
    assert batch.pixels[8].shape == (2, 3, 8, 8) and not batch.pixels[8].any()


def test_raising_batch_functions_name_the_first_bad_index_when_rows_have_errors():
    images, reasons = _mixed_batch()
    for fn in (resize_batch, preprocess_batch):
        with pytest.raises(ImageDecodeError) as info:
            fn(images, (16,), max_bytes=20000)
        assert str(info.value) == f"undecodable image at index 1: {reasons[1]}"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_preprocess_batch_rows_on_torch_device_equals_host_with_zero_rows_when_images_are_mixed(device):
    torch = pytest.importorskip("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available: the GPU variant's preprocess runs on CUDA tensors only on an NVIDIA GPU host")
    images, _ = _mixed_batch()
    host = preprocess_batch_rows(images, (16, 24), max_bytes=20000)
    dev = preprocess_batch_rows(images, (16, 24), device=device, max_bytes=20000)
    assert dev.errors == host.errors
    for size in (16, 24):
        assert dev.pixels[size].device.type == device and dev.pixels[size].is_contiguous()
        np.testing.assert_array_equal(dev.pixels[size].cpu().numpy(), host.pixels[size])


def test_error_column_is_n_by_1_object_bytes_and_failed_rows_reads_it_back():
    column = error_column(["", "image is 3 bytes; the limit is 2 bytes", "", "caf\u00e9 \x00"])
    assert column.shape == (4, 1) and column.dtype == np.object_
    assert column[1, 0] == b"image is 3 bytes; the limit is 2 bytes" and column[3, 0] == "caf\u00e9 \x00".encode()
    assert failed_rows(column).tolist() == [False, True, False, True]
    assert failed_rows(np.array([["x"], [""]], dtype=np.object_)).tolist() == [True, False]
    assert error_column([]).shape == (0, 1) and failed_rows(error_column([])).shape == (0,)


def test_clear_failed_rows_blanks_label_and_fired_only_on_failed_rows():
    labels = np.array([[b"MEL"], [b"NV"], [b"BCC"]], dtype=np.object_)
    fired = np.ones((3, 7), dtype=bool)
    new_labels, new_fired = clear_failed_rows(labels, fired, np.array([False, True, False]))
    assert new_labels.tolist() == [[b"MEL"], [b""], [b"BCC"]]
    assert new_fired.tolist() == [[True] * 7, [False] * 7, [True] * 7]
    assert labels[1, 0] == b"NV" and fired.all()  # inputs untouched


def test_clear_failed_rows_raises_when_row_counts_differ():
    with pytest.raises(ValueError, match="error tensor has 2 rows but the decision has 3 labels"):
        clear_failed_rows(np.zeros((3, 1), np.object_), np.zeros((3, 7), bool), np.zeros(2, bool))


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


def test_normalize_applies_each_declared_statistics_bit_identically_by_table_and_by_arithmetic():
    from lesionserve.architectures import INCEPTION, Normalization

    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    for norm in (INCEPTION, Normalization("odd", (0.1, 0.7, 0.3), (0.9, 0.05, 0.4))):
        by_table = normalize(rgb, norm)  # uint8: lookup table
        by_arithmetic = normalize(rgb.astype(np.float32), norm)  # float: the formula
        np.testing.assert_array_equal(by_table, by_arithmetic)
        expected = (rgb.astype(np.float64) / 255.0 - np.array(norm.mean)) / np.array(norm.std)
        np.testing.assert_allclose(by_table, np.moveaxis(expected, -1, 0), atol=1e-5)


def test_preprocess_batch_keys_by_member_input_and_shares_one_resize_per_size():
    from lesionserve.architectures import IMAGENET, INCEPTION
    from lesionserve.pipelines import Preprocessing
    from lesionserve.preprocessing import preprocess_batch

    data = _encode(_red_bgr(45, 60), ".png")
    a, b, c = Preprocessing(64, IMAGENET), Preprocessing(64, INCEPTION), Preprocessing(32, INCEPTION)
    out = preprocess_batch([data, data], [a, b, c])
    assert list(out) == [a, b, c] and out[c].shape == (2, 3, 32, 32)
    rgb = cv2.cvtColor(_red_bgr(45, 60), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(out[b][0], preprocess_rgb(rgb, 64, INCEPTION))
    np.testing.assert_array_equal(out[a][1], preprocess_rgb(rgb, 64))
    assert not np.array_equal(out[a], out[b])
