"""Each pipeline step, written once over numpy and torch, gives the numpy answer on torch tensors.

The GPU variants run these steps on CUDA tensors; on CPU tensors the same torch code is checked here
against the numpy path the CPU pipeline (and the parity-tested reference) runs. The ``cuda`` cases
need a GPU and skip without one.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lesionserve.arrays import array_ops, is_torch, to_numpy, to_torch
from lesionserve.calibration import Calibration, exceeds
from lesionserve.fusion import fuse, softmax
from lesionserve.preprocessing import normalize, preprocess_batch, preprocess_bytes, resize_batch
from lesionserve.spec import ALLOWED_VIEWS, CLASS_NAMES
from lesionserve.views import make_views

CUDA_REASON = "CUDA not available: the GPU variants' step code runs on CUDA tensors only on an NVIDIA GPU host"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON))]
RULE = Calibration(
    weights={"resnet50": 0.4, "densenet121": 0.35, "efficientnet_b3": 0.25},
    thresholds={"AKIEC": 0.16, "MEL": 0.18},
    threshold_order=("AKIEC", "MEL"),
)


def _encoded_images(count: int = 3) -> list[bytes]:
    rng = np.random.default_rng(3)
    blobs = []
    for i in range(count):
        image = rng.integers(0, 256, size=(40 + 13 * i, 57 + 7 * i, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".png", image)
        assert ok
        blobs.append(buf.tobytes())
    return blobs


def test_array_ops_picks_torch_only_when_given_a_tensor():
    assert array_ops(np.zeros(2)).name == array_ops(0.5).name == "numpy"
    assert array_ops(torch.zeros(2)).name == "torch"
    assert is_torch(torch.zeros(1)) and not is_torch(np.zeros(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("views", ALLOWED_VIEWS)
def test_make_views_on_tensor_equals_numpy_when_views_vary(device, views):
    batch = np.random.default_rng(views).normal(size=(2, 3, 6, 6)).astype(np.float32)
    got = make_views(to_torch(batch, device), views)
    assert is_torch(got) and got.device.type == device and got.is_contiguous()
    np.testing.assert_array_equal(to_numpy(got), make_views(batch, views))  # a pure permutation: exact


def test_make_views_on_tensor_raises_when_images_not_square():
    with pytest.raises(ValueError, match=r"square images, got shape \(1, 3, 4, 5\)"):
        make_views(torch.zeros(1, 3, 4, 5), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_on_tensor_matches_numpy_when_logits_are_large(device):
    logits = np.random.default_rng(1).normal(scale=30, size=(64, 7)).astype(np.float32)
    got = softmax(to_torch(logits, device))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(got), softmax(logits), rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("views", [1, 8])
def test_fuse_on_tensors_matches_numpy_when_three_backbones(device, views):
    rng = np.random.default_rng(views)
    logits = [rng.normal(scale=2, size=(5 * views, 7)).astype(np.float32) for _ in range(3)]
    weights = RULE.weight_vector(("resnet50", "densenet121", "efficientnet_b3"))
    probs, per = fuse([to_torch(x, device) for x in logits], weights, views)
    ref_probs, ref_per = fuse(logits, weights, views)
    assert probs.device.type == device and tuple(per.shape) == (5, 3, 7)
    np.testing.assert_allclose(to_numpy(probs), ref_probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_numpy(per), ref_per, rtol=0, atol=1e-6)


def test_fuse_on_tensors_raises_when_rows_not_multiple_of_views():
    with pytest.raises(ValueError, match="not one common multiple of views=8"):
        fuse([torch.zeros(12, 7)] * 3, [1.0, 1.0, 1.0], 8)


@pytest.mark.parametrize("device", DEVICES)
def test_decide_on_tensor_equals_numpy_when_thresholds_fire_and_tie(device):
    rng = np.random.default_rng(5)
    probs = softmax(rng.normal(scale=1.5, size=(400, 7)))
    mel, akiec = CLASS_NAMES.index("MEL"), CLASS_NAMES.index("AKIEC")
    probs[:3, mel] = 0.18  # equal to theta: must not fire on either path
    probs[3:6, akiec] = 0.16
    labels, fired = RULE.decide(to_torch(probs, device))
    ref_labels, ref_fired = RULE.decide(probs)
    assert labels.dtype == torch.int64 and fired.dtype == torch.bool and labels.device.type == device
    np.testing.assert_array_equal(to_numpy(labels), ref_labels)
    np.testing.assert_array_equal(to_numpy(fired), ref_fired)
    # The constructed cases exercise both branches: some thresholds fire, the ties do not.
    assert ref_fired.any() and not ref_fired[:3, mel].any() and not ref_fired[3:6, akiec].any()


def test_exceeds_keeps_numpy_semantics_when_given_floats():
    assert not exceeds(0.5, 0.5) and exceeds(0.51, 0.5)
    assert exceeds(torch.tensor([0.5, 0.6]), 0.5).tolist() == [False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_on_tensor_equals_numpy_exactly_when_batched(device):
    rgb = np.random.default_rng(2).integers(0, 256, size=(3, 9, 11, 3), dtype=np.uint8)
    got = normalize(to_torch(rgb, device))
    assert tuple(got.shape) == (3, 3, 9, 11) and got.dtype == torch.float32
    np.testing.assert_array_equal(to_numpy(got), np.stack([normalize(image) for image in rgb]))


@pytest.mark.parametrize("device", DEVICES)
def test_preprocess_batch_on_device_equals_host_when_sizes_differ(device):
    blobs = _encoded_images()
    host = preprocess_batch(blobs, (16, 24))
    dev = preprocess_batch(blobs, (16, 24), device=device)
    for size in (16, 24):
        assert dev[size].device.type == device and dev[size].is_contiguous()
        np.testing.assert_array_equal(to_numpy(dev[size]), host[size])


def test_preprocess_batch_equals_per_image_preprocessing_when_batched():
    blobs = _encoded_images()
    batch = preprocess_batch(blobs, (16, 24))
    for size in (16, 24):
        assert batch[size].flags.c_contiguous
        np.testing.assert_array_equal(batch[size], np.stack([preprocess_bytes(b, (size,))[size] for b in blobs]))


def test_resize_batch_names_the_bad_index_when_an_image_is_undecodable():
    from lesionserve.preprocessing import ImageDecodeError

    with pytest.raises(ImageDecodeError, match="undecodable image at index 1"):
        resize_batch([_encoded_images(1)[0], b"not an image"], (16,))
