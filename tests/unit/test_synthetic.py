"""Tests for the synthetic ISIC 2018 Task 3 dataset generator (lesionserve/synthetic.py)."""
from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from lesionserve.spec import CLASS_NAMES
from lesionserve import synthetic
from lesionserve.synthetic import (
    CONFIRM_TYPES,
    DatasetPaths,
    balanced_class_counts,
    generate_dataset,
    ham10000_class_counts,
    main,
    render_lesion,
    render_lesion_with_mask,
)

SMALL = (64, 48)  # width, height: keeps every test fast


def _gen(out: Path, **kwargs) -> DatasetPaths:
    kwargs.setdefault("size", SMALL)
    kwargs.setdefault("progress", False)
    return generate_dataset(out, **kwargs)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _labels(paths: DatasetPaths) -> dict[str, str]:
    _, rows = _read_csv(paths.labels_csv)
    return {row[0]: CLASS_NAMES[row[1:].index("1.0")] for row in rows}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# Layout and CSV format
# ------------------------------------------------------------------------------------------


def test_generate_dataset_writes_isic_layout_when_given_an_empty_target(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=14)

    assert paths.root == (tmp_path / "ds").resolve()
    assert paths.images_dir == paths.root / "ISIC2018_Task3_Training_Input"
    assert paths.labels_csv == (
        paths.root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    )
    assert paths.groupings_csv == paths.root / "ISIC2018_Task3_Training_LesionGroupings.csv"
    images = sorted(paths.images_dir.iterdir())
    assert [p.name for p in images] == [f"ISIC_{i:07d}.jpg" for i in range(14)]
    for image in images:
        assert image.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
        decoded = cv2.imread(str(image))
        assert decoded.shape == (SMALL[1], SMALL[0], 3)
    # Nothing but the dataset and its marker is left behind (no temporary directories).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_ground_truth_csv_is_one_hot_in_class_order_when_written(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=21)
    header, rows = _read_csv(paths.labels_csv)

    assert header == ["image", *CLASS_NAMES]
    assert paths.labels_csv.read_text().startswith("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n")
    assert [row[0] for row in rows] == [f"ISIC_{i:07d}" for i in range(21)]  # no extension, sorted
    for row in rows:
        assert len(row) == 1 + len(CLASS_NAMES)
        assert sorted(row[1:]) == ["0.0"] * (len(CLASS_NAMES) - 1) + ["1.0"]
    assert Counter(_labels(paths).values()) == {name: 3 for name in CLASS_NAMES}


def test_balanced_counts_give_remainder_to_first_classes_when_not_divisible():
    counts = balanced_class_counts(17)
    assert list(counts) == list(CLASS_NAMES)
    assert counts == {"MEL": 3, "NV": 3, "BCC": 3, "AKIEC": 2, "BKL": 2, "DF": 2, "VASC": 2}


def test_generate_dataset_respects_class_counts_when_given(tmp_path):
    wanted = {"MEL": 3, "DF": 1, "VASC": 2}
    paths = _gen(tmp_path / "ds", num_images=999, class_counts=wanted)

    counts = Counter(_labels(paths).values())
    assert counts == wanted
    assert len(list(paths.images_dir.iterdir())) == 6


def test_ham10000_counts_follow_ham10000_proportions_when_requested():
    counts = ham10000_class_counts(200)
    assert sum(counts.values()) == 200
    assert min(counts.values()) >= 2
    assert max(counts, key=counts.get) == "NV"
    assert counts["NV"] == pytest.approx(0.67 * 200, abs=2)
    assert counts["MEL"] == pytest.approx(0.11 * 200, abs=2)
    small = ham10000_class_counts(14)
    assert small == {name: 2 for name in CLASS_NAMES}


def test_ham10000_counts_raise_when_fewer_than_two_per_class():
    with pytest.raises(ValueError, match=r"num_images >= 14"):
        ham10000_class_counts(13)


# ------------------------------------------------------------------------------------------
# Determinism and variety
# ------------------------------------------------------------------------------------------


def test_generate_dataset_is_byte_identical_when_run_twice_with_same_args(tmp_path):
    first = _gen(tmp_path / "a", num_images=14, seed=5)
    second = _gen(tmp_path / "b", num_images=14, seed=5)

    hashes_a, hashes_b = _hashes(first.root), _hashes(second.root)
    assert len(hashes_a) == 2 * 14 + 4  # images, masks, three CSVs, marker
    assert hashes_a == hashes_b


def test_generate_dataset_differs_when_seeds_differ(tmp_path):
    a = _hashes(_gen(tmp_path / "a", num_images=14, seed=1).images_dir)
    b = _hashes(_gen(tmp_path / "b", num_images=14, seed=2).images_dir)

    assert not set(a.values()) & set(b.values())


def test_images_are_all_distinct_when_lesions_repeat(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=21, repeat_fraction=0.5)
    pixels = [cv2.imread(str(p)) for p in sorted(paths.images_dir.iterdir())]

    digests = {hashlib.sha256(p.tobytes()).hexdigest() for p in pixels}
    assert len(digests) == len(pixels)


def test_render_lesion_is_reproducible_when_given_same_seed():
    a = render_lesion("MEL", np.random.default_rng(3), (80, 60))
    b = render_lesion("MEL", np.random.default_rng(3), (80, 60))
    c = render_lesion("MEL", np.random.default_rng(4), (80, 60))

    assert a.shape == (60, 80, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_lesion_accepts_class_index_when_given_int():
    by_index = render_lesion(5, np.random.default_rng(0), (48, 48))
    by_name = render_lesion("DF", np.random.default_rng(0), (48, 48))
    assert np.array_equal(by_index, by_name)


def test_render_lesion_raises_when_class_unknown():
    with pytest.raises(ValueError, match=r"unknown class 'SCC'; valid names are MEL, NV, BCC, AKIEC, BKL, DF, VASC"):
        render_lesion("SCC", np.random.default_rng(0), (48, 48))


# ------------------------------------------------------------------------------------------
# Lesion groupings
# ------------------------------------------------------------------------------------------


def test_groupings_cover_every_image_once_when_lesions_repeat(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=35, repeat_fraction=0.4)
    header, rows = _read_csv(paths.groupings_csv)
    labels = _labels(paths)

    assert header == ["image", "lesion_id", "diagnosis_confirm_type"]
    images = [row[0] for row in rows]
    assert sorted(images) == sorted(labels) and len(set(images)) == len(images)
    by_lesion: dict[str, list[str]] = defaultdict(list)
    for image, lesion_id, confirm in rows:
        assert re.fullmatch(r"HAM_\d{7}", lesion_id)
        assert confirm in CONFIRM_TYPES
        by_lesion[lesion_id].append(image)
    sizes = Counter(len(v) for v in by_lesion.values())
    assert set(sizes) <= {1, 2, 3}
    assert sizes[2] + sizes[3] > 0, "some lesions must be photographed more than once"
    extra = sum(len(v) - 1 for v in by_lesion.values())
    assert extra == round(0.4 * 35)
    for lesion_images in by_lesion.values():
        assert len({labels[i] for i in lesion_images}) == 1, "a lesion's photographs share its label"


def test_groupings_confirm_type_is_constant_per_lesion_when_lesions_repeat(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=28, repeat_fraction=0.5)
    _, rows = _read_csv(paths.groupings_csv)
    confirm: dict[str, set[str]] = defaultdict(set)
    for _, lesion_id, kind in rows:
        confirm[lesion_id].add(kind)
    assert all(len(kinds) == 1 for kinds in confirm.values())


def test_groupings_have_one_lesion_per_image_when_repeat_fraction_is_zero(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=14, repeat_fraction=0.0)
    _, rows = _read_csv(paths.groupings_csv)
    assert len({row[1] for row in rows}) == 14


def test_repeated_lesion_keeps_its_colour_when_photographed_again(tmp_path):
    # Photographs of one lesion resemble each other more than photographs of other lesions of
    # the same class: same geometry and colours, only pose and lighting change.
    paths = _gen(tmp_path / "ds", class_counts={"MEL": 12}, repeat_fraction=0.5, size=(96, 72))
    _, rows = _read_csv(paths.groupings_csv)
    by_lesion: dict[str, list[str]] = defaultdict(list)
    for image, lesion_id, _ in rows:
        by_lesion[lesion_id].append(image)

    def dark_fraction(image: str) -> float:
        gray = cv2.imread(str(paths.images_dir / f"{image}.jpg"), cv2.IMREAD_GRAYSCALE)
        return float((cv2.medianBlur(gray, 5)[12:-12, 16:-16] < 110).mean())

    values = {image: dark_fraction(image) for images in by_lesion.values() for image in images}
    within = [abs(values[a] - values[b]) for imgs in by_lesion.values() for a in imgs for b in imgs if a < b]
    overall = [abs(values[a] - values[b]) for a in values for b in values if a < b]
    assert within and np.mean(within) < np.mean(overall)


# ------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (31, 48)}, r"size must be \(width, height\) with integers of at least 32, got \(31, 48\)"),
        ({"size": (64, -1)}, r"at least 32, got \(64, -1\)"),
        ({"size": (64.0, 48)}, r"at least 32"),
        ({"size": (64,)}, r"size must be \(width, height\)"),
        ({"num_images": 6}, r"num_images must be an integer >= 7 \(one image per class\), got 6"),
        ({"num_images": 7.5}, r"num_images must be an integer >= 7"),
        ({"class_counts": {"MEL": 2, "SCC": 1}},
         r"unknown class name\(s\) in class_counts: 'SCC'; valid names are MEL, NV, BCC, AKIEC, BKL, DF, VASC"),
        ({"class_counts": {"MEL": -1}}, r"class_counts\['MEL'\] must be a non-negative integer, got -1"),
        ({"class_counts": {"MEL": 0}}, r"class_counts must ask for at least one image"),
        ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
        ({"repeat_fraction": 0.9}, r"repeat_fraction must be a number in \[0, 0.5\], got 0.9"),
    ],
)
def test_generate_dataset_raises_precise_error_when_args_invalid(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _gen(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()
    assert list(tmp_path.iterdir()) == []


def test_generate_dataset_accepts_small_class_counts_when_num_images_below_seven(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=1, class_counts={"NV": 2})
    assert Counter(_labels(paths).values()) == {"NV": 2}


# ------------------------------------------------------------------------------------------
# Target directory handling
# ------------------------------------------------------------------------------------------


def test_generate_dataset_refuses_when_target_is_foreign_nonempty_dir(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("precious")

    with pytest.raises(FileExistsError, match=r"not empty and is not a previous output.*overwrite=True"):
        _gen(target, num_images=7)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_generate_dataset_replaces_foreign_dir_when_overwrite(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("old")

    paths = _gen(target, num_images=7, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert len(list(paths.images_dir.iterdir())) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_generate_dataset_replaces_previous_output_when_overwrite_not_given(tmp_path):
    target = tmp_path / "ds"
    _gen(target, num_images=14, seed=1)
    paths = _gen(target, num_images=7, seed=2)

    assert len(list(paths.images_dir.iterdir())) == 7
    assert len(_labels(paths)) == 7


def test_generate_dataset_refuses_when_previous_output_holds_extra_files(tmp_path):
    target = tmp_path / "ds"
    _gen(target, num_images=7)
    (target / "model.pt").write_text("weights")
    with pytest.raises(FileExistsError, match="not a previous output"):
        _gen(target, num_images=7, seed=1)
    assert (target / "model.pt").read_text() == "weights"


def test_generate_dataset_writes_into_empty_existing_dir_when_given_one(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    paths = _gen(target, num_images=7)
    assert len(list(paths.images_dir.iterdir())) == 7


def test_generate_dataset_refuses_when_target_is_a_file(tmp_path):
    target = tmp_path / "ds"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        _gen(target, num_images=7, overwrite=True)
    assert target.read_text() == "x"


def test_generate_dataset_keeps_previous_output_when_generation_fails(tmp_path, monkeypatch):
    target = tmp_path / "ds"
    _gen(target, num_images=7, seed=1)
    before = _hashes(target)
    calls = {"n": 0}
    real_write = synthetic._write_image

    def failing_write(path, rgb):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        real_write(path, rgb)

    monkeypatch.setattr(synthetic, "_write_image", failing_write)
    with pytest.raises(OSError, match="disk full"):
        _gen(target, num_images=14, seed=2)

    assert _hashes(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "temporary directory was not cleaned up"


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def test_cli_writes_dataset_and_prints_summary_when_args_valid(tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(["--out", str(out), "--num-images", "9", "--size", "48x40", "--seed", "2", "--no-progress"])

    assert status == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    assert "wrote 9 images (48x40, seed 2" in summary[0]
    assert "MEL=2 NV=2 BCC=1 AKIEC=1 BKL=1 DF=1 VASC=1" in summary[0]
    assert cv2.imread(str(out / "ISIC2018_Task3_Training_Input" / "ISIC_0000000.jpg")).shape == (40, 48, 3)


def test_cli_uses_ham10000_proportions_when_imbalance_requested(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-images", "40", "--size", "32x32", "--imbalance", "ham10000",
                 "--no-progress"]) == 0
    paths = DatasetPaths.under(out.resolve())
    counts = Counter(_labels(paths).values())
    assert counts == ham10000_class_counts(40)
    assert counts["NV"] > counts["MEL"] >= 2 and min(counts.values()) >= 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "10x10"], "at least 32"),
        (["--size", "600by450"], "expected WIDTHxHEIGHT"),
        (["--num-images", "3"], "num_images must be an integer >= 7"),
        (["--num-images", "10", "--imbalance", "ham10000"], "num_images >= 14"),
        (["--imbalance", "skewed"], "invalid choice"),
    ],
)
def test_cli_exits_with_usage_error_when_args_invalid(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as excinfo:
        main(["--out", str(tmp_path / "cli"), *argv])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_fails_without_touching_dir_when_target_foreign_and_no_overwrite(tmp_path, capsys):
    target = tmp_path / "cli"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    assert main(["--out", str(target), "--num-images", "7", "--size", "32x32", "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_cli_help_documents_every_option_when_asked(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--num-images", "--size", "--seed", "--imbalance", "--overwrite", "ham10000"):
        assert option in text


# ------------------------------------------------------------------------------------------
# Learnability: simple colour/size features must separate the classes
# ------------------------------------------------------------------------------------------


def _simple_features(rgb: np.ndarray) -> np.ndarray:
    """Lesion colour relative to the surrounding skin, plus the lesion's area fraction."""
    h, w = rgb.shape[:2]
    img = cv2.medianBlur(rgb, 5).astype(np.float32) / 255.0  # drops hair and sensor noise
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    ring = img[(r > 0.6) & (r < 0.85)]
    brightness = ring.sum(1)
    skin = np.median(ring[brightness >= np.median(brightness)], axis=0)  # brighter half: no hair/rim
    relative = img[r < 0.8] / skin
    lesion = np.abs(relative - 1.0).max(1) > 0.2
    colour = relative[lesion].mean(0) if lesion.any() else np.ones(3, np.float32)
    return np.r_[colour, lesion.mean()]


def _features_and_labels(paths: DatasetPaths) -> tuple[np.ndarray, np.ndarray]:
    labels = _labels(paths)
    features, targets = [], []
    for image, label in sorted(labels.items()):
        bgr = cv2.imread(str(paths.images_dir / f"{image}.jpg"))
        features.append(_simple_features(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        targets.append(CLASS_NAMES.index(label))
    return np.asarray(features), np.asarray(targets)


def test_classes_are_learnable_when_nearest_centroid_trained_on_another_seed(tmp_path):
    per_class = {name: 12 for name in CLASS_NAMES}
    train = _gen(tmp_path / "train", class_counts=per_class, size=(160, 120), seed=101)
    test = _gen(tmp_path / "test", class_counts=per_class, size=(160, 120), seed=202)
    x_train, y_train = _features_and_labels(train)
    x_test, y_test = _features_and_labels(test)

    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    z_train, z_test = (x_train - mean) / std, (x_test - mean) / std
    centroids = np.stack([z_train[y_train == k].mean(0) for k in range(len(CLASS_NAMES))])
    predicted = np.argmin(((z_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    recalls = [float((predicted[y_test == k] == k).mean()) for k in range(len(CLASS_NAMES))]
    balanced_accuracy = float(np.mean(recalls))

    print(f"nearest-centroid balanced accuracy: {balanced_accuracy:.3f} "
          f"(chance {1 / len(CLASS_NAMES):.3f}); per class {dict(zip(CLASS_NAMES, np.round(recalls, 2)))}")
    assert balanced_accuracy >= 0.6, recalls


# ------------------------------------------------------------------------------------------
# Lesion masks
# ------------------------------------------------------------------------------------------


def test_every_image_gets_a_binary_mask_listed_in_masks_csv_like_the_real_pool(tmp_path):
    paths = _gen(tmp_path / "ds", num_images=14, size=(120, 90))
    header, rows = _read_csv(paths.masks_csv)
    assert header == ["image", "mask_path"]
    assert [r[0] for r in rows] == sorted(p.stem for p in paths.images_dir.iterdir())
    for image, relative in rows:
        assert relative == f"{synthetic.MASKS_DIRNAME}/{image}_segmentation.png"
        mask = cv2.imread(str(paths.root / relative), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (90, 120) and set(np.unique(mask)) == {0, 255}


def test_mask_covers_the_lesion_when_compared_with_the_skin_around_it():
    # The lesion's colour differs from the ring of skin just outside its mask, and the mask is one
    # region near the centre (the pose keeps lesions roughly centred).
    rng = np.random.default_rng(0)
    for label in CLASS_NAMES:
        rgb, mask = render_lesion_with_mask(label, rng, (200, 150))
        assert mask.dtype == bool and 0.005 < mask.mean() < 0.6
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~mask
        inside, around = rgb[mask].astype(float).mean(axis=0), rgb[ring].astype(float).mean(axis=0)
        assert np.abs(inside - around).sum() > 30, (label, inside, around)
        count, _ = cv2.connectedComponents(mask.astype(np.uint8))
        assert count - 1 <= 2, label  # one lesion (a stray streak tip at most)
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() - 100) < 40 and abs(ys.mean() - 75) < 30, label


def test_render_lesion_with_mask_draws_the_same_image_as_render_lesion():
    a = render_lesion("NV", np.random.default_rng(5), (80, 60))
    b, mask = render_lesion_with_mask("NV", np.random.default_rng(5), (80, 60))
    assert np.array_equal(a, b) and mask.shape == (60, 80)
