"""The tritonserver launcher, without starting a server."""
from __future__ import annotations

import os
import sys

import pytest

from lesionserve.cli import main as cli_main
from lesionserve.cli import variant_problem
from lesionserve.server import CUDA_POOL_BYTES, PROJECT_ROOT, ServerStartError, TritonServer, backend_dir, server_env


def test_server_command_binds_loopback_and_disables_model_control_when_defaults(tmp_path):
    cmd = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0).command()
    assert "--grpc-address=127.0.0.1" in cmd and "--http-address=127.0.0.1" in cmd and "--metrics-address=127.0.0.1" in cmd
    assert "--model-control-mode=none" in cmd and "--exit-on-error=true" in cmd
    assert not any(a.startswith("--model-config-name") for a in cmd)


def test_server_command_selects_variant_when_model_config_name_given(tmp_path):
    cmd = TritonServer(tmp_path, model_config_name="gpu").command()
    assert "--model-config-name=gpu" in cmd


def test_server_command_sizes_cuda_pool_only_when_variant_is_gpu(tmp_path):
    # Python steps hand GPU tensors to Triton through its CUDA pool; the CPU command stays as it was.
    gpu = TritonServer(tmp_path, model_config_name="gpu_torch").command()
    assert f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}" in gpu and CUDA_POOL_BYTES >= 69_120_000
    assert not any("cuda-memory-pool" in a for a in TritonServer(tmp_path).command())


def test_variant_problem_refuses_variants_needing_backends_the_bundled_server_lacks():
    assert variant_problem(None) is None and variant_problem("gpu_torch") is None
    assert "needs Triton's tensorrt backend" in variant_problem("gpu")
    assert "needs Triton's onnxruntime backend" in variant_problem("gpu_ort")
    assert "choose one of gpu, gpu_ort, gpu_torch" in variant_problem("tpu")


def test_serve_exits_2_before_starting_anything_when_variant_unservable(tmp_path, capsys):
    assert cli_main(["serve", "--repository", str(tmp_path / "none"), "--model-config-name", "gpu"]) == 2
    assert "docker compose" in capsys.readouterr().err


def test_server_picks_distinct_free_ports_when_ports_are_zero(tmp_path):
    s = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0)
    assert len({s.grpc_port, s.http_port, s.metrics_port}) == 3 and 0 not in {s.grpc_port, s.http_port}


def test_backend_dir_holds_python_backend_and_stub_for_this_python(tmp_path):
    python = backend_dir(tmp_path) / "python"
    assert {p.name for p in python.iterdir()} >= {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}


def test_server_env_puts_project_and_venv_first_when_built():
    env = server_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PROJECT_ROOT)
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"].split(os.pathsep)[0]


def test_server_start_raises_when_repository_missing(tmp_path):
    with pytest.raises(ServerStartError, match="model repository not found"):
        TritonServer(tmp_path / "nope").start()
