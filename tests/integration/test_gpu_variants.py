"""The GPU variants' python-backend code inside a real tritonserver.

Everywhere: gpu_torch's backbone model (PyTorch in the python backend, loading the training
checkpoints) on a KIND_CPU copy of its committed config, where it runs FP32 without graphs: the
runtime switch, checkpoint loading and the tensor glue, equal to the reference within 1e-4.

With CUDA: the gpu_torch variant itself (FP16 CUDA graphs, python steps on the GPU through DLPack)
against the CPU reference pipeline, within the FP16 tolerance (argmax agreement, max prob diff).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lesionserve.export.assemble import assemble
from lesionserve.parity import compare_probabilities
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.server import TritonServer
from lesionserve_client import LesionClient
from tests.integration.test_ensemble import as_arrays, assert_parity

pytestmark = pytest.mark.integration

BACKBONE_NAMES = LESION_ENSEMBLE.member_names


def _torch_backbones_on_cpu(repository) -> None:
    """Make each backbone's config.pbtxt its committed gpu_torch config, moved to a CPU instance."""
    for name in BACKBONE_NAMES:
        folder = repository / name
        config = text_format.Parse((folder / "configs" / "gpu_torch.pbtxt").read_text(), model_config_pb2.ModelConfig())
        for group in config.instance_group:
            group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        config.parameters["intra_op_threads"].string_value = "1"
        (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
        (folder / "1" / "model.onnx").unlink()  # only the torch runtime can serve now


def test_torch_backbones_match_reference_within_1e4_when_run_on_cpu(artifacts, tmp_path_factory, reference_t1, varied_images):
    repo = assemble(artifacts, out=tmp_path_factory.mktemp("repo_torch_cpu") / "model_repository", views=1, checkpoints=True)
    _torch_backbones_on_cpu(repo)
    blobs = list(varied_images.values())
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=240) as server:
        with LesionClient(server.grpc_url) as client:
            results = client.classify(blobs)
            maps = client.classify(blobs[:3], explain=True, explain_method="gradcampp")
    assert_parity(results, reference_t1.run(blobs))
    from lesionserve.reference import explain

    _, want = explain(reference_t1, blobs[:3], "gradcampp")
    worst = max(float(np.abs(r.heatmap - m).max()) for r, m in zip(maps, want.maps))
    print(f"gpu_torch members on CPU: max |served - reference| Grad-CAM++ heatmap = {worst:.2e}")
    assert worst <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: the gpu_torch variant needs an NVIDIA GPU")
def test_gpu_torch_variant_matches_cpu_reference_within_fp16_tolerance_when_cuda_available(
    artifacts, tmp_path_factory, reference_t8, varied_images, many_images
):
    repo = assemble(artifacts, out=tmp_path_factory.mktemp("repo_gpu_torch") / "model_repository", views=8, checkpoints=True)
    blobs = list(varied_images.values()) + many_images
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, model_config_name="gpu_torch", startup_timeout=300) as server:
        with LesionClient(server.grpc_url) as client:
            results = client.classify(blobs)
    reference = reference_t8.run(blobs)
    probs, per, labels, _ = as_arrays(results)
    fused = compare_probabilities(reference.probs, probs).check("gpu_torch fused probabilities vs CPU reference")
    for i, name in enumerate(BACKBONE_NAMES):
        compare_probabilities(reference.backbone_probs[:, i], per[:, i]).check(f"gpu_torch {name} vs CPU reference")
    agreement = float(np.mean(np.array(labels) == np.array(reference.labels)))
    print(f"gpu_torch vs CPU reference: {fused.summary()}; final labels agree on {agreement:.1%}")
    assert agreement >= fused.min_agreement
