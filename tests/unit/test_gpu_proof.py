"""The GPU proof's pieces that run without a GPU (deploy/gpu_proof/README.md): reading the carried
binaries, the pack's size and contents, run.sh's arguments and its CUDA-absent exit, and the carried
tritonserver serving a probe model whose stub imports numpy from the stub venv, not PYTHONPATH."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lesionserve import gpu_proof
from lesionserve.gpu_proof import (CARRY_LIMIT_BYTES, DEFAULT_PACK, MANIFEST_NAME, PACK_NAME, SYSTEM_LIBRARIES, PackError, ProofRun,
                                   elf_dynamic, library_closure, make_stub_venv, parse_device_args, probe_problems)

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "deploy/gpu_proof/run.sh"
PACK_MISSING = ("pack not built: `make gpu-proof-pack` builds build/gpu-proof (PyPI wheels + the nvidia-pytriton install, "
                "about 2 min); it is git-ignored, so fresh clones and CI lack it")
needs_pack = pytest.mark.skipif(not (DEFAULT_PACK / PACK_NAME).is_file(), reason=PACK_MISSING)
RESULT_FILES = {"summary.md", "results.json", "harness.md", "logs.tar.gz"}


def _installed_triton() -> Path:
    try:
        from lesionserve.server import pytriton_dir

        return pytriton_dir()
    except Exception as exc:  # noqa: BLE001 - any failure means the wheel is not usable here
        pytest.skip(f"nvidia-pytriton not installed here ({exc})")


def _run_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(RUN_SH), *args], capture_output=True, text=True, env=full_env, timeout=120)


# ------------------------------------------------------------------------------ ELF and libraries


def test_elf_dynamic_reads_libpython_and_rpath_when_given_the_312_stub():
    stub = _installed_triton() / "python_backend_stubs/3.12/triton_python_backend_stub"
    dynamic = elf_dynamic(stub)
    assert "libpython3.12.so.1.0" in dynamic["needed"]
    assert any("nvidia_pytriton.libs" in r for r in dynamic["rpath"] + dynamic["runpath"])


def test_elf_dynamic_raises_when_file_is_not_elf(tmp_path):
    (tmp_path / "x.so").write_text("not a library")
    with pytest.raises(PackError, match="not a 64-bit little-endian ELF"):
        elf_dynamic(tmp_path / "x.so")


def test_library_closure_needs_only_expected_host_libraries_when_server_and_backend_loaded():
    triton = _installed_triton()
    roots = [triton / "bin/tritonserver", triton / "backends/python/libtriton_python.so",
             triton / "python_backend_stubs/3.12/triton_python_backend_stub"]
    packed, system = library_closure(roots, triton.parent.parent / "nvidia_pytriton.libs")
    assert any(n.startswith("libtritonserver") for n in packed) and any(n.startswith("libcudart") for n in packed)
    assert not any(n.startswith("libpython3-") for n in packed)  # the wheel's 3.13 runtime is for pytriton itself, not needed
    assert system - SYSTEM_LIBRARIES == {"libpython3.12.so.1.0"}


def test_locked_versions_reads_pins_when_names_differ_in_case_and_separators(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nPython_Rapidjson==1.25\nnumpy==1.26.4\n")
    assert gpu_proof.locked_versions(["python-rapidjson", "numpy"], lock) == {"python-rapidjson": "1.25", "numpy": "1.26.4"}
    with pytest.raises(PackError, match="pins no version of grpcio"):
        gpu_proof.locked_versions(["grpcio"], lock)


# ----------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(("argv", "message"), [
    (["--views", "3"], "argument --views: invalid choice: 3 (choose from 1, 2, 4, 8)"),
    (["--views", "1", "1"], "--views lists a view count twice: 1 1"),
    (["--budget", "5"], "argument --budget: must be 60..450 seconds (run.sh's hard limit 470 s minus 20 s"),
    (["--budget", "soon"], "argument --budget: must be a whole number of seconds, got 'soon'"),
    (["--rounds", "0"], "argument --rounds: must be 1..5, got '0'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_parse_device_args_names_the_bad_argument_when_invalid(argv, message, capsys, monkeypatch):
    monkeypatch.delenv(gpu_proof.HARD_LIMIT_VAR, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_device_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_device_args_refuses_out_when_a_file_or_inside_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        parse_device_args(["--out", str(tmp_path / "file")])
    assert "is a file; give a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_device_args(["--out", str(tmp_path / "w" / "out"), "--work", str(tmp_path / "w")])
    assert "must not hold one another" in capsys.readouterr().err


def test_parse_device_args_defaults_to_out_env_when_no_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    monkeypatch.delenv(gpu_proof.HARD_LIMIT_VAR, raising=False)
    args = parse_device_args([])
    assert (args.out, args.views, args.budget, args.rounds, args.skip_tests) == (tmp_path / "device-out", [1, 8], 440, 2, False)


def test_run_sh_help_lists_the_options_when_asked():
    done = _run_sh("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--out", "--skip-tests", "--views", "--budget", "--pack", "--rounds"):
        assert option in done.stdout


@pytest.mark.parametrize(("limit", "message"), [("600", "must be 90..480 seconds"), ("8m", "must be a whole number of seconds")])
def test_run_sh_refuses_hard_limit_when_not_within_8_minutes(limit, message):
    done = _run_sh("--help", GPU_PROOF_HARD_LIMIT=limit)
    assert done.returncode == 2 and message in done.stderr


def test_run_sh_exits_3_with_a_summary_when_cuda_absent(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the CUDA-absent exit cannot be shown")
    out = tmp_path / "out"
    done = _run_sh("--out", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 3, done.stderr
    assert "CUDA is not available on this machine" in done.stderr
    assert {p.name for p in out.iterdir()} <= RESULT_FILES and (out / "summary.md").is_file()
    assert "**CUDA absent**" in (out / "summary.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["outcome"] == "CUDA absent" and [s["name"] for s in results["stages"]] == ["cuda"]


# ------------------------------------------------------------------------- pieces of the device run


def _item(*reasons: str) -> SimpleNamespace:
    marks = [pytest.mark.skipif(False, reason=r).mark for r in reasons]
    return SimpleNamespace(iter_markers=lambda name: iter(m for m in marks if m.name == name))


def test_is_cuda_only_keeps_tests_that_skip_for_cuda_when_selecting():
    assert gpu_proof.is_cuda_only(_item(f"{gpu_proof.CUDA_SKIP_REASON}: FP16 CUDA graphs need an NVIDIA GPU"))
    assert not gpu_proof.is_cuda_only(_item("TensorRT not installed"))
    assert not gpu_proof.is_cuda_only(_item())


def test_cuda_test_files_finds_the_gpu_tests_when_scanning_tests():
    names = {p.name for p in gpu_proof.cuda_test_files(ROOT)}
    assert {"test_array_steps.py", "test_torch_runtime.py", "test_gpu_variants.py"} <= names


def test_harness_serves_the_gpu_torch_variant_when_asked():
    from lesionserve.benchmarks.harness import get_args_parser

    assert get_args_parser().parse_args(["--variant", gpu_proof.GPU_VARIANT]).variant == "gpu_torch"
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--variant", "tpu"])


def test_probe_problems_names_numpy_2_and_its_source_when_stub_got_the_hosts():
    report = {"executable": "/x/triton_python_backend_stub", "numpy": "2.5.2", "numpy_file": "/host/numpy/__init__.py",
              "cv2": "4.13.0", "torch": "2.11.0", "torch_cuda": True, "lesionserve": "/repo/lesionserve"}
    problems = probe_problems(report, Path("/w/pack/stub-site"), need_cuda=True)
    assert any("numpy 2.5.2 in the stub" in p for p in problems) and any("not the carried /w/pack/stub-site" in p for p in problems)
    fine = {**report, "numpy": "1.26.4", "numpy_file": "/w/pack/stub-site/numpy/__init__.py"}
    assert probe_problems(fine, Path("/w/pack/stub-site"), need_cuda=True) == []
    assert probe_problems({**fine, "torch_cuda": False}, None, need_cuda=True) == ["torch inside the stub sees no CUDA device"]


def test_make_stub_venv_puts_stub_site_first_when_python_is_isolated(tmp_path):
    stub_site = tmp_path / "stub-site"
    stub_site.mkdir()
    (stub_site / "gpu_proof_marker.py").write_text("")
    host = tmp_path / "host"
    host.mkdir()
    (host / "gpu_proof_marker.py").write_text("")
    python = make_stub_venv(tmp_path / "venv", stub_site, [host])
    code = "import gpu_proof_marker, sys; print(gpu_proof_marker.__file__); print(sys.prefix); print(repr(sys.path))"
    done = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(host)})
    marker, prefix, path = done.stdout.splitlines()
    assert marker == str(stub_site / "gpu_proof_marker.py")
    assert prefix == str(tmp_path / "venv")
    assert str(ROOT) in path and str(host) in path  # the project and the host's packages come after


def test_write_logs_archive_keeps_the_tail_when_a_log_is_large(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_proof, "MAX_LOG_BYTES", 100)
    (tmp_path / "big.log").write_text("x" * 500 + "the end")
    gpu_proof.write_logs_archive(tmp_path / "logs.tar.gz", [(tmp_path / "big.log", "t8-big.log")])
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        data = tar.extractfile("logs/t8-big.log").read()
    assert data.endswith(b"the end") and data.startswith(b"[... truncated ...]") and len(data) < 150


def test_junit_summary_counts_and_lists_failures_when_read(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.unit.a" name="t1" time="0.5"/>'
        '<testcase classname="tests.unit.a" name="t2" time="1"><failure message="assert 1 == 2&#10;more">x</failure></testcase>'
        '<testcase classname="tests.unit.a" name="t3" time="0"><skipped message="nope"/></testcase>'
        '</testsuite></testsuites>')
    summary = gpu_proof.junit_summary(tmp_path / "j.xml")
    assert (summary["passed"], summary["failures"], summary["skipped"]) == (1, 1, 1)
    assert summary["cases"][1] == {"test": "tests.unit.a::t2", "seconds": 1.0, "outcome": "failure", "message": "assert 1 == 2"}


# ---------------------------------------------------------------------------------------- the pack


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DEFAULT_PACK / MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> gpu_proof.Layout:
    return gpu_proof.unpack(DEFAULT_PACK, tmp_path_factory.mktemp("gpu-proof-work"))


@needs_pack
def test_pack_and_working_tree_fit_the_carry_limit_when_packed(manifest):
    pack = (DEFAULT_PACK / PACK_NAME).stat().st_size
    carried = sum(p.stat().st_size for p in DEFAULT_PACK.iterdir())
    assert pack == manifest["pack_bytes"], "build/gpu-proof changed after packing: run `make gpu-proof-pack` again"
    total = carried + gpu_proof.travelling_tree_bytes(ROOT)
    assert total <= CARRY_LIMIT_BYTES, f"{total / 2**20:.1f} MiB travel; the device call carries {CARRY_LIMIT_BYTES / 2**20:.0f} MiB"


@needs_pack
def test_pack_manifest_lists_server_backend_and_312_stub_when_packed(manifest):
    assert manifest["device_python"] == "3.12"
    assert "libpython3.12.so.1.0" in manifest["triton"]["stubs"]["3.12"]["needed"]
    assert manifest["wheels"]["stub-site"]["packages"] == {"numpy": "1.26.4"}
    assert all("cp312" in w for w in manifest["wheels"]["stub-site"]["wheels"])
    assert set(manifest["wheels"]["site"]["packages"]) == {"tritonclient", "python-rapidjson"}
    assert manifest["sha256"] == gpu_proof.sha256(DEFAULT_PACK / PACK_NAME)


@needs_pack
def test_unpacked_pack_holds_every_library_its_binaries_load_when_extracted(unpacked):
    triton = unpacked.site / "pytriton/tritonserver"
    roots = [unpacked.tritonserver, triton / "backends/python/libtriton_python.so", unpacked.stub("3.12")]
    assert all(p.is_file() for p in roots) and os.access(unpacked.tritonserver, os.X_OK)
    assert (triton / "backends/python/triton_python_backend_utils.py").is_file()
    packed, system = library_closure(roots, unpacked.libs)
    assert system - SYSTEM_LIBRARIES == {"libpython3.12.so.1.0"}  # all the rest travels
    assert (unpacked.stub_site / "numpy/version.py").read_text().count("1.26.4")
    assert (unpacked.site / "tritonclient/grpc/__init__.py").is_file()


@needs_pack
def test_carried_tritonserver_serves_the_probe_with_stub_venv_numpy_when_run_on_cpu(unpacked, tmp_path):
    """unpack + probe stages of the device run, on this CPU host: the pack's own server binary and
    libraries, the stub venv, and a numpy<2 folder the stub reaches without PYTHONPATH. (The pack's
    numpy is for CPython 3.12; this host runs another Python, so a link to its own numpy stands in.)"""
    import numpy

    stub_site = tmp_path / "stub-site"
    stub_site.mkdir()
    (stub_site / "numpy").symlink_to(Path(numpy.__file__).parent)
    args = parse_device_args(["--out", str(tmp_path / "out"), "--work", str(unpacked.root.parent)])
    run = ProofRun(args, stub_site=stub_site, need_cuda=False)
    run.logs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir()
    assert run.stage("unpack", 0, run.prepare), run.stages["unpack"].note
    assert run.stage("probe", 0, run.run_probe, cap=150), run.stages["probe"].note
    report = run.info["probe"]
    assert report["tritonserver"] == str(unpacked.tritonserver)
    assert report["numpy_file"].startswith(str(stub_site)) and report["numpy"].startswith("1.")
    assert report["prefix"] == str(unpacked.root.parent / "stub-venv")
    assert "cv2_error" not in report and "lesionserve_error" not in report
    assert "## Python stub (probe)" in (args.out / "summary.md").read_text()


def test_harness_markdown_adds_the_gpu_bound_row_when_both_measured(tmp_path):
    pipeline = lambda rate: {"throughput": {"images_per_s": rate}, "latency": {"p50_ms": 10.0, "p95_ms": 12.0, "p99_ms": 13.0}}  # noqa: E731
    results = {"triton": pipeline(40.0), "torch": pipeline(4.0), "ort": pipeline(8.0), "bound": pipeline(9.0)}
    args = parse_device_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    run = ProofRun(args)
    run.info["harness"] = {"8": {"results": results, "ratios": {"triton/bound": 4.4, "triton/torch": 10.0, "triton/ort": 5.0}}}
    run.info["gpu_bound"] = {"backbones": {"resnet50": {"ms_per_view_b64": 0.5}, "densenet121": {"ms_per_view_b64": 0.5},
                                           "efficientnet_b3": {"ms_per_view_b64": 1.5}}}
    table = run.harness_markdown()
    assert "| 8 | (a) Triton ensemble via SDK | 40.00 |" in table
    assert "| 8 | 40.00 | 50.0 | 0.800 |" in table  # 1000 / (8 views x 2.5 ms) = 50 images/s
