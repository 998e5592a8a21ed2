"""The bad-input catalogue against a real tritonserver.

Every case goes through the SDK and through raw tritonclient calls; each must get a precise error
for that image (what was wrong, what is allowed) in the ensemble's per-row ``error`` output, while
the other images of the same request get their results, or a result where the input is accepted
(1x1, 16-bit PNG, CMYK JPEG); the server must keep serving afterwards. The messages seen are
listed in docs/reliability.md. Reuses the session server ``server_t1`` (T=1: fast).
"""
from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from lesionserve.preprocessing import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image
from lesionserve.spec import CLASS_NAMES
from lesionserve_client import (
    InvalidImageError,
    LesionClient,
    LesionResult,
    ServerError,
    UndecodableImageError,
)

pytestmark = pytest.mark.integration

ACCEPTED = "accepted formats: JPEG, PNG, BMP, TIFF, WebP"


def _pil(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _lesion(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose IHDR declares width x height (decoding it would need width*height*3 bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), (40 * i, 90, 160)) for i in range(4)]
    return _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _png16() -> bytes:
    array = (np.arange(48 * 64 * 3, dtype=np.uint32).reshape(48, 64, 3) * 37 % 65536).astype(np.uint16)
    import cv2

    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


#: name -> (bytes factory, fragments the error must contain; None = accepted, a result is expected).
CATALOGUE: dict[str, tuple[Callable[[], bytes], tuple[str, ...] | None]] = {
    "truncated_jpeg": (lambda: _pil(_lesion(), "JPEG")[:400], ("cannot decode", ACCEPTED)),
    "truncated_jpeg_scan_data": (
        lambda: (lambda jpg: jpg[: len(jpg) * 3 // 4])(_pil(_lesion(), "JPEG")),
        ("cannot decode", "corrupt or truncated", ACCEPTED),
    ),
    "random_bytes": (
        lambda: np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        ("cannot decode", "not a JPEG, PNG, BMP, TIFF, WebP file", ACCEPTED),
    ),
    "text_file": (lambda: b"Patient 17, left forearm, 6 mm, irregular border.\n" * 20, ("not a JPEG, PNG", ACCEPTED)),
    "animated_gif": (_animated_gif, ("GIF images are not accepted", ACCEPTED)),
    "bomb_png_30000x30000": (
        lambda: _png_declaring(30000, 30000),
        ("image header declares 900000000 pixels", "the limit is 50000000 pixels"),
    ),
    "png_12000x5000_over_pixel_limit": (
        lambda: _png_declaring(12000, 5000),
        ("image is 12000x5000 pixels", "the limit is 50000000 pixels"),
    ),
    "over_byte_limit": (
        lambda: b"\xff\xd8\xff" + bytes(DEFAULT_MAX_BYTES),
        (f"image is {DEFAULT_MAX_BYTES + 3} bytes", f"the limit is {DEFAULT_MAX_BYTES} bytes"),
    ),
    "one_pixel_png": (lambda: _pil(Image.new("RGB", (1, 1), (120, 60, 30)), "PNG"), None),
    "png_16_bit": (_png16, None),
    "cmyk_jpeg": (lambda: _pil(_lesion().convert("CMYK"), "JPEG"), None),
}


@pytest.fixture(scope="module")
def good() -> bytes:
    return _pil(_lesion(80, 60), "JPEG", quality=90)


@pytest.fixture(scope="module")
def raw(server_t1):
    client = grpcclient.InferenceServerClient(server_t1.grpc_url)
    yield client
    client.close()


def _raw_infer(client, blobs: list[bytes], model: str = "lesion_ensemble", outputs=None):
    data = np.array([[b] for b in blobs], dtype=np.object_)
    tensor = grpcclient.InferInput("raw_image", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor], outputs=outputs, client_timeout=120)


def _assert_serving(raw, good: bytes) -> np.ndarray:
    """The server still answers a good request correctly; returns its probabilities (one row)."""
    result = _raw_infer(raw, [good])
    probs = result.as_numpy("probs")
    assert probs.shape == (1, len(CLASS_NAMES)) and result.as_numpy("error").tolist() == [[b""]]
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
    return probs[0]


def _decode_reason(data: bytes) -> str:
    """What decode_image says about ``data`` in process (the server's limits are the defaults)."""
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    return str(info.value)


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_gets_precise_error_or_result_and_server_keeps_serving_when_sent_via_sdk(case, server_t1, raw, good):
    factory, fragments = CATALOGUE[case]
    data = factory()
    with LesionClient(server_t1.grpc_url, timeout=120) as client:
        if fragments is None:
            (result,) = client.classify([data])
            assert isinstance(result, LesionResult) and result.label in CLASS_NAMES
        else:
            # Third of three images: the index must be the caller's.
            with pytest.raises(UndecodableImageError) as info:
                client.classify([good, good, data])
            print(f"\nCATALOGUE {case} SDK: {info.value}")
            assert info.value.index == 2
            assert str(info.value) == f"server could not decode images[2]: {info.value.reason}"
            assert info.value.reason == _decode_reason(data)  # decode_image's words, unchanged
            for fragment in fragments:
                assert fragment in info.value.reason
    _assert_serving(raw, good)


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_gets_error_row_while_other_row_is_answered_when_sent_via_raw_tritonclient(case, raw, good):
    factory, fragments = CATALOGUE[case]
    data = factory()
    result = _raw_infer(raw, [good, data])  # succeeds: a bad image fails neither the request nor its neighbour
    errors, labels = result.as_numpy("error"), result.as_numpy("label")
    fired, probs = result.as_numpy("thresholds_fired"), result.as_numpy("probs")
    assert errors.shape == labels.shape == (2, 1) and probs.shape == fired.shape == (2, len(CLASS_NAMES))
    assert errors[0, 0] == b"" and labels[0, 0].decode() in CLASS_NAMES
    np.testing.assert_allclose(probs[0], _assert_serving(raw, good), atol=1e-6)  # same as sent alone
    if fragments is None:
        assert errors[1, 0] == b"" and labels[1, 0].decode() in CLASS_NAMES
    else:
        reason = errors[1, 0].decode()
        print(f"\nCATALOGUE {case} raw error[1]: {reason}")
        assert reason == _decode_reason(data) and "index" not in reason  # the row is the index
        for fragment in fragments:
            assert fragment in reason
        assert labels[1, 0] == b"" and not fired[1].any()


def test_sdk_rejects_empty_bytes_before_sending_and_server_names_it_when_raw(server_t1, raw, good):
    with LesionClient(server_t1.grpc_url) as client, pytest.raises(InvalidImageError, match=r"images\[1\]: the image bytes are empty"):
        client.classify([good, b""])
    result = _raw_infer(raw, [b""])
    assert result.as_numpy("error").tolist() == [[b"empty input (0 bytes)"]] and result.as_numpy("label")[0, 0] == b""
    _assert_serving(raw, good)


def _tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


#: Requests Triton itself refuses before any model runs: name -> (request kwargs builder, fragments).
PROTOCOL_CASES = {
    "wrong_dtype": (
        lambda good: {"inputs": [_tensor("raw_image", np.zeros((1, 1), np.float32), "FP32")]},
        ("StatusCode.INVALID_ARGUMENT", "input 'raw_image' data-type is 'FP32'", "expects 'BYTES'"),
    ),
    "wrong_shape": (
        lambda good: {"inputs": [_tensor("raw_image", np.array([[good, good]], dtype=np.object_), "BYTES")]},
        ("StatusCode.INVALID_ARGUMENT", "shape for input 'raw_image'", "Expected [-1,1], got [1,2]"),
    ),
    "batch_over_max_batch_size": (
        lambda good: {"inputs": [_tensor("raw_image", np.array([[good]] * 9, dtype=np.object_), "BYTES")]},
        ("StatusCode.INVALID_ARGUMENT", "batch-size must be <= 8 for 'lesion_ensemble'"),
    ),
    "unknown_model": (
        lambda good: {
            "model_name": "no_such_model",
            "inputs": [_tensor("raw_image", np.array([[good]], dtype=np.object_), "BYTES")],
        },
        ("StatusCode.NOT_FOUND", "unknown model: 'no_such_model'"),
    ),
    "unknown_output": (
        lambda good: {
            "inputs": [_tensor("raw_image", np.array([[good]], dtype=np.object_), "BYTES")],
            "outputs": [grpcclient.InferRequestedOutput("no_such_output")],
        },
        ("StatusCode.INVALID_ARGUMENT", "unexpected inference output 'no_such_output'"),
    ),
    "unknown_input": (
        lambda good: {"inputs": [_tensor("image", np.array([[good]], dtype=np.object_), "BYTES")]},
        ("StatusCode.INVALID_ARGUMENT", "unexpected inference input 'image'"),
    ),
}


@pytest.mark.parametrize("case", sorted(PROTOCOL_CASES))
def test_malformed_request_gets_precise_triton_error_and_server_keeps_serving_when_raw(case, raw, good):
    build, fragments = PROTOCOL_CASES[case]
    kwargs = {"model_name": "lesion_ensemble", **build(good)}
    with pytest.raises(InferenceServerException) as info:
        raw.infer(client_timeout=60, **kwargs)
    seen = f"[{info.value.status()}] {info.value.message()}"
    print(f"\nCATALOGUE {case} raw: {seen}")
    for fragment in fragments:
        assert fragment in seen
    _assert_serving(raw, good)


def test_sdk_raises_server_error_naming_model_when_model_is_unknown(server_t1, good):
    with LesionClient(server_t1.grpc_url, model_name="no_such_model") as client, pytest.raises(ServerError) as info:
        client.classify([good])
    print(f"\nCATALOGUE unknown_model SDK: {info.value}")
    assert "no_such_model" in str(info.value)


def test_classify_returns_results_for_good_images_and_errors_for_bad_when_partial(server_t1, good):
    cases = ["animated_gif", "one_pixel_png", "bomb_png_30000x30000", "text_file", "cmyk_jpeg"]
    images: list[object] = [good] + [CATALOGUE[c][0]() for c in cases] + [b"", good]
    with LesionClient(server_t1.grpc_url, max_images_per_request=4, timeout=120) as client:
        results = client.classify(images, partial=True)
        expected = client.classify([images[0], images[2], images[5], images[7]])
    errors = {i: r for i, r in enumerate(results) if not isinstance(r, LesionResult)}
    assert sorted(errors) == [1, 3, 4, 6]
    assert "GIF images are not accepted" in errors[1].reason
    assert "900000000 pixels" in errors[3].reason
    assert "not a JPEG, PNG" in errors[4].reason
    assert isinstance(errors[6], InvalidImageError) and errors[6].index == 6
    # The good images get exactly the results a request without the bad ones gives them.
    assert [results[i] for i in (0, 2, 5, 7)] == expected


def _ensemble_requests(raw, at_least: int = 0) -> tuple[int, int]:
    """(successful requests, images inferred) of lesion_ensemble so far, from the statistics API;
    waits (up to 5 s) for the success count to reach ``at_least``: Triton may update an ensemble's
    statistics just after its response has left."""
    deadline = time.monotonic() + 5
    while True:
        (stats,) = raw.get_inference_statistics("lesion_ensemble").model_stats
        if stats.inference_stats.success.count >= at_least or time.monotonic() > deadline:
            return stats.inference_stats.success.count, stats.inference_count
        time.sleep(0.05)


def test_classify_partial_answers_eight_images_with_three_bad_in_one_round_trip_when_served(server_t1, raw, many_images):
    bad = {1: _animated_gif(), 4: _png_declaring(30000, 30000), 6: CATALOGUE["text_file"][0]()}
    images = [bad.get(i, many_images[i]) for i in range(8)]
    good = [i for i in range(8) if i not in bad]
    with LesionClient(server_t1.grpc_url, timeout=120) as client:
        calls = []
        infer = client._client.infer

        def counting_infer(*args, **kwargs):  # passes through: counts the SDK's round trips
            calls.append(kwargs["inputs"][0].shape()[0])  # images in the request
            return infer(*args, **kwargs)

        client._client.infer = counting_infer
        before = _ensemble_requests(raw)
        results = client.classify(images, partial=True)
        after = _ensemble_requests(raw, at_least=before[0] + 1)
        client._client.infer = infer
        alone = [client.classify([images[i]])[0] for i in good]
    server_requests, server_images = after[0] - before[0], after[1] - before[1]
    print(f"\nROUND TRIPS classify(8 images, 3 bad, partial=True): {len(calls)} infer call(s) of {calls} images; "
          f"server lesion_ensemble: +{server_requests} successful request(s), +{server_images} images")
    assert calls == [8] and server_requests == 1 and server_images == 8
    for index, data in bad.items():
        error = results[index]
        assert isinstance(error, UndecodableImageError) and error.index == index
        assert error.reason == _decode_reason(data)
    for index, expected in zip(good, alone):
        result = results[index]
        assert isinstance(result, LesionResult) and result.label == expected.label
        assert result.thresholds_fired == expected.thresholds_fired
        np.testing.assert_allclose(
            [result.probabilities[c] for c in CLASS_NAMES], [expected.probabilities[c] for c in CLASS_NAMES], atol=1e-6
        )
        for backbone, probs in expected.backbone_probabilities.items():
            np.testing.assert_allclose(
                [result.backbone_probabilities[backbone][c] for c in CLASS_NAMES], [probs[c] for c in CLASS_NAMES], atol=1e-6
            )
