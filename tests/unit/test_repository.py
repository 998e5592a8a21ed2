"""The committed model repository is exactly what the pipeline declarations generate."""
from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lesionserve.architectures import (
    ARCHITECTURES, INCEPTION, Architecture, Normalization, get_architecture, register_architecture, registered,
)
from lesionserve.pipelines import LESION_ENSEMBLE, PIPELINES, EnsemblePipeline, Member
from lesionserve.repository import (
    DEFAULT_REPOSITORY, VARIANTS, check_repository, main, render_pipeline, render_repository, write_repository,
)


def test_committed_repository_equals_a_regeneration_from_the_declarations():
    problems = check_repository(DEFAULT_REPOSITORY)
    assert problems == [], "regenerate with `lesionserve repository`:\n" + "\n".join(problems)


def test_check_names_each_edited_missing_and_stale_file(tmp_path):
    write_repository(tmp_path)
    assert check_repository(tmp_path) == []
    (tmp_path / "tta" / "config.pbtxt").write_text((tmp_path / "tta" / "config.pbtxt").read_text().replace('"8"', '"4"'))
    (tmp_path / "fusion" / "configs" / "gpu.pbtxt").unlink()
    (tmp_path / "old_model" / "configs").mkdir(parents=True)
    (tmp_path / "old_model" / "config.pbtxt").write_text('name: "old_model"\n')
    assert sorted(check_repository(tmp_path)) == [
        "differs: tta/config.pbtxt", "missing: fusion/configs/gpu.pbtxt", "not declared: old_model/config.pbtxt"]
    assert main(["--out", str(tmp_path), "--check"]) == 1
    write_repository(tmp_path)  # regeneration repairs it, and leaves assembly's files alone
    assert check_repository(tmp_path) == [] and not (tmp_path / "old_model").exists()


def test_regeneration_keeps_assembled_weights_and_calibration(tmp_path):
    write_repository(tmp_path)
    (tmp_path / "resnet50" / "1" / "model.onnx").write_bytes(b"onnx")
    write_repository(tmp_path)
    assert (tmp_path / "resnet50" / "1" / "model.onnx").read_bytes() == b"onnx"


@pytest.mark.parametrize("path,text", sorted(render_repository().items()))
def test_every_generated_config_parses_with_tritons_schema_and_names_its_folder(path, text):
    if not path.endswith(".pbtxt"):
        return
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == path.split("/")[0]
    assert text.startswith("#")  # each file says what it is


def test_gpu_step_variants_differ_from_cpu_only_in_device_and_input_placement():
    files = render_repository()
    for step in ("preprocess", "tta", "fusion", "threshold"):
        cpu = text_format.Parse(files[f"{step}/config.pbtxt"], model_config_pb2.ModelConfig())
        for variant in VARIANTS[1:]:
            gpu = text_format.Parse(files[f"{step}/configs/{variant}.pbtxt"], model_config_pb2.ModelConfig())
            assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            assert gpu.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
            del gpu.instance_group[:], cpu.instance_group[:]
            gpu.parameters.pop("FORCE_CPU_ONLY_INPUT_TENSORS")
            assert gpu == cpu, (step, variant)


def test_views_come_from_the_declaration_not_from_editing_configs(tmp_path):
    write_repository(tmp_path, [LESION_ENSEMBLE.with_views(2)])
    tta = text_format.Parse((tmp_path / "tta" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert tta.parameters["views"].string_value == "2"
    assert check_repository(tmp_path, [LESION_ENSEMBLE.with_views(2)]) == []
    assert main(["--out", str(DEFAULT_REPOSITORY), "--views", "2"]) == 2  # the committed folder stays as declared


def test_input_size_change_retypes_every_tensor_and_route(tmp_path):
    small = LESION_ENSEMBLE.with_input_sizes({"efficientnet_b3": 128})
    files = render_pipeline(small)
    ensemble = text_format.Parse(files["lesion_ensemble/config.pbtxt"], model_config_pb2.ModelConfig())
    routes = {s.model_name: dict(s.input_map) for s in ensemble.ensemble_scheduling.step}
    assert routes["efficientnet_b3"] == {"pixel_values": "views_128_imagenet"}
    assert routes["resnet50"] == {"pixel_values": "views_224_imagenet"}
    member = text_format.Parse(files["efficientnet_b3/configs/gpu_ort.pbtxt"], model_config_pb2.ModelConfig())
    assert list(member.input[0].dims) == [3, 128, 128]
    params = member.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    assert params["trt_profile_max_shapes"] == "pixel_values:64x3x128x128"


def test_members_with_other_normalisation_get_their_own_tensor_and_parameter():
    with registered(Architecture("test_r18_incep", "timm_classifier", "resnet18", 224, INCEPTION)) as (arch,):
        p = EnsemblePipeline("two_norms", (Member("a_r50", "resnet50"), Member("b_r18", arch.name)))
        text = render_pipeline(p)["two_norms_preprocess/config.pbtxt"]
    assert "test_r18_incep" not in ARCHITECTURES  # registered for the block only
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [o.name for o in config.output] == ["pixel_values_224_imagenet", "pixel_values_224_inception", "error", "image_size"]
    value = config.parameters["normalize_pixel_values_224_inception"].string_value
    assert Normalization.from_parameter("inception", value) == INCEPTION


def test_two_pipelines_may_not_declare_one_model():
    clash = dataclasses.replace(LESION_ENSEMBLE, name="other", step_prefix="other_")
    with pytest.raises(ValueError, match="'resnet50' is declared by pipelines 'lesion_ensemble' and 'other'"):
        render_repository([LESION_ENSEMBLE, clash])


def test_pipeline_declaration_refuses_bad_fields_naming_each():
    with pytest.raises(ValueError) as info:
        EnsemblePipeline("bad", (Member("x", "resnet50"), Member("x", "no_such_arch")), views=3, fusion="max")
    message = str(info.value)
    for part in ("member names repeat", "views must be one of", "fusion 'max'", "unknown architecture 'no_such_arch'"):
        assert part in message


def test_architecture_registry_refuses_a_conflicting_redeclaration():
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(Architecture("resnet50", "timm_classifier", "resnet50", 256))
    assert get_architecture("resnet50").input_size == 224


def test_committed_pipelines_are_the_seed_ensemble():
    assert list(PIPELINES) == ["lesion_ensemble"]
    assert LESION_ENSEMBLE.input_sizes == {"resnet50": 224, "densenet121": 224, "efficientnet_b3": 300}


def test_one_tensor_name_must_mean_one_input_and_statistics_are_hashable_tuples():
    with registered(
        Architecture("test_r18_a", "timm_classifier", "resnet18", 224, Normalization("same", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])),
        Architecture("test_r18_b", "timm_classifier", "resnet18", 224, Normalization("same", (0.4, 0.4, 0.4), (0.5, 0.5, 0.5))),
    ) as (a, b):
        assert a.normalization.mean == (0.5, 0.5, 0.5) and hash(a.normalization)
        with pytest.raises(ValueError, match="normalisation name 'same' stands for two statistics at 224 px"):
            EnsemblePipeline("clash", (Member("a", a.name), Member("b", b.name)))
