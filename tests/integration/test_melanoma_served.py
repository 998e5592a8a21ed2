"""The ViT melanoma pipeline (melanoma_vit) served from a generated repository, against the
in-process PyTorch reference, through the SDK and its CLI."""
from __future__ import annotations

import json

import pytest

from lesionserve.export.assemble import assemble_pipelines
from lesionserve.server import TritonServer
from lesionserve.vit.reference import MelanomaReference, served_against_reference
from lesionserve.vit.spec import MELANOMA_VIT
from lesionserve_client import LesionClient, MelanomaResult, UndecodableImageError
from lesionserve_client.cli import main as client_main

pytestmark = pytest.mark.integration

#: The issue's bounds: served probabilities and maps against the in-process reference.
PROB_ATOL, MAP_ATOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def server(vit_artifacts, tmp_path_factory):
    repo = assemble_pipelines([(MELANOMA_VIT, vit_artifacts)], out=tmp_path_factory.mktemp("repo_vit") / "model_repository")
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as running:
        yield running


def test_served_heads_decisions_and_maps_equal_the_reference(server, vit_artifacts, varied_images):
    blobs = list(varied_images.values())
    with LesionClient(server.grpc_url, max_images_per_request=3) as client:
        served = client.melanoma(blobs)
    want = MelanomaReference.from_checkpoint(vit_artifacts / "checkpoint.pt", vit_artifacts / "thresholds.json").classify(blobs)
    for i, got in enumerate(served):
        assert isinstance(got, MelanomaResult) and set(got.heads) == {"ham10000", "ph2"}
        h, w = got.attention.shape
        assert (w, h) == varied_images_size(blobs[i])
    prob_diff, map_diff, equal = served_against_reference(served, want)
    assert equal == len(blobs)  # every head's label and melanoma flag
    print(f"melanoma_vit: {len(blobs)} images, max |served - reference| probabilities {prob_diff:.2e}, maps {map_diff:.2e}")
    assert prob_diff <= PROB_ATOL and map_diff <= MAP_ATOL
    assert served[0].prediction.head == "ham10000" and 0.99 <= float(served[0].attention.max()) <= 1.0
    assert float(served[0].attention.min()) <= 0.01


def varied_images_size(blob: bytes) -> tuple[int, int]:
    from lesionserve.preprocessing import decode_image

    rgb = decode_image(blob)
    return rgb.shape[1], rgb.shape[0]


def test_a_head_is_chosen_by_name_and_an_unknown_one_is_refused_before_sending(server, varied_images):
    blob = varied_images["png_320x240"]
    with LesionClient(server.grpc_url) as client:
        both = client.melanoma([blob])[0]
        ph2 = client.melanoma([blob], head="ph2")[0]
        with pytest.raises(ValueError, match=r"unknown head 'dermmel'; melanoma_vit serves heads: ham10000, ph2"):
            client.melanoma([blob], head="dermmel")
    assert ph2.prediction.head == "ph2" and set(ph2.heads) == {"ph2"}
    assert ph2.prediction.class_names == ("common_nevus", "atypical_nevus", "melanoma")
    assert ph2.prediction.positive == "melanoma" and ph2.prediction.p_melanoma == ph2.prediction.probs[2]
    assert ph2.prediction.probs == both.heads["ph2"].probs


def test_bad_images_get_their_error_in_place(server, varied_images):
    blobs = [varied_images["png_320x240"], b"not an image", varied_images["bmp_160x120"]]
    with LesionClient(server.grpc_url) as client:
        rows = client.melanoma(blobs, partial=True)
        assert isinstance(rows[1], UndecodableImageError) and rows[1].index == 1
        assert rows[0].attention.shape == (240, 320) and rows[2].attention.shape == (120, 160)
        with pytest.raises(UndecodableImageError, match=r"images\[1\]"):
            client.melanoma(blobs)


def test_client_cli_prints_every_head_and_writes_attention_overlays(server, varied_images, tmp_path, capsys):
    paths = []
    for name in ("png_320x240", "bmp_160x120"):
        path = tmp_path / f"{name}.img"
        path.write_bytes(varied_images[name])
        paths.append(str(path))
    assert client_main(["melanoma", *paths, "--url", server.grpc_url, "--overlay", str(tmp_path / "maps")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["IMAGE", "HEAD", "DECISION", "P(MELANOMA)", "THRESHOLD"] and len(table) == 1 + 2 * 2
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["bmp_160x120_attention.png", "png_320x240_attention.png"]
    assert client_main(["melanoma", paths[0], "--url", server.grpc_url, "--head", "ph2", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload[0]["head"] == "ph2" and set(payload[0]["probs"]) == {"common_nevus", "atypical_nevus", "melanoma"}
    assert client_main(["melanoma", paths[0], "--url", server.grpc_url, "--head", "nope"]) == 2
