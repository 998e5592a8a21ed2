"""TensorRT engine building: the pure parts (profile, trtexec line, staleness, error text, CLI) run
everywhere; building and checking a real engine needs TensorRT and a GPU and skips without them."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from lesionserve.export import tensorrt as trt_export
from lesionserve.export.tensorrt import (
    DeviceInfo,
    EngineOptions,
    Profile,
    chunk_rows,
    engine_profile,
    format_build_errors,
    main,
    onnx_input_size,
    onnx_sources,
    plan_is_current,
    trtexec_command,
    workspace_bytes,
)
from lesionserve.parity import ParityError, compare_logits, compare_probabilities
from lesionserve.pipelines import LESION_ENSEMBLE

BACKBONE_NAMES = LESION_ENSEMBLE.member_names
BACKBONE_MAX_BATCH = LESION_ENSEMBLE.member_max_batch
from tests.unit.test_model_repository import tiny_onnx

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
T4 = DeviceInfo("Tesla T4", "7.5")


def test_engine_profile_spans_one_to_full_fan_out_when_defaults_used():
    p = engine_profile("efficientnet_b3")
    assert (p.min_batch, p.opt_batch, p.max_batch) == (1, 32, BACKBONE_MAX_BATCH) == (1, 32, 64)
    assert p.shape(p.max_batch) == (64, 3, 300, 300) and p.input_name == "pixel_values"
    assert engine_profile("resnet50").shape(1) == (1, 3, 224, 224)


def test_engine_profile_raises_when_max_batch_cannot_hold_a_full_request():
    with pytest.raises(ValueError, match=r"max batch 32 < a request's fan-out 64"):
        engine_profile("resnet50", opt_batch=8, max_batch=32)
    # Another pipeline's member: the fan-out its generated config declares.
    assert engine_profile("any_member", opt_batch=8, input_size=96, fan_out=128).max_batch == 128
    from lesionserve.export.tensorrt import served_max_batch
    from lesionserve.repository import DEFAULT_REPOSITORY

    assert served_max_batch(DEFAULT_REPOSITORY, "resnet50") == 64 and served_max_batch(DEFAULT_REPOSITORY, "nope") is None


def test_engine_profile_raises_when_opt_batch_outside_range():
    with pytest.raises(ValueError, match=r"opt batch must lie in \[1, 64\], got 65"):
        engine_profile("resnet50", opt_batch=65)


def test_trtexec_command_carries_fp16_profile_workspace_and_cache_when_given():
    p = engine_profile("resnet50")
    cmd = trtexec_command("m.onnx", "m.plan", p, workspace_gb=4, timing_cache="t.cache")
    assert cmd == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.plan", "--fp16",
        "--minShapes=pixel_values:1x3x224x224", "--optShapes=pixel_values:32x3x224x224",
        "--maxShapes=pixel_values:64x3x224x224", "--memPoolSize=workspace:4096", "--timingCacheFile=t.cache",
    ]
    assert not any(a.startswith("--timingCacheFile") for a in trtexec_command("m.onnx", "m.plan", p))


def test_workspace_bytes_raises_when_not_positive():
    assert workspace_bytes(0.5) == 2**29
    with pytest.raises(ValueError, match="workspace must be > 0 GiB"):
        workspace_bytes(0)


def _metadata(built_for: Profile, **changes) -> dict:
    meta = {"onnx_sha256": "abc", "tensorrt_version": "10.5.0", "gpu_name": T4.name, "compute_capability": "7.5",
            "profile": built_for.to_json(), "check": {"passed": True}}
    return {**meta, **changes}


@pytest.mark.parametrize(
    "changes",
    [{"onnx_sha256": "new weights"}, {"tensorrt_version": "10.6.0"}, {"gpu_name": "NVIDIA A10G"},
     {"compute_capability": "8.6"}, {"check": {"passed": False}}, {"profile": {"max": [32, 3, 224, 224]}}],
    ids=["onnx", "tensorrt", "gpu", "arch", "failed-check", "profile"],
)
def test_plan_is_current_is_false_when_anything_it_was_built_for_changed(changes):
    p = engine_profile("resnet50")
    current = dict(onnx_sha256="abc", tensorrt_version="10.5.0", device=T4, profile=p)
    assert plan_is_current(_metadata(p), **current)
    assert not plan_is_current(_metadata(p, **changes), **current)
    assert not plan_is_current(None, **current)


def test_format_build_errors_keeps_every_error_in_full_when_messages_are_long():
    long = "x" * 5000
    text = format_build_errors("parsing m.onnx", ["node 3: unsupported op Foo"], [("WARNING", "meh"), ("ERROR", long)])
    assert "TensorRT failed while parsing m.onnx" in text and "parser: node 3: unsupported op Foo" in text
    assert long in text and "meh" not in text


def test_chunk_rows_covers_all_rows_when_cycling_through_sizes():
    assert chunk_rows(20, [1, 8, 64]) == [(0, 1), (1, 9), (9, 20)]
    spans = chunk_rows(256, [1, 8, 64])
    assert spans[0][0] == 0 and spans[-1][1] == 256 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_onnx_sources_list_every_missing_file_when_repository_incomplete(tmp_path):
    tiny_onnx(tmp_path / "resnet50" / "1" / "model.onnx", 224)
    with pytest.raises(FileNotFoundError) as info:
        onnx_sources(tmp_path, None, BACKBONE_NAMES)
    assert "densenet121/1/model.onnx" in str(info.value) and "efficientnet_b3/1/model.onnx" in str(info.value)
    assert "resnet50" not in str(info.value)
    assert onnx_sources(tmp_path, None, ["resnet50"]) == {"resnet50": tmp_path / "resnet50" / "1" / "model.onnx"}


def test_cli_prints_trtexec_lines_without_tensorrt_when_asked(capsys, tmp_path):
    assert main(["--print-trtexec", "--repository", str(tmp_path), "--backbones", "densenet121"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trtexec --onnx={tmp_path}/densenet121/1/model.onnx --saveEngine={tmp_path}/densenet121/1/model.plan")
    assert "--maxShapes=pixel_values:64x3x224x224" in line


def test_engine_profile_uses_the_onnx_files_trained_size_when_it_differs_from_spec(tmp_path, capsys):
    import onnx

    path = tmp_path / "efficientnet_b3" / "1" / "model.onnx"
    tiny_onnx(path, 64)
    model = onnx.load(str(path))
    # What torch's exporter writes (IR 8, opset 17): onnx's newest defaults are past this onnxruntime.
    model.ir_version = 8
    model.opset_import[0].version = 17
    onnx.save(model, str(path))
    assert onnx_input_size(tmp_path / "efficientnet_b3" / "1" / "model.onnx") == 64
    assert engine_profile("efficientnet_b3", input_size=64).shape(64) == (64, 3, 64, 64)
    assert main(["--print-trtexec", "--repository", str(tmp_path), "--backbones", "efficientnet_b3"]) == 0
    line = capsys.readouterr().out
    assert "--minShapes=pixel_values:1x3x64x64" in line and "--maxShapes=pixel_values:64x3x64x64" in line


@pytest.mark.parametrize("variant", ["gpu_ort", "gpu_torch"])
def test_cli_builds_nothing_when_variant_needs_no_engines(variant, capsys, tmp_path):
    assert main(["--variant", variant, "--repository", str(tmp_path)]) == 0
    assert "no TensorRT engines to build" in capsys.readouterr().out


def test_cli_reads_variant_from_environment_when_not_given(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LESIONSERVE_VARIANT", "gpu_torch")
    assert main(["--repository", str(tmp_path)]) == 0
    assert "variant gpu_torch" in capsys.readouterr().out


def test_cli_exits_2_listing_variants_when_variant_unknown(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--variant", "tpu"])
    assert info.value.code == 2 and "choose one of gpu, gpu_ort, gpu_torch" in capsys.readouterr().err


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT message cannot be shown")
def test_cli_explains_where_to_build_when_tensorrt_missing(capsys, tmp_path):
    for b in BACKBONE_NAMES:
        tiny_onnx(tmp_path / b / "1" / "model.onnx", 224 if b != "efficientnet_b3" else 300)
    assert main(["--repository", str(tmp_path), "--variant", "gpu"]) == 1
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "nvcr.io/nvidia/tensorrt" in err and "--print-trtexec" in err


def test_compare_logits_reports_agreement_and_prob_gap_when_candidate_is_perturbed():
    ref = np.random.default_rng(0).normal(scale=3, size=(200, 7)).astype(np.float32)
    report = compare_logits(ref, ref + 1e-3)
    assert report.rows == 200 and report.argmax_agreement == 1.0 and report.max_prob_diff < 1e-3 and report.passed
    flipped = ref.copy()
    flipped[:2] = -flipped[:2]  # two rows of 200 change their top class: 99.0 % < 99.5 %
    bad = compare_logits(ref, flipped)
    assert bad.argmax_agreement == 0.99 and not bad.passed
    with pytest.raises(ParityError, match=r"engine: argmax agreement 99.00% \(>= 99.5%\)"):
        bad.check("engine")


def test_compare_probabilities_fails_on_prob_gap_alone_when_argmax_agrees():
    ref = np.array([[0.7, 0.2, 0.1]])
    assert not compare_probabilities(ref, np.array([[0.68, 0.22, 0.1]])).passed  # 0.02 > 0.01
    with pytest.raises(ValueError, match="equal non-empty N x C arrays"):
        compare_probabilities(ref, np.zeros((2, 3)))


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT not installed")
def test_build_backbone_installs_checked_plan_and_metadata_when_tensorrt_and_gpu_present(tmp_path):
    onnx = tmp_path / "resnet50" / "1" / "model.onnx"
    tiny_onnx(onnx, 224)
    plan = onnx.with_name("model.plan")
    options = EngineOptions(workspace_gb=1, timing_cache=tmp_path / "timing.cache", check_images=16)
    meta = trt_export.build_backbone("resnet50", onnx, plan, options)
    assert plan.is_file() and (tmp_path / "timing.cache").is_file()
    saved = json.loads(plan.with_name("model.plan.json").read_text())
    assert saved["check"]["passed"] and saved["profile"]["max"] == [64, 3, 224, 224] and saved["gpu_name"]
    assert meta["tensorrt_version"] == saved["tensorrt_version"]
    assert trt_export.build_backbone("resnet50", onnx, plan, options).get("skipped") is True  # current: kept


def test_segmenter_engine_profile_is_per_image_and_its_plan_is_listed_from_a_generated_repository(tmp_path, capsys):
    from lesionserve.repository import write_repository
    from lesionserve.segmentation.spec import LESION_SEGMENT

    profile = engine_profile("segmenter", input_size=192)
    assert (profile.output_name, profile.segmenter, profile.input_size, profile.max_batch) == ("mask_logits", True, 192, 8)
    write_repository(tmp_path, [LESION_ENSEMBLE, LESION_SEGMENT.with_input_size(192)])
    assert "segmenter" in trt_export.engine_members(tmp_path)
    assert trt_export.main(["--repository", str(tmp_path), "--print-trtexec", "--backbones", "segmenter"]) == 0
    assert "--maxShapes=pixel_values:8x3x192x192" in capsys.readouterr().out


def test_compare_masks_passes_on_the_decision_not_on_the_logits():
    from lesionserve.parity import compare_masks

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 4, size=(2, 1, 32, 32))
    near = compare_masks(reference, reference + 0.05 * np.sign(reference), threshold=0.5)
    assert near.passed and near.pixel_agreement == 1.0 and near.max_logit_diff > 0.04
    flipped = reference.copy()
    flipped[0, 0, :4] *= -1  # 128 of 2048 pixels change side
    report = compare_masks(reference, flipped, threshold=0.5)
    assert not report.passed and abs(report.pixel_agreement - (1 - 128 / 2048)) < 1e-9 and "FAILED" in report.summary()


def test_detector_engine_profile_and_trtexec_line_from_a_generated_repository(tmp_path, capsys):
    from lesionserve.detection.spec import LESION_DETECT
    from lesionserve.repository import write_repository

    write_repository(tmp_path, [LESION_DETECT.with_imgsz(320)])
    assert trt_export.engine_members(tmp_path) == ["detector"]
    assert trt_export.main(["--repository", str(tmp_path), "--print-trtexec", "--backbones", "detector"]) == 0
    line = capsys.readouterr().out
    assert "--minShapes=images:1x3x320x320" in line and "--maxShapes=images:8x3x320x320" in line


def test_compare_detector_heads_checks_scores_everywhere_and_boxes_where_something_is_seen():
    from lesionserve.parity import compare_detector_heads

    rng = np.random.default_rng(0)
    head = np.concatenate([rng.uniform(0, 320, (2, 4, 50)), rng.uniform(0, 0.04, (2, 7, 50))], axis=1)
    head[0, 4, 3] = 0.9  # one live anchor
    moved = head.copy()
    moved[:, :4, 10] += 50.0  # an empty anchor's box: free to differ
    assert compare_detector_heads(head, moved, 320).passed
    moved[0, 0, 3] += 5.0  # the live anchor's box moves 5 px (> 1% of 320)
    report = compare_detector_heads(head, moved, 320)
    assert not report.passed and report.max_box_diff == pytest.approx(5.0) and "FAILED" in report.summary()
