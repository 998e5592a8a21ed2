"""Two pipelines declared apart, served from one repository by one tritonserver, each equal to its reference.

The second pipeline is declared here and nowhere else: two other timm architectures, at other input
sizes and with other normalisations than the seed ensemble, four views instead of eight. That
nothing outside this file changes for it is the point: declarations flow into artifacts, the
generated repository, the served steps, the reference and the SDK.
"""
from __future__ import annotations

import numpy as np
import pytest

from lesionserve.architectures import Architecture, Normalization, registered
from lesionserve.calibration import Calibration
from lesionserve.export.assemble import assemble_pipelines
from lesionserve.export.random_artifacts import build_random_artifacts
from lesionserve.pipelines import LESION_ENSEMBLE, EnsemblePipeline, Member
from lesionserve.reference import ReferencePipeline
from lesionserve.repository import check_repository
from lesionserve.server import TritonServer
from lesionserve_client import LesionClient

pytestmark = pytest.mark.integration

PARITY_ATOL = 1e-4
LITE_NORM = Normalization("lite", (0.45, 0.42, 0.40), (0.27, 0.26, 0.28))
ARCHITECTURES = (
    Architecture("lite_resnet18", "timm_classifier", "resnet18", input_size=96,
                 normalization=Normalization("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
    # Its head is pooling + 1x1 conv + activation + linear: no closed-form maps, so no explain ensemble.
    Architecture("lite_mobilenet", "timm_classifier", "mobilenetv3_small_100", input_size=128, normalization=LITE_NORM,
                 explainable=False),
)


@pytest.fixture(scope="module")
def second():
    """The second declaration, with its architectures registered for this module only."""
    with registered(*ARCHITECTURES):
        yield EnsemblePipeline(
            "lite_ensemble",
            (Member("lite_resnet18", "lite_resnet18"), Member("lite_mobilenet", "lite_mobilenet")),
            views=4,
            description="test pipeline: ResNet18 @96 (inception statistics) + MobileNetV3-S @128 (own statistics), 4 views",
        )


@pytest.fixture(scope="module")
def second_artifacts(second, tmp_path_factory):
    calibration = Calibration(weights={"lite_resnet18": 0.7, "lite_mobilenet": 0.3}, thresholds={"MEL": 0.2},
                              threshold_order=("MEL",))
    return build_random_artifacts(tmp_path_factory.mktemp("lite"), calibration, seed=3, pipeline=second)


@pytest.fixture(scope="module")
def two_pipeline_server(second, small_artifacts, second_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "model_repository"
    repository = assemble_pipelines([(LESION_ENSEMBLE, small_artifacts), (second, second_artifacts)], out=out)
    server = TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240).start()
    yield server, repository
    server.stop()


def _arrays(results, classes, members):
    probs = np.array([[r.probabilities[c] for c in classes] for r in results])
    per = np.array([[[r.backbone_probabilities[m][c] for c in classes] for m in members] for r in results])
    return probs, per


@pytest.mark.parametrize("which", ["lesion_ensemble", "lite_ensemble"])
def test_each_pipeline_matches_its_reference_within_1e4_when_two_share_one_server(
    which, second, two_pipeline_server, small_artifacts, second_artifacts, varied_images
):
    server, repository = two_pipeline_server
    if which == "lite_ensemble":
        declared, artifacts = second, second_artifacts
    else:
        declared, artifacts = LESION_ENSEMBLE, small_artifacts
    reference = ReferencePipeline.from_artifacts(artifacts, views=declared.views, pipeline=declared)
    blobs = list(varied_images.values())
    with LesionClient(server.grpc_url, model_name=which) as client:
        assert client.backbones == declared.member_names
        results = client.classify(blobs)
    expected = reference.run(blobs)
    probs, per = _arrays(results, declared.class_names, declared.member_names)
    diff = max(np.abs(probs - expected.probs).max(), np.abs(per - expected.backbone_probs).max())
    print(f"{which}: {len(blobs)} images x {declared.views} views, max |Triton - reference| = {diff:.2e}")
    assert diff <= PARITY_ATOL
    assert [r.label for r in results] == expected.labels


def test_served_repository_is_exactly_the_generated_one_for_both_declarations(second, two_pipeline_server):
    _, repository = two_pipeline_server
    small = LESION_ENSEMBLE.with_input_sizes({m: 64 for m in LESION_ENSEMBLE.member_names})
    assert check_repository(repository, [small, second]) == []
    # Tensors are keyed by size and normalisation: the two pipelines' inputs never collide.
    text = (repository / "lite_ensemble_preprocess" / "config.pbtxt").read_text()
    assert "pixel_values_96_inception" in text and "pixel_values_128_lite" in text
