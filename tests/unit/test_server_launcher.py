"""The tritonserver launcher, without starting a server."""
from __future__ import annotations

import os
import sys

import pytest

from lesionserve.cli import main as cli_main
from lesionserve.cli import variant_problem
from lesionserve.processes import SHM_DIR, SHM_REGION_PREFIX, mapped_shm_regions, parse_proc_net_line, python_stubs, remove_shm_regions
from lesionserve.server import (
    CUDA_POOL_BYTES,
    PROJECT_ROOT,
    RESTRICTED_APIS,
    ServerStartError,
    TritonServer,
    backend_dir,
    server_env,
)


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


def test_server_command_closes_admin_apis_with_an_unshown_random_header_when_defaults(tmp_path):
    server = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0)
    cmd = server.command()
    grpc = [a for a in cmd if a.startswith("--grpc-restricted-protocol=")]
    http = [a for a in cmd if a.startswith("--http-restricted-api=")]
    assert len(grpc) == len(http) == 1
    apis, header = grpc[0].split("=", 1)[1].split(":")
    assert apis.split(",") == list(RESTRICTED_APIS) == ["shared-memory", "model-repository", "trace", "logging"]
    key, value = header.split("=")
    assert key == "lesionserve-admin" and len(value) == 32
    assert value not in repr(server)  # the dataclass repr must not show it
    other = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0).command()
    assert not set(other) & {grpc[0]}  # random per server
    opened = TritonServer(tmp_path, admin_apis=True).command()
    assert not any("restricted" in a for a in opened)


def test_server_command_serves_grpc_over_tls_only_when_cert_and_key_given(tmp_path):
    plain = TritonServer(tmp_path).command()
    assert not any("ssl" in a for a in plain)
    cmd = TritonServer(tmp_path, ssl_cert=tmp_path / "s.crt", ssl_key=tmp_path / "s.key").command()
    assert "--grpc-use-ssl=true" in cmd
    assert f"--grpc-server-cert={tmp_path / 's.crt'}" in cmd and f"--grpc-server-key={tmp_path / 's.key'}" in cmd
    with pytest.raises(ValueError, match="TLS needs both ssl_cert and ssl_key"):
        TritonServer(tmp_path, ssl_cert=tmp_path / "s.crt")


def test_server_start_names_missing_tls_file_without_reading_it_when_absent(tmp_path):
    (tmp_path / "s.crt").write_text("cert")
    server = TritonServer(tmp_path, grpc_port=0, http_port=0, metrics_port=0, ssl_cert=tmp_path / "s.crt", ssl_key=tmp_path / "s.key")
    with pytest.raises(ServerStartError, match=r"TLS private key not found: .*s\.key \(a PEM file is needed\)"):
        server.start()
    assert server.process is None  # refused before anything started


def test_serve_exits_2_when_only_one_of_cert_and_key_given(tmp_path, capsys):
    assert cli_main(["serve", "--repository", str(tmp_path), "--grpc-ssl-cert", str(tmp_path / "s.crt")]) == 2
    assert "--grpc-ssl-cert and --grpc-ssl-key go together" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "ipv6", "expected"),
    [
        ("   1: 0100007F:9183 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 43064 1 0", False,
         ("127.0.0.1", 0x9183, "0A", 43064)),
        ("   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1155 1 0", False,
         ("0.0.0.0", 2024, "0A", 1155)),
        ("   0: 00000000000000000000000001000000:1F41 00000000000000000000000000000000:0000 0A 00000000:00000000 "
         "00:00000000 00000000     0        0 777 1 0", True, ("::1", 8001, "0A", 777)),
    ],
)
def test_parse_proc_net_line_decodes_address_port_state_and_inode(line, ipv6, expected):
    assert parse_proc_net_line(line, ipv6) == expected


def test_remove_shm_regions_refuses_names_that_are_not_python_backend_regions():
    with pytest.raises(ValueError, match="not a python-backend shared-memory region: 'sem.other'"):
        remove_shm_regions({"sem.other"})
    with pytest.raises(ValueError, match="not a python-backend"):
        remove_shm_regions({"triton_python_backend_shm_region_x/../../etc"})
    assert remove_shm_regions({"triton_python_backend_shm_region_never-created"}) == []


def test_python_stubs_finds_none_when_no_server_has_that_pid():
    assert python_stubs(2**22 + 12345) == []


def test_serve_exits_2_with_assembly_error_before_starting_anything_when_artifacts_trained_at_other_size(tmp_path, capsys):
    from tests.unit.test_model_repository import _committed_copy, _fake_artifacts

    artifacts = _fake_artifacts(tmp_path / "art", {"resnet50": 128})
    assert cli_main(["serve", "--artifacts", str(artifacts), "--repository", str(_committed_copy(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lesion_ensemble would serve resnet50 at 128 px (declared 224)" in err and "--out DIR" in err


def test_mapped_shm_regions_lists_a_mapped_region_and_remove_shm_regions_unlinks_it(tmp_path):
    import mmap
    import uuid

    name = f"{SHM_REGION_PREFIX}unit-test-{uuid.uuid4()}"
    path = SHM_DIR / name
    path.write_bytes(b"\0" * 4096)
    try:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mapped:
            assert name in mapped_shm_regions(os.getpid())
            mapped[0] = 1
        assert name not in mapped_shm_regions(os.getpid())  # unmapped again
        assert remove_shm_regions({name}) == [name] and not path.exists()
    finally:
        path.unlink(missing_ok=True)
