"""Crop-guided classification without a server: the crop geometry, the boxes file, the served crop
step's plain functions, the BLS re-encoding, training datasets and the generated configs."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lesionserve.architectures import IMAGENET
from lesionserve.cropping import CROP_MARGIN, NO_BOX, crop_rect, crop_to_lesion
from lesionserve.pipelines import LESION_CROP_CLASSIFIER, LESION_ENSEMBLE, Preprocessing
from lesionserve.preprocessing import decode_image, error_column, failed_rows, preprocess_batch_rows, preprocess_rgb
from lesionserve.repository import render_repository
from lesionserve.segmentation.boxes import CropBoxError, CropBoxes, ImageBox, main as crop_boxes_main, write_boxes
from lesionserve.segmentation.postprocess import crop_batch, encode_crops
from lesionserve.segmentation.spec import LESION_CROP, LESION_SEGMENT
from lesionserve.training.data import LesionDataset, Sample


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from lesionserve.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("crop") / "data", size=(96, 72), seed=1,
                            class_counts={c: 2 for c in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")},
                            repeat_fraction=0.0, progress=False)


@pytest.fixture()
def picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)


def test_crop_is_the_box_grown_by_the_margin_and_no_lesion_is_the_whole_image(picture):
    crop, rect, cropped = crop_to_lesion(picture, (20, 10, 70, 60), margin=0.1)
    assert rect == (15, 5, 75, 65) and cropped and np.array_equal(crop, picture[5:65, 15:75])
    whole, rect, cropped = crop_to_lesion(picture, NO_BOX)
    assert whole is picture and rect == (0, 0, 120, 90) and not cropped
    # A lesion filling the image is still a lesion crop (cropped True), the whole rectangle.
    assert crop_to_lesion(picture, (0, 0, 120, 90))[1:] == ((0, 0, 120, 90), True)
    for bad in ((10, 10, 10, 20), (0, 0, 121, 90), (-1, 0, 5, 5)):
        with pytest.raises(ValueError, match="inside a 120x90 image"):
            crop_rect(bad, 120, 90)


def test_preprocessing_with_boxes_equals_preprocessing_the_cut_image(picture):
    inputs = (Preprocessing(32, IMAGENET), Preprocessing(48, IMAGENET))
    blobs = [_png(picture), b"not an image", _png(picture)]
    batch = preprocess_batch_rows(blobs, inputs, boxes=[(20, 10, 70, 60), (0, 0, 1, 1), NO_BOX], margin=CROP_MARGIN)
    assert batch.crops == [(15, 5, 75, 65), NO_BOX, (0, 0, 120, 90)]
    assert batch.errors[1] and not batch.errors[0] and not batch.errors[2]
    for pre in inputs:
        assert np.array_equal(batch.pixels[pre][0], preprocess_rgb(picture[5:65, 15:75], pre.size, IMAGENET))
        assert np.array_equal(batch.pixels[pre][2], preprocess_rgb(picture, pre.size, IMAGENET))
        assert not batch.pixels[pre][1].any()
    with pytest.raises(ValueError, match="2 boxes for 3 images"):
        preprocess_batch_rows(blobs, inputs, boxes=[NO_BOX, NO_BOX])


def test_crop_step_finds_the_lesion_in_the_logits_and_classifies_the_whole_image_without_one(picture):
    logits = np.full((3, 1, 32, 32), -8.0, np.float32)
    logits[0, 0, 8:24, 8:16] = 8.0  # a lesion in the left half of image 0
    blobs = [_png(picture), _png(picture), b"broken"]
    sizes = np.array([[120, 90], [120, 90], [0, 0]], np.int32)
    failed = failed_rows(error_column(["", "", "cannot decode"]))
    inputs = (Preprocessing(32, IMAGENET),)
    batch, rects, found = crop_batch(blobs, logits, sizes, failed, inputs, threshold=0.5, margin=0.0)
    x0, y0, x1, y1 = rects[0]
    assert found[:, 0].tolist() == [True, False, False]
    assert 25 <= x0 < x1 <= 65 and 15 <= y0 < y1 <= 75  # the left-middle region, in original pixels
    assert rects[1].tolist() == [0, 0, 120, 90] and rects[2].tolist() == list(NO_BOX)
    assert np.array_equal(batch.pixels[inputs[0]][1], preprocess_rgb(picture, 32, IMAGENET))
    assert batch.errors[2]


def test_bls_crops_decode_to_exactly_the_crops_pixels(picture):
    blobs = [_png(picture), b"junk"]
    crops, rects = encode_crops(blobs, [(20, 10, 70, 60), NO_BOX], margin=0.1)
    assert rects.tolist() == [[15, 5, 75, 65], list(NO_BOX)]
    assert np.array_equal(decode_image(crops[0]), picture[5:65, 15:75])  # PNG: lossless
    assert crops[1] == b"junk"  # passed on, so the classifier reports its error in place


def test_boxes_file_round_trips_and_refuses_what_does_not_fit(tmp_path, picture):
    path = write_boxes(tmp_path / "boxes.csv", [("a", ImageBox(120, 90, (20, 10, 70, 60), "segmenter")),
                                                ("b", ImageBox(120, 90, NO_BOX, "segmenter"))])
    boxes = CropBoxes.read(path)
    assert boxes.box("a", 120, 90) == (20, 10, 70, 60) and boxes.box("b", 120, 90) == NO_BOX
    assert np.array_equal(boxes.crop("a", picture), picture[5:65, 15:75]) and boxes.found_fraction() == 0.5
    with pytest.raises(CropBoxError, match="the box of a was found on a 120x90 image, this one is 60x45"):
        boxes.box("a", 60, 45)
    with pytest.raises(CropBoxError, match="has no box for image c"):
        boxes.box("c", 120, 90)
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().replace("20,10,70,60", "20,10,170,60"))
    with pytest.raises(CropBoxError, match=r"bad.csv:2: box \(20, 10, 170, 60\) is not a non-empty rectangle inside a 120x90"):
        CropBoxes.read(bad)
    bad.write_text("image,box\n")
    with pytest.raises(CropBoxError, match="header must be image,width,height"):
        CropBoxes.read(bad)
    with pytest.raises(CropBoxError, match="write one with `lesionserve crop-boxes`"):
        CropBoxes.read(tmp_path / "missing.csv")


def test_crop_boxes_command_writes_the_masks_lesion_for_every_image_of_a_split(synthetic, tmp_path, capsys):
    from lesionserve.training.data import load_dataset
    from lesionserve.training.splits import load_or_create_splits

    samples = load_dataset(synthetic.root)
    splits = tmp_path / "splits.csv"
    load_or_create_splits(splits, samples, val_fraction=0.3, test_fraction=0.2, seed=0)
    out = tmp_path / "boxes.csv"
    assert crop_boxes_main(["--splits", str(splits), "--masks", str(synthetic.root / "masks.csv"), "--out", str(out)]) == 0
    boxes = CropBoxes.read(out)
    assert set(boxes.boxes) == {s.image_id for s in samples}
    assert f"{len(samples)} images, lesion found in {len(samples)}" in capsys.readouterr().out


def test_training_datasets_cut_each_image_to_its_box(tmp_path, picture):
    image = tmp_path / "ISIC_0000001.png"
    image.write_bytes(_png(picture))
    boxes = CropBoxes.read(write_boxes(tmp_path / "b.csv", [("ISIC_0000001", ImageBox(120, 90, (20, 10, 70, 60), "masks"))]))
    sample = Sample(image, 0)
    tensor, _ = LesionDataset([sample], 32, IMAGENET, crops=boxes)[0]
    assert np.array_equal(tensor.numpy(), preprocess_rgb(picture[5:65, 15:75], 32, IMAGENET))
    from lesionserve.training.augment import AugmentedDataset

    aug, _ = AugmentedDataset([sample], 32, [0] * 7, crops=boxes)[0]  # level 0: no augmentation
    assert np.array_equal(aug.numpy(), tensor.numpy())


FULL = [LESION_ENSEMBLE, LESION_SEGMENT, LESION_CROP_CLASSIFIER, LESION_CROP,
        dataclasses.replace(LESION_CROP, name="lesion_crop_bls", mode="bls")]


@pytest.mark.parametrize("path,text", sorted((p, t) for p, t in render_repository(FULL).items()
                                             if p.endswith(".pbtxt") and ("lesion_crop" in p or p.startswith(("segmenter/", "lesion_segment")))))
def test_crop_and_segmentation_configs_parse_with_tritons_schema(path, text):
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == path.split("/")[0] and text.startswith("#")


def test_a_crop_pipeline_is_rendered_only_with_the_parts_it_calls():
    with pytest.raises(ValueError, match="calls 'lesion_segment', which this repository does not serve"):
        render_repository([LESION_ENSEMBLE, LESION_CROP_CLASSIFIER, LESION_CROP])
    resized = LESION_CROP_CLASSIFIER.with_input_sizes({"crop_resnet50": 128})
    with pytest.raises(ValueError, match="serves with another declaration"):
        render_repository([LESION_SEGMENT, resized, LESION_CROP])
    ensemble = render_repository([LESION_SEGMENT, resized, LESION_CROP.with_parts(LESION_SEGMENT, resized)])
    assert "pixel_values_128_imagenet" in ensemble["lesion_crop_preprocess/config.pbtxt"]
    with pytest.raises(ValueError, match="mode must be one of ensemble, bls"):
        dataclasses.replace(LESION_CROP, mode="chain")


def test_reference_with_boxes_equals_the_reference_on_the_cut_images(picture, tmp_path):
    from lesionserve.calibration import Calibration
    from lesionserve.export.random_artifacts import build_random_artifacts
    from lesionserve.reference import ReferencePipeline

    calibration = Calibration(weights={m: 1 / 3 for m in LESION_CROP_CLASSIFIER.member_names})
    artifacts = build_random_artifacts(tmp_path / "a", calibration, input_size=32, pipeline=LESION_CROP_CLASSIFIER)
    reference = ReferencePipeline.from_artifacts(artifacts, views=2, pipeline=LESION_CROP_CLASSIFIER)
    cut = reference.run([_png(picture)], [(20, 10, 70, 60)]).probs
    direct = reference.run([_png(picture[5:65, 15:75])]).probs
    np.testing.assert_array_equal(cut, direct)
    assert not np.array_equal(cut, reference.run([_png(picture)]).probs)
