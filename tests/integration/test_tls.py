"""gRPC over TLS: `lesionserve serve --grpc-ssl-cert/--grpc-ssl-key` (Triton's own gRPC SSL) with a
self-signed CA made here by the openssl CLI, against the SDK and its CLI. Secrets never appear in
messages, logs or reprs."""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lesionserve.processes import python_stubs
from lesionserve_client import LesionClient, ServerUnavailableError
from lesionserve_client import cli as client_cli
from tests.integration.test_server import serve_command, tritonserver_child

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not available: it makes the test certificates"),
]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate it signed for 127.0.0.1/localhost, and an unrelated second CA."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=LesionServe test CA", cwd=d)
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=Another CA", cwd=d)
    return {name: d / name for name in ("ca.pem", "ca.key", "server.pem", "server.key", "other-ca.pem")}


def secret_lines(*paths: Path) -> list[str]:
    """The base64 body lines of PEM files: none may appear in any message or log."""
    return [line for path in paths for line in path.read_text().splitlines() if line and not line.startswith("-----")]


@pytest.fixture(scope="module")
def tls_server(small_repository, pki):
    """`lesionserve serve` with TLS; yields (gRPC url, its stdout's first line, the tritonserver log path)."""
    proc = subprocess.Popen(
        serve_command(small_repository, "--grpc-ssl-cert", str(pki["server.pem"]), "--grpc-ssl-key", str(pki["server.key"])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("tritonserver ready: gRPC ") and "(TLS)" in first, first + proc.stderr.read()
        server_pid = tritonserver_child(proc.pid)
        url = first.split("gRPC ")[1].split(" ")[0]
        log = Path(first.rsplit("log ", 1)[1].strip())
        yield url, first, log
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert python_stubs(server_pid) == []
    for line in secret_lines(pki["server.key"]):
        assert line not in first + out + err + log.read_text(errors="replace")


def test_tls_client_with_the_ca_classifies_when_server_serves_grpc_over_tls(tls_server, pki, varied_images):
    url, _, _ = tls_server
    with LesionClient(url, ssl=True, root_certificates=pki["ca.pem"], timeout=30) as client:
        results = client.classify(list(varied_images.values())[:3])
    assert len(results) == 3 and all(abs(sum(r.probabilities.values()) - 1) < 1e-4 for r in results)


def test_tls_client_gets_heatmaps_and_per_image_errors_when_explaining_over_tls(tls_server, pki, varied_images):
    from lesionserve_client import UndecodableImageError

    url, _, _ = tls_server
    blobs = [varied_images["png_320x240"], b"not an image", varied_images["bmp_160x120"]]
    with LesionClient(url, ssl=True, root_certificates=pki["ca.pem"], timeout=60) as client:
        rows = client.classify(blobs, partial=True, explain=True, explain_method="gradcampp")
    assert isinstance(rows[1], UndecodableImageError) and rows[1].index == 1
    assert rows[0].heatmap.shape == (240, 320) and rows[2].heatmap.shape == (120, 160)
    assert all(r.heatmap.dtype.name == "float32" and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0 for r in (rows[0], rows[2]))


def test_cli_classifies_over_tls_when_given_ssl_and_root_certificates(tls_server, pki, varied_images, tmp_path, capsys):
    url, _, _ = tls_server
    image = tmp_path / "lesion.jpg"
    image.write_bytes(varied_images["jpeg_600x450"])
    code = client_cli.main(["classify", str(image), "--url", url, "--ssl", "--root-certificates", str(pki["ca.pem"])])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines()[1].startswith(str(image))


def test_plain_client_gets_server_unavailable_when_server_requires_tls(tls_server, varied_images):
    url, _, _ = tls_server
    start = time.monotonic()
    with LesionClient(url, timeout=10, retries=0) as client, pytest.raises(ServerUnavailableError) as info:
        client.classify([varied_images["jpeg_600x450"]])
    print(f"plain client: {info.value} ({time.monotonic() - start:.2f} s)")
    assert url in str(info.value)


def test_client_trusting_another_ca_is_refused_without_any_secret_in_errors_logs_or_repr(tls_server, pki, varied_images, caplog):
    url, _, _ = tls_server
    caplog.set_level(logging.WARNING, logger="lesionserve_client")
    client = LesionClient(url, ssl=True, root_certificates=pki["other-ca.pem"], timeout=10, retries=2, backoff=0.1)
    with client, pytest.raises(ServerUnavailableError) as info:
        client.classify([varied_images["jpeg_600x450"]])
    print(f"wrong CA: {info.value}")
    assert "gave up after 3 attempts" in str(info.value)
    assert len(caplog.records) == 2  # one warning per retry
    text = str(info.value) + repr(client) + "\n".join(r.getMessage() for r in caplog.records)
    for line in secret_lines(pki["server.key"], pki["ca.key"], pki["other-ca.pem"], pki["server.pem"], pki["ca.pem"]):
        assert line not in text
    assert "other-ca.pem" in repr(client)  # the path, not the content
