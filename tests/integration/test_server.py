"""The server command: readiness, clean stop, and fast failure with the model's error."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from export.assemble import assemble
from lesionserve.server import ServerStartError, TritonServer

pytestmark = pytest.mark.integration


def serve_command(repo) -> list[str]:
    """`lesionserve serve` on ``repo`` with free ports."""
    return [sys.executable, "-m", "lesionserve", "serve", "--repository", str(repo),
            "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]


def test_server_start_fails_fast_with_model_error_when_weights_missing(artifacts, tmp_path):
    repo = assemble(artifacts, out=tmp_path / "repo", views=1)
    (repo / "densenet121" / "1" / "model.onnx").unlink()
    start = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0).start()
    assert "densenet121" in str(info.value) and "model.onnx not found" in str(info.value)
    assert time.monotonic() - start < 60


def test_serve_command_stops_cleanly_when_interrupted(artifacts, tmp_path):
    repo = assemble(artifacts, out=tmp_path / "repo", views=1)
    proc = subprocess.Popen(
        serve_command(repo),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("tritonserver ready"), first
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "stopped (exit code 0)" in out


def test_serve_command_exits_nonzero_with_error_when_repository_broken(artifacts, tmp_path):
    repo = assemble(artifacts, out=tmp_path / "repo", views=1)
    shutil.rmtree(repo / "fusion" / "1")
    (repo / "fusion" / "1").mkdir()
    out = subprocess.run(
        serve_command(repo),
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert "fusion" in out.stderr and "error:" in out.stderr


def test_server_exits_when_launcher_is_killed(artifacts, tmp_path):
    repo = assemble(artifacts, out=tmp_path / "repo", views=1)
    launcher = subprocess.Popen(
        serve_command(repo),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    first = launcher.stdout.readline()
    assert first.startswith("tritonserver ready"), first
    url = first.split("HTTP ")[1].split(",")[0]
    launcher.kill()  # SIGKILL: no chance to stop the server itself
    launcher.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v2/health/live", timeout=1)
        except OSError:
            return  # the server is gone
        time.sleep(0.5)
    pytest.fail(f"tritonserver at {url} still answers 30 s after its launcher was killed")
