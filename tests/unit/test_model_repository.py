"""The committed model repository agrees with the seed ensemble's declaration, and assembly places artifacts right."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from lesionserve.calibration import Calibration
from lesionserve.export.assemble import AssembleError, assemble
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.repository import DEFAULT_REPOSITORY
from lesionserve.spec import ALLOWED_VIEWS, CLASS_NAMES, GPU_VARIANTS, NUM_CLASSES
from lesionserve.triton_config import square_size

BACKBONE_NAMES = LESION_ENSEMBLE.member_names
SIZES = LESION_ENSEMBLE.input_sizes
MODELS = LESION_ENSEMBLE.model_names


def load_config(name: str, repository: Path = DEFAULT_REPOSITORY, variant: str | None = None) -> model_config_pb2.ModelConfig:
    path = repository / name / ("config.pbtxt" if variant is None else f"configs/{variant}.pbtxt")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", MODELS)
def test_repository_model_has_parsable_config_and_version_dir_when_committed(name):
    config = load_config(name)
    assert config.name == name
    assert (DEFAULT_REPOSITORY / name / "1").is_dir()
    if config.backend == "python":
        assert (DEFAULT_REPOSITORY / name / "1" / "model.py").is_file()


def test_ensemble_parameters_match_spec_when_read_by_clients():
    config = load_config("lesion_ensemble")
    assert config.parameters["class_names"].string_value.split(",") == list(CLASS_NAMES)
    assert config.parameters["backbones"].string_value.split(",") == list(BACKBONE_NAMES)
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {"probs": [NUM_CLASSES], "label": [1], "backbone_probs": [len(BACKBONE_NAMES), NUM_CLASSES],
                       "thresholds_fired": [NUM_CLASSES], "error": [1]}


def test_preprocess_outputs_one_tensor_per_distinct_backbone_resolution():
    config = load_config("preprocess")
    assert sorted(square_size(o.dims) for o in config.output if o.name not in ("error", "image_size")) == sorted(set(SIZES.values()))
    assert config.max_batch_size == load_config("lesion_ensemble").max_batch_size


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
@pytest.mark.parametrize("variant", [None, "gpu"])
def test_backbone_config_matches_spec_and_fits_fan_out(backbone, variant):
    config = load_config(backbone, variant=variant)
    size = SIZES[backbone]
    assert list(config.input[0].dims) == [3, size, size] and list(config.output[0].dims) == [NUM_CLASSES]
    # A whole request's fan-out must fit one backbone batch (checked at run time only by Triton).
    assert config.max_batch_size >= load_config("lesion_ensemble").max_batch_size * max(ALLOWED_VIEWS)
    assert config.HasField("dynamic_batching")


def test_ensemble_routes_each_backbone_to_its_resolution():
    steps = {s.model_name: s for s in load_config("lesion_ensemble").ensemble_scheduling.step}
    for member in LESION_ENSEMBLE.members:
        name = member.name
        assert steps[name].input_map["pixel_values"] == member.views_tensor
        assert steps[name].output_map["logits"] == f"logits_{name}"
    fusion_inputs = [i.name for i in load_config("fusion").input if i.name.startswith("logits_")]
    assert fusion_inputs == [f"logits_{b}" for b in BACKBONE_NAMES]  # member axis order = declaration order


def test_tta_view_parameter_is_allowed_when_committed():
    assert int(load_config("tta").parameters["views"].string_value) in ALLOWED_VIEWS


def tiny_onnx(path: Path, size: int, input_name: str = "pixel_values") -> bytes:
    """A valid few-byte classifier ONNX: global average pool -> flatten -> 3x7 matmul."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7])
    cams = helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["batch", 3, size, size])  # shape aside, as served
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 7], [0.1] * 21)
    nodes = [helper.make_node("GlobalAveragePool", [input_name], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"]), helper.make_node("Identity", [input_name], ["cams"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y, cams], [w]))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path.read_bytes()


def _fake_artifacts(root: Path, sizes: dict[str, int] | None = None) -> Path:
    for b in BACKBONE_NAMES:
        tiny_onnx(root / b / "model.onnx", (sizes or {}).get(b, SIZES[b]))
    Calibration.uniform(BACKBONE_NAMES).save(root / "calibration.json")
    return root


def _checkpoint(path: Path, backbone: str, input_size: int) -> None:
    """A checkpoint payload with the fields assembly reads (format, backbone, trained size); no weights."""
    import torch

    from lesionserve.models import CHECKPOINT_FORMAT

    torch.save({"format": CHECKPOINT_FORMAT, "backbone": backbone, "config": {"input_size": input_size}}, path)


def _committed_copy(tmp_path: Path) -> Path:
    """The committed configs and code, to assemble in place without touching the real repository."""
    import shutil

    copy = tmp_path / "committed"
    shutil.copytree(DEFAULT_REPOSITORY, copy, ignore=shutil.ignore_patterns("*.onnx", "*.pt", "*.plan*", "calibration.json", "__pycache__"))
    return copy


def test_assemble_copies_repository_and_artifacts_when_out_given(tmp_path):
    artifacts = _fake_artifacts(tmp_path / "art")
    repo = assemble(artifacts, out=tmp_path / "repo", views=2)
    for b in BACKBONE_NAMES:
        assert (repo / b / "1" / "model.onnx").read_bytes() == (artifacts / b / "model.onnx").read_bytes()
    assert Calibration.load(repo / "threshold" / "1" / "calibration.json").weights == Calibration.uniform(BACKBONE_NAMES).weights
    assert load_config("tta", repo).parameters["views"].string_value == "2"
    for variant in GPU_VARIANTS:  # the GPU variants' tta serves the same T
        assert load_config("tta", repo, variant).parameters["views"].string_value == "2"
    assert load_config("tta").parameters["views"].string_value == "8"  # committed one untouched
    assert not any(repo.rglob("checkpoint.pt"))  # only gpu_torch needs them, and only when asked


def test_assemble_places_checkpoints_when_asked_and_lists_missing_ones(tmp_path):
    artifacts = _fake_artifacts(tmp_path / "art")
    with pytest.raises(AssembleError, match="resnet50/checkpoint.pt"):
        assemble(artifacts, out=tmp_path / "repo", checkpoints=True)
    for b in BACKBONE_NAMES:
        _checkpoint(artifacts / b / "checkpoint.pt", b, SIZES[b])
    (artifacts / "resnet50" / "checkpoint.pt").write_bytes(b"weights of resnet50")
    with pytest.raises(AssembleError, match="resnet50/checkpoint.pt: not a readable LesionServe checkpoint"):
        assemble(artifacts, out=tmp_path / "repo", checkpoints=True)
    _checkpoint(artifacts / "resnet50" / "checkpoint.pt", "resnet50", 224)
    repo = assemble(artifacts, out=tmp_path / "repo", checkpoints=True)
    for b in BACKBONE_NAMES:
        assert (repo / b / "1" / "checkpoint.pt").read_bytes() == (artifacts / b / "checkpoint.pt").read_bytes()


def test_assemble_lists_every_missing_artifact_when_incomplete(tmp_path):
    artifacts = _fake_artifacts(tmp_path / "art")
    (artifacts / "densenet121" / "model.onnx").unlink()
    (artifacts / "calibration.json").unlink()
    with pytest.raises(AssembleError) as info:
        assemble(artifacts, out=tmp_path / "repo")
    assert "densenet121/model.onnx" in str(info.value) and "calibration.json" in str(info.value)
    assert not (tmp_path / "repo").exists()  # nothing half-built


def test_assemble_refuses_onnx_files_the_repository_cannot_serve_listing_each(tmp_path):
    artifacts = _fake_artifacts(tmp_path / "art")
    tiny_onnx(artifacts / "resnet50" / "model.onnx", 224, input_name="input.1")
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 160, 128])  # not square
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7])
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(artifacts / "efficientnet_b3" / "model.onnx"))
    with pytest.raises(AssembleError) as info:
        assemble(artifacts, out=tmp_path / "repo")
    assert "'input.1' -> 'logits', expected 'pixel_values'" in str(info.value)
    assert "input shape ['batch', 3, 160, 128]; efficientnet_b3 must take [batch, 3, S, S]" in str(info.value)
    assert not (tmp_path / "repo").exists()


SMALL = {"resnet50": 64, "densenet121": 96, "efficientnet_b3": 64}


def test_assemble_serves_each_backbone_at_its_trained_size_when_sizes_differ_from_repository(tmp_path):
    repo = assemble(_fake_artifacts(tmp_path / "art", SMALL), out=tmp_path / "repo", views=2)
    # One tensor per distinct size: resnet50 and efficientnet_b3 share the 64 px views.
    pre = load_config("preprocess", repo)
    assert {o.name: list(o.dims) for o in pre.output} == {
        "pixel_values_64_imagenet": [3, 64, 64], "pixel_values_96_imagenet": [3, 96, 96], "error": [1], "image_size": [2]}
    tta = load_config("tta", repo)
    assert {i.name: list(i.dims) for i in tta.input} == {
        "pixel_values_64_imagenet": [-1, 3, 64, 64], "pixel_values_96_imagenet": [-1, 3, 96, 96]}
    assert [o.name for o in tta.output] == ["views_64_imagenet", "views_96_imagenet", "num_views"]
    assert tta.parameters["views"].string_value == "2"  # the view count is still applied
    steps = {s.model_name: s for s in load_config("lesion_ensemble", repo).ensemble_scheduling.step}
    assert dict(steps["preprocess"].output_map) == {
        "pixel_values_64_imagenet": "pixel_values_64_imagenet", "pixel_values_96_imagenet": "pixel_values_96_imagenet",
        "error": "error"}
    assert dict(steps["tta"].output_map) == {
        "views_64_imagenet": "views_64_imagenet", "views_96_imagenet": "views_96_imagenet", "num_views": "num_views"}
    for b, size in SMALL.items():
        assert steps[b].input_map["pixel_values"] == f"views_{size}_imagenet"
        for variant in (None, *GPU_VARIANTS):
            assert list(load_config(b, repo, variant).input[0].dims) == [3, size, size]
        ort_trt = load_config(b, repo, "gpu_ort").optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert ort_trt.parameters["trt_profile_max_shapes"] == f"pixel_values:64x3x{size}x{size}"
    for variant in GPU_VARIANTS:  # GPU variants keep their instance kind, get the same tensors
        gpu_pre = load_config("preprocess", repo, variant)
        assert [o.name for o in gpu_pre.output] == ["pixel_values_64_imagenet", "pixel_values_96_imagenet", "error", "image_size"]
        assert gpu_pre.instance_group[0].kind == gpu_pre.instance_group[0].KIND_GPU
    assert load_config("fusion", repo) == load_config("fusion")  # nothing size-dependent: untouched
    assert (repo / "fusion" / "config.pbtxt").read_text() == (DEFAULT_REPOSITORY / "fusion" / "config.pbtxt").read_text()
    assert [o.name for o in load_config("preprocess").output] == [
        "pixel_values_224_imagenet", "pixel_values_300_imagenet", "error", "image_size"]  # committed one untouched


def test_assemble_keeps_committed_configs_byte_identical_when_trained_at_native_sizes(tmp_path):
    repo = assemble(_fake_artifacts(tmp_path / "art"), out=tmp_path / "repo")
    for config in DEFAULT_REPOSITORY.glob("*/config*.pbtxt"):
        assert (repo / config.relative_to(DEFAULT_REPOSITORY)).read_text() == config.read_text()
    for config in DEFAULT_REPOSITORY.glob("*/configs/*.pbtxt"):
        assert (repo / config.relative_to(DEFAULT_REPOSITORY)).read_text() == config.read_text()


def test_assemble_refuses_in_place_naming_sizes_when_trained_size_differs_from_repository(tmp_path):
    committed = _committed_copy(tmp_path)
    before = {p: p.read_text() for p in committed.rglob("*.pbtxt")}
    with pytest.raises(AssembleError) as info:
        assemble(_fake_artifacts(tmp_path / "art", {"efficientnet_b3": 128}), committed)
    assert "efficientnet_b3 at 128 px (declared 300)" in str(info.value) and "--out DIR" in str(info.value)
    assert "resnet50" not in str(info.value)
    assert {p: p.read_text() for p in committed.rglob("*.pbtxt")} == before
    assert not any(committed.rglob("model.onnx"))


def test_assemble_refuses_checkpoint_whose_trained_size_differs_from_its_onnx_when_checkpoints_asked(tmp_path):
    artifacts = _fake_artifacts(tmp_path / "art", {b: 64 for b in BACKBONE_NAMES})
    for b in BACKBONE_NAMES:
        _checkpoint(artifacts / b / "checkpoint.pt", b, 96 if b == "densenet121" else 64)
    with pytest.raises(AssembleError, match=r"densenet121/checkpoint.pt was trained at 96 px but .*densenet121/model.onnx takes 64 px"):
        assemble(artifacts, out=tmp_path / "repo", checkpoints=True)
    assemble(artifacts, out=tmp_path / "repo")  # without checkpoints the ONNX files alone decide


def test_assemble_refuses_views_in_place_and_a_calibration_for_other_members(tmp_path):
    committed = _committed_copy(tmp_path)
    with pytest.raises(AssembleError, match=r"lesion_ensemble would serve 2 views \(declared 8\).*--out DIR"):
        assemble(_fake_artifacts(tmp_path / "art"), committed, views=2)
    artifacts = _fake_artifacts(tmp_path / "art")
    Calibration.uniform(["resnet50", "vgg16"]).save(artifacts / "calibration.json")
    with pytest.raises(AssembleError, match=r"weights are for \['resnet50', 'vgg16'\], the pipeline's members are"):
        assemble(artifacts, out=tmp_path / "repo")
    with pytest.raises(ValueError, match="views must be one of"):
        assemble(_fake_artifacts(tmp_path / "art"), out=tmp_path / "repo", views=3)


def test_assemble_in_place_fills_the_committed_repository_without_changing_a_config(tmp_path):
    committed = _committed_copy(tmp_path)
    before = {p: p.read_text() for p in committed.rglob("*.pbtxt")}
    assemble(_fake_artifacts(tmp_path / "art"), committed)
    assert {p: p.read_text() for p in committed.rglob("*.pbtxt")} == before
    assert all((committed / b / "1" / "model.onnx").is_file() for b in BACKBONE_NAMES)


def test_weights_file_names_model_path_and_remedy_when_missing(tmp_path):
    from lesionserve.triton_config import weights_file

    args = {"model_repository": str(tmp_path / "resnet50"), "model_version": "1"}
    config = {"name": "resnet50", "parameters": {}}
    with pytest.raises(FileNotFoundError, match=r"model 'resnet50': .*resnet50/1/model.onnx not found; run X"):
        weights_file(args, config, "onnx_file", "model.onnx", "run X")
    (tmp_path / "resnet50" / "1").mkdir(parents=True)
    (tmp_path / "resnet50" / "1" / "model.onnx").write_bytes(b"x")
    assert weights_file(args, config, "onnx_file", "model.onnx", "run X").name == "model.onnx"


def test_assemble_refuses_an_onnx_file_trained_with_other_statistics_than_declared(tmp_path):
    from lesionserve.architectures import INCEPTION
    from lesionserve.export.checks import NORMALIZATION_KEY

    artifacts = _fake_artifacts(tmp_path / "art")
    model = onnx.load(str(artifacts / "densenet121" / "model.onnx"))
    onnx.helper.set_model_props(model, {NORMALIZATION_KEY: INCEPTION.to_parameter()})
    onnx.save(model, str(artifacts / "densenet121" / "model.onnx"))
    with pytest.raises(AssembleError, match=r"densenet121/model.onnx was trained with normalisation 'mean=0.5,0.5,0.5;.*"
                                            r"densenet121 \(densenet121\) is declared with imagenet"):
        assemble(artifacts, out=tmp_path / "repo")


def test_assemble_out_replaces_only_a_generated_repository_and_never_the_committed_one(tmp_path, capsys):
    from lesionserve.export.assemble import main

    artifacts = _fake_artifacts(tmp_path / "art")
    precious = tmp_path / "home"
    (precious / "notes").mkdir(parents=True)
    with pytest.raises(AssembleError, match="exists and is not a model repository"):
        assemble(artifacts, out=precious)
    assert (precious / "notes").is_dir()
    with pytest.raises(AssembleError, match="is the committed repository"):
        assemble(artifacts, out=DEFAULT_REPOSITORY)
    assemble(artifacts, out=tmp_path / "repo")
    assemble(artifacts, out=tmp_path / "repo", views=1)  # a generated one is replaced
    assert load_config("tta", tmp_path / "repo").parameters["views"].string_value == "1"
    assert main(["--artifacts", str(artifacts), "--out", str(precious)]) == 2
    assert capsys.readouterr().err.startswith("error: --out")
