"""Unit tests for the lesionserve_client package; no Triton server needed.

As in PyTriton's client tests, tritonclient's gRPC InferenceServerClient is replaced by a fake,
but responses are real ``tritonclient.grpc.InferResult`` objects built from a
``ModelInferResponse`` protobuf, so the client's decoding runs on genuine tritonclient code.
"""
from __future__ import annotations

import json
import re
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferResult, service_pb2
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

try:
    import lesionserve_client  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client"))

from lesionserve_client import (  # noqa: E402
    InvalidImageError,
    LesionClient,
    LesionResult,
    LesionServeError,
    ModelConfigError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    UndecodableImageError,
    encode_png,
)
from lesionserve_client import cli  # noqa: E402
from lesionserve_client import client as client_module  # noqa: E402

CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
BACKBONES = ("resnet50", "densenet121", "efficientnet_b3")
THRESHOLD = 0.3


#: The ensemble's ``error`` output as get_model_config's JSON form writes it (int64 dims as strings).
ERROR_OUTPUT = {"name": "error", "data_type": "TYPE_STRING", "dims": ["1"]}


def make_config(
    max_batch_size: int = 8, error_output: Optional[dict[str, Any]] = ERROR_OUTPUT, **overrides: Optional[str]
) -> dict[str, Any]:
    """The JSON form of get_model_config for the ensemble; a None override drops that parameter,
    ``error_output=None`` the ``error`` output (a server older than per-row errors)."""
    params = {"class_names": ",".join(CLASSES), "backbones": ",".join(BACKBONES)}
    params.update(overrides)
    outputs = [
        {"name": "probs", "data_type": "TYPE_FP32", "dims": [str(len(CLASSES))]},
        {"name": "label", "data_type": "TYPE_STRING", "dims": ["1"]},
        {"name": "backbone_probs", "data_type": "TYPE_FP32", "dims": [str(len(BACKBONES)), str(len(CLASSES))]},
        {"name": "thresholds_fired", "data_type": "TYPE_BOOL", "dims": [str(len(CLASSES))]},
    ]
    if error_output is not None:
        outputs.append(error_output)
    return {
        "config": {
            "name": "lesion_ensemble",
            "max_batch_size": max_batch_size,
            "output": outputs,
            "parameters": {k: {"string_value": v} for k, v in params.items() if v is not None},
        }
    }


def fake_model(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-image outputs derived from the image bytes: (probs [7], backbone_probs [3, 7])."""
    rng = np.random.default_rng(zlib.crc32(blob))
    backbone = rng.dirichlet(np.ones(len(CLASSES)), size=len(BACKBONES)).astype(np.float32)
    return backbone.mean(axis=0), backbone


def expected_result(blob: bytes) -> LesionResult:
    """What the client should return for ``blob`` given fake_model."""
    probs, backbone = fake_model(blob)

    def f32(value: np.float32) -> float:
        return float(str(value))  # the client reports float32's shortest repr as a float

    return LesionResult(
        label=CLASSES[int(np.argmax(probs))],
        probabilities={c: f32(p) for c, p in zip(CLASSES, probs)},
        backbone_probabilities={b: {c: f32(p) for c, p in zip(CLASSES, backbone[i])} for i, b in enumerate(BACKBONES)},
        thresholds_fired=tuple(c for c, p in zip(CLASSES, probs) if p > THRESHOLD),
    )


def _bytes_tensor(values: list[bytes]) -> bytes:
    """Triton's raw BYTES encoding: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def build_response(
    blobs: list[bytes], classes: tuple[str, ...] = CLASSES, undecodable: Optional[dict[bytes, str]] = None
) -> InferResult:
    """A real InferResult carrying the five ensemble outputs for ``blobs``, in raw_output_contents.

    Blobs in ``undecodable`` are answered as the server answers an image it cannot decode: the
    reason in ``error``, label b"", no threshold fired (probabilities meaningless).
    """
    undecodable = undecodable or {}
    n = len(blobs)
    outs = [fake_model(b) for b in blobs]
    probs = np.stack([o[0] for o in outs]).astype(np.float32)
    backbone = np.stack([o[1] for o in outs]).astype(np.float32)
    bad = np.array([b in undecodable for b in blobs])
    labels = [b"" if bad[row] else classes[int(i)].encode() for row, i in enumerate(probs.argmax(axis=1))]
    fired = (probs > THRESHOLD) & ~bad[:, None]
    errors = [undecodable.get(b, "").encode() for b in blobs]
    response = service_pb2.ModelInferResponse(model_name="lesion_ensemble", id="")

    def add(name: str, datatype: str, shape: list[int], raw: bytes) -> None:
        tensor = response.outputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(shape)
        response.raw_output_contents.append(raw)

    # Deliberately not in the requested order: the client must look outputs up by name.
    add("label", "BYTES", [n, 1], _bytes_tensor(labels))
    add("error", "BYTES", [n, 1], _bytes_tensor(errors))
    add("probs", "FP32", [n, len(CLASSES)], probs.tobytes())
    add("thresholds_fired", "BOOL", [n, len(CLASSES)], fired.astype(np.bool_).tobytes())
    add("backbone_probs", "FP32", [n, len(BACKBONES), len(CLASSES)], backbone.tobytes())
    return InferResult(response)


class FakeTritonClient:
    """Stands in for tritonclient.grpc.InferenceServerClient; records what the client sends."""

    instances: list["FakeTritonClient"] = []
    config: dict[str, Any] = make_config()
    #: Optional hook run on every infer with the decoded blobs; may raise or sleep.
    on_infer: Optional[Callable[[list[bytes]], None]] = None
    #: Optional exception raised by get_model_config.
    config_error: Optional[Exception] = None
    #: Blob -> reason: images this fake server cannot decode (answered in the ``error`` output).
    undecodable: dict[bytes, str] = {}

    def __init__(
        self, url: str, verbose: bool = False, ssl: bool = False, root_certificates: Any = None, channel_args: Any = None
    ) -> None:
        self.url = url
        self.ssl = ssl
        self.root_certificates = root_certificates
        self.channel_args = dict(channel_args or [])
        self.closed = False
        self.config_calls = 0
        self.requests: list[list[bytes]] = []
        self.timeouts: list[Optional[float]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        FakeTritonClient.instances.append(self)

    def get_model_config(self, model_name: str, as_json: bool = False, client_timeout: Optional[float] = None) -> Any:
        assert as_json, "the client reads the JSON form of the config"
        self.config_calls += 1
        self.timeouts.append(client_timeout)
        if self.config_error is not None:
            raise self.config_error
        return json.loads(json.dumps(self.config))

    def infer(
        self,
        model_name: str,
        inputs: list[InferInput],
        outputs: Any = None,
        client_timeout: Optional[float] = None,
        **_: Any,
    ) -> InferResult:
        (tensor,) = inputs
        assert (tensor.name(), tensor.datatype()) == ("raw_image", "BYTES")
        blobs = [bytes(b) for b in deserialize_bytes_tensor(tensor._get_content())]
        assert tensor.shape() == [len(blobs), 1]
        assert sorted(o.name() for o in outputs) == sorted(["probs", "label", "backbone_probs", "thresholds_fired", "error"])
        with self._lock:
            self.requests.append(blobs)
            self.timeouts.append(client_timeout)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if self.on_infer is not None:
                type(self).on_infer(blobs)  # type: ignore[misc]
            names = self.config["config"]["parameters"]["class_names"]["string_value"]
            return build_response(blobs, tuple(names.split(",")), self.undecodable)
        finally:
            with self._lock:
                self.in_flight -= 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeTritonClient]:
    """Patch the class the client module instantiates; return the fake class for configuration."""
    monkeypatch.setattr(FakeTritonClient, "instances", [])
    monkeypatch.setattr(FakeTritonClient, "config", make_config())
    monkeypatch.setattr(FakeTritonClient, "on_infer", None)
    monkeypatch.setattr(FakeTritonClient, "config_error", None)
    monkeypatch.setattr(FakeTritonClient, "undecodable", {})
    monkeypatch.setattr(client_module, "InferenceServerClient", FakeTritonClient)
    monkeypatch.setattr(FakeTritonClient, "sleeps", [], raising=False)
    # Retries wait through this seam: recorded, not slept, so error tests stay instant.
    monkeypatch.setattr(client_module.LesionClient, "_sleep", staticmethod(FakeTritonClient.sleeps.append))
    return FakeTritonClient


def blobs_of(n: int) -> list[bytes]:
    # Trailing NULs: np.bytes_ would strip them, np.object_ must not.
    return [b"image-%02d\x00\x00" % i for i in range(n)]


def decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for the writer's output (8-bit RGB, filter type 0), by walking the chunks."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, colour, interlace) == (8, 2, 0)
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 3)
    assert not rows[:, 0].any(), "every scanline uses filter type 0"
    return rows[:, 1:].reshape(height, width, 3)


# -- classify -------------------------------------------------------------------------------


def test_classify_returns_results_in_input_order_when_inputs_span_concurrent_requests(fake):
    blobs = blobs_of(19)

    def slow_first(batch: list[bytes]) -> None:
        # Earlier requests finish last, so completion order is the reverse of input order.
        time.sleep({0: 0.3, 8: 0.15}.get(blobs.index(batch[0]), 0.0))

    fake.on_infer = staticmethod(slow_first)
    with LesionClient(max_workers=4) as client:
        results = client.classify(blobs)
    server = fake.instances[0]
    assert sorted(len(r) for r in server.requests) == [3, 8, 8]
    assert server.peak_in_flight >= 2
    assert results == [expected_result(b) for b in blobs]


@pytest.mark.parametrize(("requested", "sizes"), [(None, [3, 8, 8]), (5, [4, 5, 5, 5]), (20, [3, 8, 8])])
def test_classify_splits_requests_by_batch_limit_when_max_images_per_request_varies(fake, requested, sizes):
    blobs = blobs_of(19)
    with LesionClient(max_images_per_request=requested) as client:
        results = client.classify(blobs)
    assert sorted(len(r) for r in fake.instances[0].requests) == sizes
    assert [r.label for r in results] == [expected_result(b).label for b in blobs]


def test_classify_sends_each_input_type_as_bytes_when_inputs_are_mixed(fake, tmp_path):
    path = tmp_path / "lesion.jpg"
    path.write_bytes(b"\xff\xd8jpeg-ish\x00")
    array = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    inputs = [str(path), b"raw\x00\x00", bytearray(b"mutable"), array, path]
    with LesionClient() as client:
        results = client.classify(inputs)
    (sent,) = fake.instances[0].requests
    assert sent[0] == sent[4] == b"\xff\xd8jpeg-ish\x00"
    assert sent[1] == b"raw\x00\x00"
    assert sent[2] == b"mutable"
    np.testing.assert_array_equal(decode_png(sent[3]), array)
    assert results == [expected_result(b) for b in sent]


def test_classify_returns_empty_list_without_contacting_server_when_input_is_empty(fake):
    with LesionClient() as client:
        assert client.classify([]) == []
    assert fake.instances[0].config_calls == 0
    assert fake.instances[0].requests == []


def test_classify_reads_model_config_once_when_called_repeatedly(fake):
    with LesionClient(timeout=7.5) as client:
        client.classify(blobs_of(2))
        client.classify(blobs_of(3))
        assert client.class_names == CLASSES
        assert client.backbones == BACKBONES
    server = fake.instances[0]
    assert server.config_calls == 1
    # Each call gets what is left of its 7.5 s when it starts (the timeout covers retries too).
    assert len(server.timeouts) == 3 and all(7.4 < t <= 7.5 for t in server.timeouts)


def test_classify_uses_server_class_order_when_config_declares_other_names(fake):
    renamed = tuple(c.lower() for c in CLASSES)
    fake.config = make_config(class_names=",".join(renamed))
    with LesionClient() as client:
        (result,) = client.classify([b"x"])
    expected = expected_result(b"x")
    assert result.probabilities == {c.lower(): p for c, p in expected.probabilities.items()}
    assert result.label == expected.label.lower()


def test_classify_raises_type_error_when_given_a_single_image(fake):
    with LesionClient() as client, pytest.raises(TypeError, match="wrap a single image"):
        client.classify("lesion.jpg")


# -- result ---------------------------------------------------------------------------------


def test_result_exposes_confidence_and_json_dict_when_built_from_response(fake):
    with LesionClient() as client:
        (result,) = client.classify([b"some image"])
    expected = expected_result(b"some image")
    assert result.confidence == expected.probabilities[expected.label] == max(result.probabilities.values())
    assert set(result.backbone_probabilities) == set(BACKBONES)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["label"] == expected.label
    assert data["confidence"] == pytest.approx(result.confidence)
    assert data["thresholds_fired"] == list(expected.thresholds_fired)
    assert list(data["probabilities"]) == list(CLASSES)


# -- PNG writer ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 33, 3)])
def test_encode_png_round_trips_pixels_when_decoded_with_zlib(shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(array)), array)


def test_encode_png_round_trips_pixels_when_decoded_with_opencv():
    cv2 = pytest.importorskip("cv2")
    array = np.random.default_rng(1).integers(0, 256, size=(20, 31, 3), dtype=np.uint8)
    view = array[:, ::-1]  # non-contiguous input must still encode correctly
    decoded = cv2.imdecode(np.frombuffer(encode_png(view), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded[:, :, ::-1], view)  # OpenCV decodes to BGR


# -- invalid input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("__missing__", "file not found"),
        (np.zeros((8, 8), dtype=np.uint8), "shape (8, 8)"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "shape (8, 8, 4)"),
        (np.zeros((8, 8, 3), dtype=np.float32), "float32"),
        (42, "unsupported type int"),
        (b"", "empty"),
    ],
)
def test_classify_raises_invalid_image_error_with_index_when_input_is_unusable(fake, tmp_path, bad, message):
    if isinstance(bad, str):
        bad = str(tmp_path / "missing.jpg")
    with LesionClient() as client, pytest.raises(InvalidImageError) as info:
        client.classify([b"fine", b"fine too", bad])
    assert info.value.index == 2
    assert "images[2]" in str(info.value) and message in str(info.value)
    assert "HxWx3 uint8" in str(info.value)  # says what is allowed
    assert fake.instances[0].requests == []  # nothing sent


# -- error mapping --------------------------------------------------------------------------


def test_classify_raises_server_unavailable_error_with_url_when_connection_refused(fake):
    fake.config_error = InferenceServerException(
        "failed to connect to all addresses; last error: Connection refused", status="StatusCode.UNAVAILABLE"
    )
    with LesionClient("triton.local:8001") as client, pytest.raises(ServerUnavailableError, match="triton.local:8001"):
        client.classify([b"x"])


def test_classify_raises_server_unavailable_error_when_status_missing_but_message_says_refused(fake):
    fake.config_error = InferenceServerException("Connection refused")
    with LesionClient() as client, pytest.raises(ServerUnavailableError):
        client.classify([b"x"])


def test_classify_raises_request_timeout_error_with_timeout_when_deadline_exceeded(fake):
    def too_slow(batch: list[bytes]) -> None:
        raise InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")

    fake.on_infer = staticmethod(too_slow)
    with LesionClient(timeout=2.5) as client, pytest.raises(RequestTimeoutError, match="2.5s"):
        client.classify([b"x"])


#: Reasons in decode_image's own words, as the server's ``error`` output carries them.
TRUNCATED = "cannot decode image (12 bytes): corrupt or truncated (accepted formats: JPEG, PNG, BMP, TIFF, WebP)"
GIF = "GIF images are not accepted; accepted formats: JPEG, PNG, BMP, TIFF, WebP"
TOO_BIG = "image is 123 bytes; the limit is 100 bytes"


def test_classify_raises_first_undecodable_image_with_caller_index_when_a_later_request_reports_two(fake):
    blobs = blobs_of(19)
    blobs[10], blobs[13] = b"truncated", b"gif"
    fake.undecodable = {b"truncated": TRUNCATED, b"gif": GIF}
    with LesionClient() as client, pytest.raises(UndecodableImageError) as info:
        client.classify(blobs)
    assert info.value.index == 10  # row 2 of the second request, which starts at 8: the first bad image
    assert info.value.reason == TRUNCATED
    assert str(info.value) == f"server could not decode images[10]: {TRUNCATED}"
    sent = [blob for request in fake.instances[0].requests for blob in request]
    assert len(sent) == len(set(sent))  # no image resent (the request after it may be cancelled unsent)


def test_classify_raises_server_error_not_undecodable_when_a_message_only_reads_like_one(fake):
    # The SDK parses no prose: a message in the old server's wording is just a server error.
    def old_wording(batch: list[bytes]) -> None:
        raise InferenceServerException(
            "in ensemble 'lesion_ensemble', undecodable image at index 0: cannot decode image",
            status="StatusCode.INVALID_ARGUMENT",
        )

    fake.on_infer = staticmethod(old_wording)
    with LesionClient() as client, pytest.raises(ServerError) as info:
        client.classify([b"x"], partial=True)
    assert type(info.value) is ServerError and info.value.status == "StatusCode.INVALID_ARGUMENT"
    assert "undecodable image at index 0: cannot decode image" in str(info.value)


def test_classify_raises_server_error_keeping_message_when_other_server_failure(fake):
    def crash(batch: list[bytes]) -> None:
        raise InferenceServerException("onnx runtime error 6: out of memory", status="StatusCode.INTERNAL")

    fake.on_infer = staticmethod(crash)
    with LesionClient() as client, pytest.raises(ServerError) as info:
        client.classify([b"x"])
    assert type(info.value) is ServerError
    assert info.value.status == "StatusCode.INTERNAL"
    assert "onnx runtime error 6: out of memory" in str(info.value)
    assert isinstance(info.value.__cause__, InferenceServerException)


@pytest.mark.parametrize("missing", ["class_names", "backbones"])
def test_classify_raises_model_config_error_when_config_lacks_parameter(fake, missing):
    fake.config = make_config(**{missing: None})
    with LesionClient() as client, pytest.raises(ModelConfigError, match=f"no '{missing}' parameter"):
        client.classify([b"x"])
    assert fake.instances[0].requests == []


def test_classify_raises_model_config_error_naming_the_output_when_server_predates_per_row_errors(fake):
    fake.config = make_config(error_output=None)
    with LesionClient() as client, pytest.raises(ModelConfigError) as info:
        client.classify([b"x"], partial=True)
    message = str(info.value)
    assert "model 'lesion_ensemble' config has no 'error' output" in message
    assert "(outputs: probs, label, backbone_probs, thresholds_fired)" in message
    assert 'output { name: "error", data_type: TYPE_STRING, dims: [ 1 ] }' in message
    assert fake.instances[0].requests == []


@pytest.mark.parametrize(
    ("declared", "seen"),
    [({"name": "error", "data_type": "TYPE_FP32", "dims": ["1"]}, "TYPE_FP32 [1]"),
     ({"name": "error", "data_type": "TYPE_STRING", "dims": ["2"]}, "TYPE_STRING [2]")],
)
def test_classify_raises_model_config_error_when_error_output_has_another_type_or_shape(fake, declared, seen):
    fake.config = make_config(error_output=declared)
    with LesionClient() as client, pytest.raises(ModelConfigError, match=rf"declares output 'error' as {re.escape(seen)}; expected"):
        client.classify([b"x"])
    assert fake.instances[0].requests == []


def test_classify_raises_server_error_when_response_lacks_error_output(fake, monkeypatch):
    real = build_response

    def without_error(blobs: list[bytes], classes: tuple[str, ...] = CLASSES, undecodable: Any = None) -> InferResult:
        response = real(blobs, classes)._result
        index = [o.name for o in response.outputs].index("error")
        del response.outputs[index]
        del response.raw_output_contents[index]
        return InferResult(response)

    monkeypatch.setattr(sys.modules[__name__], "build_response", without_error)
    with LesionClient() as client, pytest.raises(ServerError, match="response is missing output 'error'"):
        client.classify([b"x"])


def test_all_errors_derive_from_lesionserve_error_when_caught_generically():
    errors = (ServerUnavailableError, RequestTimeoutError, UndecodableImageError, InvalidImageError, ServerError)
    for error in errors:
        assert issubclass(error, LesionServeError)
    assert issubclass(ModelConfigError, ServerError)


# -- lifecycle ------------------------------------------------------------------------------


def test_context_manager_closes_underlying_client_when_block_exits(fake):
    with LesionClient() as client:
        client.classify(blobs_of(10))  # starts the worker pool too
        assert not fake.instances[0].closed
    assert fake.instances[0].closed
    with pytest.raises(RuntimeError, match="closed"):
        client.classify([b"x"])


def test_client_rejects_url_when_it_has_a_scheme(fake):
    with pytest.raises(ValueError, match="host:port"):
        LesionClient("http://localhost:8000")


# -- retries --------------------------------------------------------------------------------


def unavailable_then_ok(failures: int) -> Callable[[list[bytes]], None]:
    """An on_infer hook failing the first ``failures`` requests with gRPC UNAVAILABLE."""
    calls = [0]

    def infer(batch: list[bytes]) -> None:
        calls[0] += 1
        if calls[0] <= failures:
            raise InferenceServerException("failed to connect to all addresses; Connection refused",
                                           status="StatusCode.UNAVAILABLE")

    return infer


def test_classify_retries_unavailable_with_exponential_backoff_when_server_comes_back(fake):
    fake.on_infer = staticmethod(unavailable_then_ok(3))
    with LesionClient(retries=3, backoff=0.25, max_backoff=10) as client:
        results = client.classify([b"x"])
    assert results == [expected_result(b"x")]
    assert len(fake.instances[0].requests) == 4  # 3 refused + 1 answered
    assert fake.sleeps == [0.25, 0.5, 1.0]


def test_classify_raises_unavailable_naming_attempts_when_retries_run_out(fake):
    fake.on_infer = staticmethod(unavailable_then_ok(10))
    with LesionClient("h:1", retries=2, backoff=0.1, max_backoff=0.15) as client, \
            pytest.raises(ServerUnavailableError, match=r"h:1 is unavailable.*gave up after 3 attempts") as info:
        client.classify([b"x"])
    assert fake.sleeps == [0.1, 0.15]  # doubling, capped at max_backoff
    assert isinstance(info.value.__cause__, InferenceServerException)


def test_classify_does_not_retry_when_retries_is_zero(fake):
    fake.on_infer = staticmethod(unavailable_then_ok(1))
    with LesionClient(retries=0) as client, pytest.raises(ServerUnavailableError) as info:
        client.classify([b"x"])
    assert "gave up" not in str(info.value) and fake.sleeps == []


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        ("StatusCode.INVALID_ARGUMENT", "inference request batch-size must be <= 8", ServerError),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", RequestTimeoutError),
        ("StatusCode.INTERNAL", "Stub process 'resnet50_0_0' is not healthy.", ServerError),
    ],
)
def test_classify_never_retries_errors_other_than_unavailable(fake, status, message, error):
    def fail(batch: list[bytes]) -> None:
        raise InferenceServerException(message, status=status)

    fake.on_infer = staticmethod(fail)
    with LesionClient(retries=5) as client, pytest.raises(error):
        client.classify([b"x"])
    assert len(fake.instances[0].requests) == 1 and fake.sleeps == []


def test_classify_stops_retrying_within_timeout_when_server_stays_down(fake, monkeypatch):
    # Real waiting here: the point is the wall-clock bound. 0.3 s, then 0.6 s; 1.2 s no longer fits in 1 s.
    monkeypatch.setattr(client_module.LesionClient, "_sleep", staticmethod(time.sleep))
    fake.on_infer = staticmethod(unavailable_then_ok(100))
    start = time.monotonic()
    with LesionClient(timeout=1.0, retries=10, backoff=0.3, max_backoff=5) as client, \
            pytest.raises(ServerUnavailableError, match="gave up after 3 attempts"):
        client.classify([b"x"])
    assert time.monotonic() - start < 1.0
    assert all(0 < t <= 1.0 for t in fake.instances[0].timeouts)  # no attempt may run past the deadline


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be >= 0"),
        ({"backoff": 0}, "backoff must be > 0"),
        ({"backoff": 2, "max_backoff": 1}, "max_backoff >= backoff"),
    ],
)
def test_client_rejects_retry_settings_when_out_of_range(fake, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LesionClient(**kwargs)


def test_client_caps_grpc_reconnect_backoff_and_keeps_message_limits_when_channel_built(fake):
    with LesionClient():
        pass
    args = fake.instances[0].channel_args
    assert args["grpc.max_reconnect_backoff_ms"] == client_module.MAX_RECONNECT_BACKOFF_MS <= 1000
    assert args["grpc.max_receive_message_length"] == args["grpc.max_send_message_length"] == 2**31 - 1


# -- TLS options ----------------------------------------------------------------------------

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBfakecertificatebody\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEsecretkeymaterial0123456789\n-----END PRIVATE KEY-----\n"


def test_client_raises_naming_the_path_when_root_certificates_missing(fake, tmp_path):
    missing = tmp_path / "no-ca.pem"
    with pytest.raises(FileNotFoundError, match=r"root_certificates file not found: '.*no-ca\.pem'"):
        LesionClient(ssl=True, root_certificates=missing)
    assert fake.instances == []  # no channel was created


def test_client_raises_without_echoing_content_when_root_certificates_is_not_a_certificate(fake, tmp_path):
    key = tmp_path / "server.key"
    key.write_text(PEM_KEY)
    with pytest.raises(ValueError, match="holds no PEM certificate") as info:
        LesionClient(ssl=True, root_certificates=key)
    assert "secretkeymaterial" not in str(info.value)


def test_client_raises_when_root_certificates_given_without_ssl(fake, tmp_path):
    (tmp_path / "ca.pem").write_text(PEM_CERT)
    with pytest.raises(ValueError, match="pass ssl=True"):
        LesionClient(root_certificates=tmp_path / "ca.pem")


def test_client_passes_tls_settings_and_repr_shows_paths_only_when_ssl(fake, tmp_path):
    (tmp_path / "ca.pem").write_text(PEM_CERT)
    with LesionClient("h:1", ssl=True, root_certificates=tmp_path / "ca.pem") as client:
        text = repr(client)
    assert fake.instances[0].ssl is True and fake.instances[0].root_certificates == str(tmp_path / "ca.pem")
    assert "ssl=True" in text and "ca.pem" in text and "fakecertificatebody" not in text


def test_cli_passes_ssl_and_root_certificates_when_given(fake, images, tmp_path, capsys):
    (tmp_path / "ca.pem").write_text(PEM_CERT)
    assert cli.main(["classify", *images, "--ssl", "--root-certificates", str(tmp_path / "ca.pem"), "--retries", "0"]) == 0
    assert fake.instances[0].ssl is True and fake.instances[0].root_certificates == str(tmp_path / "ca.pem")


def test_cli_exits_2_naming_the_ca_file_when_missing(fake, images, tmp_path, capsys):
    assert cli.main(["classify", *images, "--ssl", "--root-certificates", str(tmp_path / "ca.pem")]) == 2
    assert f"root_certificates file not found: '{tmp_path / 'ca.pem'}'" in capsys.readouterr().err


def test_cli_refuses_root_certificates_without_ssl(fake, images, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["classify", *images, "--root-certificates", str(tmp_path / "ca.pem")])
    assert info.value.code == 2 and "add --ssl" in capsys.readouterr().err


# -- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for name, content in [("a.jpg", b"first image"), ("longer_name.png", b"second image")]:
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    return paths


def test_cli_prints_aligned_table_when_classifying(fake, images, capsys):
    assert cli.main(["classify", *images, "--url", "h:1", "--timeout", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["IMAGE", "LABEL", "CONFIDENCE", "TOP-3", "THRESHOLDS", "FIRED"]
    assert len(lines) == 3
    for line, path, blob in zip(lines[1:], images, [b"first image", b"second image"]):
        expected = expected_result(blob)
        assert line.startswith(path)
        assert line.index(expected.label, len(path)) == lines[0].index("LABEL")  # column aligned
        assert f"{expected.confidence:.3f}" in line
        top1, prob1 = max(expected.probabilities.items(), key=lambda kv: kv[1])
        assert f"{top1} {prob1:.3f}" in line
    assert fake.instances[0].url == "h:1"
    assert 2.9 < fake.instances[0].timeouts[0] <= 3.0  # what is left of the 3 s once the call starts


def test_cli_prints_json_list_when_json_flag_given(fake, images, capsys):
    assert cli.main(["classify", *images, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["image"] for d in data] == images
    assert [d["label"] for d in data] == [expected_result(b).label for b in (b"first image", b"second image")]
    assert set(data[0]["backbone_probabilities"]) == set(BACKBONES)


@pytest.mark.parametrize(
    ("status", "message", "code"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect\nConnection refused", 3),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'raw_image'", 2),
        ("StatusCode.INTERNAL", "boom", 2),
    ],
)
def test_cli_prints_one_line_error_and_exit_code_when_request_fails(fake, images, capsys, status, message, code):
    def fail(batch: list[bytes]) -> None:
        raise InferenceServerException(message, status=status)

    fake.on_infer = staticmethod(fail)
    assert cli.main(["classify", *images]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    err_lines = captured.err.splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ")


def test_cli_exits_2_naming_image_and_reason_when_server_cannot_decode_one(fake, images, capsys):
    fake.undecodable = {b"second image": GIF}
    assert cli.main(["classify", *images]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: server could not decode images[1]: {GIF}\n"


def test_cli_exits_2_naming_the_file_when_image_is_missing(fake, tmp_path, capsys):
    assert cli.main(["classify", str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err


def test_cli_help_describes_url_and_images_when_requested(capsys):
    with pytest.raises(SystemExit) as top:
        cli.main(["--help"])
    assert top.value.code == 0
    assert "classify" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["classify", "--help"])
    text = capsys.readouterr().out
    assert "host:port" in text and "JPEG" in text and "--json" in text


# -- partial results ------------------------------------------------------------------------


def test_classify_answers_eight_images_with_three_bad_in_one_round_trip_when_partial(fake):
    blobs = blobs_of(8)
    reasons = {1: TRUNCATED, 4: GIF, 6: TOO_BIG}
    for index, reason in reasons.items():
        blobs[index] = b"bad-%d" % index
        fake.undecodable[blobs[index]] = reason
    with LesionClient() as client:
        results = client.classify(blobs, partial=True)
    assert fake.instances[0].requests == [blobs]  # exactly one infer call, every image in it
    errors = {i: r for i, r in enumerate(results) if not isinstance(r, LesionResult)}
    assert sorted(errors) == [1, 4, 6]
    for index, error in errors.items():
        assert type(error) is UndecodableImageError and error.index == index and error.reason == reasons[index]
        assert str(error) == f"server could not decode images[{index}]: {reasons[index]}"
    assert [results[i] for i in (0, 2, 3, 5, 7)] == [expected_result(blobs[i]) for i in (0, 2, 3, 5, 7)]


def test_classify_returns_errors_in_place_and_other_results_when_partial_and_images_are_bad(fake, tmp_path):
    blobs = blobs_of(19)
    blobs[1], blobs[9], blobs[10] = b"bad-a", b"bad-b", b"bad-c"  # two in the same request
    fake.undecodable = {b"bad-a": TRUNCATED, b"bad-b": GIF, b"bad-c": TOO_BIG}
    images: list[Any] = list(blobs) + [str(tmp_path / "missing.jpg")]
    with LesionClient(max_workers=3) as client:
        results = client.classify(images, partial=True)
    assert len(results) == 20
    for index, result in enumerate(results):
        if index in (1, 9, 10):
            assert isinstance(result, UndecodableImageError) and result.index == index
            assert result.reason == fake.undecodable[blobs[index]]
        elif index == 19:
            assert isinstance(result, InvalidImageError) and result.index == 19 and "file not found" in result.reason
        else:
            assert result == expected_result(blobs[index])
    # The same three requests as without bad images: every image sent once, nothing resent.
    requests = fake.instances[0].requests
    assert sorted(len(r) for r in requests) == [3, 8, 8]
    assert sorted(b for r in requests for b in r) == sorted(blobs)


def test_classify_sends_the_same_requests_whether_partial_or_not_when_every_image_is_good(fake):
    blobs = blobs_of(19)
    with LesionClient(max_workers=1) as client:
        strict = client.classify(blobs)
        partial = client.classify(blobs, partial=True)
    requests = fake.instances[0].requests
    assert strict == partial and len(requests) == 6
    assert sorted(map(tuple, requests[:3])) == sorted(map(tuple, requests[3:]))


def test_classify_still_raises_when_not_partial_and_an_image_is_bad(fake):
    blobs = blobs_of(3)
    blobs[2] = b"bad"
    fake.undecodable = {b"bad": TOO_BIG}
    with LesionClient() as client, pytest.raises(UndecodableImageError) as info:
        client.classify(blobs)
    assert info.value.index == 2 and info.value.reason == TOO_BIG
    assert str(info.value) == f"server could not decode images[2]: {TOO_BIG}"
    assert len(fake.instances[0].requests) == 1


def test_classify_returns_only_errors_in_one_request_when_partial_and_every_image_is_undecodable(fake):
    blobs = [b"bad-0", b"bad-1", b"bad-2"]
    fake.undecodable = {blob: f"reason {i}" for i, blob in enumerate(blobs)}
    with LesionClient() as client:
        results = client.classify(blobs, partial=True)
    assert [(type(r), r.index, r.reason) for r in results] == [(UndecodableImageError, i, f"reason {i}") for i in range(3)]
    assert len(fake.instances[0].requests) == 1


def test_classify_raises_server_error_even_when_partial(fake):
    def crash(batch: list[bytes]) -> None:
        raise InferenceServerException("onnx runtime error 6: out of memory", status="StatusCode.INTERNAL")

    fake.on_infer = staticmethod(crash)
    with LesionClient() as client, pytest.raises(ServerError, match="out of memory"):
        client.classify(blobs_of(2), partial=True)


def test_classify_returns_only_errors_without_requests_when_partial_and_every_input_is_unusable(fake):
    with LesionClient() as client:
        results = client.classify([b"", 3], partial=True)
    assert [type(r) for r in results] == [InvalidImageError, InvalidImageError]
    assert [r.index for r in results] == [0, 1]
    assert not fake.instances[0].requests
