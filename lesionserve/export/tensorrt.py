"""Stage 3 of export: ONNX -> TensorRT FP16 engine per backbone (and the segmenter), checked against ONNX Runtime.

    python -m export.tensorrt --repository model_repository       # ONNX already assembled there (compose)
    python -m export.tensorrt --artifacts runs/demo                # ONNX from runs/demo/<backbone>/model.onnx
    python -m export.tensorrt --print-trtexec                      # the equivalent trtexec lines; no GPU needed

For each backbone: build ``<repository>/<backbone>/1/model.plan`` with the TensorRT Python API (FP16,
one optimisation profile of batch 1 / 32 / 64, a workspace limit, a timing cache reused across
builds), run the engine and ONNX Runtime on the same served-like inputs (synthetic lesions through
the shared preprocessing), and install the plan only if they agree: >= 99.5 % argmax agreement and
max probability difference <= 1e-2 (the segmenter: masks agreeing on >= 99.9 % of pixels). ``model.plan.json`` beside it records the TensorRT version, GPU
name, compute capability, profile, build seconds and the check.

An engine runs only under the TensorRT version that built it, on GPUs of the architecture it was
built on: build on the serving GPU with the TensorRT release of the Triton image (compose's
``engine-builder`` service runs nvcr.io/nvidia/tensorrt:<yy.mm>-py3 for tritonserver:<yy.mm>-py3).
A plan whose model.plan.json matches the ONNX file, TensorRT version, GPU and profile is kept;
``--force`` rebuilds.

The trtexec equivalent of one build (printed per backbone by ``--print-trtexec``)::

    trtexec --onnx=model_repository/resnet50/1/model.onnx --saveEngine=model_repository/resnet50/1/model.plan \\
        --fp16 --minShapes=pixel_values:1x3x224x224 --optShapes=pixel_values:32x3x224x224 \\
        --maxShapes=pixel_values:64x3x224x224 --memPoolSize=workspace:4096 --timingCacheFile=timing.cache

Needs tensorrt and cuda-python (device buffers for the check), onnxruntime, numpy and OpenCV; no
torch (NVIDIA's TensorRT image has none).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lesionserve.pipelines import PIPELINES, declared_member, declared_pipeline
from lesionserve.repository import DEFAULT_REPOSITORY
from lesionserve.parity import (DEFAULT_MAX_PROB_DIFF, DEFAULT_MIN_AGREEMENT, MaskParityReport, ParityReport,
                               compare_detector_heads, compare_logits, compare_masks)
from lesionserve.detection.spec import DETECTOR_INPUT, DETECTOR_OUTPUT, LESION_DETECT
from lesionserve.segmentation.spec import LESION_SEGMENT, SEGMENTER, SEGMENTER_INPUT, SEGMENTER_OUTPUT
from lesionserve.spec import (
    ALLOWED_VIEWS,
    BACKBONE_INPUT,
    BACKBONE_OUTPUT,
    TENSORRT_OPT_BATCH,
    get_variant,
)

DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_OPT_BATCH = TENSORRT_OPT_BATCH
#: 256 rows: one disagreement still meets 99.5 %, two do not.
DEFAULT_CHECK_IMAGES = 256
#: The check feeds the engine batches of these sizes in turn: the profile's min, a single image's
#: eight views and the max (None: the profile's), so the whole profile range is exercised, not one shape.
CHECK_CHUNKS = (1, 8, None)
#: Images of the segmenter's engine check (each brings S x S pixels to compare).
SEGMENTER_CHECK_IMAGES = 32
PLAN_FILE = "model.plan"


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or cuda-python, or a GPU) is missing here; the message says what to use instead."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message carries every error it logged."""


class EngineCheckError(RuntimeError):
    """The engine disagrees with ONNX Runtime beyond tolerance; it was not installed."""


# --------------------------------------------------------------------------- pure: no TensorRT needed


@dataclass(frozen=True)
class Profile:
    """One optimisation profile over the batch axis of ``input_name`` [batch, 3, size, size]."""

    input_name: str
    input_size: int
    min_batch: int
    opt_batch: int
    max_batch: int
    output_name: str = BACKBONE_OUTPUT  # the segmenter's: mask_logits

    @property
    def segmenter(self) -> bool:
        return self.output_name == SEGMENTER_OUTPUT

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, self.input_size, self.input_size)

    def trtexec_shape(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in self.shape(batch))

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "min": list(self.shape(self.min_batch)),
            "opt": list(self.shape(self.opt_batch)),
            "max": list(self.shape(self.max_batch)),
        }


def served_max_batch(repository: Path, member: str) -> int | None:
    """max_batch_size of ``member``'s gpu config in ``repository`` (its pipeline's whole fan-out), if there."""
    path = repository / member / "configs" / "gpu.pbtxt"
    match = re.search(r"^max_batch_size:\s*(\d+)", path.read_text(), re.M) if path.is_file() else None
    return int(match.group(1)) if match else None


def served_input_size(repository: Path, member: str) -> int | None:
    """The input side of ``member``'s gpu config in ``repository`` (dims [ 3, S, S ]), if there."""
    path = repository / member / "configs" / "gpu.pbtxt"
    match = re.search(r"dims: \[ 3, (\d+), \1 \]", path.read_text()) if path.is_file() else None
    return int(match.group(1)) if match else None


def engine_profile(
    backbone: str, opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int | None = None, input_size: int | None = None,
    fan_out: int | None = None,
) -> Profile:
    """The profile for ``backbone``: batch 1 .. max_batch, which must hold a whole request's fan-out.

    ``fan_out``: the rows one request can bring (the member config's max_batch_size, see
    served_max_batch); default what its committed pipeline declares. ``max_batch`` defaults to it.
    ``input_size``: the side the ONNX file takes (its trained size, see onnx_input_size); default the
    size its committed pipeline declares.
    """
    if backbone == LESION_DETECT.detector:  # the detector: one row per image, letterboxed input
        fan_out = fan_out or LESION_DETECT.max_batch_size
        max_batch = max_batch or fan_out
        return Profile(DETECTOR_INPUT, input_size or LESION_DETECT.imgsz, 1, min(opt_batch, max_batch), max_batch,
                       DETECTOR_OUTPUT)
    if backbone == SEGMENTER.name:  # the segmenter: one row per image, no views
        fan_out = fan_out or LESION_SEGMENT.max_batch_size
        max_batch = max_batch or fan_out
        return Profile(SEGMENTER_INPUT, input_size or LESION_SEGMENT.size, 1, min(opt_batch, max_batch), max_batch,
                       SEGMENTER_OUTPUT)
    if fan_out is None:
        fan_out = declared_pipeline(backbone).member_max_batch
    max_batch = max_batch or fan_out
    if max_batch < fan_out:
        raise ValueError(
            f"max batch {max_batch} < a request's fan-out {fan_out} (ensemble max batch x {max(ALLOWED_VIEWS)} views): "
            f"Triton would refuse a full request's fan-out at run time"
        )
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"opt batch must lie in [1, {max_batch}], got {opt_batch}")
    return Profile(BACKBONE_INPUT, input_size or declared_member(backbone).preprocessing.size, 1, opt_batch, max_batch)


def onnx_input_size(onnx_path: str | Path) -> int:
    """Side S of the ONNX backbone's [batch, 3, S, S] input: the size it was trained at, which
    export.assemble serves it at, so the engine's profile must use it too."""
    from lesionserve.export.checks import ort_session  # onnxruntime: in the builder image, unlike onnx

    shape = ort_session(onnx_path, threads=1).get_inputs()[0].shape
    if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
        raise EngineBuildError(f"{onnx_path}: input shape {shape}; expected [batch, 3, S, S] with a fixed square S")
    return int(shape[2])


def workspace_bytes(gigabytes: float) -> int:
    """The builder's workspace limit in bytes (GiB given, as on the command line)."""
    if not gigabytes > 0:
        raise ValueError(f"workspace must be > 0 GiB, got {gigabytes}")
    return int(gigabytes * 2**30)


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: Profile,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: str | Path | None = None,
) -> list[str]:
    """The trtexec line that builds the same engine as ``build_engine`` (workspace in MiB, its default unit)."""
    command = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        "--fp16",
        f"--minShapes={profile.trtexec_shape(profile.min_batch)}",
        f"--optShapes={profile.trtexec_shape(profile.opt_batch)}",
        f"--maxShapes={profile.trtexec_shape(profile.max_batch)}",
        f"--memPoolSize=workspace:{workspace_bytes(workspace_gb) // 2**20}",
    ]
    if timing_cache is not None:
        command.append(f"--timingCacheFile={timing_cache}")
    return command


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "7.5" for a T4


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_plan_metadata(path: str | Path) -> dict[str, Any] | None:
    """model.plan.json as a dict, or None when missing or unreadable (then the plan is rebuilt)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def plan_is_current(
    metadata: dict[str, Any] | None, *, onnx_sha256: str, tensorrt_version: str, device: DeviceInfo, profile: Profile
) -> bool:
    """Whether an installed plan was built from this ONNX file, by this TensorRT, for this GPU and profile,
    and passed its check: anything else must be rebuilt (a stale plan would serve old weights or fail to load)."""
    return bool(
        metadata
        and metadata.get("onnx_sha256") == onnx_sha256
        and metadata.get("tensorrt_version") == tensorrt_version
        and metadata.get("gpu_name") == device.name
        and metadata.get("compute_capability") == device.compute_capability
        and metadata.get("profile") == profile.to_json()
        and (metadata.get("check") or {}).get("passed") is True
    )


def format_build_errors(stage: str, parser_errors: Sequence[str], log: Sequence[tuple[str, str]]) -> str:
    """Every parser error and every ERROR/INTERNAL_ERROR line TensorRT logged, in full (never truncated)."""
    lines = [f"TensorRT failed while {stage}:"]
    lines += [f"  parser: {e}" for e in parser_errors]
    lines += [f"  {level}: {message}" for level, message in log if level in ("ERROR", "INTERNAL_ERROR")]
    if len(lines) == 1:
        lines.append("  (TensorRT logged no error; rerun with --verbose for its full log)")
    return "\n".join(lines)


def chunk_rows(rows: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) pairs covering ``rows`` with chunk sizes taken from ``sizes`` in turn."""
    spans, start, i = [], 0, 0
    while start < rows:
        stop = min(rows, start + sizes[i % len(sizes)])
        spans.append((start, stop))
        start, i = stop, i + 1
    return spans


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # Triton (or a concurrent reader) never sees half a plan


# --------------------------------------------------------------------------- TensorRT and CUDA


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: run this inside nvcr.io/nvidia/tensorrt:<release>-py3 of the Triton image's "
            "release (`docker compose --profile gpu run --rm engine-builder`), or print the equivalent command "
            "with --print-trtexec"
        ) from exc
    return tensorrt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6.1
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise TensorRTUnavailable("cuda-python is not installed (pip install 'cuda-python==12.6.*')") from exc
    return cudart


def _cuda(cudart, result: tuple, what: str) -> Any:
    """Unpack a cuda-python (error, value...) tuple, raising with CUDA's own message on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, message = cudart.cudaGetErrorString(err)
        raise TensorRTUnavailable(f"{what} failed: {err!r} {message.decode() if isinstance(message, bytes) else message}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_info() -> DeviceInfo:
    """Name and compute capability of CUDA device 0 (the GPU reserved for this container)."""
    cudart = _import_cudart()
    props = _cuda(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties (is a GPU visible?)")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.rstrip("\x00").strip(), f"{props.major}.{props.minor}")


def _logger(trt, verbose: bool = False):
    """A TensorRT logger that keeps every message (for errors in full) and echoes warnings as they come."""

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg) -> None:
            level = str(severity).rsplit(".", 1)[-1]
            self.messages.append((level, msg))
            if verbose or int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT {level}] {msg}", file=sys.stderr)

    return CollectingLogger()


def build_engine(
    onnx_path: str | Path,
    profile: Profile,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: str | Path | None = None,
    verbose: bool = False,
) -> tuple[bytes, float]:
    """Build a serialized FP16 engine from ``onnx_path``; returns (plan bytes, build seconds)."""
    trt = _import_tensorrt()
    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated there); 8.x needs it.
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(format_build_errors(f"parsing {onnx_path}", errors, logger.messages))
    tensor = network.get_input(0)
    dims = tuple(tensor.shape)[1:]
    # An ultralytics export leaves height and width free (-1): the profile pins them to the served size.
    fits = len(dims) == 3 and dims[0] == 3 and all(d in (-1, profile.input_size) for d in dims[1:])
    if tensor.name != profile.input_name or not fits:
        raise EngineBuildError(
            f"{onnx_path}: input {tensor.name!r} {tuple(tensor.shape)} does not fit the profile "
            f"{profile.input_name!r} [batch, 3, {profile.input_size}, {profile.input_size}]"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(workspace_gb))
    config.set_flag(trt.BuilderFlag.FP16)
    optimization = builder.create_optimization_profile()
    optimization.set_shape(
        profile.input_name, profile.shape(profile.min_batch), profile.shape(profile.opt_batch), profile.shape(profile.max_batch)
    )
    config.add_optimization_profile(optimization)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU or TensorRT: start afresh rather than fail the build.
        print(f"timing cache {cache_path} does not fit this GPU/TensorRT; starting a new one", file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineBuildError(format_build_errors(f"building the engine for {onnx_path}", [], logger.messages))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), seconds


class EngineRunner:
    """Runs host float32 batches through a serialized engine (device buffers from cuda-python).

    ``with EngineRunner(plan, profile) as run: logits = run(x)``
    """

    def __init__(self, plan: bytes, profile: Profile) -> None:
        trt = _import_tensorrt()
        self.cudart = _import_cudart()
        self.profile = profile
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineBuildError(format_build_errors("deserialising the engine", [], self.logger.messages))
        self.context = self.engine.create_execution_context()
        rows = profile.max_batch
        c = self.cudart
        self.d_in = _cuda(c, c.cudaMalloc(rows * 3 * profile.input_size**2 * 4), "cudaMalloc (input)")
        # Every output needs a buffer (the detector's graph also has its features); one row of each
        # at the profile's shape: C logits, 1 x S x S mask logits, (4 + C) x anchors boxes and scores.
        self.context.set_input_shape(profile.input_name, profile.shape(rows))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.row_shapes = {n: tuple(int(d) for d in self.context.get_tensor_shape(n)[1:]) for n in outputs}
        self.d_outs = {n: _cuda(c, c.cudaMalloc(rows * int(np.prod(shape)) * 4), f"cudaMalloc ({n})")
                       for n, shape in self.row_shapes.items()}
        self.row_shape = self.row_shapes[profile.output_name]
        self.d_out = self.d_outs[profile.output_name]
        self.stream = _cuda(c, c.cudaStreamCreate(), "cudaStreamCreate")

    def __call__(self, x: np.ndarray, chunks: Sequence[int | None] = CHECK_CHUNKS) -> np.ndarray:
        c, out = self.cudart, []
        sizes = [self.profile.max_batch if n is None else min(n, self.profile.max_batch) for n in chunks]
        for start, stop in chunk_rows(len(x), sizes):
            chunk = np.ascontiguousarray(x[start:stop], dtype=np.float32)
            if not self.context.set_input_shape(self.profile.input_name, chunk.shape):
                raise EngineBuildError(f"engine refused input shape {chunk.shape} (profile {self.profile.to_json()})")
            self.context.set_tensor_address(self.profile.input_name, int(self.d_in))
            for name, buffer in self.d_outs.items():
                self.context.set_tensor_address(name, int(buffer))
            _cuda(c, c.cudaMemcpy(self.d_in, chunk.ctypes.data, chunk.nbytes, c.cudaMemcpyKind.cudaMemcpyHostToDevice), "copy in")
            if not self.context.execute_async_v3(int(self.stream)):
                raise EngineBuildError(format_build_errors("running the engine", [], self.logger.messages))
            _cuda(c, c.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            host = np.empty((len(chunk), *self.row_shape), np.float32)
            _cuda(c, c.cudaMemcpy(host.ctypes.data, self.d_out, host.nbytes, c.cudaMemcpyKind.cudaMemcpyDeviceToHost), "copy out")
            out.append(host)
        return np.concatenate(out)

    def close(self) -> None:
        c = self.cudart
        c.cudaFree(self.d_in)
        for buffer in self.d_outs.values():
            c.cudaFree(buffer)
        c.cudaStreamDestroy(self.stream)

    def __enter__(self) -> "EngineRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_engine(
    plan: bytes,
    onnx_path: str | Path,
    profile: Profile,
    images: int = DEFAULT_CHECK_IMAGES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_prob_diff: float = DEFAULT_MAX_PROB_DIFF,
) -> "ParityReport | MaskParityReport":
    """Engine vs ONNX Runtime (CPU, FP32) on ``images`` synthetic lesions through the shared preprocessing:
    class probabilities for a backbone, masks (compare_masks) for the segmenter."""
    from lesionserve.export.checks import check_batch, onnx_normalization, ort_logits, ort_session

    session = ort_session(onnx_path)
    if profile.output_name == DETECTOR_OUTPUT:  # letterboxed lesions in [0, 1]; compare boxes and scores
        from lesionserve.detection.export import check_inputs

        x = check_inputs(profile.input_size, batch=min(images, SEGMENTER_CHECK_IMAGES), seed=1)
        reference = session.run([DETECTOR_OUTPUT], {DETECTOR_INPUT: x})[0]
        with EngineRunner(plan, profile) as run:
            candidate = run(x)
        return compare_detector_heads(reference, candidate, profile.input_size)
    if profile.segmenter:
        images = min(images, SEGMENTER_CHECK_IMAGES)  # 1 x S x S logits per image: fewer images suffice
    x = check_batch(profile.input_size, batch=images, seed=1, normalization=onnx_normalization(session))
    reference = ort_logits(session, x)
    with EngineRunner(plan, profile) as run:
        candidate = run(x)
    if profile.segmenter:
        return compare_masks(reference, candidate, SEGMENTER.threshold)
    return compare_logits(reference, candidate, min_agreement, max_prob_diff)


# --------------------------------------------------------------------------- per backbone, and all of them


@dataclass
class EngineOptions:
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: Path | None = None
    opt_batch: int = DEFAULT_OPT_BATCH
    check_images: int = DEFAULT_CHECK_IMAGES
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_prob_diff: float = DEFAULT_MAX_PROB_DIFF
    force: bool = False
    verbose: bool = False


def build_backbone(backbone: str, onnx_path: Path, plan_path: Path, options: EngineOptions) -> dict[str, Any]:
    """Build, check and install one engine (or keep a current one); returns its model.plan.json content."""
    trt = _import_tensorrt()
    profile = engine_profile(backbone, options.opt_batch, input_size=onnx_input_size(onnx_path),
                             fan_out=served_max_batch(plan_path.parents[1], backbone))
    device = device_info()
    onnx_sha = file_sha256(onnx_path)
    meta_path = plan_path.with_name(plan_path.name + ".json")
    current = read_plan_metadata(meta_path)
    if not options.force and plan_path.is_file() and plan_is_current(
        current, onnx_sha256=onnx_sha, tensorrt_version=trt.__version__, device=device, profile=profile
    ):
        return {**current, "skipped": True}
    plan, seconds = build_engine(onnx_path, profile, options.workspace_gb, options.timing_cache, options.verbose)
    report = check_engine(plan, onnx_path, profile, options.check_images, options.min_agreement, options.max_prob_diff)
    if not report.passed:
        # Never leave an older plan in place: it was built from other weights or for another GPU.
        plan_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise EngineCheckError(f"{backbone}: TensorRT FP16 engine vs ONNX Runtime: {report.summary()}; plan not installed")
    metadata = {
        "backbone": backbone,
        "tensorrt_version": trt.__version__,
        "gpu_name": device.name,
        "compute_capability": device.compute_capability,
        "precision": "fp16",
        "profile": profile.to_json(),
        "workspace_bytes": workspace_bytes(options.workspace_gb),
        "build_seconds": round(seconds, 1),
        "onnx_sha256": onnx_sha,
        "plan_bytes": len(plan),
        "check": {**report.to_json(), "reference": "onnxruntime CPU FP32", "inputs": "synthetic lesions (export.checks)"},
        "trtexec": " ".join(trtexec_command(onnx_path, plan_path, profile, options.workspace_gb, options.timing_cache)),
    }
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(plan_path, plan)
    _atomic_write(meta_path, (json.dumps(metadata, indent=2) + "\n").encode())
    return metadata


def engine_members(repository: Path) -> list[str]:
    """Models of ``repository`` whose gpu variant serves a TensorRT plan (the ensembles' members);
    for a folder without configs yet, the members the committed pipelines declare."""
    found = sorted(p.parent.parent.name for p in repository.glob("*/configs/gpu.pbtxt")
                   if 'platform: "tensorrt_plan"' in p.read_text())
    return found or [m for p in PIPELINES.values() for m in p.member_names]


def onnx_sources(repository: Path, artifacts: Path | None, backbones: Iterable[str]) -> dict[str, Path]:
    """Backbone -> ONNX file: ``<artifacts>/<b>/model.onnx`` or the repository's ``<b>/1/model.onnx``."""
    sources = {
        b: (artifacts / b / "model.onnx") if artifacts is not None else (repository / b / "1" / "model.onnx")
        for b in backbones
    }
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "ONNX files not found (export and assemble first: python -m export.assemble --artifacts DIR):\n  "
            + "\n  ".join(missing)
        )
    return sources


def describe(metadata: dict[str, Any]) -> str:
    p = metadata["profile"]
    where = f"TensorRT {metadata['tensorrt_version']}, {metadata['gpu_name']} (sm {metadata['compute_capability']}), " \
            f"batch {p['min'][0]}/{p['opt'][0]}/{p['max'][0]}"
    if metadata.get("skipped"):
        return f"{metadata['backbone']}: model.plan is up to date ({where}); --force rebuilds"
    check = metadata["check"]
    if "max_box_diff" in check:
        return (f"{metadata['backbone']}: built model.plan in {metadata['build_seconds']}s ({where}); vs ONNX Runtime: "
                f"max |score diff| {check['max_score_diff']:.1e}, max |box diff| {check['max_box_diff']:.2f} px over {check['rows']} images")
    if "pixel_agreement" in check:
        return (f"{metadata['backbone']}: built model.plan in {metadata['build_seconds']}s ({where}); vs ONNX Runtime: "
                f"masks agree on {check['pixel_agreement']:.4%} of pixels (>= {check['min_agreement']:.1%}) over {check['rows']} images")
    return (
        f"{metadata['backbone']}: built model.plan in {metadata['build_seconds']}s ({where}); vs ONNX Runtime: "
        f"argmax agreement {check['argmax_agreement']:.2%} (>= {check['min_agreement']:.1%}), "
        f"max |prob diff| {check['max_prob_diff']:.1e} (<= {check['max_prob_tolerance']:.0e}) over {check['rows']} images"
    )


# --------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, help="read <DIR>/<backbone>/model.onnx (default: the repository's <backbone>/1/model.onnx)")
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="model repository to write plans into (default %(default)s)")
    parser.add_argument("--backbones", nargs="+", metavar="NAME",
                        help="which members (default: every model whose configs/gpu.pbtxt serves a TensorRT plan)")
    parser.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, help="builder workspace limit in GiB (default %(default)s)")
    parser.add_argument("--timing-cache", type=Path, help="timing cache file, read if present and updated after each build")
    parser.add_argument("--opt-batch", type=int, default=DEFAULT_OPT_BATCH, help="profile's optimal batch (default %(default)s; the profile spans 1 .. the member config's max_batch_size)")
    parser.add_argument("--check-images", type=int, default=DEFAULT_CHECK_IMAGES, help="images in the engine check (default %(default)s)")
    parser.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, help="least argmax agreement with ONNX Runtime (default %(default)s)")
    parser.add_argument("--max-prob-diff", type=float, default=DEFAULT_MAX_PROB_DIFF, help="largest probability difference (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even where model.plan.json says the plan is current")
    parser.add_argument("--variant", default=os.environ.get("LESIONSERVE_VARIANT", "gpu"),
                        help="serving variant (default $LESIONSERVE_VARIANT or gpu); only gpu needs engines, others exit at once")
    parser.add_argument("--print-trtexec", action="store_true", help="print the equivalent trtexec commands and exit")
    parser.add_argument("--verbose", action="store_true", help="echo TensorRT's whole log")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        variant = get_variant(args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    if not variant.needs_tensorrt_engines:
        print(f"variant {variant.name} serves {variant.backbones}: no TensorRT engines to build")
        return 0
    repository = args.repository
    members = engine_members(repository)
    unknown = sorted(set(args.backbones or ()) - set(members))
    if unknown:
        parser.error(f"{', '.join(unknown)}: not a TensorRT member of {repository}; members: {', '.join(members)}")
    args.backbones = args.backbones or members
    if args.print_trtexec:
        for b in args.backbones:
            onnx = (args.artifacts / b / "model.onnx") if args.artifacts else repository / b / "1" / "model.onnx"
            # No file yet: the size the repository's config serves (else the declared one).
            size = onnx_input_size(onnx) if onnx.is_file() else served_input_size(repository, b)
            command = trtexec_command(onnx, repository / b / "1" / PLAN_FILE, engine_profile(b, args.opt_batch, input_size=size, fan_out=served_max_batch(repository, b)), args.workspace_gb, args.timing_cache)
            print(" ".join(command))
        return 0
    options = EngineOptions(args.workspace_gb, args.timing_cache, args.opt_batch, args.check_images,
                            args.min_agreement, args.max_prob_diff, args.force, args.verbose)
    try:
        sources = onnx_sources(repository, args.artifacts, args.backbones)
        for b, onnx in sources.items():
            print(describe(build_backbone(b, onnx, repository / b / "1" / PLAN_FILE, options)), flush=True)
    except (TensorRTUnavailable, EngineBuildError, EngineCheckError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"TensorRT engines ready in {repository}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
