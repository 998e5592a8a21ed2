"""Run the tritonserver binary shipped in the nvidia-pytriton wheel on a model repository.

Used by the ``lesionserve serve`` command, the demo and the integration-test fixture.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lesionserve_client.credentials import API_KEY_HEADER, ApiKey

from lesionserve import PROJECT_ROOT
from lesionserve.processes import StubProcess, mapped_shm_regions, python_stubs, remove_shm_regions
from lesionserve.spec import GPU_VARIANTS

#: Python backend shared memory per instance: the largest tensor crossing it is 64 views at 300x300.
SHM_DEFAULT_BYTES = 32 * 1024 * 1024
SHM_GROWTH_BYTES = 32 * 1024 * 1024
#: CUDA memory pool on GPU 0 for GPU variants: python models hand GPU tensors to Triton through it, and
#: the largest (tta's 64 views at 300x300, FP32) is 69 MB: Triton's 64 MB default is too small.
CUDA_POOL_BYTES = 1024 * 1024 * 1024


#: Log lines that mean a model will never load. Triton usually exits on them (--exit-on-error), but
#: some python-backend failures (e.g. a missing model.py) leave the load hanging: we stop it ourselves.
FATAL_LOG_MARKERS = ("failed to load '", "Failed to preinitialize Python stub")


#: Triton APIs no LesionServe client needs, closed by default (``admin_apis=False``): system shared
#: memory (a request could map any /dev/shm object by name, the python backend's own regions of
#: patients' pixels included, and have outputs written into it), the repository API, trace and logging.
#: The SDK needs only health, metadata, model-config, inference (and statistics stays open for benchmarks).
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
#: Header a request would need to use a restricted API (over gRPC Triton expects it prefixed with
#: ``triton-grpc-protocol-``); its value is random per start and never printed or logged.
RESTRICTED_HEADER = "lesionserve-admin"
#: Every protocol group Triton 2.51 can restrict (the names of --grpc-restricted-protocol and
#: --http-restricted-api). Health is never restricted here: probes need it, and it tells nothing.
PROTOCOL_GROUPS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                   "statistics", "trace", "logging")
#: What a server started with an API key requires it for, over gRPC: every call of the SDK but health
#: (metadata and configs name the models and classes; statistics count the traffic).
CREDENTIAL_APIS = ("inference", "metadata", "model-config", "statistics")
#: Header of the HTTP restriction that leaves HTTP to health alone (with TLS or an API key): its value is
#: random per start and given to nobody. Measured on 2.51: `/v2/health/{ready,live}` answer 200 without
#: it; `/v2`, model configs and `POST /v2/models/<m>/infer` answer 403 "This API is restricted, expecting
#: header 'lesionserve-closed'", also with the right `lesionserve-key`. So there is no plain-text
#: inference beside a TLS gRPC port, and the key never crosses plain HTTP.
CLOSED_HEADER = "lesionserve-closed"
LOOPBACK = "127.0.0.1"
#: Seconds a stub may take to exit by itself once its server is gone, before it is killed.
STUB_EXIT_GRACE = 5.0


class ServerStartError(RuntimeError):
    """tritonserver exited or did not become ready; the message carries its log."""


def pytriton_dir() -> Path:
    """Folder of the Triton build inside the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServerStartError("nvidia-pytriton is not installed (it carries tritonserver): run `make setup`") from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def backend_dir(cache: Path | None = None) -> Path:
    """A backends folder laid out as tritonserver expects: python/{libtriton_python.so, utils, stub}."""
    triton = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = [
        triton / "backends/python/libtriton_python.so",
        triton / "backends/python/triton_python_backend_utils.py",
        triton / f"python_backend_stubs/{version}/triton_python_backend_stub",
    ]
    target = (cache or Path(tempfile.gettempdir()) / f"lesionserve-backends-{os.getuid()}") / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not src.exists():
            raise ServerStartError(f"missing {src}: the nvidia-pytriton install is incomplete")
        dst = target / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return target.parent


def server_env() -> dict[str, str]:
    """Environment for tritonserver and its python stubs.

    The stub runs an isolated embedded interpreter: it takes its prefix, and so this venv's
    site-packages (numpy<2, onnxruntime, cv2), from the first ``python3`` on PATH, and (seen with
    deploy/gpu_proof's probe model) imports ``lesionserve`` from its working folder rather than from
    PYTHONPATH. PYTHONPATH is still set for every other process tritonserver starts.
    """
    site = sysconfig.get_paths()["purelib"]
    libs = Path(site) / "nvidia_pytriton.libs"  # the stub needs the bundled libcudart even on CPU
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libs)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    # The stub finds its interpreter's prefix through PATH: put this venv's python first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launching process dies, even by SIGKILL.

    The server gets its own session (so Ctrl-C reaches only us and we stop it in order), which
    would otherwise let it outlive a killed launcher and keep its ports. The "parent" is the thread
    that called ``start``: a server started from a worker thread is stopped when that thread ends
    (seen: three servers started from a thread pool got SIGTERM 0.3 s after becoming ready).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: fall back to stop() / the context manager
        pass


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a port on this machine (a name other than localhost: assume not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A tritonserver process: ``with TritonServer(repo) as server: ...`` starts, waits, stops.

    Safe by default: ports of 0 pick free ones; binds to ``host`` (loopback by default); model control
    API off; the APIs in RESTRICTED_APIS closed unless ``admin_apis``. ``ssl_cert`` + ``ssl_key``
    (PEM files) serve gRPC over TLS only. ``stop`` leaves no stub process or shared-memory region behind.

    ``api_key``: gRPC then requires header ``lesionserve-key`` (``triton-grpc-protocol-lesionserve-key``
    on the wire) for CREDENTIAL_APIS (and for the admin APIs when ``admin_apis``). With TLS or an API
    key, HTTP answers health only (CLOSED_HEADER). A ``host`` beyond loopback needs both TLS and an
    API key: anything else is refused here. Metrics (plain HTTP, no credential) bind ``metrics_host``,
    loopback unless said otherwise.
    """

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    model_config_name: str | None = None
    log_path: Path | None = None
    startup_timeout: float = 300.0
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    admin_apis: bool = False
    api_key: ApiKey | str | None = None
    metrics_host: str = LOOPBACK
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.log_path = Path(self.log_path) if self.log_path is not None else None
        if (self.ssl_cert is None) != (self.ssl_key is None):
            raise ValueError("TLS needs both ssl_cert and ssl_key (PEM files), or neither for plain gRPC")
        self.ssl_cert = Path(self.ssl_cert) if self.ssl_cert is not None else None
        self.ssl_key = Path(self.ssl_key) if self.ssl_key is not None else None
        if isinstance(self.api_key, str):  # wrapped: the dataclass repr then shows its length, not the key
            self.api_key = ApiKey(self.api_key, "the api_key argument")
        if not is_loopback(self.host):
            missing = [what for what, ok in (("TLS (--grpc-ssl-cert and --grpc-ssl-key)", self.tls),
                                             ("an API key (LESIONSERVE_API_KEY or --api-key-file)", self.api_key is not None)) if not ok]
            if missing:
                raise ValueError(f"host {self.host!r} exposes the server beyond loopback, which needs TLS and an API key; "
                                 f"missing: {' and '.join(missing)} (or bind {LOOPBACK})")
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        # Never printed or logged: a request would need it to use a restricted API.
        self._restricted_value = secrets.token_hex(16)
        # Given to nobody: with it, HTTP would answer more than health.
        self._closed_value = secrets.token_hex(16)
        self._stubs_at_ready: list[StubProcess] = []
        self._shm_regions: set[str] = set()

    @property
    def tls(self) -> bool:
        return self.ssl_cert is not None

    @property
    def http_health_only(self) -> bool:
        """HTTP answers health and nothing else: with TLS (no plain-text twin of the TLS port) or an API
        key (which must not cross plain HTTP)."""
        return self.tls or self.api_key is not None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        cmd = [
            str(pytriton_dir() / "bin/tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir()}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.metrics_host}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            "--log-verbose=0",
        ]
        admin = f"{','.join(RESTRICTED_APIS)}:{RESTRICTED_HEADER}={self._restricted_value}"
        if self.api_key is not None:
            keyed = CREDENTIAL_APIS + (RESTRICTED_APIS if self.admin_apis else ())
            cmd.append(f"--grpc-restricted-protocol={','.join(keyed)}:{API_KEY_HEADER}={self.api_key.value}")
        if not self.admin_apis:
            cmd.append(f"--grpc-restricted-protocol={admin}")
        # A group may sit in one HTTP restriction only (2.51 refuses to start otherwise): all but health, or the admin ones.
        if self.http_health_only:
            closed = [group for group in PROTOCOL_GROUPS if group != "health"]
            cmd.append(f"--http-restricted-api={','.join(closed)}:{CLOSED_HEADER}={self._closed_value}")
        elif not self.admin_apis:
            cmd.append(f"--http-restricted-api={admin}")
        if self.tls:
            cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.ssl_cert}", f"--grpc-server-key={self.ssl_key}"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        if self.model_config_name in GPU_VARIANTS:
            cmd.append(f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}")
        return cmd + self.extra_args

    def start(self) -> "TritonServer":
        if not self.repository.is_dir():
            raise ServerStartError(f"model repository not found: {self.repository}")
        for what, path in (("TLS certificate", self.ssl_cert), ("TLS private key", self.ssl_key)):
            # Named by path only: the key's content must never reach a message or a log.
            if path is not None and not path.is_file():
                raise ServerStartError(f"{what} not found: {path} (a PEM file is needed)")
            if path is not None and not os.access(path, os.R_OK):
                raise ServerStartError(f"{what} not readable: {path}")
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        log = open(self.log_path, "wb")
        # Own process group: Ctrl-C in a terminal reaches us, and we stop the server in order.
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(),
            cwd=PROJECT_ROOT,  # the stubs import lesionserve from their working folder: this project's
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._wait_ready()
        return self

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def model_errors(self) -> str:
        """The lines of the log that explain a failed model load."""
        text = self.log_path.read_text(errors="replace") if self.log_path else ""
        markers = ("UNAVAILABLE", "Error", *FATAL_LOG_MARKERS)
        keep = [ln for ln in text.splitlines() if any(m in ln for m in markers)]
        return "\n".join(keep) or self.log_tail()

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # the stubs it had started, and their regions, must not outlive it
                raise ServerStartError(
                    f"tritonserver exited with code {self.process.returncode} while loading {self.repository}:\n"
                    f"{self.model_errors()}\n(full log: {self.log_path})"
                )
            if self.is_ready():
                self._stubs_at_ready = self.stubs()
                self._remember_shm_regions()
                return
            if self._log_has_fatal_marker():
                errors = self.model_errors()
                self.stop()
                raise ServerStartError(f"a model failed to load in {self.repository}:\n{errors}\n(full log: {self.log_path})")
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"tritonserver not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def _log_has_fatal_marker(self) -> bool:
        text = self.log_path.read_text(errors="replace") if self.log_path else ""
        return any(marker in text for marker in FATAL_LOG_MARKERS)

    def stubs(self) -> list[StubProcess]:
        """The live python-backend stub processes of this server (also after it died)."""
        if self.process is None:
            return []
        return python_stubs(self.process.pid, self.repository)

    def dead_stubs(self) -> list[StubProcess]:
        """Stubs running when the server became ready that have died since.

        Triton 2.51 does not restart a dead stub: it keeps reporting the server and the model ready
        while every request to that model fails with "Stub process '<name>' is not healthy."
        """
        return [stub for stub in self._stubs_at_ready if not stub.alive()]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads models and exits), then SIGKILL the group if it hangs.

        Then no stub of this server survives (a stub can outlive a SIGKILLed server) and no
        shared-memory region of it stays in /dev/shm (a killed stub cannot remove its own).
        """
        if self.process is None:
            return None
        self._remember_shm_regions()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reap_stubs()
        remove_shm_regions(self._shm_regions)
        return self.process.returncode

    @property
    def shm_regions(self) -> set[str]:
        """Names (in /dev/shm) of the python-backend regions this server is known to have used."""
        return set(self._shm_regions)

    def _remember_shm_regions(self) -> None:
        """Record the regions of the live stubs, and those the server maps: a stub that failed to
        start is gone, but the server still maps the region it made for it (which would leak)."""
        self._shm_regions |= {stub.shm_region for stub in self.stubs()}
        if self.process is not None and self.process.poll() is None:
            self._shm_regions |= mapped_shm_regions(self.process.pid)

    def _reap_stubs(self) -> None:
        """Give orphaned stubs STUB_EXIT_GRACE seconds to notice their server is gone, then SIGKILL them."""
        deadline = time.monotonic() + STUB_EXIT_GRACE
        while (left := self.stubs()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for stub in left:
            if stub.alive():  # checked again: the pid must still be this stub's
                try:
                    os.kill(stub.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STUB_EXIT_GRACE
        while self.stubs() and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
