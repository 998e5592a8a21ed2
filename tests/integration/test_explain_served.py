"""Heatmaps from the server (the <model>_explain ensemble) against the in-process reference."""
from __future__ import annotations

import numpy as np
import pytest

from lesionserve.reference import explain
from lesionserve_client import LesionClient, UndecodableImageError

pytestmark = pytest.mark.integration

#: The issue's bound on maps in [0, 1] (the reference itself equals pytorch-grad-cam: tests/unit/test_explain.py).
MAP_ATOL = 1e-3


@pytest.mark.parametrize("views,method", [(1, "gradcam"), (8, "gradcampp")])
def test_served_heatmaps_equal_the_reference_within_1e3_and_classification_is_unchanged(
    views, method, request, varied_images
):
    server = request.getfixturevalue(f"server_t{views}")
    reference = request.getfixturevalue(f"reference_t{views}")
    blobs = list(varied_images.values())[:4]
    with LesionClient(server.grpc_url) as client:
        plain = client.classify(blobs)
        explained = client.classify(blobs, explain=True, explain_method=method)
        other = client.classify(blobs[:1], explain=True, explain_class="VASC", explain_method=method)
    _, want = explain(reference, blobs, method)
    worst = max(float(np.abs(r.heatmap - m).max()) for r, m in zip(explained, want.maps))
    _, want_vasc = explain(reference, blobs[:1], method, classes=["VASC"])
    worst = max(worst, float(np.abs(other[0].heatmap - want_vasc.maps[0]).max()))
    print(f"T={views} {method}: max |served - reference| heatmap = {worst:.2e} over {len(blobs) + 1} maps")
    assert worst <= MAP_ATOL
    assert [r.heatmap.shape for r in explained] == [m.shape for m in want.maps]
    assert [r.explained_class for r in explained] == [r.label for r in plain] and other[0].explained_class == "VASC"
    for a, b in zip(plain, explained):  # the explain ensemble classifies exactly as the plain one
        assert a.label == b.label and max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) < 1e-6
    picture = explained[0].overlay(blobs[0])
    assert picture.shape == (*explained[0].heatmap.shape, 3) and picture.dtype == np.uint8


def test_explanations_keep_per_image_errors_and_refuse_unknown_classes(server_t1, varied_images):
    blobs = [varied_images["png_320x240"], b"not an image", varied_images["bmp_160x120"]]
    with LesionClient(server_t1.grpc_url) as client:
        rows = client.classify(blobs, partial=True, explain=True)
        assert isinstance(rows[1], UndecodableImageError) and rows[1].index == 1
        assert rows[0].heatmap.shape == (240, 320) and rows[2].heatmap.shape == (120, 160)
        with pytest.raises(ValueError, match="cannot explain unknown class 'mole'; classes: MEL, NV"):
            client.classify(blobs[:1], explain=True, explain_class="mole")
        with pytest.raises(UndecodableImageError, match=r"images\[1\]"):
            client.classify(blobs, explain=True)


def test_client_cli_writes_one_overlay_per_image_when_asked_to_explain(server_t1, varied_images, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    paths = []
    for name in ("jpeg_600x450", "png_320x240"):
        path = tmp_path / f"{name}.{'jpg' if name.startswith('jpeg') else 'png'}"
        path.write_bytes(varied_images[name])
        paths.append(str(path))
    out = subprocess.run([sys.executable, "-m", "lesionserve_client", "classify", *paths, "--url", server_t1.grpc_url,
                          "--explain", str(tmp_path / "maps"), "--explain-method", "gradcampp"],
                         capture_output=True, text=True, check=True)
    assert "2 overlay(s) in" in out.stderr and "LABEL" in out.stdout
    assert Image.open(tmp_path / "maps" / "jpeg_600x450_gradcampp.png").size == (600, 450)
    assert Image.open(tmp_path / "maps" / "png_320x240_gradcampp.png").size == (320, 240)
