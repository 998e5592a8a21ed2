"""Dataset layouts: ISIC 2018 (training + official splits + lesion groupings), HAM10000 metadata, class folders."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from lesionserve.spec import CLASS_NAMES
from lesionserve.training.data import (
    LAYOUT_SIGNS,
    DatasetError,
    Sample,
    class_counts,
    detect_layout,
    isic_ground_truths,
    load_dataset,
    load_isic_dir,
)
from lesionserve.synthetic import generate_dataset

REAL_METADATA = Path("/work/shared/data/isic-real/ham10000_metadata.csv")
HEADER = "image," + ",".join(CLASS_NAMES)


def write_jpeg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((12, 16, 3), 40 + 20 * shade, dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def one_hot_line(image: str, label: int) -> str:
    return ",".join([image, *("1.0" if i == label else "0.0" for i in range(len(CLASS_NAMES)))])


def make_isic_split(root: Path, word: str, labels: list[int], prefix: str) -> list[str]:
    """Official-layout split folder pair ISIC2018_Task3_<word>_{Input,GroundTruth} with one image per label."""
    ids = [f"{prefix}_{i:04d}" for i in range(len(labels))]
    for image, label in zip(ids, labels):
        write_jpeg(root / f"ISIC2018_Task3_{word}_Input" / f"{image}.jpg", label)
    truth = root / f"ISIC2018_Task3_{word}_GroundTruth"
    truth.mkdir(parents=True)
    lines = [HEADER, *(one_hot_line(i, l) for i, l in zip(ids, labels))]
    (truth / f"ISIC2018_Task3_{word}_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    return ids


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_dataset(root, num_images=21, size=(64, 48), seed=3, repeat_fraction=0.4, progress=False)
    return root


# --------------------------------------------------------------------------------------- Sample


def test_sample_is_hashable_with_lesion_default_none_when_built_positionally():
    a = Sample(Path("x/ISIC_1.jpg"), 2)
    b = Sample(Path("x/ISIC_1.jpg"), 2, "HAM_1")
    assert a.lesion_id is None and b.lesion_id == "HAM_1"
    assert len({a, b, Sample(Path("x/ISIC_1.jpg"), 2)}) == 2
    with pytest.raises(AttributeError):
        a.label = 3  # frozen


# ---------------------------------------------------------------------------------------- isic2018


def test_load_dataset_fills_lesion_ids_from_groupings_when_synthetic_isic_layout(synthetic):
    samples = load_dataset(synthetic)  # auto -> isic2018
    with (synthetic / "ISIC2018_Task3_Training_LesionGroupings.csv").open() as handle:
        expected = {row["image"]: row["lesion_id"] for row in csv.DictReader(handle)}
    assert detect_layout(synthetic) == "isic2018"
    assert len(samples) == 21
    assert {s.image_id: s.lesion_id for s in samples} == expected
    assert len(set(expected.values())) < len(expected)  # some lesion has several photographs
    assert load_dataset(synthetic, layout="isic2018") == samples


def test_load_isic_dir_reads_named_official_split_when_all_splits_side_by_side(tmp_path):
    train_ids = make_isic_split(tmp_path, "Training", [0, 1, 2], "TR")
    val_ids = make_isic_split(tmp_path, "Validation", [3, 4], "VA")
    test_ids = make_isic_split(tmp_path, "Test", [5, 6, 0, 1], "TE")
    write_csv(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv", ["image", "lesion_id", "diagnosis_confirm_type"],
              [["TR_0000", "HAM_1", "histo"], ["VA_0000", "HAM_9", "histo"]])

    default = load_dataset(tmp_path, layout="isic2018")
    assert [s.image_id for s in default] == train_ids  # several splits: training is the default
    assert [s.lesion_id for s in default] == ["HAM_1", None, None]
    validation = load_dataset(tmp_path, layout="isic2018", split="validation")
    assert [(s.image_id, s.label) for s in validation] == list(zip(val_ids, [3, 4]))
    assert all(s.lesion_id is None for s in validation)  # groupings cover the training split only
    test = load_isic_dir(tmp_path, split="test")
    assert [(s.image_id, s.label) for s in test] == list(zip(test_ids, [5, 6, 0, 1]))
    assert all(s.path.parent.name == "ISIC2018_Task3_Test_Input" for s in test)


def test_load_isic_dir_names_expected_folder_when_requested_split_missing(tmp_path):
    make_isic_split(tmp_path, "Training", [0, 1], "TR")
    with pytest.raises(DatasetError, match=r"no validation split folder ISIC2018_Task3_Validation_Input"):
        load_isic_dir(tmp_path, split="validation")
    with pytest.raises(ValueError, match="split must be one of training, validation, test"):
        load_isic_dir(tmp_path, split="holdout")


def test_load_lesion_groupings_names_line_when_image_has_two_lesions(tmp_path):
    make_isic_split(tmp_path, "Training", [0, 1], "TR")
    write_csv(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv", ["image", "lesion_id"],
              [["TR_0000", "HAM_1"], ["TR_0000", "HAM_2"]])
    with pytest.raises(DatasetError, match=r"line 3: image 'TR_0000' listed again with lesion 'HAM_2'"):
        load_dataset(tmp_path)



def test_load_dataset_reads_loose_ground_truth_csv_when_laid_out_as_official_test_download(tmp_path):
    ids = ["ISIC_0034524", "ISIC_0034525"]
    for image, label in zip(ids, [1, 4]):
        write_jpeg(tmp_path / "ISIC2018_Task3_Test_Input" / f"{image}.jpg", label)
    (tmp_path / "ISIC2018_Task3_Test_Input" / "LICENSE.txt").write_text("not an image")
    (tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv").write_text(
        "\n".join([HEADER, one_hot_line(ids[0], 1), one_hot_line(ids[1], 4)]) + "\n")
    assert detect_layout(tmp_path) == "isic2018"
    assert isic_ground_truths(tmp_path) == {"ISIC2018_Task3_Test": tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv"}
    samples = load_dataset(tmp_path)
    assert [(s.image_id, CLASS_NAMES[s.label], s.lesion_id) for s in samples] == [
        (ids[0], "NV", None), (ids[1], "BKL", None)]
    assert load_dataset(tmp_path, layout="isic2018", split="test") == samples


def test_isic_ground_truths_refuses_when_folder_and_loose_csv_hold_one_set(tmp_path):
    make_isic_split(tmp_path, "Test", [0], "TE")
    (tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv").write_text(HEADER + "\n" + one_hot_line("TE_0000", 0) + "\n")
    with pytest.raises(DatasetError, match="both ISIC2018_Task3_Test_GroundTruth and ISIC2018_Task3_Test_GroundTruth"
                                           ".csv hold the ISIC2018_Task3_Test ground truth"):
        load_dataset(tmp_path)


def test_detect_layout_reads_ground_truth_csv_with_dx_column_as_ham10000_when_named_like_isic(tmp_path):
    write_jpeg(tmp_path / "ISIC2018_Task3_Test_Images" / "ISIC_1.jpg")
    write_csv(tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv", ["lesion_id", "image_id", "dx", "dx_type"],
              [["HAM_1", "ISIC_1", "df", "histo"]])
    assert detect_layout(tmp_path) == "ham10000"
    samples = load_dataset(tmp_path)
    assert [(s.image_id, CLASS_NAMES[s.label], s.lesion_id) for s in samples] == [("ISIC_1", "DF", "HAM_1")]

# ---------------------------------------------------------------------------------------- ham10000


def test_load_dataset_maps_dx_and_searches_subfolders_when_metadata_has_no_path(tmp_path):
    write_jpeg(tmp_path / "part_1" / "ISIC_1.jpg")
    write_jpeg(tmp_path / "part_2" / "ISIC_2.jpg")
    write_jpeg(tmp_path / "part_2" / "ISIC_3.png")
    csv_path = write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "age"],
                         [["HAM_1", "ISIC_1", "mel", "40"], ["HAM_1", "ISIC_2", "MEL", "40"],
                          ["HAM_2", "ISIC_3", "Vasc", "70"]])
    samples = load_dataset(csv_path)  # auto -> ham10000
    assert [(s.image_id, CLASS_NAMES[s.label], s.lesion_id) for s in samples] == [
        ("ISIC_1", "MEL", "HAM_1"), ("ISIC_2", "MEL", "HAM_1"), ("ISIC_3", "VASC", "HAM_2")]
    assert samples[2].path == tmp_path / "part_2" / "ISIC_3.png"
    assert load_dataset(tmp_path) == samples  # a folder holding one metadata CSV works too
    assert detect_layout(tmp_path) == "ham10000"


def test_load_dataset_uses_path_column_and_image_dirs_when_given(tmp_path):
    write_jpeg(tmp_path / "imgs" / "a.jpg")
    write_jpeg(tmp_path / "first" / "b.jpg")
    write_jpeg(tmp_path / "second" / "b.jpg", shade=3)
    write_jpeg(tmp_path / "second" / "c.jpg")
    csv_path = write_csv(tmp_path / "meta.csv", ["image", "path", "dx", "lesion_id"],
                         [["a", "imgs/a.jpg", "nv", "L1"], ["b", "", "bkl", ""], ["c", "", "df", "L3"]])
    samples = load_dataset(csv_path, layout="ham10000", image_dirs=[tmp_path / "first", tmp_path / "second"])
    assert [s.path for s in samples] == [tmp_path / "imgs" / "a.jpg", tmp_path / "first" / "b.jpg",
                                         tmp_path / "second" / "c.jpg"]  # first listed folder wins for b
    assert [s.lesion_id for s in samples] == ["L1", None, "L3"]
    assert [CLASS_NAMES[s.label] for s in samples] == ["NV", "BKL", "DF"]


def test_load_dataset_names_row_and_valid_values_when_dx_unknown(tmp_path):
    write_jpeg(tmp_path / "ISIC_1.jpg")
    csv_path = write_csv(tmp_path / "meta.csv", ["image_id", "dx", "lesion_id"],
                         [["ISIC_1", "nv", "L1"], ["ISIC_2", "scc", "L2"]])
    with pytest.raises(DatasetError, match=r"meta.csv line 3 \(image 'ISIC_2'\): unknown dx 'scc'.*akiec, bcc"):
        load_dataset(csv_path, layout="ham10000")


def test_load_dataset_lists_absent_images_when_metadata_row_has_no_file(tmp_path):
    write_jpeg(tmp_path / "ISIC_1.jpg")
    csv_path = write_csv(tmp_path / "meta.csv", ["image_id", "dx", "lesion_id", "path"],
                         [["ISIC_1", "nv", "L1", ""], ["ISIC_2", "nv", "L2", ""], ["ISIC_3", "nv", "L3", "x/ISIC_3.jpg"]])
    with pytest.raises(DatasetError, match=r"2 image\(s\) listed in .*meta.csv not found: ISIC_2.jpg .*x/ISIC_3.jpg"):
        load_dataset(csv_path)


def test_load_dataset_names_both_lines_when_image_id_repeats(tmp_path):
    write_jpeg(tmp_path / "ISIC_1.jpg")
    csv_path = write_csv(tmp_path / "meta.csv", ["image_id", "dx", "lesion_id"],
                         [["ISIC_1", "nv", "L1"], ["ISIC_1", "nv", "L1"]])
    with pytest.raises(DatasetError, match="line 3: image 'ISIC_1' already listed on line 2"):
        load_dataset(csv_path)


def test_load_dataset_refuses_to_guess_when_image_found_in_two_subfolders(tmp_path):
    write_jpeg(tmp_path / "a" / "ISIC_1.jpg")
    write_jpeg(tmp_path / "b" / "ISIC_1.jpg")
    csv_path = write_csv(tmp_path / "meta.csv", ["image_id", "dx", "lesion_id"], [["ISIC_1", "nv", "L1"]])
    with pytest.raises(DatasetError, match="found in several folders"):
        load_dataset(csv_path)


def test_load_dataset_names_required_columns_when_csv_has_no_dx(tmp_path):
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "MEL"], [["ISIC_1", "1.0"]])
    with pytest.raises(DatasetError, match="needs an 'image_id' \\(or 'image'\\) column and a 'dx' column"):
        load_dataset(csv_path)


@pytest.mark.skipif(not REAL_METADATA.is_file(), reason="shared HAM10000 pool not present")
def test_load_dataset_reads_real_ham10000_pool_when_shared_data_present():
    samples = load_dataset(REAL_METADATA, layout="ham10000")
    assert class_counts(samples) == {"MEL": 501, "NV": 4341, "BCC": 268, "AKIEC": 187, "BKL": 586, "DF": 64, "VASC": 84}
    assert all(s.lesion_id for s in samples)
    assert len({s.lesion_id for s in samples}) < len(samples)


# ----------------------------------------------------------------------------------------- folders


def test_load_dataset_reads_class_folders_in_any_case_when_layout_is_folders(tmp_path):
    write_jpeg(tmp_path / "mel" / "m1.jpg")
    write_jpeg(tmp_path / "Nv" / "n1.PNG")
    write_jpeg(tmp_path / "Nv" / "n2.jpeg")
    (tmp_path / "Nv" / "notes.txt").write_text("ignored")
    (tmp_path / "README.md").write_text("ignored")
    samples = load_dataset(tmp_path)  # auto -> folders
    assert detect_layout(tmp_path) == "folders"
    assert sorted((s.image_id, CLASS_NAMES[s.label]) for s in samples) == [("m1", "MEL"), ("n1", "NV"), ("n2", "NV")]
    assert all(s.lesion_id is None for s in samples)


def test_load_dataset_lists_valid_names_when_class_folder_unknown(tmp_path):
    write_jpeg(tmp_path / "MEL" / "m1.jpg")
    write_jpeg(tmp_path / "melanoma" / "m2.jpg")
    with pytest.raises(DatasetError, match=r"unknown class folder\(s\) 'melanoma'; valid names .*MEL, NV, BCC"):
        load_dataset(tmp_path, layout="folders")


def test_load_dataset_names_both_files_when_image_id_in_two_class_folders(tmp_path):
    write_jpeg(tmp_path / "MEL" / "x.jpg")
    write_jpeg(tmp_path / "NV" / "x.png")
    with pytest.raises(DatasetError, match="duplicate image id 'x'"):
        load_dataset(tmp_path, layout="folders")


# -------------------------------------------------------------------------------------------- auto


def test_load_dataset_describes_layouts_when_nothing_recognisable(tmp_path):
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout \(the folder is empty\)"):
        load_dataset(tmp_path)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "labels.csv").write_text("image,label\nx,1\n")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path)
    message = str(info.value)
    assert "cannot tell the dataset layout (found labels.csv, stuff/). Looked for isic2018: " in message
    for sign in LAYOUT_SIGNS.values():
        assert sign in message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_dataset(tmp_path, layout="coco")
