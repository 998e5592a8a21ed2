"""Against a real tritonserver: parity with the reference pipeline, ordering, errors, recovery."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.spec import CLASS_NAMES
from lesionserve_client import LesionClient, UndecodableImageError

pytestmark = pytest.mark.integration

BACKBONE_NAMES = LESION_ENSEMBLE.member_names

#: Triton (ONNX Runtime) vs the PyTorch eager reference, on fused and per-backbone probabilities.
PARITY_ATOL = 1e-4


def as_arrays(results) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    probs = np.array([[r.probabilities[c] for c in CLASS_NAMES] for r in results])
    per = np.array([[[r.backbone_probabilities[b][c] for c in CLASS_NAMES] for b in BACKBONE_NAMES] for r in results])
    fired = np.array([[c in r.thresholds_fired for c in CLASS_NAMES] for r in results])
    return probs, per, [r.label for r in results], fired


def assert_parity(results, reference) -> float:
    probs, per, labels, fired = as_arrays(results)
    diff = max(np.abs(probs - reference.probs).max(), np.abs(per - reference.backbone_probs).max())
    print(f"parity: max |Triton - reference| = {diff:.2e} over {len(results)} images")
    assert diff <= PARITY_ATOL
    assert labels == reference.labels
    np.testing.assert_array_equal(fired, reference.thresholds_fired)
    return diff


@pytest.mark.parametrize("views", [8, 1])
def test_ensemble_matches_reference_within_1e4_when_images_vary_in_size_and_format(
    views, request, varied_images
):
    server = request.getfixturevalue(f"server_t{views}")
    reference = request.getfixturevalue(f"reference_t{views}")
    blobs = list(varied_images.values())
    with LesionClient(server.grpc_url) as client:
        results = client.classify(blobs)
    assert_parity(results, reference.run(blobs))
    assert any(r.thresholds_fired for r in results) or views == 1  # the decision path ran for real


def test_classify_returns_n_results_in_input_order_when_inputs_span_concurrent_requests(
    server_t1, reference_t1, many_images
):
    with LesionClient(server_t1.grpc_url, max_workers=3) as client:
        results = client.classify(many_images)
    assert len(results) == len(many_images)
    assert_parity(results, reference_t1.run(many_images))
    assert len({tuple(r.probabilities.values()) for r in results}) == len(many_images)


def test_classify_accepts_paths_bytes_and_arrays_when_mixed(server_t1, reference_t1, varied_images, tmp_path):
    import cv2

    path = tmp_path / "lesion.png"
    path.write_bytes(varied_images["png_320x240"])
    array = cv2.cvtColor(cv2.imdecode(np.frombuffer(varied_images["png_320x240"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with LesionClient(server_t1.grpc_url) as client:
        by_path, by_bytes, by_array = client.classify([str(path), varied_images["png_320x240"], array])
    assert by_path == by_bytes == by_array  # lossless array encoding: identical pixels, identical result


def test_undecodable_image_names_its_index_and_server_keeps_serving(server_t1, many_images):
    with LesionClient(server_t1.grpc_url, max_images_per_request=4) as client:
        with pytest.raises(UndecodableImageError) as info:
            client.classify(many_images[:5] + [b"\x89PNG but not really"] + many_images[5:7])
        assert info.value.index == 5
        assert "cannot decode" in info.value.reason
        assert len(client.classify(many_images[:2])) == 2


def test_raw_tritonclient_gets_typed_outputs_and_a_per_row_error_for_bad_bytes(server_t1, many_images):
    client = grpcclient.InferenceServerClient(server_t1.grpc_url)
    data = np.array([[many_images[0]], [many_images[1]]], dtype=np.object_)
    inp = grpcclient.InferInput("raw_image", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer("lesion_ensemble", [inp])
    assert result.as_numpy("probs").shape == (2, 7) and result.as_numpy("probs").dtype == np.float32
    assert result.as_numpy("backbone_probs").shape == (2, 3, 7)
    assert result.as_numpy("thresholds_fired").dtype == bool
    assert result.as_numpy("label")[0, 0].decode() in CLASS_NAMES
    np.testing.assert_allclose(result.as_numpy("probs").sum(1), 1.0, atol=1e-5)

    bad = np.array([[many_images[0]], [b""]], dtype=np.object_)
    inp = grpcclient.InferInput("raw_image", list(bad.shape), "BYTES")
    inp.set_data_from_numpy(bad)
    result = client.infer("lesion_ensemble", [inp])  # one bad row no longer fails the request
    assert result.as_numpy("error")[:, 0].tolist() == [b"", b"empty input (0 bytes)"]
    assert result.as_numpy("label")[0, 0].decode() in CLASS_NAMES and result.as_numpy("label")[1, 0] == b""
    assert not result.as_numpy("thresholds_fired")[1].any()


def test_client_cli_prints_json_results_when_run_against_server(server_t1, varied_images, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(varied_images["jpeg_600x450"])
    out = subprocess.run(
        [sys.executable, "-m", "lesionserve_client", "classify", str(path), "--url", server_t1.grpc_url, "--json"],
        capture_output=True, text=True, check=True,
    )
    payload = json.loads(out.stdout)
    assert len(payload) == 1 and payload[0]["label"] in CLASS_NAMES
