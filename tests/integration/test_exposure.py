"""The exposed configuration: `lesionserve serve` with TLS and an API key (`--api-key-file`), as the
Kubernetes manifests run it (there with `--host 0.0.0.0`; here on loopback, the same flags otherwise).

Inference needs the key, over TLS gRPC only: a request without it, with a wrong one, in plain gRPC
or over the HTTP port (a KServe v2 binary request, which a default server answers) is refused; the
right one is answered; HTTP still answers health. The key appears in no output, log, message or repr.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lesionserve.processes import python_stubs
from lesionserve.spec import CLASS_NAMES
from lesionserve_client import API_KEY_ENV, CredentialError, LesionClient, ServerUnavailableError
from lesionserve_client import cli as client_cli
from tests.integration.test_server import serve_command, tritonserver_child
from tests.integration.test_tls import pki  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

KEY = secrets.token_urlsafe(32)
WRONG = secrets.token_urlsafe(32)


@pytest.fixture(autouse=True)
def no_key_in_environment(monkeypatch):
    """Clients in these tests carry only the keys they are given."""
    monkeypatch.delenv(API_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("credentials") / "api-key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def exposed(small_repository, pki, key_file):  # noqa: F811
    """`lesionserve serve --grpc-ssl-cert ... --api-key-file ...`; yields (gRPC url, HTTP url)."""
    proc = subprocess.Popen(
        serve_command(small_repository, "--grpc-ssl-cert", str(pki["server.pem"]), "--grpc-ssl-key", str(pki["server.key"]),
                      "--api-key-file", str(key_file)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert "(TLS) (API key required)" in first and "(health only)" in first, first + proc.stderr.read()
        print(f"\n{first.strip()}")
        server_pid = tritonserver_child(proc.pid)
        with open(f"/proc/{server_pid}/cmdline", "rb") as f:
            flags = [a.decode() for a in f.read().split(b"\0") if b"restricted" in a]
        assert any(f.endswith(f":lesionserve-key={KEY}") for f in flags)
        print("restricted: " + " ".join(re.sub(r"(:[\w-]+=).*", r"\1<value>", f) for f in flags))
        grpc_url = first.split("gRPC ")[1].split(" ")[0]
        http_url = first.split("HTTP ")[1].split(" ")[0]
        log = Path(first.rsplit("log ", 1)[1].strip())
        yield grpc_url, http_url
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert python_stubs(server_pid) == []
    assert KEY not in first + out + err + log.read_text(errors="replace")


def kserve_binary_infer(http_url: str, image: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST a KServe v2 binary-tensor request for ``image`` (as curl would); (HTTP status, body)."""
    header = json.dumps({
        "inputs": [{"name": "raw_image", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 4 + len(image)}}],
    }).encode()  # no "outputs": every output, as JSON
    request = urllib.request.Request(
        f"{http_url}/v2/models/lesion_ensemble/infer", data=header + struct.pack("<I", len(image)) + image, method="POST",
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sdk_with_the_key_over_tls_classifies_when_exposed(exposed, pki, key_file, varied_images):  # noqa: F811
    url, _ = exposed
    with LesionClient(url, ssl=True, root_certificates=pki["ca.pem"], api_key_file=key_file, timeout=30) as client:
        results = client.classify(list(varied_images.values())[:3])
    print(f"right key: {[r.label for r in results]}")
    assert len(results) == 3 and all(abs(sum(r.probabilities.values()) - 1) < 1e-4 for r in results)


@pytest.mark.parametrize("key", [None, WRONG], ids=["no_key", "wrong_key"])
def test_sdk_without_the_right_key_gets_credential_error_at_once_when_exposed(exposed, pki, varied_images, key, caplog):  # noqa: F811
    url, _ = exposed
    caplog.set_level(logging.DEBUG, logger="lesionserve_client")
    client = LesionClient(url, ssl=True, root_certificates=pki["ca.pem"], api_key=key, timeout=30, retries=3)
    with client, pytest.raises(CredentialError) as info:
        client.classify([varied_images["jpeg_600x450"]])
    message = str(info.value)
    print(f"{'wrong' if key else 'no'} key: {message}")
    assert "This protocol is restricted, expecting header 'triton-grpc-protocol-lesionserve-key'" in message
    assert ("is not the server's" if key else "no API key was sent") in message
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # refused, not retried
    shown = message + repr(client) + caplog.text
    assert KEY not in shown and WRONG not in shown


def test_raw_grpc_is_refused_without_the_prefixed_header_and_health_stays_open_when_exposed(exposed, pki):  # noqa: F811
    url, _ = exposed
    with grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(pki["ca.pem"])) as raw:
        assert raw.is_server_ready() and raw.is_server_live()  # probes need no credential
        for what, call in {"model config, no header": lambda: raw.get_model_config("lesion_ensemble"),
                           "server metadata, no header": lambda: raw.get_server_metadata(),
                           "statistics, no header": lambda: raw.get_inference_statistics("lesion_ensemble"),
                           "model config, the key unprefixed": lambda: raw.get_model_config("lesion_ensemble",
                                                                                            headers={"lesionserve-key": KEY})}.items():
            with pytest.raises(InferenceServerException, match="This protocol is restricted") as info:
                call()
            print(f"{what}: {info.value.status()} {info.value.message()}")
        assert raw.get_model_config("lesion_ensemble", headers={"triton-grpc-protocol-lesionserve-key": KEY}).config.name == "lesion_ensemble"


def test_plain_grpc_with_the_right_key_is_refused_when_exposed(exposed, varied_images):
    url, _ = exposed
    with LesionClient(url, api_key=KEY, timeout=10, retries=0) as client, pytest.raises(ServerUnavailableError) as info:
        client.classify([varied_images["jpeg_600x450"]])
    print(f"plain gRPC, right key: {info.value}")
    assert KEY not in str(info.value)


def test_http_inference_is_answered_by_a_default_server_but_refused_with_or_without_the_key_when_exposed(
    exposed, server_small, varied_images
):
    image = varied_images["png_320x240"]
    status, body = kserve_binary_infer(server_small.http_url, image)
    labels = [o["data"] for o in json.loads(body)["outputs"] if o["name"] == "label"] if status == 200 else []
    print(f"default server, HTTP binary infer: {status}, label {labels}")
    assert status == 200 and labels and labels[0][0] in CLASS_NAMES  # what the issue saw: plain-text inference
    _, http_url = exposed
    for what, headers in {"no key": {}, "the right key": {"lesionserve-key": KEY}, "a wrong key": {"lesionserve-key": WRONG}}.items():
        status, body = kserve_binary_infer(http_url, image, headers)
        print(f"exposed server, HTTP binary infer with {what}: {status} {body}")
        assert status == 403 and "This API is restricted" in body and KEY not in body
    assert http_get(f"{http_url}/v2/health/ready") == http_get(f"{http_url}/v2/health/live") == 200
    assert http_get(f"{http_url}/v2/models/lesion_ensemble/config") == http_get(f"{http_url}/v2") == 403


def test_client_cli_classifies_with_the_key_file_and_exits_2_without(exposed, pki, key_file, varied_images, tmp_path, capsys):  # noqa: F811
    url, _ = exposed
    image = tmp_path / "lesion.jpg"
    image.write_bytes(varied_images["jpeg_600x450"])
    tls = ["--url", url, "--ssl", "--root-certificates", str(pki["ca.pem"])]
    assert client_cli.main(["classify", str(image), *tls, "--api-key-file", str(key_file)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(str(image))
    assert client_cli.main(["classify", str(image), *tls]) == 2
    err = capsys.readouterr().err
    print(f"CLI without key: {err.strip()}")
    assert "refused the request" in err and KEY not in err
