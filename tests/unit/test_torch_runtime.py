"""The gpu_torch backbone runner: bucketing, the CPU FP32 path, and (with a GPU) FP16 CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.parity import compare_logits
from lesionserve.torch_runtime import TorchBackbone, bucket_for, load_torch_backbone

CUDA_REASON = "CUDA not available: FP16 CUDA graphs of the gpu_torch variant need an NVIDIA GPU"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


def _tiny_model() -> torch.nn.Module:
    """A small CNN with BatchNorm (rows must not mix in eval mode) and a 7-class head."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 7),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize(("rows", "bucket"), [(1, 8), (8, 8), (9, 16), (33, 64), (64, 64)])
def test_bucket_for_picks_smallest_bucket_holding_rows_when_rows_vary(rows, bucket):
    assert bucket_for(rows, (8, 16, 32, 64)) == bucket


@pytest.mark.parametrize(("rows", "message"), [(0, "at least one row"), (65, "exceeds the largest captured batch size 64")])
def test_bucket_for_raises_when_rows_outside_buckets(rows, message):
    with pytest.raises(ValueError, match=message):
        bucket_for(rows, (8, 16, 32, 64))


def test_torch_backbone_equals_model_when_run_on_cpu_in_fp32():
    model = _tiny_model()
    x = np.random.default_rng(0).normal(size=(5, 3, 16, 16)).astype(np.float32)
    runner = TorchBackbone(_tiny_model(), 16, device="cpu", half=False, cuda_graphs=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    got = runner(x)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(runner(torch.from_numpy(x)), got, rtol=0, atol=0)  # numpy or tensor in: same


def test_torch_backbone_raises_when_fp16_or_graphs_requested_on_cpu():
    with pytest.raises(ValueError, match="FP16 and CUDA graphs need a CUDA device"):
        TorchBackbone(_tiny_model(), 16, device="cpu")


def test_torch_backbone_raises_when_input_resolution_differs():
    runner = TorchBackbone(_tiny_model(), 16, device="cpu", half=False, cuda_graphs=False)
    with pytest.raises(ValueError, match=r"expected N x 3 x 16 x 16 images, got \(2, 3, 8, 8\)"):
        runner(np.zeros((2, 3, 8, 8), np.float32))


def test_load_torch_backbone_reads_name_and_resolution_when_checkpoint_saved(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "c.pt", "resnet50", create_backbone("resnet50"), {"config": {"input_size": 64}})
    name, runner = load_torch_backbone(tmp_path / "c.pt", device="cpu", half=False, cuda_graphs=False)
    assert name == "resnet50" and runner.input_size == 64
    assert tuple(runner(np.zeros((2, 3, 64, 64), np.float32)).shape) == (2, 7)


def test_load_torch_backbone_serves_the_traced_segmenter_as_pytorch_does(tmp_path):
    from lesionserve.segmentation.model import save_segmenter, trace_segmenter
    from lesionserve.segmentation.spec import SEGMENTER

    torch.manual_seed(0)
    model = SEGMENTER.create().eval()
    save_segmenter(tmp_path / "s.pt", model, 64)
    name, runner = load_torch_backbone(trace_segmenter(tmp_path / "s.pt", tmp_path / "model.ts"), device="cpu",
                                       half=False, cuda_graphs=False)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    assert name == SEGMENTER.name and runner.input_size == 64
    np.testing.assert_allclose(runner(x).numpy(), want, atol=1e-5)


@needs_cuda
def test_torch_backbone_graphs_match_fp32_eager_when_batches_straddle_buckets():
    model = _tiny_model()
    x = np.random.default_rng(1).normal(size=(83, 3, 16, 16)).astype(np.float32)  # 64 + 19: two replays, padding
    runner = TorchBackbone(_tiny_model(), 16, device="cuda:0", half=True, cuda_graphs=True, buckets=(8, 16, 32, 64))
    assert sorted(runner.graphs) == [8, 16, 32, 64]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    first = runner(x).cpu().numpy()
    runner(np.random.default_rng(2).normal(size=(64, 3, 16, 16)).astype(np.float32))  # overwrite the buffers
    again = runner(x).cpu().numpy()
    np.testing.assert_array_equal(first, again)  # results never alias the graphs' static buffers
    compare_logits(expected, first).check("FP16 CUDA graphs vs FP32 eager")


def test_torch_backbone_explains_as_the_exported_closed_form_when_run_on_cpu():
    from lesionserve.explain import explained

    torch.manual_seed(0)
    model = create_backbone("resnet50").eval()
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    runner = TorchBackbone(model, 64, device="cpu", half=False, cuda_graphs=False)
    logits, cams = runner.explain(x)
    with torch.no_grad():
        want_logits, want_cams = explained(model)(torch.from_numpy(x))
    assert cams.shape == (3, 2, 7, 2, 2) and cams.dtype == torch.float32
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(cams, want_cams, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, runner(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="expected N x 3 x 64 x 64 images"):
        runner.explain(np.zeros((1, 3, 32, 32), np.float32))
