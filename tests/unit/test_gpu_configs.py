"""Every GPU variant config (configs/<variant>.pbtxt) parses and agrees with the declaration and the CPU configs."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import model_config_pb2

from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.repository import DEFAULT_REPOSITORY
from lesionserve.export.tensorrt import engine_profile
from lesionserve.spec import (
    BACKBONE_INPUT,
    BACKBONE_OUTPUT,
    GPU_VARIANTS,
    NUM_CLASSES,
)
from lesionserve.torch_runtime import DEFAULT_BUCKETS
from lesionserve.triton_config import backbone_runtime, batch_buckets, device_for, flag

BACKBONE_NAMES = LESION_ENSEMBLE.member_names
ENSEMBLE_MAX_BATCH, BACKBONE_MAX_BATCH = LESION_ENSEMBLE.max_batch_size, LESION_ENSEMBLE.member_max_batch
STEPS = ("preprocess", "tta", "fusion", "threshold", "heatmap")
KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_GPU
KIND_CPU = model_config_pb2.ModelInstanceGroup.KIND_CPU
ALL_VARIANT_FILES = sorted(DEFAULT_REPOSITORY.glob("*/configs/*.pbtxt"))


def load(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def config(model: str, variant: str | None = None) -> model_config_pb2.ModelConfig:
    return load(DEFAULT_REPOSITORY / model / ("config.pbtxt" if variant is None else f"configs/{variant}.pbtxt"))


def as_json(cfg: model_config_pb2.ModelConfig) -> dict:
    """The dict the python backend's initialize receives (parse_args_config), for triton_config helpers."""
    return MessageToDict(cfg, preserving_proto_field_name=True)


def test_variant_files_exist_for_every_model_and_variant_when_committed():
    # A missing file would make that model silently fall back to its CPU config.pbtxt in a GPU variant.
    expected = {DEFAULT_REPOSITORY / m / "configs" / f"{v}.pbtxt" for m in (*STEPS, *BACKBONE_NAMES) for v in GPU_VARIANTS}
    assert set(ALL_VARIANT_FILES) == expected


@pytest.mark.parametrize("path", ALL_VARIANT_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_variant_config_parses_with_gpu_instances_and_model_name_when_committed(path):
    cfg = load(path)
    assert cfg.name == path.parent.parent.name
    assert [g.kind for g in cfg.instance_group] == [KIND_GPU]


@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("step", STEPS)
def test_step_variant_equals_cpu_config_except_device_when_committed(step, variant):
    gpu, cpu = config(step, variant), config(step)
    assert gpu.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert [g.kind for g in cpu.instance_group] == [KIND_CPU]
    del gpu.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"]
    for g in gpu.instance_group:
        g.kind = KIND_CPU
    assert gpu == cpu


@pytest.mark.parametrize("variant", GPU_VARIANTS)
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_backbone_variant_matches_spec_and_batches_dynamically_when_committed(backbone, variant):
    cfg, size = config(backbone, variant), LESION_ENSEMBLE.input_sizes[backbone]
    assert [(i.name, list(i.dims)) for i in cfg.input] == [(BACKBONE_INPUT, [3, size, size])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [(BACKBONE_OUTPUT, [NUM_CLASSES]), ("cams", [2, NUM_CLASSES, -1, -1])]
    assert cfg.max_batch_size == BACKBONE_MAX_BATCH >= ENSEMBLE_MAX_BATCH * 8
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == list(DEFAULT_BUCKETS)
    assert cfg.max_batch_size == config(backbone).max_batch_size


def test_spec_batch_limits_match_ensemble_and_preprocess_configs_when_committed():
    assert config("lesion_ensemble").max_batch_size == config("preprocess").max_batch_size == ENSEMBLE_MAX_BATCH
    assert all(config(b).max_batch_size == BACKBONE_MAX_BATCH for b in BACKBONE_NAMES)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_gpu_variant_serves_tensorrt_plan_when_committed(backbone):
    cfg = config(backbone, "gpu")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_gpu_ort_variant_uses_tensorrt_ep_fp16_with_engine_profile_when_committed(backbone):
    cfg = config(backbone, "gpu_ort")
    assert cfg.backend == "onnxruntime" and cfg.default_model_filename == "model.onnx"
    (accelerator,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    params = dict(accelerator.parameters)
    assert accelerator.name == "tensorrt" and params["precision_mode"] == "FP16"
    profile = engine_profile(backbone)  # the same profile as the gpu variant's engines
    assert params["trt_profile_min_shapes"] == profile.trtexec_shape(profile.min_batch)
    assert params["trt_profile_opt_shapes"] == profile.trtexec_shape(profile.opt_batch)
    assert params["trt_profile_max_shapes"] == profile.trtexec_shape(profile.max_batch)
    assert params["trt_engine_cache_path"] == f"/engine_cache/{backbone}"  # compose mounts a volume there


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_gpu_torch_variant_runs_torch_fp16_graphs_on_gpu_inputs_when_committed(backbone):
    cfg = as_json(config(backbone, "gpu_torch"))
    assert config(backbone, "gpu_torch").backend == "python"
    assert backbone_runtime(cfg) == "torch" and flag(cfg, "cuda_graphs", False)
    assert cfg["parameters"]["precision"]["string_value"] == "fp16"
    assert cfg["parameters"]["FORCE_CPU_ONLY_INPUT_TENSORS"]["string_value"] == "no"
    assert batch_buckets(cfg) == DEFAULT_BUCKETS
    assert backbone_runtime(as_json(config(backbone))) == "onnxruntime"  # the CPU config keeps ORT


def test_device_for_returns_cuda_device_only_when_instance_kind_is_gpu():
    assert device_for({"model_instance_kind": "GPU", "model_instance_device_id": "1"}) == "cuda:1"
    assert device_for({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) is None
    assert device_for({}) is None


def test_flag_raises_naming_model_when_value_not_boolean():
    with pytest.raises(ValueError, match="model 'm': parameter 'cuda_graphs' must be true or false, got 'maybe'"):
        flag({"name": "m", "parameters": {"cuda_graphs": {"string_value": "maybe"}}}, "cuda_graphs", True)


def test_backbone_runtime_raises_listing_runtimes_when_unknown():
    with pytest.raises(ValueError, match="runtime 'tvm' is not one of onnxruntime, torch"):
        backbone_runtime({"name": "m", "parameters": {"runtime": {"string_value": "tvm"}}})


def test_batch_buckets_add_max_batch_and_drop_oversized_sizes_when_preferred_exceed_it():
    cfg = {"name": "m", "max_batch_size": 48, "dynamic_batching": {"preferred_batch_size": [64, 8, 16]}}
    assert batch_buckets(cfg) == (8, 16, 48)
    with pytest.raises(ValueError, match="need max_batch_size > 0"):
        batch_buckets({"name": "m", "max_batch_size": 0})


@pytest.mark.parametrize("variant", GPU_VARIANTS.values(), ids=lambda v: v.name)
def test_variant_declares_exactly_the_triton_backends_when_compared_with_its_configs(variant):
    # lesionserve serve refuses variants whose backends the bundled tritonserver lacks: this keeps that honest.
    used = set()
    for path in DEFAULT_REPOSITORY.glob(f"*/configs/{variant.name}.pbtxt"):
        cfg = load(path)
        used.add("tensorrt" if cfg.platform == "tensorrt_plan" else cfg.backend)
    assert used == set(variant.triton_backends)
