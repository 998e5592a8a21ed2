"""The Triton model repository, generated from the pipeline declarations.

    lesionserve repository                 # regenerate the committed model_repository/
    lesionserve repository --check         # exit 1 listing every file that differs from a regeneration
    lesionserve repository --out DIR --views 1

Every ``config.pbtxt``, every GPU variant ``configs/<variant>.pbtxt`` and every ``1/model.py`` is
written here, comments included, from :mod:`lesionserve.pipelines`: the committed files are exactly
what :func:`render_repository` returns (a unit test regenerates and compares). Weights, calibration
files and engines are not part of it: ``lesionserve assemble`` places them.

The configs are written as text (not through protobuf) so that they keep their comments; a unit
test parses each one with Triton's own ModelConfig schema.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

from lesionserve import PROJECT_ROOT
from lesionserve.explain import CAM_METHODS, CAMS_OUTPUT
from lesionserve.pipelines import PIPELINES, EnsemblePipeline, Member
from lesionserve.preprocessing import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from lesionserve.detection.spec import DetectionPipeline
from lesionserve.vit.spec import MelanomaPipeline
from lesionserve.segmentation.spec import CropPipeline, SegmentationPipeline
from lesionserve.spec import ALLOWED_VIEWS, BACKBONE_INPUT, BACKBONE_OUTPUT, GPU_VARIANTS, TENSORRT_OPT_BATCH, check_views

DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"

#: None is the CPU variant (config.pbtxt); the others are configs/<name>.pbtxt.
VARIANTS: tuple[str | None, ...] = (None, *GPU_VARIANTS)
#: Files this module owns in a model folder; anything else there (weights, calibration) is assembly's.
GENERATED_PATTERNS = ("config.pbtxt", "configs/*.pbtxt", "1/model.py", "1/.gitkeep")

#: CPU serving settings, measured in benchmarks/RESULTS.md ("Tuning").
CPU_INTRA_OP_THREADS = 2
CPU_RUN_BATCH = 4
DECODE_THREADS = 2
#: The dynamic batcher waits this long for more rows: longer on CPU, where a batch costs far more.
QUEUE_DELAY_US = {None: 2000, "gpu": 500, "gpu_ort": 500, "gpu_torch": 500}
#: The TensorRT engine workspace of the gpu_ort variant (4 GiB).
TRT_WORKSPACE_BYTES = 4 << 30

GPU_STEP_HEADER = (
    "# GPU variant {variant} (one such file per variant name: Triton picks configs/<name>.pbtxt with\n"
    "# --model-config-name; all are generated from one declaration). Tensor work runs on the\n"
    "# instance's GPU with torch and reaches the next step through DLPack:\n"
    "#   {what}\n"
)
GPU_INPUTS_ANYWHERE = (
    "# Inputs may arrive in GPU memory (no copy to the host); the model takes either.\n"
    + '{param}\n'
)


# -- pbtxt text -----------------------------------------------------------------------------

def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f'{{ name: "{name}", data_type: {dtype}, dims: {_dims(dims)} }}'


def _tensors(field: str, tensors: Sequence[str]) -> str:
    if len(tensors) == 1:
        return f"{field} [ {tensors[0]} ]\n"
    return f"{field} [\n" + ",\n".join(f"  {t}" for t in tensors) + "\n]\n"


def _param(key: str, value: object) -> str:
    return f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def _instances(variant: str | None) -> str:
    return f"instance_group [ {{ count: 1, kind: {'KIND_CPU' if variant is None else 'KIND_GPU'} }} ]\n"


def _cpu_ort_params() -> str:
    """ONNX Runtime settings of every network on a CPU instance (benchmarks/RESULTS.md, "Tuning")."""
    return (_param("intra_op_threads", CPU_INTRA_OP_THREADS) + _param("allow_spinning", 0)
            + _param("core_lock", "backbones") + _param("run_batch", CPU_RUN_BATCH))


def _head(name: str, backend: str, max_batch: int) -> str:
    return f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {max_batch}\n'


def _gpu_step(variant: str | None, what: str) -> tuple[str, str]:
    """(header, trailing parameter) of a python step in a GPU variant; empty strings on CPU."""
    if variant is None:
        return "", ""
    return (GPU_STEP_HEADER.format(variant=variant, what=what),
            GPU_INPUTS_ANYWHERE.format(param=_param("FORCE_CPU_ONLY_INPUT_TENSORS", "no").rstrip("\n")))


# -- one model each -------------------------------------------------------------------------

def preprocess_config(p: EnsemblePipeline, variant: str | None) -> str:
    header, gpu = _gpu_step(variant, "decode and resize on the CPU (OpenCV), normalise on the GPU; outputs stay on the GPU.")
    outputs = [_tensor(f"pixel_values_{pre.key}", "TYPE_FP32", (3, pre.size, pre.size)) for pre in p.preprocessings]
    outputs.append(_tensor("error", "TYPE_STRING", (1,)))
    outputs.append(_tensor("image_size", "TYPE_INT32", (2,)))
    norms = "".join(_param(f"normalize_pixel_values_{pre.key}", pre.normalization.to_parameter()) for pre in p.preprocessings)
    return (
        f"{header}"
        f"# Encoded image bytes (one per batch row) -> normalised pixels for each distinct member input\n"
        f"# (pixel_values_<size>_<normalisation>), decoded once and resized once per size; see\n"
        f"# lesionserve/preprocessing.py. error: empty for a decoded row, else why the image could not be read\n"
        f"# (that row's pixels are zeros and the pipeline reports the error in its place). image_size: the\n"
        f"# decoded width and height (0, 0 for such a row), which heatmaps are resized back to.\n"
        + _head(p.step("preprocess"), "python", p.max_batch_size)
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,))])
        + _tensors("output", outputs)
        + "# Per output: the normalisation (x/255 - mean) / std applied after resizing to its size.\n"
        + norms
        + "# Input limits, checked per image before decoding (pixels from the header); see docs/reliability.md.\n"
        + _param("max_pixels", DEFAULT_MAX_PIXELS) + _param("max_bytes", DEFAULT_MAX_BYTES)
        + gpu
        + "# Decoding threads: a request's images decode side by side (OpenCV releases the GIL).\n"
        + _param("decode_threads", DECODE_THREADS)
        + _instances(variant)
    )


def tta_config(p: EnsemblePipeline, variant: str | None) -> str:
    header, gpu = _gpu_step(variant, "the dihedral views are made on the GPU from preprocess's GPU outputs.")
    ins = [_tensor(f"pixel_values_{pre.key}", "TYPE_FP32", (-1, 3, pre.size, pre.size)) for pre in p.preprocessings]
    outs = [_tensor(f"views_{pre.key}", "TYPE_FP32", (-1, 3, pre.size, pre.size)) for pre in p.preprocessings]
    outs.append(_tensor("num_views", "TYPE_INT32", (1,)))
    return (
        f"{header}"
        "# Test-time augmentation fan-out: N images -> N*T deterministic dihedral views per member input.\n"
        "# Non-batching (max_batch_size 0) because it changes the number of rows.\n"
        + _head(p.step("tta"), "python", 0)
        + _tensors("input", ins) + _tensors("output", outs)
        + f"# T, the number of views per image: one of {', '.join(map(str, ALLOWED_VIEWS))} (identity, flips, rot180, transposes, rot90s).\n"
        + _param("views", p.views)
        + gpu + _instances(variant)
    )


def fusion_config(p: EnsemblePipeline, variant: str | None) -> str:
    header, gpu = _gpu_step(variant, "softmax, view mean and weighted sum on the GPU; probs stay on the GPU for threshold.")
    c, b = len(p.class_names), len(p.members)
    ins = [_tensor(f"logits_{m.name}", "TYPE_FP32", (-1, c)) for m in p.members]
    ins.append(_tensor("num_views", "TYPE_INT32", (1,)))
    outs = [_tensor("probs", "TYPE_FP32", (-1, c)), _tensor("backbone_probs", "TYPE_FP32", (-1, b, c))]
    return (
        f"{header}"
        "# Per-member logits of N*T views -> softmax per view, mean over views, weighted sum over members\n"
        "# (in input order: that order is backbone_probs' member axis). Weights come from\n"
        "# 1/calibration.json (written by calibration, placed by `lesionserve assemble`).\n"
        + _head(p.step("fusion"), "python", 0)
        + _tensors("input", ins) + _tensors("output", outs)
        + gpu + _instances(variant)
    )


def threshold_config(p: EnsemblePipeline, variant: str | None) -> str:
    header, gpu = _gpu_step(variant, "the rule runs where probs arrive; label and thresholds_fired leave for the host.")
    c = len(p.class_names)
    ins = [_tensor("probs", "TYPE_FP32", (-1, c)), _tensor("error", "TYPE_STRING", (-1, 1))]
    outs = [_tensor("label", "TYPE_STRING", (-1, 1)), _tensor("thresholds_fired", "TYPE_BOOL", (-1, c))]
    return (
        f"{header}"
        "# Fused probabilities -> final label: argmax, then class-specific thresholds (seed rule: AKIEC, then\n"
        "# MEL; MEL wins). Thresholds come from 1/calibration.json; the rule is Calibration.decide. A row\n"
        "# whose image could not be read (non-empty error) gets an empty label and no fired threshold.\n"
        + _head(p.step("threshold"), "python", 0)
        + _tensors("input", ins) + _tensors("output", outs)
        + "# The class axis, in output order (label names come from here).\n"
        + _param("class_names", ",".join(p.class_names))
        + gpu + _instances(variant)
    )


def _backbone_io(p: EnsemblePipeline, m: Member) -> str:
    size = m.preprocessing.size
    return (
        f"# >= ensemble max_batch_size ({p.max_batch_size}) x largest view count ({max(ALLOWED_VIEWS)}): "
        "a request's whole fan-out fits one batch.\n"
        f"max_batch_size: {p.member_max_batch}\n"
        + _tensors("input", [_tensor(BACKBONE_INPUT, "TYPE_FP32", (3, size, size))])
        + "# cams: Grad-CAM and Grad-CAM++ per class at the pooled feature map (lesionserve/explain.py),\n"
        "# computed only when a request asks for them (the explain ensemble does; classification does not).\n"
        + _tensors("output", [_tensor(BACKBONE_OUTPUT, "TYPE_FP32", (m.arch.num_classes,))]
                   + ([_tensor(CAMS_OUTPUT, "TYPE_FP32", (len(CAM_METHODS), m.arch.num_classes, -1, -1))]
                      if m.arch.explainable else []))
    )


def _queue_delay(variant: str | None) -> str:
    """Dynamic batching with the variant's queue delay only (single networks outside an ensemble's members)."""
    return f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US[variant]}\n}}\n"


def _batching(p: EnsemblePipeline, variant: str | None) -> str:
    sizes, n = [], p.max_batch_size
    while n < p.member_max_batch:
        sizes.append(n)
        n *= 2
    sizes.append(p.member_max_batch)
    return (
        "dynamic_batching {\n"
        f"  preferred_batch_size: {_dims(sizes)}\n"
        f"  max_queue_delay_microseconds: {QUEUE_DELAY_US[variant]}\n"
        "}\n"
    )


def _tensorrt_accelerator(model: str, shapes: dict[str, str]) -> str:
    """ORT's TensorRT execution provider in FP16 with an engine cache and one optimisation profile."""
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
        '        name: "tensorrt"\n'
        '        parameters { key: "precision_mode" value: "FP16" }\n'
        f'        parameters {{ key: "max_workspace_size_bytes" value: "{TRT_WORKSPACE_BYTES}" }}\n'
        '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
        f'        parameters {{ key: "trt_engine_cache_path" value: "/engine_cache/{model}" }}\n'
        + "".join(f'        parameters {{ key: "trt_profile_{k}_shapes" value: "{v}" }}\n' for k, v in shapes.items())
        + "      }\n    ]\n  }\n}\n"
    )


def member_config(p: EnsemblePipeline, m: Member, variant: str | None) -> str:
    """A member's config: python+ORT on CPU; TensorRT plan, ORT+TensorRT EP or torch on the GPU."""
    arch, pre = m.arch, m.preprocessing
    identity = (f"# {m.name}: {arch.timm_name} ({arch.family}) at {pre.size} px, {pre.normalization.name} "
                f"normalisation, {arch.num_classes} classes.\n")
    io = _backbone_io(p, m)
    if variant is None:
        return (
            "# CPU variant: ONNX Runtime inside the python backend (this Triton build has no onnxruntime backend).\n"
            f"# GPU variants: configs/{{{','.join(GPU_VARIANTS)}}}.pbtxt, selected with --model-config-name=NAME.\n"
            + identity + f'name: "{m.name}"\nbackend: "python"\n' + io + _batching(p, variant)
            + "# CPU tuning (benchmarks/RESULTS.md, \"Tuning\"): the members take turns on the cores\n"
            "# (core_lock), each using both (intra_op_threads) without busy-waiting when idle (allow_spinning),\n"
            "# in ORT runs of run_batch rows (larger runs cost more per row on CPU, and more memory).\n"
            + _cpu_ort_params()
            + _instances(variant)
        )
    if variant == "gpu":
        return (
            "# Variant gpu: a TensorRT FP16 engine (1/model.plan) built on the serving GPU by\n"
            "# `lesionserve tensorrt` (in compose: the engine-builder service) with the Triton image's TensorRT\n"
            f"# release; its optimisation profile covers batch 1..{p.member_max_batch} (1/model.plan.json records it, with the\n"
            "# TensorRT version and GPU the engine was built for: a plan runs only on that GPU architecture).\n"
            + identity + f'name: "{m.name}"\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n'
            + io + _batching(p, variant) + _instances(variant)
        )
    if variant == "gpu_ort":
        batches = {"min": 1, "opt": min(TENSORRT_OPT_BATCH, p.member_max_batch), "max": p.member_max_batch}
        shapes = {k: f"{BACKBONE_INPUT}:{n}x3x{pre.size}x{pre.size}" for k, n in batches.items()}
        return (
            "# Variant gpu_ort: Triton's onnxruntime backend on 1/model.onnx with the TensorRT execution provider\n"
            "# in FP16 (CUDA EP for any node TensorRT cannot take). No engine build step: ONNX Runtime builds the\n"
            "# TensorRT engine at first load and caches it under trt_engine_cache_path (a volume in compose), so\n"
            "# later loads take seconds. The profile matches export.tensorrt's.\n"
            + identity + f'name: "{m.name}"\nbackend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n'
            + io + _batching(p, variant) + _instances(variant) + _tensorrt_accelerator(m.name, shapes)
        )
    if variant == "gpu_torch":
        return (
            "# Variant gpu_torch: PyTorch FP16 inside the python backend on the training checkpoint\n"
            "# (1/checkpoint.pt, placed by `lesionserve assemble --checkpoints`), one CUDA graph captured per\n"
            "# batch size in preferred_batch_size + max_batch_size (a batch is padded to the next one). For GPU\n"
            "# hosts without TensorRT; see lesionserve/torch_runtime.py.\n"
            + identity + f'name: "{m.name}"\nbackend: "python"\n' + io + _batching(p, variant)
            + _param("runtime", "torch") + _param("checkpoint_file", "checkpoint.pt")
            + _param("precision", "fp16") + _param("cuda_graphs", "true")
            + "# Inputs may arrive in GPU memory (tta's outputs): taken through DLPack without a host copy.\n"
            + _param("FORCE_CPU_ONLY_INPUT_TENSORS", "no") + _instances(variant)
        )
    raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(GPU_VARIANTS)} (or None for CPU)")


def heatmap_config(p: EnsemblePipeline, variant: str | None) -> str:
    header, gpu = _gpu_step(variant, "the maps arrive from the members; fusion and resizing run on the host (OpenCV).")
    c = len(p.class_names)
    ins = [_tensor(f"cams_{m.name}", "TYPE_FP32", (-1, len(CAM_METHODS), c, -1, -1)) for m in p.members]
    ins += [_tensor("num_views", "TYPE_INT32", (1,)), _tensor("label", "TYPE_STRING", (-1, 1)),
            _tensor("error", "TYPE_STRING", (-1, 1)), _tensor("image_size", "TYPE_INT32", (-1, 2)),
            _tensor("explain_class", "TYPE_STRING", (-1, 1)), _tensor("explain_method", "TYPE_STRING", (-1, 1))]
    return (
        f"{header}"
        "# Member maps of N*T views -> one heatmap per image at its own size, in [0, 1]: each view's map for\n"
        "# the image's class (explain_class, or the label where empty) upsampled and scaled, its view undone,\n"
        "# averaged over the T views, resized to image_size, summed over members with the fusion weights\n"
        "# (1/calibration.json) and scaled; see lesionserve/explain.py. Heatmaps of one request share a size:\n"
        "# the SDK sends one image per explanation request.\n"
        + _head(p.step("heatmap"), "python", 0)
        + _tensors("input", ins)
        + _tensors("output", [_tensor("heatmap", "TYPE_FP32", (-1, -1, -1))])
        + "# The class axis, the members' input sides (in input order) and the methods of the cams axis 1.\n"
        + _param("class_names", ",".join(p.class_names))
        + _param("member_sizes", ",".join(f"{m.name}={m.preprocessing.size}" for m in p.members))
        + _param("methods", ",".join(CAM_METHODS))
        + gpu + _instances(variant)
    )


def _map(kind: str, pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f'      {kind} {{ key: "{k}" value: "{v}" }}\n' for k, v in pairs)


def _step(model: str, inputs: Iterable[tuple[str, str]], outputs: Iterable[tuple[str, str]]) -> str:
    return (f'    {{\n      model_name: "{model}"\n      model_version: -1\n'
            + _map("input_map", inputs) + _map("output_map", outputs) + "    }")


def _classifier_steps(p: EnsemblePipeline, explain: bool = False) -> list[str]:
    """The steps after preprocessing (pixel_values_<key> and error in): views, members, fusion, decision."""
    keys = [f"pixel_values_{pre.key}" for pre in p.preprocessings]
    views = [f"views_{pre.key}" for pre in p.preprocessings]
    logits = [f"logits_{m.name}" for m in p.members]
    maps = lambda m: [(CAMS_OUTPUT, f"cams_{m.name}")] if explain else []  # noqa: E731
    return [
        _step(p.step("tta"), [(k, k) for k in keys], [(v, v) for v in views] + [("num_views", "num_views")]),
        *(_step(m.name, [(BACKBONE_INPUT, m.views_tensor)], [(BACKBONE_OUTPUT, f"logits_{m.name}"), *maps(m)])
          for m in p.members),
        _step(p.step("fusion"), [(x, x) for x in logits] + [("num_views", "num_views")],
              [("probs", "probs"), ("backbone_probs", "backbone_probs")]),
        _step(p.step("threshold"), [("probs", "probs"), ("error", "error")],
              [("label", "label"), ("thresholds_fired", "thresholds_fired")]),
    ]


def _classification_outputs(p: EnsemblePipeline) -> list[str]:
    c, b = len(p.class_names), len(p.members)
    return [
        _tensor("probs", "TYPE_FP32", (c,)), _tensor("label", "TYPE_STRING", (1,)),
        _tensor("backbone_probs", "TYPE_FP32", (b, c)), _tensor("thresholds_fired", "TYPE_BOOL", (c,)),
        _tensor("error", "TYPE_STRING", (1,)),
    ]


def _client_params(p: EnsemblePipeline) -> str:
    return ("# Read by the client SDK: the order of the class and member axes, and the TTA view count.\n"
            + _param("class_names", ",".join(p.class_names)) + _param("backbones", ",".join(p.member_names))
            + _param("views", p.views))


def ensemble_config(p: EnsemblePipeline, explain: bool = False) -> str:
    """The model clients call (``explain``: its twin that also answers with heatmaps); ensembles have
    no variants (their steps do)."""
    keys = [f"pixel_values_{pre.key}" for pre in p.preprocessings]
    sized = [("image_size", "image_size")] if explain else []
    steps = [
        _step(p.step("preprocess"), [("raw_image", "raw_image")], [(k, k) for k in keys] + [("error", "error")] + sized),
        *_classifier_steps(p, explain),
    ]
    if explain:
        steps.append(_step(
            p.step("heatmap"),
            [(f"cams_{m.name}", f"cams_{m.name}") for m in p.members]
            + [(x, x) for x in ("num_views", "label", "error", "image_size", "explain_class", "explain_method")],
            [("heatmap", "heatmap")],
        ))
    outputs = _classification_outputs(p)
    inputs = [_tensor("raw_image", "TYPE_STRING", (1,))]
    about = ""
    if explain:
        outputs.append(_tensor("heatmap", "TYPE_FP32", (-1, -1)))
        inputs += [_tensor("explain_class", "TYPE_STRING", (1,)), _tensor("explain_method", "TYPE_STRING", (1,))]
        about = (f"# {p.name}, with explanations: per image also a heatmap (height x width of the image, in [0, 1])\n"
                 f"# for explain_class (empty: the predicted label) by explain_method ({', '.join(CAM_METHODS)}).\n")
    return (
        f"# Pipeline {p.name}: {p.description or 'an ensemble of ' + ', '.join(p.member_names)}.\n"
        + about +
        "# The model clients call: encoded images in; fused probabilities, label, per-member probabilities\n"
        "# and fired thresholds out, one row per image. error: empty, or why that row's image could not be\n"
        "# read (its other outputs then carry no prediction); the other rows are unaffected.\n"
        f'name: "{p.explain_name if explain else p.name}"\nplatform: "ensemble"\nmax_batch_size: {p.max_batch_size}\n'
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + _client_params(p)
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


def model_py(module: str, what: str) -> str:
    return (f'"""Triton python model: {what}. Generated by `lesionserve repository`; the code is\n'
            f'lesionserve.triton_models.{module}."""\n'
            f"from lesionserve.triton_models.{module} import TritonPythonModel  # noqa: F401\n")


STEP_CODE = {
    "preprocess": (preprocess_config, "preprocess", "encoded images -> normalised pixels per member input"),
    "tta": (tta_config, "tta", "pixels -> N*T dihedral views"),
    "fusion": (fusion_config, "fusion", "member logits -> fused class probabilities"),
    "threshold": (threshold_config, "threshold", "fused probabilities -> calibrated label"),
    "heatmap": (heatmap_config, "heatmap", "member maps -> one fused heatmap per image"),
}


def render_pipeline(p: EnsemblePipeline) -> dict[str, str]:
    """Relative path -> content of every generated file of one pipeline."""
    files: dict[str, str] = {}

    def add(model: str, variant: str | None, text: str) -> None:
        files[f"{model}/config.pbtxt" if variant is None else f"{model}/configs/{variant}.pbtxt"] = text

    for role, (render, module, what) in STEP_CODE.items():
        if role == "heatmap" and not p.explainable:
            continue
        model = p.step(role)
        for variant in VARIANTS:
            add(model, variant, render(p, variant))
        files[f"{model}/1/model.py"] = model_py(module, what)
    for m in p.members:
        for variant in VARIANTS:
            add(m.name, variant, member_config(p, m, variant))
        files[f"{m.name}/1/model.py"] = model_py(
            "backbone", f"member {m.name} ({m.arch.timm_name}); ONNX Runtime on model.onnx in the CPU variant, PyTorch FP16 "
            "on checkpoint.pt in gpu_torch (the config's runtime parameter chooses; gpu and gpu_ort do not use this file)")
    for explain in (False, True) if p.explainable else (False,):
        name = p.explain_name if explain else p.name
        add(name, None, ensemble_config(p, explain))
        files[f"{name}/1/.gitkeep"] = ""  # Triton needs the version folder; git keeps no empty folder
    return files


#: GPU variants of the segmenter, as the backbones': a TensorRT plan from our engine builder (its
#: check compares masks), Triton's onnxruntime backend with the TensorRT EP, PyTorch in the python backend.
SEGMENTER_GPU_VARIANTS = GPU_VARIANTS
#: The file gpu_torch serves the segmenter from (segmentation.model.trace_segmenter).
SEGMENTER_TORCHSCRIPT = "model.ts"


def segmenter_config(p: "SegmentationPipeline", variant: str | None = None) -> str:
    """The segmenter: ONNX Runtime in the python backend on CPU (the backbones' code); on a GPU,
    ORT with the TensorRT EP (gpu_ort) or PyTorch FP16 (gpu_torch)."""
    from lesionserve.segmentation.spec import SEGMENTER_INPUT, SEGMENTER_OUTPUT

    s, seg = p.size, p.segmenter
    identity = (f"# {seg.name}: U-Net with a {seg.encoder} encoder (segmentation_models_pytorch) at {s} px, "
                f"{seg.normalization.name} normalisation; mask_logits: lesion logits on the input grid.\n")
    io = (_tensors("input", [_tensor(SEGMENTER_INPUT, "TYPE_FP32", (3, s, s))])
          + _tensors("output", [_tensor(SEGMENTER_OUTPUT, "TYPE_FP32", (1, s, s))])
          + _queue_delay(variant))
    if variant is None:
        return (
            "# CPU: ONNX Runtime inside the python backend (lesionserve/triton_models/onnx_backbone.py).\n"
            f"# GPU variants: configs/{{{','.join(SEGMENTER_GPU_VARIANTS)}}}.pbtxt, selected with --model-config-name=NAME.\n"
            + identity + f'name: "{seg.name}"\nbackend: "python"\nmax_batch_size: {p.max_batch_size}\n' + io
            + _cpu_ort_params()
            + _instances(None)
        )
    if variant == "gpu":
        return (
            "# Variant gpu: a TensorRT FP16 engine (1/model.plan) built on the serving GPU by `lesionserve tensorrt`\n"
            "# (checked against ONNX Runtime on masks: >= 99.9% of pixels agree); 1/model.plan.json records it.\n"
            + identity + f'name: "{seg.name}"\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n'
            + f"max_batch_size: {p.max_batch_size}\n" + io + _instances(variant)
        )
    if variant == "gpu_ort":
        shapes = {k: f"{SEGMENTER_INPUT}:{n}x3x{s}x{s}" for k, n in (("min", 1), ("opt", p.max_batch_size), ("max", p.max_batch_size))}
        return (
            "# Variant gpu_ort: Triton's onnxruntime backend on 1/model.onnx with the TensorRT execution provider\n"
            "# in FP16 (engine cached under trt_engine_cache_path after the first load).\n"
            + identity + f'name: "{seg.name}"\nbackend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n'
            + f"max_batch_size: {p.max_batch_size}\n" + io + _instances(variant) + _tensorrt_accelerator(seg.name, shapes)
        )
    if variant == "gpu_torch":
        return (
            "# Variant gpu_torch: PyTorch FP16 inside the python backend on the segmenter traced to TorchScript\n"
            "# (1/model.ts, written by `lesionserve assemble --checkpoints`), CUDA graphs per batch size.\n"
            + identity + f'name: "{seg.name}"\nbackend: "python"\nmax_batch_size: {p.max_batch_size}\n' + io
            + _param("runtime", "torch") + _param("checkpoint_file", SEGMENTER_TORCHSCRIPT)
            + _param("precision", "fp16") + _param("cuda_graphs", "true")
            + _param("FORCE_CPU_ONLY_INPUT_TENSORS", "no") + _instances(variant)
        )
    raise ValueError(f"the segmenter has no variant {variant!r}; variants: {', '.join(SEGMENTER_GPU_VARIANTS)} (or None for CPU)")


def segment_post_config(p: "SegmentationPipeline") -> str:
    from lesionserve.segmentation.spec import SEGMENTER_OUTPUT

    s = p.size
    return (
        "# Segmenter logits -> per image its lesion as ISIC 2018 Task 1 defines one (lesionserve/segmentation/\n"
        "# postprocess.py): probabilities resized to image_size, > threshold, largest component, holes filled.\n"
        "# mask: that image's mask in the top-left image_size corner of a request-wide canvas (uint8 0/1);\n"
        "# box: x0, y0, x1 (exclusive), y1 (exclusive) in original pixels, -1s when not found; area: the\n"
        "# mask's share of the image; found: false when no pixel passes (never a silent empty box).\n"
        + _head(p.step("post"), "python", 0)
        + _tensors("input", [_tensor(SEGMENTER_OUTPUT, "TYPE_FP32", (-1, 1, s, s)), _tensor("image_size", "TYPE_INT32", (-1, 2)),
                             _tensor("error", "TYPE_STRING", (-1, 1))])
        + _tensors("output", [_tensor("mask", "TYPE_UINT8", (-1, -1, -1)), _tensor("box", "TYPE_INT32", (-1, 4)),
                              _tensor("area", "TYPE_FP32", (-1, 1)), _tensor("found", "TYPE_BOOL", (-1, 1))])
        + _param("threshold", p.segmenter.threshold) + _instances(None)
    )


def segment_ensemble_config(p: "SegmentationPipeline") -> str:
    from lesionserve.segmentation.spec import SEGMENTER_INPUT, SEGMENTER_OUTPUT

    key = f"pixel_values_{p.preprocessing.key}"
    steps = [
        _step(p.step("preprocess"), [("raw_image", "raw_image")], [(key, key), ("error", "error"), ("image_size", "image_size")]),
        _step(p.step("segmenter"), [(SEGMENTER_INPUT, key)], [(SEGMENTER_OUTPUT, SEGMENTER_OUTPUT)]),
        _step(p.step("post"), [(SEGMENTER_OUTPUT, SEGMENTER_OUTPUT), ("image_size", "image_size"), ("error", "error")],
              [(k, k) for k in ("mask", "box", "area", "found")]),
    ]
    return (
        f"# Pipeline {p.name}: {p.description}.\n"
        "# Encoded images in; per image mask (its height x width in the top-left of the canvas), box, area,\n"
        "# found, image_size and error (empty, or why that image could not be read; its row is then not found).\n"
        f'name: "{p.name}"\nplatform: "ensemble"\nmax_batch_size: {p.max_batch_size}\n'
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,))])
        + _tensors("output", [_tensor("mask", "TYPE_UINT8", (-1, -1)), _tensor("box", "TYPE_INT32", (4,)),
                              _tensor("area", "TYPE_FP32", (1,)), _tensor("found", "TYPE_BOOL", (1,)),
                              _tensor("image_size", "TYPE_INT32", (2,)), _tensor("error", "TYPE_STRING", (1,))])
        + _param("segmenter", p.segmenter.name) + _param("input_size", p.size)
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


def render_segmentation(p: "SegmentationPipeline") -> dict[str, str]:
    """Relative path -> content of every generated file of a segmentation pipeline."""
    pre = p.step("preprocess")
    return {
        f"{pre}/config.pbtxt": preprocess_config(p, None), f"{pre}/1/model.py": model_py("preprocess", STEP_CODE["preprocess"][2]),
        f"{p.segmenter.name}/config.pbtxt": segmenter_config(p),
        **{f"{p.segmenter.name}/configs/{v}.pbtxt": segmenter_config(p, v) for v in SEGMENTER_GPU_VARIANTS},
        f"{p.segmenter.name}/1/model.py": model_py("backbone", f"segmenter {p.segmenter.name}: ONNX Runtime on model.onnx in the CPU "
                                                   "variant, PyTorch FP16 on checkpoint.pt in gpu_torch (the runtime parameter chooses)"),
        f"{p.step('post')}/config.pbtxt": segment_post_config(p),
        f"{p.step('post')}/1/model.py": model_py("segment_post", "segmenter logits -> mask, box, area, found per image"),
        f"{p.name}/config.pbtxt": segment_ensemble_config(p), f"{p.name}/1/.gitkeep": "",
    }


def crop_step_config(p: "CropPipeline") -> str:
    from lesionserve.segmentation.spec import SEGMENTER_OUTPUT

    c, s = p.classifier, p.segmentation.size
    outputs = [_tensor(f"pixel_values_{pre.key}", "TYPE_FP32", (-1, 3, pre.size, pre.size)) for pre in c.preprocessings]
    outputs += [_tensor("error", "TYPE_STRING", (-1, 1)), _tensor("box", "TYPE_INT32", (-1, 4)), _tensor("cropped", "TYPE_BOOL", (-1, 1))]
    return (
        "# The crop step: encoded images and segmenter logits -> each image's lesion (lesion_segment's post-\n"
        "# processing), its bounding rectangle grown by margin cut from the original image (lesionserve/cropping.py),\n"
        "# then the classifier's preprocessing of the crop, one tensor per member input. box: the rectangle\n"
        "# classified (x0, y0, x1, y1 exclusive, original pixels); cropped: false where no lesion was found and\n"
        "# the whole image was classified; error: as preprocess's (the image is decoded again here).\n"
        + _head(p.step("preprocess"), "python", 0)
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (-1, 1)), _tensor(SEGMENTER_OUTPUT, "TYPE_FP32", (-1, 1, s, s)),
                             _tensor("image_size", "TYPE_INT32", (-1, 2)), _tensor("segment_error", "TYPE_STRING", (-1, 1))])
        + _tensors("output", outputs)
        + "".join(_param(f"normalize_pixel_values_{pre.key}", pre.normalization.to_parameter()) for pre in c.preprocessings)
        + _param("threshold", p.segmentation.segmenter.threshold) + _param("margin", p.margin)
        + _param("max_pixels", DEFAULT_MAX_PIXELS) + _param("max_bytes", DEFAULT_MAX_BYTES)
        + _param("decode_threads", DECODE_THREADS) + _instances(None)
    )


def _crop_outputs(p: "CropPipeline") -> list[str]:
    return _classification_outputs(p.classifier) + [_tensor("box", "TYPE_INT32", (4,)), _tensor("cropped", "TYPE_BOOL", (1,))]


def _crop_about(p: "CropPipeline") -> str:
    return (f"# Pipeline {p.name} ({p.mode}): {p.description}.\n"
            f"# {p.segmentation.name} finds the lesion, {p.classifier.name}'s members classify the crop (margin {p.margin:g}).\n"
            "# Outputs: the classifier's, plus box (the rectangle classified, original pixels) and cropped (false:\n"
            "# no lesion found, the whole image was classified).\n")


def crop_ensemble_config(p: "CropPipeline") -> str:
    from lesionserve.segmentation.spec import SEGMENTER_INPUT, SEGMENTER_OUTPUT

    seg, c = p.segmentation, p.classifier
    seg_key = f"pixel_values_{seg.preprocessing.key}"
    keys = [f"pixel_values_{pre.key}" for pre in c.preprocessings]
    steps = [
        # The segmenter's input gets its own name here: it may share a size and normalisation with a member's.
        _step(seg.step("preprocess"), [("raw_image", "raw_image")],
              [(seg_key, "segmenter_input"), ("error", "segment_error"), ("image_size", "image_size")]),
        _step(seg.step("segmenter"), [(SEGMENTER_INPUT, "segmenter_input")], [(SEGMENTER_OUTPUT, SEGMENTER_OUTPUT)]),
        _step(p.step("preprocess"), [(k, k) for k in ("raw_image", SEGMENTER_OUTPUT, "image_size", "segment_error")],
              [(k, k) for k in keys] + [("error", "error"), ("box", "box"), ("cropped", "cropped")]),
        *_classifier_steps(c),
    ]
    return (
        _crop_about(p)
        + f'name: "{p.name}"\nplatform: "ensemble"\nmax_batch_size: {p.max_batch_size}\n'
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,))])
        + _tensors("output", _crop_outputs(p))
        + _client_params(c) + _param("margin", p.margin)
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


def crop_bls_config(p: "CropPipeline") -> str:
    return (
        _crop_about(p)
        + "# BLS: calls the segmentation pipeline, crops, re-encodes each crop as PNG and calls the classifier's\n"
        "# ensemble (lesionserve/triton_models/crop_bls.py).\n"
        + _head(p.name, "python", p.max_batch_size)
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,))])
        + _tensors("output", _crop_outputs(p))
        + _client_params(p.classifier) + _param("margin", p.margin)
        + _param("segmentation", p.segmentation.name) + _param("classifier", p.classifier.name)
        + _param("max_pixels", DEFAULT_MAX_PIXELS) + _param("max_bytes", DEFAULT_MAX_BYTES)
        + f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US[None]}\n}}\n"
        + _instances(None)
    )


def render_crop(p: "CropPipeline") -> dict[str, str]:
    """Relative path -> content of the crop pipeline's own models (its parts are rendered by theirs)."""
    if p.mode == "bls":
        return {f"{p.name}/config.pbtxt": crop_bls_config(p),
                f"{p.name}/1/model.py": model_py("crop_bls", "segment, crop, re-encode and classify (BLS)")}
    pre = p.step("preprocess")
    return {f"{pre}/config.pbtxt": crop_step_config(p),
            f"{pre}/1/model.py": model_py("crop_preprocess", "segmenter logits -> lesion crop -> member inputs"),
            f"{p.name}/config.pbtxt": crop_ensemble_config(p), f"{p.name}/1/.gitkeep": ""}


#: GPU variants of the detector: no gpu_torch, which would import ultralytics (AGPL-3.0) in serving.
DETECTOR_GPU_VARIANTS = ("gpu", "gpu_ort")


def _anchors(imgsz: int) -> int:
    """Anchor points of a YOLO head at strides 8, 16 and 32."""
    return sum((imgsz // stride) ** 2 for stride in (8, 16, 32))


def render_detection(p: "DetectionPipeline") -> dict[str, str]:
    """Relative path -> content of every generated file of a detection pipeline."""
    from lesionserve.detection.explain import FEATURES_OUTPUT
    from lesionserve.detection.spec import DETECTOR_INPUT, DETECTOR_OUTPUT

    s, c, a, f = p.imgsz, len(p.class_names), _anchors(p.imgsz), p.imgsz // 32
    pre, nms, cam = p.step("preprocess"), p.step("nms"), p.step("eigencam")
    letterbox = [_tensor(DETECTOR_INPUT, "TYPE_FP32", (3, s, s)), _tensor("letterbox", "TYPE_FP32", (3,)),
                 _tensor("image_size", "TYPE_INT32", (2,)), _tensor("error", "TYPE_STRING", (1,))]
    pre_config = (
        "# Encoded images -> the detector's letterboxed input (lesionserve/detection/preprocess.py: longer side to\n"
        f"# {s} px, aspect kept, grey padding, /255), each image's letterbox (scale, pad_x, pad_y), size and decode error.\n"
        + _head(pre, "python", p.max_batch_size)
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,))]) + _tensors("output", letterbox)
        + _param("imgsz", s) + _param("max_pixels", DEFAULT_MAX_PIXELS) + _param("max_bytes", DEFAULT_MAX_BYTES)
        + _instances(None)
    )
    identity = (f"# {p.detector}: the ultralytics export (lesionserve detect-export) at {s} px. output0: per anchor ({a}) the\n"
                f"# box (cx, cy, w, h on the canvas) and {c} class scores; features: layer 8's activations (channels x\n"
                "# S/32 x S/32), computed only when the explain ensemble asks.\n")
    io = (_tensors("input", [_tensor(DETECTOR_INPUT, "TYPE_FP32", (3, s, s))])
          + _tensors("output", [_tensor(DETECTOR_OUTPUT, "TYPE_FP32", (4 + c, a)), _tensor(FEATURES_OUTPUT, "TYPE_FP32", (-1, f, f))]))

    def detector(variant: str | None) -> str:
        batching = _queue_delay(variant)
        head = f'name: "{p.detector}"\n'
        if variant is None:
            return ("# CPU: ONNX Runtime inside the python backend (lesionserve/triton_models/onnx_backbone.py).\n"
                    "# GPU variants: configs/{gpu,gpu_ort}.pbtxt (no gpu_torch: serving must not import ultralytics, AGPL-3.0).\n"
                    + identity + head + f'backend: "python"\nmax_batch_size: {p.max_batch_size}\n' + io + batching
                    + _cpu_ort_params() + _instances(None))
        if variant == "gpu":
            return ("# Variant gpu: a TensorRT FP16 engine (1/model.plan) built by `lesionserve tensorrt` from the ONNX file and\n"
                    "# checked against ONNX Runtime on boxes and scores (an ultralytics .engine file is not a Triton plan).\n"
                    + identity + head + 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n'
                    + f"max_batch_size: {p.max_batch_size}\n" + io + batching + _instances(variant))
        shapes = {k: f"{DETECTOR_INPUT}:{n}x3x{s}x{s}" for k, n in (("min", 1), ("opt", p.max_batch_size), ("max", p.max_batch_size))}
        return ("# Variant gpu_ort: Triton's onnxruntime backend on 1/model.onnx with the TensorRT execution provider in FP16.\n"
                + identity + head + 'backend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n'
                + f"max_batch_size: {p.max_batch_size}\n" + io + batching + _instances(variant) + _tensorrt_accelerator(p.detector, shapes))
    nms_inputs = [_tensor(DETECTOR_OUTPUT, "TYPE_FP32", (-1, 4 + c, a)), _tensor("letterbox", "TYPE_FP32", (-1, 3)),
                  _tensor("image_size", "TYPE_INT32", (-1, 2)), _tensor("error", "TYPE_STRING", (-1, 1)),
                  _tensor("conf", "TYPE_FP32", (-1, 1)), _tensor("iou", "TYPE_FP32", (-1, 1)), _tensor("max_det", "TYPE_INT32", (-1, 1))]
    results = [_tensor("boxes", "TYPE_FP32", (-1, -1, 4)), _tensor("scores", "TYPE_FP32", (-1, -1)),
               _tensor("classes", "TYPE_INT32", (-1, -1)), _tensor("count", "TYPE_INT32", (-1, 1))]
    nms_config = (
        "# Head outputs -> per image its boxes after NMS as ultralytics' predict does it (lesionserve/detection/nms.py):\n"
        "# best class score > conf, greedy NMS per class at iou, at most max_det boxes, back to original pixels.\n"
        "# Padded to the request's largest count: count says how many rows of boxes/scores/classes are real.\n"
        + _head(nms, "python", 0) + _tensors("input", nms_inputs) + _tensors("output", results) + _instances(None)
    )
    def steps(explain: bool) -> list[str]:
        outs = [(DETECTOR_OUTPUT, DETECTOR_OUTPUT)] + ([(FEATURES_OUTPUT, FEATURES_OUTPUT)] if explain else [])
        return [
            _step(pre, [("raw_image", "raw_image")], [(DETECTOR_INPUT, DETECTOR_INPUT), ("letterbox", "letterbox"),
                                                      ("image_size", "image_size"), ("error", "error")]),
            _step(p.detector, [(DETECTOR_INPUT, DETECTOR_INPUT)], outs),
            _step(nms, [(k, k) for k in (DETECTOR_OUTPUT, "letterbox", "image_size", "error", "conf", "iou", "max_det")],
                  [(k, k) for k in ("boxes", "scores", "classes", "count")]),
            *([_step(cam, [(k, k) for k in (FEATURES_OUTPUT, "letterbox", "image_size", "error")], [("heatmap", "heatmap")])]
              if explain else []),
        ]

    cam_config = (
        "# Layer-8 activations -> EigenCAM per image at its own size (lesionserve/detection/explain.py): the activations'\n"
        "# first principal component, sign fixed, ReLU, in [0, 1]. Gradient-free: it explains no class or box.\n"
        "# heatmap: each image's map in the top-left image_size corner of a request-wide canvas.\n"
        + _head(cam, "python", 0)
        + _tensors("input", [_tensor(FEATURES_OUTPUT, "TYPE_FP32", (-1, -1, f, f)), _tensor("letterbox", "TYPE_FP32", (-1, 3)),
                             _tensor("image_size", "TYPE_INT32", (-1, 2)), _tensor("error", "TYPE_STRING", (-1, 1))])
        + _tensors("output", [_tensor("heatmap", "TYPE_FP32", (-1, -1, -1))]) + _param("imgsz", s) + _instances(None)
    )

    def ensemble(explain: bool) -> str:
        outputs = [_tensor("boxes", "TYPE_FP32", (-1, 4)), _tensor("scores", "TYPE_FP32", (-1,)),
                   _tensor("classes", "TYPE_INT32", (-1,)), _tensor("count", "TYPE_INT32", (1,)), _tensor("error", "TYPE_STRING", (1,))]
        if explain:
            outputs += [_tensor("heatmap", "TYPE_FP32", (-1, -1)), _tensor("image_size", "TYPE_INT32", (2,))]
        return (
            f"# Pipeline {p.name}{' (with EigenCAM heatmaps)' if explain else ''}: {p.description}.\n"
            "# Encoded images and the NMS parameters (conf, iou, max_det: one value per request, repeated per row) in;\n"
            "# per image boxes (x0, y0, x1, y1 in its pixels), scores, class indices (class_names), count, and error.\n"
            + (f"# heatmap: the EigenCAM of layer 8 at the image's size (image_size), padded to the request's largest image.\n" if explain else "")
            + f'name: "{p.explain_name if explain else p.name}"\nplatform: "ensemble"\nmax_batch_size: {p.max_batch_size}\n'
            + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,)), _tensor("conf", "TYPE_FP32", (1,)),
                                 _tensor("iou", "TYPE_FP32", (1,)), _tensor("max_det", "TYPE_INT32", (1,))])
            + _tensors("output", outputs)
            + _param("class_names", ",".join(p.class_names)) + _param("imgsz", s)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps(explain)) + "\n  ]\n}\n"
        )

    return {f"{pre}/config.pbtxt": pre_config, f"{pre}/1/model.py": model_py("detect_preprocess", "encoded images -> letterboxed detector input"),
            f"{p.detector}/config.pbtxt": detector(None),
            **{f"{p.detector}/configs/{v}.pbtxt": detector(v) for v in DETECTOR_GPU_VARIANTS},
            f"{p.detector}/1/model.py": model_py("onnx_backbone", f"detector {p.detector}: ONNX Runtime on model.onnx"),
            f"{nms}/config.pbtxt": nms_config, f"{nms}/1/model.py": model_py("detect_nms", "head outputs -> boxes after NMS"),
            f"{cam}/config.pbtxt": cam_config, f"{cam}/1/model.py": model_py("detect_eigencam", "layer-8 activations -> EigenCAM per image"),
            f"{p.name}/config.pbtxt": ensemble(False), f"{p.name}/1/.gitkeep": "",
            f"{p.explain_name}/config.pbtxt": ensemble(True), f"{p.explain_name}/1/.gitkeep": ""}


VIT_GPU_VARIANTS = ("gpu_ort",)


def render_melanoma(p: "MelanomaPipeline") -> dict[str, str]:
    """Relative path -> content of every generated file of the ViT melanoma pipeline."""
    from lesionserve.vit.decision import HEAD_OUTPUTS
    from lesionserve.vit.spec import MAP_KINDS, VIT_INPUT, logits_name, map_name

    m, s, g = p.model, p.model.input_size, p.model.grid
    pre, backbone, post = p.step("preprocess"), p.step("backbone"), p.step("post")
    key = f"pixel_values_{p.preprocessing.key}"
    logits = [_tensor(logits_name(h.name), "TYPE_FP32", (h.num_classes,)) for h in p.heads]
    maps = [_tensor(map_name(k), "TYPE_FP32", (g, g)) for k in MAP_KINDS]
    identity = (f"# {backbone}: {m.timm_name} at {s} px ({m.normalization.name} statistics), one MLP head per dataset\n"
                f"# ({', '.join(m.heads)}): logits_<head>; attention_rollout (Abnar and Zuidema) and attention_cls (the last\n"
                f"# block's CLS-token attention, mean over heads) on the {g} x {g} patch grid (lesionserve vit-export).\n")
    io = _tensors("input", [_tensor(VIT_INPUT, "TYPE_FP32", (3, s, s))]) + _tensors("output", logits + maps)

    def backbone_config(variant: str | None) -> str:
        if variant is None:
            return ("# CPU: ONNX Runtime inside the python backend (lesionserve/triton_models/onnx_backbone.py).\n"
                    f"# GPU variant: configs/{','.join(VIT_GPU_VARIANTS)}.pbtxt, selected with --model-config-name=NAME.\n"
                    + identity + f'name: "{backbone}"\nbackend: "python"\nmax_batch_size: {p.max_batch_size}\n' + io
                    + _queue_delay(None) + _cpu_ort_params() + _param("export_hint", "export it with lesionserve vit-export") + _instances(None))
        shapes = {k: f"{VIT_INPUT}:{n}x3x{s}x{s}" for k, n in (("min", 1), ("opt", p.max_batch_size), ("max", p.max_batch_size))}
        return ("# Variant gpu_ort: Triton's onnxruntime backend on 1/model.onnx with the TensorRT execution provider in FP16.\n"
                + identity + f'name: "{backbone}"\nbackend: "onnxruntime"\ndefault_model_filename: "model.onnx"\n'
                + f"max_batch_size: {p.max_batch_size}\n" + io + _queue_delay(variant)
                + _instances(variant) + _tensorrt_accelerator(backbone, shapes))

    per_head = {"probs": lambda h: ("TYPE_FP32", (h.num_classes,)), "label": lambda h: ("TYPE_STRING", (1,)),
                "melanoma": lambda h: ("TYPE_BOOL", (1,)), "threshold": lambda h: ("TYPE_FP32", (1,))}
    assert tuple(per_head) == HEAD_OUTPUTS
    head_outputs = [(f"{w}_{h.name}", *per_head[w](h)) for h in p.heads for w in HEAD_OUTPUTS]
    post_config = (
        "# Logits per head and the attention map -> per head softmax probabilities (probs_<head>), the decision at the\n"
        "# head's operating threshold on P(melanoma) from 1/thresholds.json (label_<head>, melanoma_<head>, threshold_<head>),\n"
        "# and attention: the map at each image's size scaled to [0, 1], in the top-left image_size corner of a\n"
        "# request-wide canvas (lesionserve/vit/decision.py).\n"
        + _head(post, "python", 0)
        + _tensors("input", [_tensor(logits_name(h.name), "TYPE_FP32", (-1, h.num_classes)) for h in p.heads]
                   + [_tensor(map_name(p.map_kind), "TYPE_FP32", (-1, g, g)), _tensor("image_size", "TYPE_INT32", (-1, 2)),
                      _tensor("error", "TYPE_STRING", (-1, 1))])
        + _tensors("output", [_tensor(n, t, (-1, *d)) for n, t, d in head_outputs] + [_tensor("attention", "TYPE_FP32", (-1, -1, -1))])
        + _param("heads", ",".join(m.heads)) + _param("map", p.map_kind) + _instances(None)
    )
    from_backbone = [(logits_name(h.name), logits_name(h.name)) for h in p.heads] + [(map_name(p.map_kind), map_name(p.map_kind))]
    steps = [
        _step(pre, [("raw_image", "raw_image")], [(key, key), ("error", "error"), ("image_size", "image_size")]),
        _step(backbone, [(VIT_INPUT, key)], from_backbone),
        _step(post, from_backbone + [("image_size", "image_size"), ("error", "error")],
              [(n, n) for n, _, _ in head_outputs] + [("attention", "attention")]),
    ]
    ensemble = (
        f"# Pipeline {p.name}: {p.description}.\n"
        "# Encoded images in; per image and head probs_<head> (class_names_<head> order; positive_<head>: the melanoma\n"
        "# class its threshold is set on), label_<head>, melanoma_<head>,\n"
        f"# threshold_<head>; attention ({p.map_kind} map at the image's size, top-left of the canvas), image_size, error.\n"
        f'name: "{p.name}"\nplatform: "ensemble"\nmax_batch_size: {p.max_batch_size}\n'
        + _tensors("input", [_tensor("raw_image", "TYPE_STRING", (1,))])
        + _tensors("output", [_tensor(n, t, d) for n, t, d in head_outputs]
                   + [_tensor("attention", "TYPE_FP32", (-1, -1)), _tensor("image_size", "TYPE_INT32", (2,)),
                      _tensor("error", "TYPE_STRING", (1,))])
        + _param("heads", ",".join(m.heads))
        + "".join(_param(f"class_names_{h.name}", ",".join(h.class_names)) + _param(f"positive_{h.name}", h.positive) for h in p.heads)
        + _param("map", p.map_kind) + _param("backbone", m.timm_name) + _param("input_size", s)
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )
    return {f"{pre}/config.pbtxt": preprocess_config(p, None), f"{pre}/1/model.py": model_py("preprocess", STEP_CODE["preprocess"][2]),
            f"{backbone}/config.pbtxt": backbone_config(None),
            **{f"{backbone}/configs/{v}.pbtxt": backbone_config(v) for v in VIT_GPU_VARIANTS},
            f"{backbone}/1/model.py": model_py("onnx_backbone", f"ViT backbone + heads {backbone}: ONNX Runtime on model.onnx"),
            f"{post}/config.pbtxt": post_config, f"{post}/1/model.py": model_py("vit_post", "ViT logits and map -> probabilities, decisions, map"),
            f"{p.name}/config.pbtxt": ensemble, f"{p.name}/1/.gitkeep": ""}


def render_repository(pipelines: Sequence[EnsemblePipeline] = tuple(PIPELINES.values())) -> dict[str, str]:
    """Relative path -> content for every pipeline; two pipelines may not declare one model name."""
    files: dict[str, str] = {}
    owner: dict[str, str] = {}
    for p in pipelines:
        for model in p.model_names:
            if model in owner:
                raise ValueError(f"model {model!r} is declared by pipelines {owner[model]!r} and {p.name!r}; "
                                 "give members unique names or the pipeline a step_prefix")
            owner[model] = p.name
        if isinstance(p, DetectionPipeline):
            files.update(render_detection(p))
        elif isinstance(p, MelanomaPipeline):
            files.update(render_melanoma(p))
        elif isinstance(p, CropPipeline):
            files.update(render_crop(p))
        elif isinstance(p, SegmentationPipeline):
            files.update(render_segmentation(p))
        else:
            files.update(render_pipeline(p))
    served = {p.name: p for p in pipelines}
    for p in pipelines:
        if isinstance(p, CropPipeline):
            for part in (p.segmentation, p.classifier):
                if served.get(part.name) != part:  # the crop step's tensors must match what is served
                    raise ValueError(f"crop pipeline {p.name!r} calls {part.name!r}, which this repository "
                                     + ("serves with another declaration" if part.name in served else "does not serve")
                                     + ": serve them together (assemble_pipelines passes the served parts)")
    return files


def _generated_files(root: Path) -> set[str]:
    """Relative paths under ``root`` that this module would own."""
    found: set[str] = set()
    for pattern in GENERATED_PATTERNS:
        found.update(str(p.relative_to(root)) for p in root.glob(f"*/{pattern}"))
    return found


def write_repository(root: str | Path = DEFAULT_REPOSITORY,
                     pipelines: Sequence[EnsemblePipeline] = tuple(PIPELINES.values())) -> list[Path]:
    """Write every generated file under ``root``; remove generated files of models no longer declared.

    Assembly's files (weights, calibration) are left alone. Returns the files written.
    """
    root = Path(root)
    files = render_repository(pipelines)
    models = {path.split("/", 1)[0] for path in files}
    for stale in sorted(_generated_files(root) - set(files)):
        (root / stale).unlink()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in models) if root.is_dir() else []:
        if not any(f.is_file() for f in folder.rglob("*")):
            shutil.rmtree(folder)
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # a server reading the repository never sees a half-written config
            written.append(path)
    return written


def check_repository(root: str | Path = DEFAULT_REPOSITORY,
                     pipelines: Sequence[EnsemblePipeline] = tuple(PIPELINES.values())) -> list[str]:
    """Every difference between ``root`` and a regeneration: missing, differing and stale files."""
    root = Path(root)
    files = render_repository(pipelines)
    problems = []
    for rel, text in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.read_text() != text:
            problems.append(f"differs: {rel}")
    problems += [f"not declared: {rel}" for rel in sorted(_generated_files(root) - set(files))]
    return problems


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionserve repository", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_REPOSITORY, help="repository folder (default %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 listing each file that differs")
    parser.add_argument("--views", type=int, choices=ALLOWED_VIEWS, help="serve this TTA view count (needs --out other than the committed folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    pipelines = list(PIPELINES.values())
    if args.views is not None:
        if args.out.resolve() == DEFAULT_REPOSITORY.resolve():
            print(f"error: --views {args.views} changes the served pipeline; write it elsewhere with --out DIR", file=sys.stderr)
            return 2
        pipelines = [p.with_views(check_views(args.views)) for p in pipelines]
    if args.check:
        problems = check_repository(args.out, pipelines)
        if problems:
            print(f"{args.out} differs from its declaration (regenerate with `lesionserve repository`):", file=sys.stderr)
            print("  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print(f"{args.out}: {len(render_repository(pipelines))} generated files, all equal to their declaration")
        return 0
    written = write_repository(args.out, pipelines)
    print(f"{args.out}: {len(written)} file(s) written, {len(render_repository(pipelines))} generated in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
