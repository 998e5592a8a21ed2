"""Session fixtures: exported artifacts, and real tritonserver processes on free loopback ports.

The backbones are randomly initialised (seeded) with their classifier heads rescaled so that the
probabilities are far from uniform: parity is then a meaningful check, and no training is needed.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from export.assemble import assemble
from export.onnx_export import export_onnx
from lesionserve.calibration import Calibration
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.reference import ReferencePipeline
from lesionserve.server import TritonServer
from lesionserve.spec import BACKBONE_NAMES, CLASS_NAMES
from training.synthetic import render_lesion

#: Fixed thresholds low enough that they fire on some test images, so the decision path is exercised.
TEST_CALIBRATION = Calibration(
    weights={"resnet50": 0.4, "densenet121": 0.35, "efficientnet_b3": 0.25},
    thresholds={"AKIEC": 0.16, "MEL": 0.18},
    threshold_order=("AKIEC", "MEL"),
    meta={"source": "integration-test fixture"},
)


def _spread_head(model: torch.nn.Module, size: int, target_std: float = 2.0) -> None:
    """Rescale the classifier so logits on image-like input have std ~target_std."""
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        std = model.eval()(x).std().item()
        head = model.get_classifier()
        head.weight.mul_(target_std / max(std, 1e-6))
        head.bias.normal_(0, 0.5)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    for name in BACKBONE_NAMES:
        model = create_backbone(name)
        _spread_head(model, 224 if name != "efficientnet_b3" else 300)
        save_checkpoint(root / name / "checkpoint.pt", name, model)
        export_onnx(root / name / "checkpoint.pt", root / name / "model.onnx")
    TEST_CALIBRATION.save(root / "calibration.json")
    return root


def _start(artifacts: Path, tmp_path_factory, views: int):
    repo = assemble(artifacts, out=tmp_path_factory.mktemp(f"repo_t{views}") / "model_repository", views=views)
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180)
    return server.start()


@pytest.fixture(scope="session")
def server_t8(artifacts, tmp_path_factory):
    server = _start(artifacts, tmp_path_factory, views=8)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_t1(artifacts, tmp_path_factory):
    server = _start(artifacts, tmp_path_factory, views=1)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_t8(artifacts) -> ReferencePipeline:
    return ReferencePipeline.from_artifacts(artifacts, views=8)


@pytest.fixture(scope="session")
def reference_t1(artifacts) -> ReferencePipeline:
    return ReferencePipeline.from_artifacts(artifacts, views=1)


def _encode(rgb: np.ndarray, ext: str, mode: str = "rgb") -> bytes:
    if mode == "gray":
        array = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif mode == "rgba":
        array = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
        array[..., 3] = 128
    else:
        array = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session")
def varied_images() -> dict[str, bytes]:
    """Synthetic lesions in several sizes and formats, named by what they exercise."""
    rng = np.random.default_rng(7)
    lesion = lambda label, w, h: render_lesion(label, rng, (w, h))  # noqa: E731
    return {
        "jpeg_600x450": _encode(lesion("MEL", 600, 450), ".jpg"),
        "png_320x240": _encode(lesion("NV", 320, 240), ".png"),
        "gray_jpeg_500x375": _encode(lesion("BCC", 500, 375), ".jpg", "gray"),
        "rgba_png_256x256": _encode(lesion("AKIEC", 256, 256), ".png", "rgba"),
        "jpeg_1024x768": _encode(lesion("VASC", 1024, 768), ".jpg"),
        "bmp_160x120": _encode(lesion("DF", 160, 120), ".bmp"),
    }


@pytest.fixture(scope="session")
def many_images() -> list[bytes]:
    """19 distinct small JPEGs: spans three requests of at most 8 images."""
    rng = np.random.default_rng(11)
    return [_encode(render_lesion(CLASS_NAMES[i % 7], rng, (200, 150)), ".jpg") for i in range(19)]
