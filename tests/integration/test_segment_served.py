"""The segmentation pipeline (lesion_segment) served beside the classifier from one generated
repository, against the in-process PyTorch reference, through the SDK."""
from __future__ import annotations

import numpy as np
import pytest

from lesionserve.export.assemble import assemble_pipelines
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.segmentation.reference import SegmentationReference
from lesionserve.segmentation.spec import LESION_SEGMENT
from lesionserve.server import TritonServer
from lesionserve.spec import CLASS_NAMES
from lesionserve_client import LesionClient, SegmentationResult, UndecodableImageError

pytestmark = pytest.mark.integration

#: The issue's bound: served masks equal the reference's on at least this share of pixels.
MIN_PIXEL_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def server(small_artifacts, segmenter, tmp_path_factory):
    repo = assemble_pipelines([(LESION_ENSEMBLE, small_artifacts), (LESION_SEGMENT, segmenter)],
                              out=tmp_path_factory.mktemp("repo_seg") / "model_repository", views=1)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as running:
        yield running


def test_served_masks_boxes_and_areas_equal_the_reference(server, segmenter, varied_images):
    blobs = list(varied_images.values())
    with LesionClient(server.grpc_url, max_images_per_request=4) as client:
        served = client.segment(blobs)
        classified = client.classify(blobs[:2])  # the classifier still answers from the same server
    want = SegmentationReference([segmenter / "checkpoint.pt"]).segment(blobs)
    worst = 1.0
    for got, ref, blob in zip(served, want, blobs):
        assert isinstance(got, SegmentationResult)
        assert got.mask.shape == ref.mask.shape and got.found == ref.found
        worst = min(worst, float((got.mask == ref.mask).mean()))
        assert got.box == (ref.box if ref.found else None)
        assert abs(got.area_fraction - ref.area_fraction) < 1e-3
    print(f"segmentation: {len(blobs)} images, masks agree on >= {worst:.4%} of pixels; boxes equal")
    assert worst >= MIN_PIXEL_AGREEMENT
    assert len(classified) == 2 and all(r.label in CLASS_NAMES for r in classified)
    picture = served[0].overlay(blobs[0])
    assert picture.shape == (*served[0].mask.shape, 3) and picture.dtype == np.uint8


def test_bad_images_get_their_error_in_place_and_the_others_their_lesion(server, varied_images):
    blobs = [varied_images["png_320x240"], b"not an image", varied_images["bmp_160x120"]]
    with LesionClient(server.grpc_url) as client:
        rows = client.segment(blobs, partial=True)
        assert isinstance(rows[1], UndecodableImageError) and rows[1].index == 1
        assert rows[0].mask.shape == (240, 320) and rows[2].mask.shape == (120, 160)
        with pytest.raises(UndecodableImageError, match=r"images\[1\]"):
            client.segment(blobs)


def test_client_cli_prints_boxes_and_writes_one_overlay_per_image(server, varied_images, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    path = tmp_path / "lesion.png"
    path.write_bytes(varied_images["png_320x240"])
    out = subprocess.run([sys.executable, "-m", "lesionserve_client", "segment", str(path), "--url", server.grpc_url,
                          "--overlay", str(tmp_path / "seg")], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0].split() == ["IMAGE", "FOUND", "BOX", "AREA"] and str(path) in out.stdout
    assert "1 overlay(s) in" in out.stderr
    assert Image.open(tmp_path / "seg" / "lesion_lesion.png").size == (320, 240)


def test_the_gpu_torch_segmenter_on_a_cpu_instance_equals_the_reference(small_artifacts, segmenter, varied_images,
                                                                        tmp_path_factory):
    """The segmenter's gpu_torch config (PyTorch in the python backend on checkpoint.pt), moved to a
    CPU instance: the torch runtime's code path wherever the tests run (FP16 and graphs need CUDA)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = assemble_pipelines([(LESION_ENSEMBLE, small_artifacts), (LESION_SEGMENT, segmenter)], checkpoints=True,
                              out=tmp_path_factory.mktemp("repo_seg_torch") / "model_repository", views=1)
    folder = repo / LESION_SEGMENT.segmenter.name
    config = text_format.Parse((folder / "configs" / "gpu_torch.pbtxt").read_text(), model_config_pb2.ModelConfig())
    for group in config.instance_group:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
    (folder / "1" / "model.onnx").unlink()  # only the torch runtime can serve now
    blobs = list(varied_images.values())
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as running:
        with LesionClient(running.grpc_url) as client:
            served = client.segment(blobs)
    want = SegmentationReference([segmenter / "checkpoint.pt"]).segment(blobs)
    worst = min(float((got.mask == ref.mask).mean()) for got, ref in zip(served, want))
    print(f"gpu_torch segmenter on CPU: masks agree on >= {worst:.4%} of pixels")
    assert worst >= MIN_PIXEL_AGREEMENT and all(g.box == (r.box if r.found else None) for g, r in zip(served, want))
