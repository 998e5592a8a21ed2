"""The GPU proof: one prepared device call that runs the project's CUDA checks and measures gpu_torch.

    python -m lesionserve.gpu_proof pack --out build/gpu-proof       # here (make gpu-proof-pack)
    bash deploy/gpu_proof/run.sh --out "$OUT"                          # on the GPU host (make gpu-proof)

The GPU host has Python 3.12, torch (CUDA), numpy 2, OpenCV and timm, but no Triton, no tritonclient
and no internet. ``pack`` builds a carry folder of what it lacks, taken from the nvidia-pytriton
wheel installed here and from PyPI wheels pinned in requirements.lock: the tritonserver binary and
the libraries it loads, the python backend with its 3.12 stub, numpy<2 for the stub alone, and
tritonclient. ``device`` (run.sh) unpacks it, checks CUDA, probes the python stub, runs the tests
that skip with "CUDA not available", serves the gpu_torch variant through the benchmark harness at
each view count, and writes summary.md, results.json, harness.md and logs.tar.gz to ``--out``,
after every stage, so a stopped run still leaves what it measured. deploy/gpu_proof/README.md has
the exact device call.

How the carried pieces are used without changing lesionserve.server:
- the unpacked ``site/`` folder goes first on PYTHONPATH and holds a ``pytriton`` package that is
  only the wheel's ``tritonserver/`` folder, so ``pytriton_dir()`` and ``backend_dir()`` resolve to it;
- the stub embeds an *isolated* interpreter (pybind11, ``PyConfig_InitIsolatedConfig``): it ignores
  PYTHONPATH and takes its prefix from the first ``python3`` on PATH, which ``server_env()`` makes
  the directory of ``sys.executable``. So the processes that start servers run a small venv made on
  the host (``make_stub_venv``) whose site-packages lists the carried numpy<2 first, then the
  project, then the host's own site-packages (torch, OpenCV, timm). Their PYTHONPATH puts the host's
  site-packages first again, so those processes themselves keep the host's numpy 2; only the stubs,
  which read no PYTHONPATH, get numpy<2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lesionserve import PROJECT_ROOT

HERE_DIR = PROJECT_ROOT / "deploy" / "gpu_proof"
DEFAULT_PACK = PROJECT_ROOT / "build" / "gpu-proof"
DEFAULT_CACHE = PROJECT_ROOT / "build" / "gpu-proof-cache"
DEFAULT_WORK = Path("/tmp/lesionserve-gpu-proof")
PACK_NAME = "gpu-proof-pack.tar.xz"
MANIFEST_NAME = "manifest.json"
#: What travels to the device per call: working tree + shared/ + carried paths (device README).
CARRY_LIMIT_BYTES = 64 * 1024 * 1024
DEVICE_PYTHON = "3.12"
GPU_VARIANT = "gpu_torch"
STUB_BINARY = "triton_python_backend_stub"
#: Skip reasons of the tests that need a GPU start with this (tests/unit, tests/integration).
CUDA_SKIP_REASON = "CUDA not available"
#: Libraries the carried binaries need from the host itself (everything else is packed).
SYSTEM_LIBRARIES = frozenset({
    "ld-linux-x86-64.so.2", "libc.so.6", "libdl.so.2", "libm.so.6", "libpthread.so.0", "librt.so.1",
    "libresolv.so.2", "libgcc_s.so.1", "libstdc++.so.6", "libz.so.1",
})
#: pip's platform tags for the GPU host (x86-64, glibc >= 2.28 there).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# Exit codes of `device` (argparse errors exit 2; `timeout` in run.sh exits 124).
EXIT_FAILED, EXIT_NO_CUDA, EXIT_HARD_STOP = 1, 3, 124
#: run.sh's hard limit (seconds), passed in its environment; the Python budget must end before it.
HARD_LIMIT_VAR = "GPU_PROOF_HARD_LIMIT"
DEFAULT_HARD_LIMIT = 470
#: Seconds kept back at the end for stopping children and writing the summary.
FINISH_RESERVE = 20.0


@dataclass(frozen=True)
class WheelGroup:
    """Wheels installed together into one folder of the pack."""

    folder: str
    packages: tuple[str, ...]
    purpose: str


WHEEL_GROUPS = (
    WheelGroup("stub-site", ("numpy",), "numpy<2 for Triton's python stub only: under numpy 2 its outputs are empty"),
    WheelGroup("site", ("tritonclient", "python-rapidjson"), "the gRPC client of the tests, the client package and the harness"),
    WheelGroup("fallback/grpcio", ("grpcio",), "used only if the host's grpcio is older than tritonclient's generated code"),
    WheelGroup("fallback/protobuf", ("protobuf",), "used only if the host's protobuf is older than tritonclient's generated code"),
)


class PackError(RuntimeError):
    """The carry folder cannot be built or read; the message says what to do."""


class StageFailed(RuntimeError):
    """A stage of the device run failed; the message is its one-line reason."""


class HardStop(BaseException):
    """SIGTERM (run.sh's hard limit) or Ctrl-C: stop everything and write what we have."""


# ----------------------------------------------------------------------------------- ELF files


def elf_dynamic(path: Path) -> dict[str, list[str]]:
    """DT_NEEDED, DT_RPATH and DT_RUNPATH entries of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            raise PackError(f"{path} is not a 64-bit little-endian ELF file")
        f.seek(0x28)
        (shoff,) = struct.unpack("<Q", f.read(8))
        f.seek(0x3A)
        shentsize, shnum, _ = struct.unpack("<HHH", f.read(6))
        if shnum == 0:
            raise PackError(f"{path} has no section headers: cannot read its dynamic section")
        f.seek(shoff)
        raw = f.read(shentsize * shnum)
        # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
        sections = [struct.unpack_from("<IIQQQQIIQQ", raw, i * shentsize) for i in range(shnum)]
        out: dict[str, list[str]] = {"needed": [], "rpath": [], "runpath": []}
        dynamic = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
        if dynamic is None:
            return out
        strtab = sections[dynamic[6]]
        f.seek(strtab[4])
        strings = f.read(strtab[5])
        f.seek(dynamic[4])
        entries = f.read(dynamic[5])
    tags = {1: "needed", 15: "rpath", 29: "runpath"}
    for tag, value in struct.iter_unpack("<qQ", entries[: len(entries) // 16 * 16]):
        if tag == 0:
            break
        if tag in tags:
            out[tags[tag]].append(strings[value : strings.index(b"\0", value)].decode())
    return out


def library_closure(roots: Sequence[Path], libs_dir: Path) -> tuple[dict[str, Path], set[str]]:
    """The libraries of ``libs_dir`` that ``roots`` load, transitively; and the names they need
    from the host (everything not in ``libs_dir``)."""
    bundled = {p.name: p for p in libs_dir.iterdir() if p.is_file()}
    packed: dict[str, Path] = {}
    system: set[str] = set()
    todo = list(roots)
    while todo:
        for name in elf_dynamic(todo.pop())["needed"]:
            if name in bundled:
                if name not in packed:
                    packed[name] = bundled[name]
                    todo.append(bundled[name])
            else:
                system.add(name)
    return packed, system


# ------------------------------------------------------------------------- what travels, here


def travelling_tree_bytes(root: Path = PROJECT_ROOT) -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked-not-ignored
    files, plus shared/ inside the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout
    paths = {root / p.decode() for p in listed.split(b"\0") if p}
    shared = root / "shared"
    if shared.is_dir():
        paths |= {p for p in shared.rglob("*") if p.is_file() or p.is_symlink()}
    return sum(p.lstat().st_size for p in paths if p.is_symlink() or p.is_file())


def locked_versions(names: Sequence[str], lock: Path = PROJECT_ROOT / "requirements.lock") -> dict[str, str]:
    """``{name: version}`` from requirements.lock (names compared as PEP 503 normalises them)."""
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==", 1)
            pins[norm(name)] = version.strip()
    missing = [n for n in names if norm(n) not in pins]
    if missing:
        raise PackError(f"{lock} pins no version of {', '.join(missing)}: pin them (make lock) before packing")
    return {n: pins[norm(n)] for n in names}


# --------------------------------------------------------------------------------- the pack


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PackError(f"pip failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _target_flags(python: str) -> list[str]:
    flags = ["--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def fetch_wheels(group: WheelGroup, versions: Mapping[str, str], cache: Path, python: str) -> list[Path]:
    """The group's wheels for CPython ``python`` on x86-64 Linux, from ``cache`` or PyPI."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name in group.packages:
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{versions[name]}-"
        found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(stem)
                 and (f"cp{python.replace('.', '')}" in p.name or "-py3-none-" in p.name or "-abi3-" in p.name)]
        if not found:
            _pip("download", *_target_flags(python), "-d", str(cache), f"{name}=={versions[name]}")
            found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(stem)]
            if not found:
                raise PackError(f"pip downloaded no wheel named {stem}*.whl into {cache}")
        wheels.append(sorted(found)[-1])
    return wheels


def _triton_sources() -> tuple[Path, Path, str]:
    """(pytriton/tritonserver folder, nvidia_pytriton.libs folder, "nvidia-pytriton X (tag)") here."""
    from importlib import metadata

    from lesionserve.server import ServerStartError, pytriton_dir

    try:
        triton = pytriton_dir()
    except ServerStartError as exc:
        raise PackError(str(exc)) from exc
    libs = triton.parent.parent / "nvidia_pytriton.libs"
    if not (triton / "bin/tritonserver").is_file() or not libs.is_dir():
        raise PackError(f"{triton} or {libs} is incomplete: reinstall nvidia-pytriton (make setup)")
    dist = metadata.distribution("nvidia-pytriton")
    tag = next((ln.split(":", 1)[1].strip() for ln in (dist.read_text("WHEEL") or "").splitlines() if ln.startswith("Tag:")), "?")
    return triton, libs, f"nvidia-pytriton {dist.version} ({tag})"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _tar_xz(staging: Path, target: Path) -> None:
    """``staging``'s content as ``target`` (xz, all cores when the xz tool is here)."""
    tmp = target.with_name(target.name + ".tmp")
    if shutil.which("tar") and shutil.which("xz"):
        subprocess.run(["tar", "--sort=name", "--owner=0", "--group=0", "-I", "xz -T0 -6", "-cf", str(tmp), "-C", str(staging), "."],
                       check=True)
    else:
        with tarfile.open(tmp, "w:xz", preset=6) as tar:
            tar.add(staging, arcname=".")
    tmp.replace(target)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_pack(out: Path = DEFAULT_PACK, cache: Path = DEFAULT_CACHE, python: str = DEVICE_PYTHON,
               limit: int = CARRY_LIMIT_BYTES, log: Callable[[str], None] = print) -> dict:
    """Build the carry folder ``out`` (PACK_NAME + MANIFEST_NAME); return the manifest.

    Raises PackError when a piece is missing or the pack and the working tree together exceed ``limit``.
    """
    out, cache = Path(out), Path(cache)
    strays = [p.name for p in out.iterdir() if p.name not in (PACK_NAME, MANIFEST_NAME)] if out.is_dir() else []
    if strays:
        raise PackError(f"refusing to write into {out}: it holds files the pack did not write ({', '.join(sorted(strays))})")
    triton, libs, source = _triton_sources()
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_versions = sorted({python, here})  # the local one lets the CPU test here start the carried server
    staging = cache / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    shim = staging / "site/pytriton"
    stubs = {}
    for version in stub_versions:
        stub = triton / f"python_backend_stubs/{version}/{STUB_BINARY}"
        if not stub.is_file():
            raise PackError(f"the nvidia-pytriton wheel here has no python {version} stub ({stub})")
        _copy(stub, shim / f"tritonserver/python_backend_stubs/{version}/{STUB_BINARY}")
        stubs[version] = {"path": f"site/pytriton/tritonserver/python_backend_stubs/{version}/{STUB_BINARY}",
                          "needed": elf_dynamic(stub)["needed"]}
    roots = [triton / "bin/tritonserver", triton / "backends/python/libtriton_python.so",
             *(triton / f"python_backend_stubs/{v}/{STUB_BINARY}" for v in stub_versions)]
    for rel in ("bin/tritonserver", "backends/python/libtriton_python.so", "backends/python/triton_python_backend_utils.py"):
        _copy(triton / rel, shim / "tritonserver" / rel)
    packed, system = library_closure(roots, libs)
    for name, path in packed.items():
        _copy(path, staging / "site/nvidia_pytriton.libs" / name)
    unexpected = sorted(n for n in system if n not in SYSTEM_LIBRARIES and not n.startswith("libpython3."))
    if unexpected:
        raise PackError(f"the carried binaries need host libraries this pack does not expect: {', '.join(unexpected)}")
    (shim / "__init__.py").write_text(
        f'"""Only the tritonserver/ folder of {source}, carried for the GPU proof (lesionserve/gpu_proof.py)."""\n')

    versions = locked_versions([p for g in WHEEL_GROUPS for p in g.packages])
    wheels = {}
    for group in WHEEL_GROUPS:
        files = fetch_wheels(group, versions, cache / "wheels", python)
        log(f"  {group.folder}: {', '.join(p.name for p in files)}")
        _pip("install", "--quiet", "--no-index", "--no-compile", *_target_flags(python), "--target", str(staging / group.folder),
             *map(str, files))
        wheels[group.folder] = {"wheels": [p.name for p in files], "packages": {p: versions[p] for p in group.packages},
                                "purpose": group.purpose}

    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pack": PACK_NAME,
        "device_python": python,
        "triton": {"source": source, "server": "site/pytriton/tritonserver/bin/tritonserver", "stubs": stubs,
                   "libraries": {n: p.stat().st_size for n, p in sorted(packed.items())},
                   "host_libraries": sorted(system)},
        "wheels": wheels,
        "unpacked_bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    log(f"  compressing {manifest['unpacked_bytes'] / 2**20:.1f} MiB ...")
    _tar_xz(staging, out / PACK_NAME)
    tree = travelling_tree_bytes()
    manifest.update(pack_bytes=(out / PACK_NAME).stat().st_size, sha256=sha256(out / PACK_NAME), tree_bytes=tree)
    manifest["total_bytes"] = manifest["pack_bytes"] + tree + len(json.dumps(manifest, indent=2)) + 64
    manifest["limit_bytes"] = limit
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    if manifest["total_bytes"] > limit:
        raise PackError(f"pack {manifest['pack_bytes'] / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB exceed "
                        f"the {limit / 2**20:.0f} MiB the device call carries")
    return manifest


# ------------------------------------------------------------------------ unpacked, on device


@dataclass(frozen=True)
class Layout:
    """An unpacked pack: ``root/site`` (pytriton shim, libraries, tritonclient),
    ``root/stub-site`` (numpy<2), ``root/fallback/*``."""

    root: Path
    manifest: dict

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def stub_site(self) -> Path:
        return self.root / "stub-site"

    @property
    def libs(self) -> Path:
        return self.site / "nvidia_pytriton.libs"

    @property
    def tritonserver(self) -> Path:
        return self.root / self.manifest["triton"]["server"]

    def stub(self, version: str) -> Path | None:
        entry = self.manifest["triton"]["stubs"].get(version)
        return self.root / entry["path"] if entry else None

    def fallback(self, package: str) -> Path:
        return self.root / "fallback" / package


def read_manifest(pack: Path) -> dict:
    path = Path(pack) / MANIFEST_NAME
    if not (Path(pack) / PACK_NAME).is_file() or not path.is_file():
        raise PackError(f"no pack at {pack} ({PACK_NAME} + {MANIFEST_NAME}): run `make gpu-proof-pack` where PyPI is "
                        f"reachable, and name {os.path.relpath(pack, PROJECT_ROOT)} in the device call's carry")
    return json.loads(path.read_text())


def unpack(pack: Path, work: Path) -> Layout:
    """Extract the pack into ``work/pack`` (again only if its checksum changed); check it first."""
    manifest = read_manifest(pack)
    archive = Path(pack) / PACK_NAME
    digest = sha256(archive)
    if digest != manifest.get("sha256"):
        raise PackError(f"{archive} does not match {MANIFEST_NAME} (sha256 {digest[:12]} vs {str(manifest.get('sha256'))[:12]}): rebuild it")
    root = Path(work) / "pack"
    marker = root / ".unpacked"
    if not (marker.is_file() and marker.read_text() == digest):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with tarfile.open(archive, "r:xz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, filter="data")
            else:
                tar.extractall(root)
        marker.write_text(digest)
    return Layout(root, manifest)


def make_stub_venv(dest: Path, stub_site: Path, host_sites: Sequence[str | Path],
                   base_executable: str | None = None) -> Path:
    """A venv (made by hand: no venv/ensurepip module needed) for the processes that start servers;
    returns its python. Its site-packages lists, in order: ``stub_site`` (numpy<2), the project,
    then ``host_sites`` (processed as site dirs, their .pth files too). The python stub, which reads
    no PYTHONPATH, finds this venv through PATH and imports exactly that."""
    base = Path(base_executable or getattr(sys, "_base_executable", None) or sys.executable)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "bin").mkdir(parents=True)
    for name in ("python", "python3", f"python{version}"):
        (dest / "bin" / name).symlink_to(base)
    (dest / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {sys.version.split()[0]}\n")
    site = dest / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True)
    (site / "00-gpu-proof-stub-numpy.pth").write_text(f"{Path(stub_site)}\n")
    (site / "10-gpu-proof-project.pth").write_text(f"{PROJECT_ROOT}\n{PROJECT_ROOT / 'client'}\n")
    (site / "20-gpu-proof-host.pth").write_text("".join(f"import site; site.addsitedir({str(h)!r})\n" for h in host_sites))
    return dest / "bin" / "python3"


def host_site_dirs() -> list[str]:
    """This interpreter's own site-packages folders (a venv's, and the base's if it includes them)."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


@dataclass
class ProofEnv:
    """What the stages' processes see: ``python`` (the stub venv once made, else this interpreter);
    PYTHONPATH = the carried site, the project, fallbacks, then the host's site-packages (so these
    processes keep the host's numpy; the stubs ignore PYTHONPATH)."""

    layout: Layout | None
    python: str = sys.executable
    fallbacks: list[Path] = field(default_factory=list)
    lib_dirs: list[Path] = field(default_factory=list)
    host_sites: list[str] = field(default_factory=host_site_dirs)

    def environ(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        paths = ([str(self.layout.site)] if self.layout else []) + [str(PROJECT_ROOT), str(PROJECT_ROOT / "client")]
        paths += [str(p) for p in self.fallbacks] + list(self.host_sites)
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if self.layout:
            libs = [str(self.layout.libs)] + [str(p) for p in self.lib_dirs]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env


def libpython_dirs(version: str = DEVICE_PYTHON) -> tuple[str, list[Path]]:
    """(soname, folders holding it that the loader might not search) for this interpreter."""
    import sysconfig

    soname = f"libpython{version}.so.1.0"
    candidates = [sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib"), "/usr/lib/x86_64-linux-gnu", "/usr/local/lib"]
    return soname, [Path(d) for d in dict.fromkeys(c for c in candidates if c) if (Path(d) / soname).exists()]


# ----------------------------------------------------------------------------- stage children


def probe(repository: Path, work: Path, log_path: Path, timeout: float) -> dict:
    """Start the probe repository with lesionserve.server.TritonServer, as the project does, and
    return the probe model's report of its stub (plus the server binary and backend folder used)."""
    from lesionserve.server import TritonServer

    repo = Path(work) / "probe_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(repository, repo)
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=log_path, startup_timeout=timeout)
    command = server.command()
    result: dict[str, Any] = {"tritonserver": command[0],
                              "backend_directory": next(a.split("=", 1)[1] for a in command if a.startswith("--backend-directory="))}
    body = {"inputs": [{"name": "REQUEST", "shape": [1], "datatype": "INT32", "data": [0]}], "outputs": [{"name": "REPORT"}]}
    with server:
        request = urllib.request.Request(f"{server.http_url}/v2/models/gpu_proof_probe/infer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as exc:
            raise StageFailed(f"the probe request failed: HTTP {exc.code} {exc.read()[:500]!r}") from exc
        data = payload["outputs"][0].get("data") or [""]
        if not data[0]:
            raise StageFailed("the probe answered with zero bytes: numpy 2 inside the stub (the 2.51 pitfall)?")
        result.update(json.loads(data[0]))
        result["stub_pids"] = [s.pid for s in server.stubs()]
    return result


def probe_problems(report: Mapping[str, Any], stub_site: Path | None, need_cuda: bool) -> list[str]:
    """What in a probe report would stop the served pipeline (empty: the stub is fit)."""
    problems = []
    if os.path.basename(str(report.get("executable", ""))) != STUB_BINARY:
        problems.append(f"the probe did not run in {STUB_BINARY} but in {report.get('executable')!r}")
    if not str(report.get("numpy", "")).startswith("1."):
        problems.append(f"numpy {report.get('numpy')} in the stub ({report.get('numpy_file')}): the stub needs numpy<2")
    if stub_site is not None and not str(report.get("numpy_file", "")).startswith(str(stub_site)):
        problems.append(f"numpy in the stub came from {report.get('numpy_file')}, not the carried {stub_site}")
    for key in ("cv2", "torch", "lesionserve"):
        if f"{key}_error" in report:
            problems.append(f"{key} fails in the stub: {report[f'{key}_error']}")
    if need_cuda and report.get("torch_cuda") is not True:
        problems.append("torch inside the stub sees no CUDA device")
    return problems


def gpu_bound(artifacts: Path, batches: Sequence[int] = (8, 64), repeats: int = 20) -> dict:
    """Milliseconds per view of each backbone alone on the GPU, as gpu_torch runs it (FP16, CUDA graphs,
    inputs already on the GPU): no pipeline serving these backbones on this GPU can beat it."""
    import torch

    from lesionserve.torch_runtime import load_torch_backbone

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "batches": list(batches), "repeats": repeats, "backbones": {}}
    for checkpoint in sorted(Path(artifacts).glob("*/checkpoint.pt")):
        name, runner = load_torch_backbone(checkpoint, device="cuda:0", half=True, cuda_graphs=True)
        row: dict[str, float] = {"input_size": runner.input_size}
        for batch in batches:
            x = torch.randn(batch, 3, runner.input_size, runner.input_size, device="cuda:0")
            for _ in range(3):
                runner(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                runner(x)
            torch.cuda.synchronize()
            row[f"ms_per_view_b{batch}"] = round(1000 * (time.perf_counter() - start) / (repeats * batch), 4)
        out["backbones"][name] = row
        del runner
        torch.cuda.empty_cache()
    if not out["backbones"]:
        raise StageFailed(f"no */checkpoint.pt under {artifacts}")
    return out


def run_harness(argv: Sequence[str]) -> int:
    """benchmarks.harness with the ensemble served as gpu_torch (its baselines are unchanged)."""
    from lesionserve.benchmarks import harness

    return harness.main([*argv, "--variant", GPU_VARIANT])


# ------------------------------------------------------------- pytest plugin: CUDA tests only


def is_cuda_only(item: Any) -> bool:
    """A test that skips with "CUDA not available..." where there is no GPU."""
    return any(str(m.kwargs.get("reason", "")).startswith(CUDA_SKIP_REASON) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    """Active only under ``pytest -p lesionserve.gpu_proof``: keep the CUDA-only tests."""
    keep = [item for item in items if is_cuda_only(item)]
    dropped = [item for item in items if not is_cuda_only(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def cuda_test_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """Test modules that hold a CUDA-only test (named by their skip reason)."""
    found = []
    for tier in ("unit", "integration"):
        found += [p for p in sorted((root / "tests" / tier).glob("test_*.py")) if CUDA_SKIP_REASON in p.read_text()]
    return found


def junit_summary(path: Path) -> dict:
    """Counts and the non-passing cases of a pytest --junitxml file."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    cases = []
    for case in root.iter("testcase"):
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "seconds": float(case.get("time", 0)),
                      "outcome": outcome.tag if outcome is not None else "passed",
                      "message": (outcome.get("message") or "").splitlines()[0][:300] if outcome is not None and outcome.get("message") else ""})
    return {**counts, "cases": cases}


# ----------------------------------------------------------------------- the device run


@dataclass
class Stage:
    name: str
    status: str = "pending"  # passed | failed | skipped | running
    seconds: float = 0.0
    note: str = ""
    log: Path | None = None
    requested_skip: bool = False


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path
    started: float


CUDA_CHECK = r"""
import json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   device_count=torch.cuda.device_count(), first_kernel=torch.ones(2, device="cuda:0").add(1).sum().item())
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
    out["cuda_available"] = False
from importlib import metadata
out["packages"] = {}
for name in ("numpy", "opencv-python-headless", "opencv-python", "timm", "onnxruntime", "grpcio", "protobuf", "pytest", "ml-dtypes", "pillow"):
    try:
        out["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


class ProofRun:
    """The device run: stages in order, each timed, logged and bounded by the budget."""

    def __init__(self, args: argparse.Namespace, stub_site: Path | None = None, need_cuda: bool = True) -> None:
        """``stub_site`` replaces the pack's numpy<2 folder and ``need_cuda=False`` accepts a stub without
        CUDA: both only so that the CPU tests can run these stages on a host of another Python."""
        self.args = args
        self.stub_site_override = stub_site
        self.need_cuda = need_cuda
        self.out: Path = args.out
        self.work: Path = args.work
        self.logs = self.work / "logs"
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.stages: dict[str, Stage] = {}
        self.info: dict[str, Any] = {"command": " ".join(["deploy/gpu_proof/run.sh", *args.argv]), "budget_s": args.budget}
        self.env = ProofEnv(None)
        self.children: list[Child] = []
        self.outcome = "running"

    # ---- time and children
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start_child(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            process = subprocess.Popen(list(cmd), cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                       env=dict(env or self.env.environ()), start_new_session=True)
        child = Child(name, process, log, time.monotonic())
        self.children.append(child)
        return child

    def wait_child(self, child: Child, timeout: float) -> int:
        try:
            return child.process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill(child)
            raise StageFailed(f"stopped after {time.monotonic() - child.started:.0f}s (its share of the budget); see {child.log.name}")
        finally:
            if child.process.poll() is not None and child in self.children:
                self.children.remove(child)

    def kill(self, *children: Child, grace: float = 5.0) -> None:
        """SIGTERM the children's process groups, SIGKILL what is left after ``grace`` seconds.
        (Their tritonservers follow: TritonServer gives each the parent-death signal.)"""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = [c for c in children if c.process.poll() is None]
            for c in live:
                try:
                    os.killpg(c.process.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while any(c.process.poll() is None for c in live) and time.monotonic() < deadline:
                time.sleep(0.1)

    def run_child(self, name: str, cmd: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> Path:
        child = self.start_child(name, cmd, env)
        rc = self.wait_child(child, timeout)
        if rc != 0:
            raise StageFailed(f"exit code {rc}; see {child.log.name}: {last_line(child.log)}")
        return child.log

    # ---- stage bookkeeping
    def stage(self, name: str, minimum: float, body: Callable[[Stage, float], None], needs: Sequence[str] = (),
              cap: float | None = None) -> bool:
        st = self.stages.setdefault(name, Stage(name))
        missing = [n for n in needs if self.stages.get(n) is None or self.stages[n].status != "passed"]
        if missing:
            st.status, st.note = "skipped", f"needs {', '.join(missing)}, which did not pass"
        elif self.left() - FINISH_RESERVE < minimum:
            st.status, st.note = "skipped", f"budget: {self.left() - FINISH_RESERVE:.0f}s left, needs at least {minimum:.0f}s"
        if st.status == "skipped":
            self.write_outputs()
            return False
        timeout = self.left() - FINISH_RESERVE if cap is None else min(cap, self.left() - FINISH_RESERVE)
        st.status = "running"
        self.write_outputs()
        t0 = time.monotonic()
        try:
            body(st, timeout)
            st.status = "passed"
        except HardStop:
            st.status, st.note = "failed", "stopped by the hard time limit (run.sh)"
            raise
        except (StageFailed, PackError) as exc:
            st.status, st.note = "failed", str(exc)
        except Exception as exc:  # a bug of ours or a broken host: recorded, the run goes on
            st.status, st.note = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            st.seconds = round(time.monotonic() - t0, 1)
            self.write_outputs()
        return st.status == "passed"

    def skip(self, name: str, note: str) -> None:
        self.stages[name] = Stage(name, "skipped", note=note, requested_skip=True)

    # ---- stages
    def check_cuda(self, st: Stage, timeout: float) -> None:
        smi = shutil.which("nvidia-smi")
        text = ""
        for args in ([], ["--query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.max.sm",
                          "--format=csv"]) if smi else ():
            try:
                done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=30)
                text += f"$ nvidia-smi {' '.join(args)}\n{done.stdout}{done.stderr}\n"
            except (OSError, subprocess.TimeoutExpired) as exc:
                text += f"$ nvidia-smi {' '.join(args)}\nfailed: {exc}\n"
        (self.logs / "nvidia-smi.txt").write_text(text or "nvidia-smi: not on PATH\n")
        self.info["nvidia_smi"] = text.strip() or "nvidia-smi: not on PATH"
        done = subprocess.run([sys.executable, "-c", CUDA_CHECK], capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
        try:
            cuda = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            cuda = {"cuda_available": False, "error": f"the CUDA check printed no result: {done.stderr[-500:]}"}
        self.info["cuda"] = cuda
        (self.logs / "host.json").write_text(json.dumps(cuda, indent=2))
        if not cuda.get("cuda_available"):
            reason = cuda.get("error") or f"torch {cuda.get('torch')} reports torch.cuda.is_available() == False"
            raise StageFailed(f"CUDA absent: {reason}; nvidia-smi: {'present' if smi else 'not on PATH'}")
        st.note = f"{cuda['device']} (sm {cuda['capability']}, {cuda['memory_gib']} GiB), torch {cuda['torch']}, CUDA {cuda['torch_cuda_build']}"

    def prepare(self, st: Stage, timeout: float) -> None:
        layout = unpack(self.args.pack, self.work)
        env = ProofEnv(layout)
        notes = [f"pack of {layout.manifest['created']}"]
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = layout.stub(version)
        if stub is None:
            raise StageFailed(f"this host runs Python {version}; the pack carries stubs for {', '.join(layout.manifest['triton']['stubs'])}")
        soname, env.lib_dirs = libpython_dirs(version)
        ldd = shutil.which("ldd")
        if ldd:
            done = subprocess.run([ldd, str(stub)], capture_output=True, text=True, env=env.environ(), timeout=30)
            (self.logs / "ldd-stub.txt").write_text(done.stdout + done.stderr)
            missing = [ln.split("=>")[0].strip() for ln in done.stdout.splitlines() if "not found" in ln]
            if missing:
                raise StageFailed(f"the python {version} stub cannot load {', '.join(missing)} on this host"
                                  + (" (no libpython shared library here: the python backend cannot run)" if soname in missing else ""))
        env.python = str(make_stub_venv(self.work / "stub-venv", self.stub_site(layout), env.host_sites))
        # What a stub will import: an isolated interpreter (-I ignores PYTHONPATH, as the stub does).
        check = "import numpy, sys; print(numpy.__version__, numpy.__file__, sys.prefix)"
        isolated = subprocess.run([env.python, "-I", "-c", check], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
        normal = subprocess.run([env.python, "-c", check], capture_output=True, text=True, env=env.environ(), timeout=60, cwd=PROJECT_ROOT)
        self.info["numpy_seen"] = {"stub (isolated)": (isolated.stdout or isolated.stderr).strip()[-300:],
                                   "stage processes": (normal.stdout or normal.stderr).strip()[-300:]}
        if not isolated.stdout.startswith("1.") or str(self.stub_site(layout)) not in isolated.stdout:
            raise StageFailed(f"the stub venv does not give the carried numpy<2 first: {self.info['numpy_seen']['stub (isolated)']}")
        check = "import tritonclient.grpc, tritonclient.grpc.service_pb2_grpc, google.protobuf, grpc; print(grpc.__version__)"
        for attempt in ([], [layout.fallback("grpcio")], [layout.fallback("protobuf")], [layout.fallback("grpcio"), layout.fallback("protobuf")]):
            env.fallbacks = attempt
            done = subprocess.run([env.python, "-c", check], capture_output=True, text=True, env=env.environ(),
                                  cwd=PROJECT_ROOT, timeout=60)
            if done.returncode == 0:
                break
        else:
            raise StageFailed(f"tritonclient does not import, even with the carried grpcio/protobuf: {done.stderr.strip().splitlines()[-1:]}")
        if attempt:
            notes.append("carried " + " + ".join(p.name for p in attempt) + " used (the host's are too old for tritonclient)")
        self.env = env
        environ = env.environ()
        self.info["environment"] = {"python": env.python, "PYTHONPATH": environ["PYTHONPATH"], "LD_LIBRARY_PATH": environ["LD_LIBRARY_PATH"],
                                    "fallbacks": [str(p) for p in attempt], "libpython_dirs": [str(d) for d in env.lib_dirs]}
        st.note = "; ".join(notes + [f"stub numpy {isolated.stdout.split()[0]}, stage processes numpy {normal.stdout.split()[0] if normal.stdout else '?'}"])

    def stub_site(self, layout: Layout) -> Path:
        return self.stub_site_override or layout.stub_site

    def run_probe(self, st: Stage, timeout: float) -> None:
        report_path = self.logs / "probe.json"
        self.run_child("probe", [self.env.python, "-m", "lesionserve.gpu_proof", "probe", "--work", str(self.work), "--json", str(report_path),
                                 "--log", str(self.logs / "tritonserver-probe.log"), "--timeout", str(int(min(timeout, 120)))], timeout)
        report = json.loads(report_path.read_text())
        self.info["probe"] = report
        problems = probe_problems(report, self.stub_site(self.env.layout) if self.env.layout else None, need_cuda=self.need_cuda)
        if problems:
            raise StageFailed("; ".join(problems))
        st.note = (f"stub python {report['python']}, numpy {report['numpy']} (carried), OpenCV {report.get('cv2')}, "
                   f"torch {report.get('torch')} on {report.get('cuda_device')}")

    def run_tests_and_artifacts(self) -> None:
        """The CUDA tests and the artifacts' export at once: the export is CPU work, the tests mostly GPU."""
        artifacts = self.work / "artifacts"
        shutil.rmtree(artifacts, ignore_errors=True)
        export_cmd = [self.env.python, "-m", "lesionserve.export.random_artifacts", "--out", str(artifacts)]
        tests = None
        if self.args.skip_tests:
            self.skip("tests", "--skip-tests")
        else:
            files = [str(p.relative_to(PROJECT_ROOT)) for p in cuda_test_files()]
            self.info["test_files"] = files
            tmp = self.work / "tmp-pytest"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            test_cmd = [self.env.python, "-m", "pytest", "-p", "lesionserve.gpu_proof", "-p", "no:cacheprovider", "-ra",
                        f"--junitxml={self.logs / 'pytest.xml'}", *files]
            tests = self.start_child("pytest", test_cmd, self.env.environ(TMPDIR=str(tmp)))
        export = self.start_child("artifacts", export_cmd)

        def wait_tests(st: Stage, timeout: float) -> None:
            st.log = tests.log
            rc = self.wait_child(tests, timeout)
            xml = self.logs / "pytest.xml"
            if xml.exists():
                self.info["pytest"] = junit_summary(xml)
                p = self.info["pytest"]
                st.note = f"{p['passed']} passed, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped"
            if rc == 5:
                raise StageFailed("no CUDA-only test was collected")
            if rc != 0:
                raise StageFailed(f"pytest exit code {rc}: {st.note or last_line(tests.log)}")
            if not self.info.get("pytest") or self.info["pytest"]["skipped"] or not self.info["pytest"]["passed"]:
                raise StageFailed(f"CUDA tests skipped on a host where CUDA was found: {st.note or 'no pytest.xml'}")

        def wait_export(st: Stage, timeout: float) -> None:
            st.log = export.log
            rc = self.wait_child(export, timeout)
            if rc != 0:
                raise StageFailed(f"exit code {rc}; see artifacts.log: {last_line(export.log)}")
            missing = [p for p in ("calibration.json",) if not (artifacts / p).is_file()]
            if missing or not list(artifacts.glob("*/checkpoint.pt")):
                raise StageFailed(f"the export left no checkpoints or calibration under {artifacts}")
            st.note = f"{len(list(artifacts.glob('*/checkpoint.pt')))} backbones, random weights, native sizes"

        if tests is not None:
            self.stage("tests", 0, wait_tests, cap=300)
        self.stage("artifacts", 0, wait_export, cap=240)

    def run_gpu_bound(self, st: Stage, timeout: float) -> None:
        path = self.logs / "gpu_bound.json"
        self.run_child("gpu-bound", [self.env.python, "-m", "lesionserve.gpu_proof", "gpu-bound", "--artifacts",
                                     str(self.work / "artifacts"), "--json", str(path)], timeout)
        self.info["gpu_bound"] = json.loads(path.read_text())
        rows = self.info["gpu_bound"]["backbones"]
        st.note = ", ".join(f"{n} {r['ms_per_view_b64']:.3f} ms/view" for n, r in rows.items()) + " (batch 64, FP16 graphs)"

    def run_harness_at(self, views: int, st: Stage, timeout: float) -> None:
        out = self.work / "harness" / f"t{views}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [self.env.python, "-m", "lesionserve.gpu_proof", "harness", "--views", str(views), "--images", "synthetic",
               "--num-images", "16", "--rounds", str(self.args.rounds), "--throughput-views", "128", "--latency-views", "32",
               "--bound-repeats", "1", "--artifacts", str(self.work / "artifacts"), "--out", str(out)]
        try:
            st.log = self.run_child(f"harness-t{views}", cmd, timeout)
        finally:
            if (out / "harness.json").exists():
                report = json.loads((out / "harness.json").read_text())
                self.info.setdefault("harness", {})[str(views)] = {
                    "results": report["views"].get(str(views)), "ratios": report["ratios"].get(str(views)),
                    "machine": report.get("machine"), "images": report.get("images")}
        h = self.info["harness"][str(views)]["results"]["triton"]
        st.note = f"gpu_torch served: {h['throughput']['images_per_s']:.1f} images/s, p50 {h['latency']['p50_ms']} ms"

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            if not self.stage("cuda", 5, self.check_cuda, cap=120):
                self.outcome = "CUDA absent"
                return EXIT_NO_CUDA
            self.stage("unpack", 10, self.prepare, cap=120)
            self.stage("probe", 30, self.run_probe, needs=["unpack"], cap=180)
            self.run_tests_and_artifacts()
            self.stage("gpu-bound", 30, self.run_gpu_bound, needs=["artifacts"], cap=120)
            for i, views in enumerate(self.args.views):
                share = (self.left() - FINISH_RESERVE) / (len(self.args.views) - i)
                self.stage(f"harness-t{views}", 75, lambda st, t, v=views: self.run_harness_at(v, st, t),
                           needs=["probe", "artifacts"], cap=max(75.0, share))
            bad = [s for s in self.stages.values() if s.status == "failed" or (s.status == "skipped" and not s.requested_skip)]
            self.outcome = "PASSED" if not bad else f"FAILED ({', '.join(s.name for s in bad)})"
            return 0 if not bad else EXIT_FAILED
        except HardStop:
            self.outcome = "STOPPED by the hard time limit"
            return EXIT_HARD_STOP
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # run.sh's KILL follows in 15 s: finish the files first
            self.kill(*self.children, grace=3.0)
            self.write_outputs(final=True)

    # ---- outputs
    def write_outputs(self, final: bool = False) -> None:
        elapsed = round(time.monotonic() - self.started, 1)
        results = {"outcome": self.outcome if final else "running", "started": self.started_at.isoformat(timespec="seconds"),
                   "elapsed_s": elapsed, "stages": [{**vars(s), "log": s.log.name if s.log else None} for s in self.stages.values()],
                   **self.info}
        _atomic_write(self.out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
        harness_md = self.harness_markdown()
        if harness_md:
            _atomic_write(self.out / "harness.md", harness_md + "\n")
        _atomic_write(self.out / "summary.md", summary_markdown(results, harness_md, self.logs))
        write_logs_archive(self.out / "logs.tar.gz", self.log_files())

    def harness_markdown(self) -> str:
        runs = {v: r for v, r in self.info.get("harness", {}).items() if r.get("results")}
        if not runs:
            return ""
        report = {"views": {v: r["results"] for v, r in runs.items()}, "ratios": {v: r["ratios"] for v, r in runs.items()}}
        try:
            from lesionserve.benchmarks.harness import markdown

            table = markdown(report)
        except Exception as exc:  # the figures are in results.json either way
            table = f"(harness table unavailable: {type(exc).__name__}: {exc})"
        bound = self.info.get("gpu_bound", {}).get("backbones")
        if bound:
            lines = ["", "| T | (a) Triton gpu_torch images/s | (e) backbones alone on the GPU, images/s | (a)/(e) |", "|---|---|---|---|"]
            for v, r in runs.items():
                a = r["results"]["triton"]["throughput"]["images_per_s"]
                e = 1000 / (int(v) * sum(row["ms_per_view_b64"] for row in bound.values()))
                lines.append(f"| {v} | {a:.2f} | {e:.1f} | {a / e:.3f} |")
            table += "\n" + "\n".join(lines)
        return ("(a) is the gpu_torch variant on the GPU; (b), (c) and (d) run on the host's CPU cores, so the CPU goals "
                "in the second table do not apply here. (e): FP16 CUDA graphs at batch 64, inputs already on the GPU.\n\n" + table)

    def log_files(self) -> list[tuple[Path, str]]:
        """(file, name in logs.tar.gz): the stage logs, and the harness's and the tests' server logs and reports."""
        files = [(p, p.name) for p in sorted(self.logs.glob("*")) if p.is_file() and not p.name.endswith(".tmp")]
        harness = sorted((self.work / "harness").glob("t*/*.log")) + sorted((self.work / "harness").glob("t*/harness.*"))
        files += [(p, f"{p.parent.name}-{p.name}") for p in harness]
        files += [(p, f"pytest-{p.name}") for p in sorted((self.work / "tmp-pytest").glob("tritonserver-*.log"))]
        return files


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


#: Files larger than this go into logs.tar.gz as their last MAX_LOG_BYTES (the device returns <= 16 MiB a file).
MAX_LOG_BYTES = 2 * 1024 * 1024


def write_logs_archive(path: Path, files: Sequence[tuple[Path, str]]) -> None:
    """``files`` as ``logs/<name>`` in a .tar.gz, each cut to its last MAX_LOG_BYTES."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f, name in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if len(data) > MAX_LOG_BYTES:
                data = b"[... truncated ...]\n" + data[-MAX_LOG_BYTES:]
            info = tarfile.TarInfo(f"logs/{name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def server_logs_for(stage: str, work: Path) -> list[Path]:
    """The tritonserver logs a stage's servers wrote."""
    if stage == "probe":
        return sorted((work / "logs").glob("tritonserver-probe.log"))
    if stage == "tests":
        return sorted((work / "tmp-pytest").glob("tritonserver-*.log"))
    if stage.startswith("harness-t"):
        return sorted((work / "harness" / stage.removeprefix("harness-")).glob("*.log"))
    return []


def summary_markdown(results: Mapping[str, Any], harness_md: str, logs: Path) -> str:
    """summary.md: the outcome, each stage, the figures, and log tails for what failed."""
    cuda = results.get("cuda", {})
    lines = [f"# LesionServe GPU proof: {results['outcome']}", "",
             f"Started {results['started']}, {results['elapsed_s']} s {'so far' if results['outcome'] == 'running' else 'in all'}; command `{results.get('command')}`; budget {results.get('budget_s')} s.", ""]
    if cuda:
        if cuda.get("cuda_available"):
            lines.append(f"GPU: {cuda.get('device')} (sm {cuda.get('capability')}, {cuda.get('memory_gib')} GiB); torch {cuda.get('torch')} "
                         f"(CUDA {cuda.get('torch_cuda_build')}); Python {cuda.get('python')}; host packages {cuda.get('packages')}.")
        else:
            lines.append(f"**CUDA absent**: {cuda.get('error') or 'torch.cuda.is_available() is False'} (torch {cuda.get('torch')}, "
                         f"Python {cuda.get('python')}). Nothing GPU-side was run.")
        lines.append("")
    lines += ["| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {str(s['note']).replace('|', '/')} |" for s in results["stages"]]
    pytest_info = results.get("pytest")
    if pytest_info:
        lines += ["", "## CUDA-only tests", "", f"Files: {', '.join(results.get('test_files', []))}", "",
                  "| test | outcome | seconds | message |", "|---|---|---|---|"]
        lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |" for c in pytest_info["cases"]]
    probe_info = results.get("probe")
    if probe_info:
        lines += ["", "## Python stub (probe)", "", "```", json.dumps(probe_info, indent=1), "```"]
    bound = results.get("gpu_bound")
    if bound:
        lines += ["", f"## Backbones alone on the GPU ({bound.get('device')}; FP16, CUDA graphs, {bound.get('repeats')} runs)", "",
                  "| backbone | size | " + " | ".join(f"ms/view at batch {b}" for b in bound["batches"]) + " |",
                  "|---|---|" + "---|" * len(bound["batches"])]
        lines += [f"| {n} | {r['input_size']} | " + " | ".join(str(r[f'ms_per_view_b{b}']) for b in bound["batches"]) + " |"
                  for n, r in bound["backbones"].items()]
    if harness_md:
        lines += ["", "## Benchmark harness (python -m benchmarks.harness, ensemble served as gpu_torch)", "", harness_md]
    smi = results.get("nvidia_smi")
    if smi:
        lines += ["", "## nvidia-smi (at the start)", "", "```", smi[-3000:], "```"]
    for s in (s for s in results["stages"] if s["status"] == "failed"):
        log = logs / (s.get("log") or f"{s['name']}.log")
        if tail(log):
            lines += ["", f"## {s['name']} failed: last lines of {log.name}", "", "```", tail(log, 40), "```"]
        for server_log in server_logs_for(s["name"], logs.parent):
            lines += ["", f"server log {server_log.name} ({s['name']}), last lines:", "", "```", tail(server_log, 25), "```"]
    lines += ["", "Files: summary.md, results.json (all figures), harness.md, logs.tar.gz (stage logs, server logs, "
              "pytest.xml, probe.json, gpu_bound.json, harness JSON/PNG per T)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ CLI


def hard_limit() -> int:
    """run.sh's hard limit in seconds (its environment), or the default."""
    value = os.environ.get(HARD_LIMIT_VAR, "")
    return int(value) if value.isdigit() else DEFAULT_HARD_LIMIT


def _positive_budget(value: str) -> int:
    try:
        seconds = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, got {value!r}") from None
    hard = hard_limit()
    if not 60 <= seconds <= hard - FINISH_RESERVE:
        raise argparse.ArgumentTypeError(
            f"must be 60..{hard - int(FINISH_RESERVE)} seconds (run.sh's hard limit {hard} s minus {int(FINISH_RESERVE)} s to write the summary), got {seconds}")
    return seconds


def _rounds(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 5:
        raise argparse.ArgumentTypeError(f"must be 1..5, got {value!r}")
    return int(value)


def device_parser() -> argparse.ArgumentParser:
    from lesionserve.spec import ALLOWED_VIEWS

    hard = hard_limit()
    parser = argparse.ArgumentParser(
        prog="deploy/gpu_proof/run.sh",
        description="The GPU proof on the device machine: CUDA check, carried Triton probe, CUDA-only tests, gpu_torch "
                    "served through the benchmark harness. Writes summary.md, results.json, harness.md, logs.tar.gz to --out "
                    f"after every stage. Exit 0 passed, 1 a stage failed, 2 bad arguments, 3 CUDA absent, 124 hard limit ({hard} s).")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or PROJECT_ROOT / "runs/gpu-proof"),
                        help="folder for the 4 result files (default: $OUT, else runs/gpu-proof)")
    parser.add_argument("--pack", type=Path, default=DEFAULT_PACK, help="carry folder from `make gpu-proof-pack` (default build/gpu-proof)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder for the unpacked pack, artifacts, logs (default %(default)s)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA-only pytest tests")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 8], choices=ALLOWED_VIEWS, metavar="T",
                        help=f"view counts for the harness, each of {', '.join(map(str, ALLOWED_VIEWS))} (default 1 8)")
    parser.add_argument("--rounds", type=_rounds, default=2, help="harness rounds per view count, 1..5 (default %(default)s)")
    parser.add_argument("--budget", type=_positive_budget, default=min(440, hard - int(FINISH_RESERVE)),
                        help=f"seconds for all stages; later ones are skipped when it runs out (default %(default)s, at most {hard - int(FINISH_RESERVE)})")
    return parser


def parse_device_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = device_parser()
    args = parser.parse_args(list(argv))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    if len(set(args.views)) != len(args.views):
        parser.error(f"--views lists a view count twice: {' '.join(map(str, args.views))}")
    args.out, args.work, args.pack = args.out.resolve(), args.work.resolve(), args.pack.resolve()
    if args.out == args.work or args.work in args.out.parents or args.out in args.work.parents:
        parser.error(f"--out {args.out} and --work {args.work} must not hold one another: all of --out comes back from the device")
    args.argv = list(argv)
    return args


def device_main(argv: Sequence[str]) -> int:
    args = parse_device_args(argv)

    def stop(signum: int, frame: Any) -> None:
        raise HardStop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    run = ProofRun(args)
    code = run.run()
    if code == EXIT_NO_CUDA:
        print(f"gpu-proof: CUDA is not available on this machine ({run.stages['cuda'].note}); nothing GPU-side can be proven "
              f"here. Summary: {args.out / 'summary.md'}", file=sys.stderr)
    else:
        print(f"gpu-proof: {run.outcome}. Summary: {args.out / 'summary.md'}", file=sys.stderr)
    return code


def pack_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lesionserve.gpu_proof pack",
                                     description="Build the GPU proof's carry folder from the nvidia-pytriton install here and PyPI wheels.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PACK, help="carry folder (default build/gpu-proof)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="wheel cache and staging, not carried (default build/gpu-proof-cache)")
    parser.add_argument("--python", default=DEVICE_PYTHON, help="the GPU host's Python (default %(default)s)")
    args = parser.parse_args(list(argv))
    try:
        manifest = build_pack(args.out, args.cache, args.python)
    except PackError as exc:
        print(f"gpu-proof pack: {exc}", file=sys.stderr)
        return 1
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"pack: {args.out / PACK_NAME} {mib(manifest['pack_bytes'])} (unpacked {mib(manifest['unpacked_bytes'])}); working tree "
          f"{mib(manifest['tree_bytes'])}; total {mib(manifest['total_bytes'])} of {mib(manifest['limit_bytes'])}")
    return 0


def probe_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lesionserve.gpu_proof probe", description="Start the probe model; write its report.")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True, help="where the report goes")
    parser.add_argument("--log", type=Path, required=True, help="tritonserver log")
    parser.add_argument("--timeout", type=float, default=120.0, help="server start-up limit in seconds")
    args = parser.parse_args(list(argv))
    try:
        report = probe(HERE_DIR / "probe_repository", args.work, args.log, args.timeout)
    except Exception as exc:
        print(f"probe failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


def gpu_bound_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lesionserve.gpu_proof gpu-bound", description=gpu_bound.__doc__)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(list(argv))
    report = gpu_bound(args.artifacts)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "pack": pack_main, "device": device_main, "probe": probe_main, "gpu-bound": gpu_bound_main, "harness": run_harness,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m lesionserve.gpu_proof {{{','.join(COMMANDS)}}} [options]\n\n{__doc__}", file=sys.stderr if argv else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
