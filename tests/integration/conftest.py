"""Session fixtures: exported artifacts, and real tritonserver processes on free loopback ports.

The backbones are randomly initialised (seeded) with their classifier heads rescaled so that the
probabilities are far from uniform: parity is then a meaningful check, and no training is needed
(export.random_artifacts). ``artifacts`` are at the native sizes (224/224/300); ``small_artifacts``
are "trained" at 64 px and so served at 64 px, ~10x cheaper per view: the fault, soak and TLS
tests use them, where what matters is the serving machinery, not the resolution.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lesionserve.export.assemble import assemble
from lesionserve.export.random_artifacts import build_random_artifacts
from lesionserve.calibration import Calibration
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.reference import ReferencePipeline
from lesionserve.server import TritonServer
from lesionserve.spec import CLASS_NAMES
from lesionserve.synthetic import render_lesion

#: Fixed thresholds low enough that they fire on some test images, so the decision path is exercised.
TEST_CALIBRATION = Calibration(
    weights={"resnet50": 0.4, "densenet121": 0.35, "efficientnet_b3": 0.25},
    thresholds={"AKIEC": 0.16, "MEL": 0.18},
    threshold_order=("AKIEC", "MEL"),
    meta={"source": "integration-test fixture"},
)
#: The python-backend models of the seed pipeline (one stub each): its steps and members, not its ensembles.
PYTHON_MODELS = tuple(m for m in LESION_ENSEMBLE.model_names if m not in (LESION_ENSEMBLE.name, LESION_ENSEMBLE.explain_name))
#: Side length the small artifacts are trained and served at.
SMALL_INPUT_SIZE = 64


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    return build_random_artifacts(tmp_path_factory.mktemp("artifacts"), TEST_CALIBRATION)


@pytest.fixture(scope="session")
def small_artifacts(tmp_path_factory) -> Path:
    return build_random_artifacts(tmp_path_factory.mktemp("artifacts64"), TEST_CALIBRATION, input_size=SMALL_INPUT_SIZE)


@pytest.fixture(scope="session")
def segmenter(tmp_path_factory) -> Path:
    """A segmenter trained for a few steps at 64 px on synthetic lesions, exported (its folder)."""
    from lesionserve.export.segmenter_export import export_segmenter
    from lesionserve.segmentation.train import train_segmenter
    from lesionserve.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("segserve")
    data = generate_dataset(root / "data", size=(160, 120), seed=3, class_counts={c: 3 for c in CLASS_NAMES},
                            repeat_fraction=0.0, progress=False)
    out = root / "seg" / "segmenter"
    train_segmenter({"data": str(data.root), "out": str(out), "sizes": [64], "frozen_epochs": 0, "unfrozen_epochs": 2,
                     "batch_size": 4, "max_steps_per_epoch": 4, "threads": 2})
    export_segmenter(out / "checkpoint.pt", out / "model.onnx")
    return out


@pytest.fixture(scope="session")
def small_repository(small_artifacts, tmp_path_factory) -> Path:
    """The committed repository with the 64 px artifacts, T=1 (configs rewritten for 64 px)."""
    return assemble(small_artifacts, out=tmp_path_factory.mktemp("repo64") / "model_repository", views=1)


@pytest.fixture(scope="session")
def server_small(small_repository):
    server = TritonServer(small_repository, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=180).start()
    yield server
    server.stop()


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


@pytest.fixture(scope="session")
def vit_artifacts(tmp_path_factory) -> Path:
    """A two-head DeiT-Tiny trained for two epochs at 64 px on synthetic lesions (ham10000: melanoma
    vs rest, ph2: the synthetic PH2 stand-ins), evaluated (thresholds.json) and exported: the folder
    ``assemble --melanoma`` takes, plus ``checkpoint.pt`` for the reference."""
    import shutil

    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.data import load_dataset
    from lesionserve.vit.data import write_synthetic_ph2
    from lesionserve.vit.evaluate import evaluate_checkpoint
    from lesionserve.vit.export import export_vit
    from lesionserve.vit.train import load_recipe, train_vit

    root = tmp_path_factory.mktemp("vitserve")
    data = generate_dataset(root / "data", size=(160, 120), seed=5, class_counts={c: 6 for c in CLASS_NAMES},
                            repeat_fraction=0.0, progress=False)
    ph2_data = generate_dataset(root / "ph2_data", size=(160, 120), seed=6, class_counts={"MEL": 6, "NV": 6, "BKL": 6},
                                repeat_fraction=0.0, progress=False)  # its own images: the heads share the backbone
    ph2 = write_synthetic_ph2(load_dataset(ph2_data.root), root / "ph2.csv")
    config = load_recipe(overrides={"timm_name": "deit_tiny_patch16_224", "input_size": 64, "epochs": 2, "head_only_epochs": 1,
                                    "unfreeze_per_epoch": 16, "val_fraction": 0.25, "test_fraction": 0.25})
    checkpoint = train_vit(config, {"ham10000": str(data.root), "ph2": str(ph2)}, root / "run", progress=False)
    out = root / "artifacts"
    evaluate_checkpoint(checkpoint, root / "run" / "splits.json", out, n_boot=50, progress=False)
    export_vit(checkpoint, out / "model.onnx")
    shutil.copyfile(checkpoint, out / "checkpoint.pt")
    return out
