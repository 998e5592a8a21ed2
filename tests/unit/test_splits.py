"""Lesion-grouped stratified splits: no leak, proportions, determinism, files, changed-data detection, CLI."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lesionserve.spec import CLASS_NAMES
from lesionserve.training.data import DatasetError, Sample, load_dataset
from lesionserve.training.splits import (
    lesion_overlap,
    load_or_create_splits,
    main,
    make_splits,
    read_splits,
    split_summary,
    write_splits,
)
from lesionserve.synthetic import generate_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[Sample]:
    root = tmp_path_factory.mktemp("splits") / "data"
    counts = {name: 12 for name in CLASS_NAMES}
    generate_dataset(root, size=(64, 48), seed=1, class_counts=counts, repeat_fraction=0.4, progress=False)
    return load_dataset(root)


def grouped_samples(per_class: dict[int, int], seed: int = 0, max_shots: int = 3) -> list[Sample]:
    """Fake samples (no files) with lesions of 1..max_shots photographs."""
    rng = np.random.default_rng(seed)
    samples, number = [], 0
    for label, n in per_class.items():
        left, lesion = n, 0
        while left:
            shots = min(left, int(rng.integers(1, max_shots + 1)))
            for _ in range(shots):
                samples.append(Sample(Path(f"/d/ISIC_{number:06d}.jpg"), label, f"L{label}_{lesion}"))
                number += 1
            left -= shots
            lesion += 1
    return samples


def lesions_of(samples) -> set[str]:
    return {s.lesion_id for s in samples}


# --------------------------------------------------------------------------------------- making


def test_make_splits_keeps_each_lesion_on_one_side_when_lesions_have_several_images(synthetic):
    per_lesion = Counter(s.lesion_id for s in synthetic)
    assert max(per_lesion.values()) > 1  # otherwise grouping would not be exercised
    splits = make_splits(synthetic, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert set(splits) == {"train", "val", "test"}
    assert not lesions_of(splits["train"]) & lesions_of(splits["val"])
    assert not lesions_of(splits["train"]) & lesions_of(splits["test"])
    assert not lesions_of(splits["val"]) & lesions_of(splits["test"])
    assert lesion_overlap(splits) == {}
    assert sorted(s.image_id for part in splits.values() for s in part) == sorted(s.image_id for s in synthetic)


def test_make_splits_matches_class_proportions_within_one_lesion_when_stratifying():
    per_class = {0: 150, 1: 600, 2: 80, 3: 45, 4: 120, 5: 30, 6: 36}
    samples = grouped_samples(per_class, max_shots=3)
    for seed in range(3):
        splits = make_splits(samples, val_fraction=0.2, test_fraction=0.15, seed=seed)
        for name, fraction in (("train", 0.65), ("val", 0.2), ("test", 0.15)):
            counts = Counter(s.label for s in splits[name])
            for label, n in per_class.items():
                # Whole lesions of at most 3 images are dealt, so each split is off by under 3 images.
                assert abs(counts[label] - fraction * n) < 3, (seed, name, label, counts[label], fraction * n)


def test_make_splits_puts_a_lesion_in_every_split_when_class_has_three_lesions():
    samples = grouped_samples({0: 40}) + [Sample(Path(f"/d/rare_{i}.jpg"), 5, f"R{i}") for i in range(3)]
    splits = make_splits(samples, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert [sum(s.label == 5 for s in splits[n]) for n in ("train", "val", "test")] == [1, 1, 1]


def test_make_splits_is_identical_when_input_order_changes_and_differs_when_seed_changes():
    samples = grouped_samples({0: 60, 1: 90, 2: 30, 6: 12}, seed=4)
    first = make_splits(samples, seed=7)
    shuffled = list(samples)
    random.Random(0).shuffle(shuffled)
    assert make_splits(shuffled, seed=7) == first
    assert make_splits(list(reversed(samples)), seed=7) == first
    assert make_splits(samples, seed=8) != first


def test_make_splits_treats_image_without_lesion_as_own_group_when_lesion_missing():
    samples = [Sample(Path(f"/d/img_{i}.jpg"), 1) for i in range(20)]
    splits = make_splits(samples, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [10, 5, 5]


def test_make_splits_omits_test_when_test_fraction_is_zero():
    splits = make_splits(grouped_samples({0: 20, 1: 20}), val_fraction=0.3, test_fraction=0.0, seed=0)
    assert set(splits) == {"train", "val"}


def test_make_splits_names_lesion_when_its_images_have_different_labels():
    samples = grouped_samples({0: 5}) + [Sample(Path("/d/a.jpg"), 1, "MIXED"), Sample(Path("/d/b.jpg"), 2, "MIXED")]
    with pytest.raises(DatasetError, match=r"lesion 'MIXED' has images of different classes \(a=NV, b=BCC\)"):
        make_splits(samples)


def test_make_splits_names_image_when_id_repeats():
    samples = [Sample(Path("/d/one/x.jpg"), 0), Sample(Path("/d/two/x.jpg"), 0)]
    with pytest.raises(DatasetError, match="duplicate image id 'x'"):
        make_splits(samples)


@pytest.mark.parametrize("val,test", [(0.0, 0.2), (0.5, 0.5), (0.2, -0.1), (1.0, 0.0)])
def test_make_splits_raises_when_fractions_invalid(val, test):
    with pytest.raises(ValueError, match="fraction"):
        make_splits(grouped_samples({0: 10}), val_fraction=val, test_fraction=test)


# ---------------------------------------------------------------------------------------- files


def test_read_splits_returns_written_splits_when_round_tripped(synthetic, tmp_path):
    splits = make_splits(synthetic, seed=2)
    path = write_splits(tmp_path / "splits.csv", splits)
    assert path.read_text().splitlines()[0] == "split,image,path,label,lesion_id"
    assert read_splits(path) == splits


def test_read_splits_lists_images_when_files_no_longer_exist(synthetic, tmp_path):
    splits = make_splits(synthetic, seed=0)
    kept = splits["test"][0]
    moved = Sample(tmp_path / "gone" / "ISIC_9999999.jpg", kept.label, kept.lesion_id)
    splits["test"] = [moved, *splits["test"][1:]]
    path = write_splits(tmp_path / "splits.csv", splits)
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed no longer exist: .*ISIC_9999999.jpg"):
        read_splits(path)
    with pytest.raises(FileNotFoundError, match="split file not found: .*nope.csv"):
        read_splits(tmp_path / "nope.csv")


def test_read_splits_names_line_when_lesion_is_on_two_sides(synthetic, tmp_path):
    splits = make_splits(synthetic, seed=0)
    a, b = splits["train"][0], splits["val"][0]
    splits["val"][0] = Sample(b.path, b.label, a.lesion_id)
    path = write_splits(tmp_path / "splits.csv", splits)
    with pytest.raises(DatasetError, match=f"lesion '{a.lesion_id}' is in val here and in train on line 2"):
        read_splits(path)


def test_load_or_create_splits_writes_then_reuses_file_when_dataset_unchanged(synthetic, tmp_path):
    path = tmp_path / "run" / "splits.csv"
    created = load_or_create_splits(path, synthetic, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert path.is_file() and created == make_splits(synthetic, 0.2, 0.2, seed=0)
    # An existing file wins over new arguments: every run of an experiment sees the same test set.
    assert load_or_create_splits(path, list(reversed(synthetic)), seed=5) == created


def test_load_or_create_splits_says_what_changed_when_dataset_changed(synthetic, tmp_path):
    path = tmp_path / "splits.csv"
    load_or_create_splits(path, synthetic, seed=0)
    with pytest.raises(DatasetError, match=r"dataset changed since .*1 image\(s\) no longer in the dataset"):
        load_or_create_splits(path, synthetic[1:], seed=0)
    extra = Sample(synthetic[0].path.with_name("ISIC_7777777.jpg"), 0)
    with pytest.raises(DatasetError, match=r"1 image\(s\) not in the split file \(e.g. ISIC_7777777\)"):
        load_or_create_splits(path, [*synthetic, extra], seed=0)
    first = synthetic[0]
    relabelled = [Sample(first.path, (first.label + 1) % 7, first.lesion_id), *synthetic[1:]]
    with pytest.raises(DatasetError, match=f"with a different label \\(e.g. {first.image_id}\\)"):
        load_or_create_splits(path, relabelled, seed=0)


# -------------------------------------------------------------------------------------- summary/CLI


def test_split_summary_lists_counts_per_class_and_split_when_printed():
    samples = [Sample(Path(f"/d/m{i}.jpg"), 0) for i in range(10)] + [Sample(Path(f"/d/n{i}.jpg"), 1) for i in range(20)]
    splits = make_splits(samples, val_fraction=0.2, test_fraction=0.2, seed=0)
    text = split_summary(splits)
    lines = {line.split()[0]: line.split() for line in text.splitlines()}
    assert lines["MEL"][1:] == ["6", "(60%)", "2", "(20%)", "2", "(20%)", "10"]
    assert lines["NV"][-1] == "20" and lines["VASC"][-1] == "0"
    assert lines["total"][1] == "18" and lines["total"][-1] == "30"


def test_splits_cli_writes_file_and_refuses_overwrite_when_file_exists(synthetic, tmp_path, capsys):
    data = synthetic[0].path.parent.parent
    out = tmp_path / "s.csv"
    assert main(["--data", str(data), "--out", str(out), "--val", "0.25", "--test", "0.25", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "MEL" in printed and f"wrote {out}" in printed
    assert read_splits(out) == make_splits(synthetic, 0.25, 0.25, seed=3)
    assert main(["--data", str(data), "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["--data", str(data), "--out", str(out), "--overwrite", "--test", "0"]) == 0
    assert set(read_splits(out)) == {"train", "val"}
