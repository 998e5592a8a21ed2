"""Closed-form Grad-CAM and Grad-CAM++ against pytorch-grad-cam's gradients, and in the exported graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lesionserve.architectures import get_architecture
from lesionserve.explain import CAM_METHODS, CAMS_OUTPUT, cam_maps, explained, scale_map, upsample_map
from lesionserve.export.random_artifacts import spread_head
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.preprocessing import preprocess_rgb
from lesionserve.synthetic import render_lesion

pytest.importorskip("pytorch_grad_cam", reason="grad-cam (pytorch-grad-cam) is installed by make setup")
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

#: The oracle's tolerance on maps scaled to [0, 1] (issue: within 1e-3).
MAP_ATOL = 1e-3
SIZE = 96  # small inputs: the closed form does not depend on the size, and CPU time does


def _module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


@pytest.fixture(scope="module", params=["resnet50", "densenet121", "efficientnet_b3"])
def backbone(request):
    torch.manual_seed(0)
    model = create_backbone(request.param)
    spread_head(model, SIZE)  # probabilities far from uniform, as trained models give
    return request.param, model.eval()


def _images(sizes=((600, 450), (320, 240))) -> np.ndarray:
    rng = np.random.default_rng(5)
    return np.stack([preprocess_rgb(render_lesion(label, rng, size), SIZE)
                     for label, size in zip(("MEL", "NV"), sizes)])


@pytest.mark.parametrize("method", CAM_METHODS)
def test_closed_form_equals_pytorch_grad_cam_within_1e3_for_each_class(backbone, method):
    name, model = backbone
    x = torch.from_numpy(_images())
    layer = _module(model, get_architecture(name).cam_layer)
    library = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}[method]
    with torch.no_grad():
        _, cams = explained(model)(x)
    worst = 0.0
    with library(model=model, target_layers=[layer]) as cam:
        for c in (0, 1, 6):
            want = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x))
            for i in range(len(x)):
                got = upsample_map(cams[i, CAM_METHODS.index(method), c].numpy(), SIZE, SIZE)
                worst = max(worst, float(np.abs(got - want[i]).max()))
    print(f"{name} {method}: max |closed form - pytorch-grad-cam| = {worst:.2e}")
    assert worst <= MAP_ATOL


def test_explained_model_keeps_the_logits_bit_for_bit(backbone):
    _, model = backbone
    x = torch.from_numpy(_images())
    with torch.no_grad():
        logits, cams = explained(model)(x)
        assert torch.equal(logits, model(x))
    assert cams.shape[:3] == (2, len(CAM_METHODS), 7) and bool((cams >= 0).all())


def test_grad_cam_is_the_classifier_weighted_feature_map():
    features = torch.rand(1, 3, 2, 2)
    weight = torch.tensor([[1.0, -2.0, 0.5]])
    expected = torch.relu((weight[0, :, None, None] * features[0]).sum(0)) / 4
    torch.testing.assert_close(cam_maps(features, weight)[0, 0, 0], expected)


def test_scale_map_is_finite_on_a_flat_map():
    assert scale_map(np.zeros((3, 3), np.float32)).max() == 0.0


def test_export_with_explain_checks_the_maps_and_keeps_logits_first(tmp_path):
    import onnx

    from lesionserve.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = create_backbone("resnet50")
    save_checkpoint(tmp_path / "c.pt", "resnet50", model, {"config": {"input_size": 64}})
    report = export_onnx(tmp_path / "c.pt", tmp_path / "m.onnx", explain=True)
    outputs = [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output]
    assert outputs == ["logits", CAMS_OUTPUT]
    assert report.cams_max_rel_diff is not None and report.cams_max_rel_diff <= 1e-4
    plain = export_onnx(tmp_path / "c.pt", tmp_path / "plain.onnx", explain=False)
    assert plain.cams_max_rel_diff is None
    assert [o.name for o in onnx.load(str(tmp_path / "plain.onnx")).graph.output] == ["logits"]


@pytest.fixture(scope="module")
def small_ensemble(tmp_path_factory):
    from lesionserve.export.random_artifacts import build_random_artifacts
    from lesionserve.calibration import Calibration

    calibration = Calibration(weights={"resnet50": 0.5, "densenet121": 0.3, "efficientnet_b3": 0.2})
    return build_random_artifacts(tmp_path_factory.mktemp("cam64"), calibration, input_size=64)


@pytest.mark.parametrize("views", [1, 8])
@pytest.mark.parametrize("method", CAM_METHODS)
def test_fused_and_member_maps_equal_pytorch_grad_cam_within_1e3_at_t1_and_t8(small_ensemble, views, method):
    import cv2

    from lesionserve.reference import ReferencePipeline, explain

    rng = np.random.default_rng(9)
    sizes = [(600, 450), (257, 311), (128, 128)]  # widths x heights: landscape, odd portrait, square
    blobs = [cv2.imencode(".png", cv2.cvtColor(render_lesion(c, rng, s), cv2.COLOR_RGB2BGR))[1].tobytes()
             for c, s in zip(("MEL", "BCC", "NV"), sizes)]
    reference = ReferencePipeline.from_artifacts(small_ensemble, views=views)
    _, served = explain(reference, blobs, method, classes=[None, "VASC", None])
    _, oracle = explain(reference, blobs, method, classes=[None, "VASC", None], oracle=True)
    assert served.classes[1] == "VASC" and [m.shape for m in served.maps] == [(h, w) for w, h in sizes]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(served.maps, oracle.maps))
    for a, b in zip(served.member_maps, oracle.member_maps):
        worst = max(worst, *(float(np.abs(a[k] - b[k]).max()) for k in a))
    print(f"T={views} {method}: max |closed form - pytorch-grad-cam| over fused and member maps = {worst:.2e}")
    assert worst <= MAP_ATOL
    assert all(0.0 <= float(m.min()) and float(m.max()) <= 1.0 for m in served.maps)


def test_explaining_an_unknown_class_names_the_classes(small_ensemble):
    from lesionserve.reference import ReferencePipeline, explain

    rng = np.random.default_rng(1)
    import cv2

    blob = cv2.imencode(".png", render_lesion("MEL", rng, (100, 80)))[1].tobytes()
    with pytest.raises(ValueError, match=r"cannot explain unknown class 'melanoma'; classes: MEL, NV, BCC"):
        explain(ReferencePipeline.from_artifacts(small_ensemble, views=1), [blob], classes=["melanoma"])


def test_overlay_keeps_the_image_size_colours_the_hot_region_and_labels_the_corner():
    from lesionserve.explain import overlay

    rgb = np.full((120, 160, 3), 128, np.uint8)
    heat = np.zeros((120, 160), np.float32)
    heat[60:, 80:] = 1.0
    out = overlay(rgb, heat, "MEL", 0.87)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert out[100, 140, 0] > out[100, 140, 2]  # hot: red over blue
    assert tuple(out[1, 1]) == (0, 0, 0) and out[:20, :60].max() > 200  # black box, white (anti-aliased) text
    assert tuple(out[100, 20]) == (70, 70, 128)  # cold: grey 128 blended with JET's darkest blue (0, 0, 128)
    with pytest.raises(ValueError, match="heatmap is 10x10, the image 160x120"):
        overlay(rgb, np.zeros((10, 10), np.float32), "MEL", 0.5)


def test_explain_command_writes_overlays_and_a_grid_for_the_ensemble_and_for_one_checkpoint(small_ensemble, tmp_path, capsys):
    import cv2

    from lesionserve.cli import main

    rng = np.random.default_rng(2)
    paths = []
    for i, size in enumerate([(200, 150), (90, 120)]):
        path = tmp_path / f"lesion{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(render_lesion("MEL", rng, size), cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    assert main(["explain", "--artifacts", str(small_ensemble), "--views", "2", *paths, "--out", str(tmp_path / "e")]) == 0
    for i, (w, h) in enumerate([(200, 150), (90, 120)]):
        for method in CAM_METHODS:
            assert cv2.imread(str(tmp_path / "e" / f"lesion{i}_{method}.png")).shape == (h, w, 3)
    assert cv2.imread(str(tmp_path / "e" / "grid.png")) is not None
    assert main(["explain", "--checkpoint", str(small_ensemble / "densenet121" / "checkpoint.pt"), paths[0],
                 "--class", "NV", "--oracle", "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "lesion0_gradcampp.png").is_file()
    assert main(["explain", "--artifacts", str(small_ensemble), paths[0], "--class", "mole", "--out", str(tmp_path / "x")]) == 2
    assert "cannot explain unknown class 'mole'" in capsys.readouterr().err
