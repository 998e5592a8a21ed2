"""Safe defaults of a server started with no options (docs/reliability.md, "Safe defaults").

Loopback only; no model control; no API that makes the server open a file or a shared-memory
object a request names; the SDK's own calls still work (and a model trained at 64 px is served at
64 px, equal to the reference pipeline).
"""
from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lesionserve.processes import listening_sockets
from lesionserve.reference import ReferencePipeline
from lesionserve_client import LesionClient
from tests.integration.test_ensemble import assert_parity

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def raw(server_small):
    with grpcclient.InferenceServerClient(server_small.grpc_url) as client:
        yield client


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_server_listens_only_on_loopback_when_started_with_defaults(server_small):
    sockets = listening_sockets(server_small.process.pid)
    print(f"tritonserver {server_small.process.pid} listens on {sorted(sockets)}")
    assert {port for _, port in sockets} == {server_small.grpc_port, server_small.http_port, server_small.metrics_port}
    assert all(is_loopback(host) for host, _ in sockets), sockets
    for stub in server_small.stubs():
        assert listening_sockets(stub.pid) == set(), f"{stub.name} listens"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.load_model("tta"),
        lambda c: c.unload_model("tta"),
        # A load that carries its own model files: would write and run them.
        lambda c: c.load_model("tta", config='{"backend": "python"}', files={"file:1/model.py": b"import os"}),
        lambda c: c.get_model_repository_index(),
    ],
    ids=["load", "unload", "load_with_file_override", "repository_index"],
)
def test_model_control_and_repository_api_refused_when_defaults(raw, call):
    with pytest.raises(InferenceServerException, match="This protocol is restricted") as info:
        call(raw)
    assert info.value.status() == "StatusCode.UNAVAILABLE"


def test_no_request_can_map_host_shared_memory_or_redirect_logs_when_defaults(server_small, raw):
    region = server_small.stubs()[0].shm_region  # a real object in /dev/shm: the backend's own region
    calls = {
        "register the python backend's region": lambda: raw.register_system_shared_memory("r", f"/{region}", 4096),
        "register a path": lambda: raw.register_system_shared_memory("p", "/etc/passwd", 4096),
        "log file": lambda: raw.update_log_settings({"log_file": "/tmp/lesionserve-hijack.log"}),
        "trace file": lambda: raw.update_trace_settings(settings={"trace_file": "/tmp/lesionserve-trace.json"}),
    }
    for what, call in calls.items():
        with pytest.raises(InferenceServerException, match="This protocol is restricted") as info:
            call()
        print(f"{what}: {info.value}")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("v2/repository/models/tta/load", {"parameters": {"config": "{}", "file:1/model.py": "aW1wb3J0IG9z"}}),
        ("v2/repository/models/tta/unload", {}),
        ("v2/systemsharedmemory/region/r/register", {"key": "/etc/passwd", "offset": 0, "byte_size": 16}),
        ("v2/logging", {"log_file": "/tmp/lesionserve-hijack.log"}),
        ("v2/trace/setting", {"trace_file": "/tmp/lesionserve-trace.json"}),
    ],
)
def test_http_admin_endpoints_answer_403_when_defaults(server_small, path, body):
    request = urllib.request.Request(f"{server_small.http_url}/{path}", data=json.dumps(body).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 403
    assert "This API is restricted" in info.value.read().decode()


def test_sdk_classifies_at_the_trained_64px_within_1e4_of_reference_when_admin_apis_closed(
    server_small, small_artifacts, varied_images
):
    blobs = list(varied_images.values())
    with LesionClient(server_small.grpc_url) as client:
        results = client.classify(blobs)
    reference = ReferencePipeline.from_artifacts(small_artifacts, views=1)
    assert set(reference.input_sizes.values()) == {64}
    assert_parity(results, reference.run(blobs))
