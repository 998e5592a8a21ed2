"""Crop-guided classification (lesion_crop) served in both modes, ensemble and BLS, beside the
classifier and the segmenter from one generated repository, against the in-process reference."""
from __future__ import annotations

import dataclasses

import pytest

from lesionserve.calibration import Calibration
from lesionserve.export.assemble import AssembleError, assemble_pipelines
from lesionserve.export.random_artifacts import build_random_artifacts
from lesionserve.pipelines import LESION_CROP_CLASSIFIER, LESION_ENSEMBLE
from lesionserve.segmentation.reference import CropReference
from lesionserve.segmentation.spec import LESION_CROP, LESION_SEGMENT
from lesionserve.server import TritonServer
from lesionserve_client import LesionClient, UndecodableImageError

from .conftest import SMALL_INPUT_SIZE

pytestmark = pytest.mark.integration

#: The issue's bound on probabilities between served and reference.
MAX_PROB_DIFF = 1e-4
CROP_CALIBRATION = Calibration(weights={"crop_resnet50": 0.4, "crop_densenet121": 0.35, "crop_efficientnet_b3": 0.25},
                               thresholds={"AKIEC": 0.16, "MEL": 0.18}, threshold_order=("AKIEC", "MEL"))
BLS = dataclasses.replace(LESION_CROP, name="lesion_crop_bls", mode="bls")


@pytest.fixture(scope="module")
def crop_artifacts(tmp_path_factory):
    return build_random_artifacts(tmp_path_factory.mktemp("crop64"), CROP_CALIBRATION, input_size=SMALL_INPUT_SIZE,
                                  pipeline=LESION_CROP_CLASSIFIER, seed=7)


@pytest.fixture(scope="module")
def server(small_artifacts, segmenter, crop_artifacts, tmp_path_factory):
    repo = assemble_pipelines(
        [(LESION_ENSEMBLE, small_artifacts), (LESION_SEGMENT, segmenter), (LESION_CROP_CLASSIFIER, crop_artifacts),
         (LESION_CROP, None), (BLS, None)],
        out=tmp_path_factory.mktemp("repo_crop") / "model_repository", views=1)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as running:
        yield running


def test_served_crops_equal_the_reference_in_both_modes(server, segmenter, crop_artifacts, varied_images):
    blobs = list(varied_images.values())
    reference = CropReference.from_artifacts([segmenter / "checkpoint.pt"], crop_artifacts, views=1).classify(blobs)
    with LesionClient(server.grpc_url, max_images_per_request=4) as client:
        served = {mode: client.classify(blobs, crop=True, crop_model=name)
                  for mode, name in (("ensemble", LESION_CROP.name), ("bls", BLS.name))}
        whole = client.classify(blobs)  # the whole-image classifier still answers from the same server
    for mode, rows in served.items():
        worst = 0.0
        for row, probs, box, cropped in zip(rows, reference.result.probs, reference.crops, reference.cropped):
            assert row.crop_box == box and row.cropped == cropped, mode
            worst = max(worst, max(abs(row.probabilities[c] - float(p)) for c, p in zip(LESION_CROP_CLASSIFIER.class_names, probs)))
        assert [r.label for r in rows] == reference.result.labels, mode
        print(f"crop ({mode}): {len(rows)} images, max |served - reference| {worst:.2e}; boxes equal; "
              f"lesion crops {sum(reference.cropped)}/{len(rows)}")
        assert worst <= MAX_PROB_DIFF
    assert set(rows[0].backbone_probabilities) == set(LESION_CROP_CLASSIFIER.member_names)
    assert len(whole) == len(blobs) and whole[0].crop_box is None and whole[0].cropped is None


def test_bad_images_get_their_error_in_place_in_both_modes(server, varied_images):
    blobs = [varied_images["png_320x240"], b"not an image", varied_images["bmp_160x120"]]
    with LesionClient(server.grpc_url) as client:
        for name in (LESION_CROP.name, BLS.name):
            rows = client.classify(blobs, partial=True, crop=True, crop_model=name)
            assert isinstance(rows[1], UndecodableImageError) and rows[1].index == 1, name
            x0, y0, x1, y1 = rows[0].crop_box
            assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240, name
            with pytest.raises(UndecodableImageError, match=r"images\[1\]"):
                client.classify(blobs, crop=True, crop_model=name)
        with pytest.raises(ValueError, match="cannot be combined"):
            client.classify(blobs, crop=True, explain=True)


def test_assembly_refuses_a_crop_pipeline_without_its_parts(small_artifacts, tmp_path):
    with pytest.raises(AssembleError, match="lesion_segment and lesion_crop_classify"):
        assemble_pipelines([(LESION_ENSEMBLE, small_artifacts), (LESION_CROP, None)], out=tmp_path / "repo")


def test_assembly_refuses_members_trained_on_whole_images(segmenter, crop_artifacts, tmp_path):
    import json
    import shutil

    copy = tmp_path / "crop"
    shutil.copytree(crop_artifacts, copy)
    (copy / "crop_resnet50" / "config.json").write_text(json.dumps({"crop_boxes": None, "crop_margin": 0.1}))
    with pytest.raises(AssembleError, match="crop_resnet50 was trained on whole images"):
        assemble_pipelines([(LESION_SEGMENT, segmenter), (LESION_CROP_CLASSIFIER, copy), (LESION_CROP, None)],
                           out=tmp_path / "repo")


def test_client_cli_prints_the_rectangle_classified_and_writes_crop_overlays(server, varied_images, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    path = tmp_path / "lesion.png"
    path.write_bytes(varied_images["png_320x240"])
    out = subprocess.run([sys.executable, "-m", "lesionserve_client", "classify", str(path), "--url", server.grpc_url,
                          "--crop", "--crop-overlay", str(tmp_path / "crops")], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0].split()[-1] == "CROP" and str(path) in out.stdout
    assert "1 overlay(s) in" in out.stderr
    assert Image.open(tmp_path / "crops" / "lesion_crop.png").size == (320, 240)
