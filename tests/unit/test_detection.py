"""The detector's boxes without ultralytics: seed 000's saliency rule, mask boxes, conversions, the report."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lesionserve.detection.boxes import (FALLBACK_YOLO, box_iou, from_yolo, mask_box, saliency_box, saliency_mask,
                                         to_yolo)
from lesionserve.synthetic import render_lesion_with_mask


def _skin(width: int = 200, height: int = 150) -> np.ndarray:
    """Pale, barely saturated skin: nothing the rule calls lesion."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:] = (222, 190, 170)
    return rgb


def test_saliency_box_finds_a_dark_blob_and_pads_it_by_8_percent():
    rgb = _skin()
    cv2.circle(rgb, (100, 75), 30, (60, 30, 20), -1)  # dark (V < 80): lesion whatever the saturation
    found = saliency_box(rgb)
    assert not found.fell_back
    # The disc spans 70..130 x 45..105 (61 px): the box holds it with about 0.08 * 61 = 4.9 px on each side.
    x0, y0, x1, y1 = found.box
    margins = (70 - x0, 45 - y0, x1 - 131, y1 - 106)
    assert all(3 <= m <= 7 for m in margins), margins
    assert saliency_mask(rgb)[75, 100] and not saliency_mask(rgb)[5, 5]


@pytest.mark.parametrize("radius", [3, 200])  # < 1 % of the image, and > 95 % of it
def test_saliency_box_falls_back_to_the_centred_box_when_the_contour_is_not_trusted(radius):
    rgb = _skin()
    cv2.circle(rgb, (100, 75), radius, (60, 30, 20), -1)
    found = saliency_box(rgb)
    assert found.fell_back and found.box == from_yolo(*FALLBACK_YOLO, 200, 150)
    assert np.allclose(found.box, (30, 22.5, 170, 127.5), atol=1)  # 70% of each side, centred


def test_saliency_box_falls_back_on_plain_skin():
    assert saliency_box(_skin()).fell_back


def test_yolo_conversion_round_trips_and_iou_is_the_overlap():
    box = (20, 10, 120, 90)
    assert from_yolo(*to_yolo(box, 200, 100), 200, 100) == box
    assert to_yolo(box, 200, 100) == (0.35, 0.5, 0.5, 0.8)
    assert box_iou(box, box) == 1.0 and box_iou(box, (120, 10, 130, 90)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_mask_box_is_the_largest_component_filled_and_none_when_empty():
    mask = np.zeros((50, 60), bool)
    mask[10:30, 5:25] = True
    mask[15:20, 10:15] = False  # a hole: filled, so the box is unchanged
    mask[40:42, 50:52] = True  # a speck: not the lesion
    assert mask_box(mask) == (5, 10, 25, 30)
    assert mask_box(np.zeros((5, 5), bool)) is None


def test_saliency_boxes_overlap_synthetic_lesions_that_know_their_masks():
    rng = np.random.default_rng(0)
    ious = []
    for label in ("MEL", "NV", "BCC", "BKL"):
        rgb, mask = render_lesion_with_mask(label, rng, (240, 180))
        ious.append(box_iou(saliency_box(rgb).box, mask_box(mask)))
    assert np.mean(ious) > 0.5, ious


def test_detect_boxes_reports_per_class_and_counts_images_without_masks(tmp_path, capsys):
    from lesionserve.detection.box_report import main
    from lesionserve.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", size=(160, 120), seed=2, class_counts={c: 2 for c in ("MEL", "NV", "DF")},
                            repeat_fraction=0.0, progress=False)
    rows = (data.root / "masks.csv").read_text().splitlines()
    partial = data.root / "masks_partial.csv"  # beside the original: its paths are relative to the folder
    partial.write_text("\n".join(rows[:-1]) + "\n")  # one image loses its mask
    assert main(["--data", str(data.root), "--masks", str(partial), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r" / "box_iou.json").read_text())
    assert report["summary"]["all"]["images"] == 5 and report["skipped"] == 1
    assert set(report["summary"]) <= {"MEL", "NV", "DF", "all"}
    out = capsys.readouterr().out
    assert (tmp_path / "r" / "box_iou.png").stat().st_size > 0 and "1 image(s) without a mask were skipped" in out


def test_repeat_factors_are_capped_inverse_frequency():
    from lesionserve.detection.dataset import repeat_factors

    assert repeat_factors({0: 100, 1: 10, 2: 1, 3: 40}, cap=5) == {0: 1, 1: 5, 2: 5, 3: 2}
    with pytest.raises(ValueError, match="repeat cap must be >= 1"):
        repeat_factors({0: 1}, cap=0)


@pytest.mark.parametrize("source", ["masks", "saliency"])
def test_dataset_writer_writes_the_ultralytics_layout_with_repeated_rare_classes(tmp_path, source):
    from lesionserve.detection.dataset import write_dataset
    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.data import load_dataset
    from lesionserve.training.masks import load_mask_index

    data = generate_dataset(tmp_path / "data", size=(160, 120), seed=4, class_counts={"MEL": 2, "NV": 6, "DF": 1},
                            repeat_fraction=0.0, progress=False)
    samples = load_dataset(data.root)
    index = load_mask_index(data.root / "masks.csv")
    index.pop(samples[0].image_id)  # no mask: left out with --boxes masks, kept with saliency
    manifest = write_dataset({"train": samples[:-1], "val": samples[-1:]}, tmp_path / "det", source, index, progress=False)
    out = tmp_path / "det"
    expected_train = len(samples) - 1 - (source == "masks")
    assert manifest["images"] == {"train": expected_train, "val": 1}
    label = (out / "labels" / "val" / f"{samples[-1].image_id}.txt").read_text().split()
    assert int(label[0]) == samples[-1].label and len(label) == 5 and all(0 < float(v) <= 1 for v in label[1:])
    assert Path((out / "images" / "val").iterdir().__next__()).suffix == ".jpg"
    train = (out / "train.txt").read_text().split()
    assert len(train) == manifest["train_list_length"] == sum(manifest["train_list_per_class"].values())
    nv, df = manifest["repeat_factor"]["NV"], manifest["repeat_factor"].get("DF")
    assert nv == 1 and (df is None or df > 1)
    yaml = (out / "data.yaml").read_text()
    assert "train: train.txt" in yaml and "  0: MEL" in yaml and "  6: VASC" in yaml
