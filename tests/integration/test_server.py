"""The server command: readiness, clean stop, fast failure with the model's error, no orphans."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from lesionserve.export.assemble import assemble
from lesionserve.processes import PROC, SHM_DIR, SHM_REGION_PREFIX, mapped_shm_regions, python_stubs
from lesionserve.server import ServerStartError, TritonServer
from tests.integration.conftest import PYTHON_MODELS

pytestmark = pytest.mark.integration


def serve_command(repo, *extra: str) -> list[str]:
    """`lesionserve serve` on ``repo`` with free ports."""
    return [sys.executable, "-m", "lesionserve", "serve", "--repository", str(repo),
            "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *extra]


def tritonserver_child(launcher_pid: int) -> int:
    """Pid of the tritonserver a `lesionserve serve` process started."""
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == launcher_pid and cmdline.endswith(b"tritonserver"):
                return int(entry.name)
    raise AssertionError(f"no tritonserver child of {launcher_pid}")


def shm_region_names() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{SHM_REGION_PREFIX}*")}


def mapped_by_live_processes() -> set[str]:
    return {r for entry in PROC.iterdir() if entry.name.isdigit() for r in mapped_shm_regions(int(entry.name))}


@pytest.mark.parametrize(
    ("model", "damage", "expected"),
    [
        ("resnet50", lambda repo: (repo / "resnet50/1/model.onnx").write_bytes(b"\x08\x07 not protobuf" * 50),
         "model.onnx is not a readable ONNX model"),
        ("threshold", lambda repo: (repo / "threshold/1/calibration.json").write_text('{"weights": {"resnet50": "heavy"}}'),
         "malformed calibration file"),
        # No model.py: the stub never starts, the load would hang; its region used to stay in /dev/shm.
        ("fusion", lambda repo: (repo / "fusion/1/model.py").unlink(), "Failed to preinitialize Python stub"),
    ],
    ids=["corrupt_onnx", "initialize_raises", "model_py_missing"],
)
def test_server_start_fails_fast_naming_model_and_its_error_and_leaves_no_stub_when_model_broken(
    small_artifacts, tmp_path, model, damage, expected
):
    repo = assemble(small_artifacts, out=tmp_path / "repo", views=1)
    damage(repo)
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0)
    before = shm_region_names()
    start = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        server.start()
    took = time.monotonic() - start
    message = str(info.value)
    print(f"{model}: failed in {took:.1f} s: {message.splitlines()[0]} ... {expected}")
    assert f"failed to load '{model}'" in message or f"{repo / model}" in message
    assert expected in message
    assert took < 60
    assert python_stubs(server.process.pid) == []  # the stubs of models that did load are gone too
    assert server.shm_regions and not [r for r in server.shm_regions if (SHM_DIR / r).exists()]
    # Nothing new and unowned either (regions other live servers map are theirs).
    assert not shm_region_names() - before - mapped_by_live_processes()


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


def test_serve_command_exits_1_naming_the_stub_when_a_stub_dies(small_repository):
    proc = subprocess.Popen(serve_command(small_repository), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("tritonserver ready"), first + proc.stderr.read()
        server_pid = tritonserver_child(proc.pid)
        stubs = {stub.name: stub for stub in python_stubs(server_pid)}
        os.kill(stubs["tta_0_0"].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        print(f"serve exited {proc.returncode} {time.monotonic() - killed:.1f} s after the kill: {err.strip()}")
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert f"error: python backend stub tta_0_0 (pid {stubs['tta_0_0'].pid}) died" in err
    assert "Triton does not restart stubs" in err
    assert python_stubs(server_pid) == []
    assert not [s.shm_region for s in stubs.values() if (SHM_DIR / s.shm_region).exists()]


def test_server_stop_leaves_no_stub_or_region_when_tritonserver_was_sigkilled_and_a_stub_hangs(small_repository):
    server = TritonServer(small_repository, grpc_port=0, http_port=0, metrics_port=0).start()
    stubs = server.stubs()
    assert len(stubs) == len(PYTHON_MODELS)
    # A stub that cannot run (stopped here; busy or hung in life) cannot notice its server died: an orphan.
    hung = next(stub for stub in stubs if stub.name == "densenet121_0_0")
    os.kill(hung.pid, signal.SIGSTOP)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    time.sleep(2)
    assert "densenet121_0_0" in [stub.name for stub in python_stubs(server.process.pid)]  # an orphan now
    server.stop()
    assert python_stubs(server.process.pid) == []
    assert [s.shm_region for s in stubs if (SHM_DIR / s.shm_region).exists()] == []
