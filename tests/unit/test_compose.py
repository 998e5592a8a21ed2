"""docker-compose.yml: parsed and checked here (no Docker engine runs on these machines).

Where the `docker compose` CLI exists it also validates the file against the Compose schema.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lesionserve.spec import GPU_VARIANTS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_RESERVATION = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} and ${VAR} substitution, enough to read the file's effective values."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_compose_puts_builder_and_gpu_server_in_gpu_profile_when_parsed(services):
    assert {name: s.get("profiles") for name, s in services.items()} == {
        "engine-builder": ["gpu"], "triton": ["gpu"], "triton-cpu": ["cpu"],
    }


def test_triton_starts_only_when_engine_builder_completed_successfully(services):
    assert services["triton"]["depends_on"] == {"engine-builder": {"condition": "service_completed_successfully"}}
    assert services["engine-builder"]["restart"] == "no"  # one-shot
    assert "depends_on" not in services["triton-cpu"]


def test_builder_and_server_images_share_ngc_release_when_release_changes(services):
    builder = interpolate(services["engine-builder"]["build"]["args"]["TENSORRT_IMAGE"])
    server = interpolate(services["triton"]["build"]["args"]["TRITON_IMAGE"])
    assert builder == "nvcr.io/nvidia/tensorrt:24.10-py3" and server == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert interpolate(services["triton-cpu"]["build"]["args"]["TRITON_IMAGE"]) == server
    release = {"TRITON_RELEASE": "25.01"}  # one variable moves both
    assert interpolate(services["engine-builder"]["build"]["args"]["TENSORRT_IMAGE"], release).endswith(":25.01-py3")
    assert interpolate(services["triton"]["build"]["args"]["TRITON_IMAGE"], release).endswith(":25.01-py3")


@pytest.mark.parametrize("name", ["engine-builder", "triton", "triton-cpu"])
def test_service_build_points_to_existing_dockerfile_when_parsed(services, name):
    build = services[name]["build"]
    assert build["context"] == "." and (ROOT / build["dockerfile"]).is_file()


def test_services_reserve_one_nvidia_gpu_only_when_in_gpu_profile(services):
    for name in ("engine-builder", "triton"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"] == [GPU_RESERVATION]
    assert "deploy" not in services["triton-cpu"]


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_server_ports_bind_loopback_when_not_configured(services, name):
    ports = services[name]["ports"]
    defaults = [interpolate(p) for p in ports]
    assert defaults == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"]
    exposed = [interpolate(p, {"TRITON_BIND": "0.0.0.0", "TRITON_GRPC_PORT": "9001"}) for p in ports]
    assert exposed == ["0.0.0.0:8000:8000", "0.0.0.0:9001:8001", "0.0.0.0:8002:8002"]
    assert all(p.startswith("${TRITON_BIND:-127.0.0.1}:") for p in ports)  # no port left unbound to an address


@pytest.mark.parametrize("name", ["triton", "triton-cpu"])
def test_server_is_healthchecked_on_readiness_when_model_control_is_off(services, name):
    service = services[name]
    assert service["healthcheck"]["test"] == ["CMD", "curl", "-fsS", "http://localhost:8000/v2/health/ready"]
    command = service["command"]
    assert command[0] == "tritonserver" and "--model-repository=/models" in command
    assert "--model-control-mode=none" in command and "--exit-on-error=true" in command
    assert int(str(service["shm_size"]).removesuffix("gb")) >= 2


def test_server_serves_gpu_variant_only_when_in_gpu_profile(services):
    gpu = [interpolate(a) for a in services["triton"]["command"]]
    assert "--model-config-name=gpu" in gpu and any(a.startswith("--cuda-memory-pool-byte-size=0:") for a in gpu)
    assert "--model-config-name=gpu_torch" in [interpolate(a, {"LESIONSERVE_VARIANT": "gpu_torch"}) for a in services["triton"]["command"]]
    assert not any("model-config-name" in a for a in services["triton-cpu"]["command"])
    assert interpolate(services["engine-builder"]["environment"]["LESIONSERVE_VARIANT"]) in GPU_VARIANTS


def test_repository_volume_is_read_only_when_mounted_by_servers(compose, services):
    assert "./model_repository:/models" in services["engine-builder"]["volumes"]
    assert "./model_repository:/models:ro" in services["triton"]["volumes"]
    assert "./model_repository:/models:ro" in services["triton-cpu"]["volumes"]
    named = {v.split(":")[0] for s in services.values() for v in s["volumes"] if not v.startswith(".")}
    assert named == set(compose["volumes"]) == {"trt-timing-cache", "ort-trt-engines"}
    # gpu_ort's configs cache ONNX Runtime's engines under /engine_cache: that path must be a volume.
    assert any(v.split(":")[1] == "/engine_cache" for v in services["triton"]["volumes"])


def test_builder_writes_engines_into_shared_repository_when_run(services):
    command = services["engine-builder"]["command"]
    assert command[:3] == ["python3", "-m", "lesionserve.export.tensorrt"] and "--repository=/models" in command
    assert any(a.startswith("--timing-cache=/cache/") for a in command)


def test_server_image_installs_torch_only_when_built_for_gpu(services):
    requirements = (ROOT / "deploy/requirements-triton.txt").read_text()
    assert re.search(r"^numpy==1\.", requirements, re.M) and "opencv-python-headless==" in requirements
    assert "torch==" in (ROOT / "deploy/requirements-triton-torch.txt").read_text()
    assert services["triton"]["build"]["args"]["WITH_TORCH"] == "1"
    assert services["triton-cpu"]["build"]["args"]["WITH_TORCH"] == "0"


def test_server_image_installs_pillow_when_preprocess_checks_headers():
    # lesionserve.preprocessing reads image headers with Pillow before decoding (size limits).
    assert re.search(r"^pillow==\d", (ROOT / "deploy/requirements-triton.txt").read_text(), re.M)
    assert "PIL" in (ROOT / "deploy/triton.Dockerfile").read_text()


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_compose_works(), reason="docker compose CLI not available (`docker compose version` fails)")
@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_config_validates_when_cli_available(profile):
    result = subprocess.run(["docker", "compose", "--profile", profile, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
