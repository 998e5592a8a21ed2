"""ultralytics offline: a one-epoch tiny training and an export with every outbound connection made
to fail; the served path never imports ultralytics (AGPL-3.0, a training extra)."""
from __future__ import annotations

import importlib.util

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Not importorskip: importing ultralytics at collection would patch PIL.Image.open for the whole session.
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics is not installed (make setup installs it)", allow_module_level=True)


@pytest.fixture()
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:2] or args[:1])
        raise OSError("outbound connections are disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_one_epoch_training_and_export_run_with_every_connection_refused(tmp_path, no_network):
    from lesionserve.detection.dataset import write_dataset
    from lesionserve.detection.export import export_detector
    from lesionserve.detection.train import train_detector
    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.data import load_dataset
    from lesionserve.training.masks import load_mask_index

    data = generate_dataset(tmp_path / "data", size=(160, 120), seed=0, class_counts={c: 2 for c in
                            ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")}, repeat_fraction=0.0, progress=False)
    samples = load_dataset(data.root)
    write_dataset({"train": samples[:10], "val": samples[10:]}, tmp_path / "det", "masks",
                  load_mask_index(data.root / "masks.csv"), progress=False)
    best = train_detector(tmp_path / "det" / "data.yaml", tmp_path / "run",
                          {"model": "yolo11n.yaml", "epochs": 1, "imgsz": 64, "batch": 4})
    assert best.is_file() and (tmp_path / "run" / "train" / "results.csv").is_file()
    report = export_detector(best, tmp_path / "model.onnx", imgsz=64)
    print(f"offline: trained 1 epoch and exported; max |ORT - PyTorch| {report.max_abs_diff:.2e}; "
          f"{len(no_network)} connection attempt(s) refused")
    assert Path(report.onnx_path).is_file() and report.max_abs_diff <= 1e-3


def test_letterbox_equals_ultralytics_letterbox_pixel_for_pixel(tmp_path):
    from lesionserve.detection.train import offline_environment

    offline_environment(tmp_path / "ultralytics")  # imports ultralytics the project's way
    from ultralytics.data.augment import LetterBox

    from lesionserve.detection.preprocess import letterbox, unletterbox

    rng = np.random.default_rng(0)
    for height, width, size in ((450, 600, 640), (333, 217, 320), (64, 64, 64), (1000, 300, 640)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        want = LetterBox(new_shape=(size, size), auto=False, scale_fill=False, scaleup=True, center=True)(image=image)
        got, scale, pad = letterbox(image, size)
        assert np.array_equal((got.transpose(1, 2, 0) * 255).round().astype(np.uint8), want)
        back = unletterbox(np.array([[pad[0], pad[1], size - pad[0], size - pad[1]]]), scale, pad, width, height)
        np.testing.assert_allclose(back[0], [0, 0, width, height], atol=1.0)


def test_the_served_path_never_imports_ultralytics():
    """Repository generation, assembly, preprocessing, the detector's boxes, dataset writer and
    letterbox, and the SDK: none of them may pull the AGPL package in."""
    modules = ("lesionserve.repository", "lesionserve.export.assemble", "lesionserve.preprocessing",
               "lesionserve.detection.preprocess", "lesionserve.detection.boxes", "lesionserve.detection.dataset",
               "lesionserve_client")
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('ultralytics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_detect_evaluate_scores_label_sets_side_by_side_with_the_seed(tmp_path, no_network):
    """Trains nothing new: the weights of a one-epoch run, scored against two label sets of one split."""
    from lesionserve.detection.dataset import write_dataset
    from lesionserve.detection.evaluate import evaluate, markdown
    from lesionserve.detection.train import train_detector
    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.data import load_dataset
    from lesionserve.training.masks import load_mask_index

    data = generate_dataset(tmp_path / "data", size=(160, 120), seed=1, class_counts={c: 2 for c in ("MEL", "NV", "BCC")},
                            repeat_fraction=0.0, progress=False)
    samples, index = load_dataset(data.root), load_mask_index(data.root / "masks.csv")
    sets = {}
    for source in ("masks", "saliency"):
        write_dataset({"train": samples[:4], "val": samples[4:]}, tmp_path / source, source, index, progress=False)
        sets[source] = tmp_path / source / "data.yaml"
    best = train_detector(sets["masks"], tmp_path / "run", {"model": "yolo11n.yaml", "epochs": 1, "imgsz": 64, "batch": 2})
    report = evaluate(best, sets, "val", tmp_path / "eval")
    assert report["imgsz"] == 64 and set(report["label_sets"]) == {"masks", "saliency"}
    for scores in report["label_sets"].values():
        assert 0.0 <= scores["map50_95"] <= scores["map50"] <= 1.0
    table = markdown(report)
    assert "| mAP@0.5 |" in table and "0.603" in table and (tmp_path / "eval" / "detector_eval.json").is_file()

    # The same weights' maps against the lesions' masks: Grad-CAM++ offline, the served EigenCAM.
    from lesionserve.detection.export import export_detector
    from lesionserve.detection.map_report import main as maps_main

    export_detector(best, tmp_path / "export" / "model.onnx", imgsz=64)
    assert maps_main(["--weights", str(best), "--onnx", str(tmp_path / "export" / "model.onnx"), "--data", str(tmp_path / "masks"),
                      "--split", "val", "--masks", str(data.root / "masks.csv"), "--images", "2", "--out", str(tmp_path / "maps")]) == 0
    maps = json.loads((tmp_path / "maps" / "detector_maps.json").read_text())
    assert maps["images"] == 2 and all(0.0 <= maps[k]["maps"]["mass"] <= 1.0 for k in ("gradcampp", "eigencam"))


def test_importing_ultralytics_the_projects_way_leaves_image_decoding_alone(tmp_path):
    """ultralytics patches PIL.Image.open at import (it then tries pi-heif on unknown files); the
    project undoes it, so a bad image still gets the project's own message."""
    from PIL import Image

    from lesionserve.detection.train import offline_environment
    from lesionserve.preprocessing import ImageDecodeError, decode_image

    offline_environment(tmp_path / "ultralytics")
    assert Image.open.__module__.startswith("PIL")
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG, BMP, TIFF, WebP file"):
        decode_image(b"not an image at all" * 20)
