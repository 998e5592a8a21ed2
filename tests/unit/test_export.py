"""ONNX export: named tensors, dynamic batch, and the self-check against PyTorch."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from lesionserve.export.onnx_export import INPUT_NAME, OUTPUT_NAME, ExportCheckError, export_onnx, main
from lesionserve.models import create_backbone, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50" / "checkpoint.pt"
    save_checkpoint(path, "resnet50", create_backbone("resnet50"))
    return path


def test_export_onnx_writes_named_dynamic_model_when_check_passes(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME] and [o.name for o in graph.output] == [OUTPUT_NAME, "cams"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    report = json.loads(out.with_suffix(".export.json").read_text())
    assert report["max_abs_diff"] <= report["atol"] and report["input_size"] == 224
    printed = capsys.readouterr().out
    assert "max |ORT - torch|" in printed and "cams: " in printed and report["cams_max_rel_diff"] <= 1e-4


def test_export_onnx_raises_and_leaves_no_file_when_tolerance_not_met(checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportCheckError, match=r"resnet50: ONNX Runtime differs from PyTorch by .* \(> atol"):
        export_onnx(checkpoint, out, atol=-1.0)  # no difference is <= -1: the check must fail
    assert not out.exists() and not out.with_suffix(".onnx.tmp").exists()


def test_export_onnx_raises_when_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_onnx(tmp_path / "none.pt", tmp_path / "m.onnx")


def test_export_onnx_takes_the_trained_size_from_the_checkpoint_when_trained_smaller(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "c.pt", "resnet50", create_backbone("resnet50"), {"config": {"input_size": 64}})
    report = export_onnx(tmp_path / "c.pt", tmp_path / "m.onnx")
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert report.input_size == 64 and dims == ["batch", 3, 64, 64]


def test_random_artifacts_record_and_serve_the_given_input_size_when_asked(tmp_path):
    from lesionserve.export.assemble import served_input_sizes
    from lesionserve.export.random_artifacts import build_random_artifacts
    from lesionserve.models import checkpoint_input_size
    from lesionserve.pipelines import LESION_ENSEMBLE

    with pytest.raises(ValueError, match="input_size must be >= 32"):
        build_random_artifacts(tmp_path / "tiny", input_size=16)
    artifacts = build_random_artifacts(tmp_path / "a", input_size=32)
    assert served_input_sizes(artifacts, checkpoints=True) == {b: 32 for b in LESION_ENSEMBLE.member_names}
    assert checkpoint_input_size(artifacts / "resnet50" / "checkpoint.pt") == 32
