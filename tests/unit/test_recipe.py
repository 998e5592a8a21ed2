"""The training recipe's pieces on tiny inputs: config merging, sampler, focal loss, graded
augmentation, strict pretrained loading, curves and the cosine schedule."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from lesionserve.spec import CLASS_NAMES
from lesionserve.training.augment import AugmentedDataset, augment, class_levels, level_for_ratio
from lesionserve.training.config import ConfigError, TrainConfig, load_recipes, resolve_config
from lesionserve.training.curves import plot_curves
from lesionserve.training.data import Sample
from lesionserve.training.losses import focal_loss
from lesionserve.training.pretrained import (
    PretrainedMismatchError,
    PretrainedUnavailableError,
    load_pretrained,
    unwrap_state_dict,
)
from lesionserve.training.sampling import EpochSampler, cap_per_class
from lesionserve.training.train import build_parser, warmup_cosine

MEL = CLASS_NAMES.index("MEL")
NV = CLASS_NAMES.index("NV")


def base(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"backbone": "resnet50", "data": str(tmp_path / "data"), "out": str(tmp_path / "runs" / "r50"), **overrides}


# ------------------------------------------------------------------------------------------ config


def test_resolve_config_takes_backbone_section_when_no_overrides(tmp_path):
    r50 = resolve_config(base(tmp_path))
    dn = resolve_config(base(tmp_path, backbone="densenet121"))
    b3 = resolve_config(base(tmp_path, backbone="efficientnet_b3"))
    assert (r50["lr"], r50["weight_decay"], r50["focal_gamma"]) == (1e-4, 1e-4, 1.0)
    assert (dn["lr"], dn["weight_decay"], dn["focal_gamma"]) == (5e-5, 5e-5, 1.0)
    assert (b3["lr"], b3["weight_decay"], b3["focal_gamma"]) == (5e-5, 5e-5, 0.0)
    assert (r50["input_size"], dn["input_size"], b3["input_size"]) == (224, 224, 300)  # native, per backbone
    for cfg in (r50, dn, b3):
        assert cfg["label_smoothing"] == 0.1 and cfg["batch_size"] == 32 and cfg["epochs"] == 35
        assert cfg["schedule"] == "plateau" and cfg["plateau_factor"] == 0.5 and cfg["grad_clip"] == 1.0
        assert cfg["early_stop_patience"] == 10 and cfg["sampler"] == "balanced" and cfg["augment"] == "graded"


def test_resolve_config_lets_overrides_beat_profile_when_both_set(tmp_path):
    profiled = resolve_config(base(tmp_path, profile="from_scratch"))
    assert profiled["lr"] == 1e-3 and profiled["profile"] == "from_scratch"
    overridden = resolve_config(base(tmp_path, profile="from_scratch", lr=2e-3, early_stop_patience=None))
    assert overridden["lr"] == 2e-3
    assert overridden["early_stop_patience"] is None  # an explicit null overrides the recipe's 10


def test_resolve_config_raises_listing_valid_keys_when_key_unknown(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) learning_rate; valid keys: .*\blr\b.*weight_decay"):
        resolve_config(base(tmp_path, learning_rate=1e-3))


def test_resolve_config_raises_naming_choices_when_value_invalid(tmp_path):
    with pytest.raises(ConfigError, match="schedule must be one of plateau, cosine; got 'step'"):
        resolve_config(base(tmp_path, schedule="step"))
    with pytest.raises(ConfigError, match="batch_size must be an integer, got '8'"):
        resolve_config(base(tmp_path, batch_size="8"))
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        resolve_config(base(tmp_path, lr="fast"))
    assert resolve_config(base(tmp_path, lr="1e-4"))["lr"] == 1e-4  # how YAML 1.1 reads 1e-4
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction must be below 1"):
        resolve_config(base(tmp_path, val_fraction=0.5, test_fraction=0.5))
    with pytest.raises(ConfigError, match="unknown profile 'fast'.*valid profiles: from_scratch"):
        resolve_config(base(tmp_path, profile="fast"))


def test_resolve_config_reads_other_recipe_when_config_file_given(tmp_path):
    recipe = tmp_path / "mine.yaml"
    text = (Path(load_recipes()["path"]).read_text()
            .replace("lr: 1.0e-4\n  weight_decay", "lr: 3.0e-4\n  weight_decay", 1))  # the defaults section
    recipe.write_text(text + "\n  mine:\n    epochs: 3\n")
    cfg = resolve_config(base(tmp_path, config=str(recipe), backbone="densenet121", profile="mine"))
    assert cfg["recipe"] == str(recipe.resolve()) and cfg["epochs"] == 3
    assert cfg["lr"] == 5e-5  # the backbone section still beats the file's defaults
    assert resolve_config(base(tmp_path, config=str(recipe), backbone="densenet121"))["epochs"] == 35


def test_load_recipes_raises_listing_valid_keys_when_yaml_section_has_unknown_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("defaults:\n  epochs: 3\nbackbones:\n  resnet50:\n    learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"backbones.resnet50: unknown key\(s\) learning_rate; valid keys: .*\blr\b"):
        load_recipes(recipe)
    recipe.write_text("defaults:\n  epochs: 3\nbackbones:\n  vgg16:\n    lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) vgg16; valid keys: resnet50, densenet121, efficientnet_b3"):
        load_recipes(recipe)


def test_resolve_config_puts_split_file_beside_backbone_folders_when_splits_unset(tmp_path):
    cfg = resolve_config(base(tmp_path))
    assert cfg["splits"] == str((tmp_path / "runs" / "splits.csv").resolve())
    assert cfg["split_seed"] == 0 and cfg["test_fraction"] == 0.2 and cfg["val_fraction"] == 0.2
    explicit = resolve_config(TrainConfig(**base(tmp_path, splits=str(tmp_path / "s.csv"))))
    assert explicit["splits"] == str((tmp_path / "s.csv").resolve())


def test_train_cli_passes_only_given_flags_when_parsed():
    args = vars(build_parser().parse_args(
        ["--backbone", "densenet121", "--data", "d", "--out", "o", "--lr", "0.002", "--early-stop-patience", "none",
         "--no-amp", "--schedule", "cosine"]))
    assert args == {"backbone": "densenet121", "data": "d", "out": "o", "lr": 0.002, "early_stop_patience": None,
                    "amp": False, "schedule": "cosine"}


def test_train_cli_help_shows_per_backbone_recipe_when_values_differ(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "recipe: 0.0001 (resnet50), 5e-05 (densenet121, efficientnet_b3)" in text
    assert "from_scratch" in text


# ----------------------------------------------------------------------------------------- sampler


def test_epoch_sampler_draws_classes_uniformly_when_balanced():
    counts = [60, 400, 25, 12, 50, 5, 8]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    sampler = EpochSampler(labels, "balanced", seed=3)
    drawn = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        drawn += [labels[i] for _, _, i in sampler]
    freq = np.bincount(drawn, minlength=7) / len(drawn)
    np.testing.assert_allclose(freq, 1 / 7, atol=0.012)  # natural frequencies range 0.009 .. 0.71
    assert len(EpochSampler(labels, "balanced")) == len(labels)


def test_epoch_sampler_repeats_keys_when_seed_and_epoch_repeat():
    labels = [0] * 20 + [1] * 5 + [6] * 2
    a, b = EpochSampler(labels, seed=7), EpochSampler(labels, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    c = EpochSampler(labels, seed=8)
    c.set_epoch(4)
    assert list(a) != list(c)
    assert [k[:2] for k in a] == [(4, d) for d in range(len(labels))]  # keys carry (epoch, draw position)


def test_epoch_sampler_yields_each_image_once_when_shuffle():
    labels = [0] * 20 + [1] * 5 + [6] * 2
    keys = list(EpochSampler(labels, "shuffle", seed=1))
    assert sorted(i for _, _, i in keys) == list(range(len(labels)))
    assert [i for _, _, i in keys] != list(range(len(labels)))


def test_epoch_sampler_splits_global_draw_across_ranks_when_world_size_two():
    labels = [0] * 10 + [1] * 3 + [2] * 2  # 15 draws: padded to 16, 8 per rank
    single = EpochSampler(labels, seed=2)
    ranks = [EpochSampler(labels, seed=2, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r) for r in ranks] == [8, 8]
    merged = sorted(list(ranks[0]) + list(ranks[1]), key=lambda k: k[1])
    assert merged[:15] == list(single)
    assert merged[15][2] == list(single)[0][2]  # the padding wraps around


def fake_samples(groups: dict[int, list[int]]) -> list[Sample]:
    """{label: [images per lesion, ...]} -> samples with lesion ids."""
    samples = []
    for label, sizes in groups.items():
        for g, size in enumerate(sizes):
            samples += [Sample(Path(f"/d/c{label}_l{g}_{i}.jpg"), label, f"L{label}_{g}") for i in range(size)]
    return samples


def test_cap_per_class_keeps_whole_lesions_when_class_exceeds_cap():
    samples = fake_samples({1: [3, 1, 2, 2, 1, 4], 0: [2, 1], 5: [1]})
    kept = cap_per_class(samples, 4, seed=0)
    per_class = np.bincount([s.label for s in kept], minlength=7)
    assert per_class[1] == 4 and per_class[0] == 3 and per_class[5] == 1
    lesions = {s.lesion_id for s in kept}
    for lesion in lesions:  # a lesion is kept whole or not at all
        assert sum(s.lesion_id == lesion for s in kept) == sum(s.lesion_id == lesion for s in samples)
    assert cap_per_class(list(reversed(samples)), 4, seed=0) == list(reversed(kept))  # order-independent
    assert any(cap_per_class(samples, 4, seed=s) != kept for s in range(1, 6))  # the seed matters
    assert cap_per_class(samples, None, seed=0) == samples


# ------------------------------------------------------------------------------------------- loss


def test_focal_loss_equals_label_smoothed_cross_entropy_when_gamma_zero():
    torch.manual_seed(0)
    logits, targets = torch.randn(9, 7) * 3, torch.randint(0, 7, (9,))
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0, label_smoothing=0.1), expected)
    assert not torch.allclose(focal_loss(logits, targets, gamma=1.0, label_smoothing=0.1), expected)


def test_focal_loss_matches_hand_computation_when_gamma_positive():
    logits, target, eps, gamma = [2.0, 0.0, -1.0], 0, 0.1, 2.0
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    q = [(1 - eps) * (c == target) + eps / 3 for c in range(3)]
    expected = -sum(q[c] * (1 - p[c]) ** gamma * math.log(p[c]) for c in range(3))
    got = focal_loss(torch.tensor([logits]), torch.tensor([target]), gamma=gamma, label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(0.1576, abs=1e-4)  # 0.0039 + 0.0568 + 0.0970, worked out by hand


# ---------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("ratio, level", [(1.0, 0), (1.99, 0), (2.0, 1), (5.99, 1), (6.0, 2), (14.99, 2),
                                          (15.0, 3), (68.0, 3)])
def test_level_for_ratio_follows_seed_thresholds_when_ratio_near_boundaries(ratio, level):
    assert level_for_ratio(ratio) == level


def test_class_levels_force_mel_to_level_two_when_mel_is_common():
    # MEL, NV, BCC, AKIEC, BKL, DF, VASC (HAM10000-like but MEL as large as NV)
    counts = [4000, 4341, 268, 1200, 2500, 64, 280]
    levels = class_levels(counts, "graded")
    assert levels == [2, 0, 3, 1, 0, 3, 3]
    assert class_levels([500, 4341, 268, 187, 586, 64, 84]) == [2, 0, 3, 3, 2, 3, 3]  # HAM10000 pool
    assert class_levels([0, 10, 10, 10, 10, 10, 10]) == [3, 0, 0, 0, 0, 0, 0]  # absent class: rarest


def test_class_levels_ignore_counts_when_mode_basic_or_none():
    counts = [10, 4000, 3, 2, 1, 1, 1]
    assert class_levels(counts, "basic") == [1] * 7
    assert class_levels(counts, "none") == [0] * 7
    with pytest.raises(ValueError, match="augment must be one of graded, basic, none"):
        class_levels(counts, "heavy")


def test_augment_changes_nothing_when_level_zero_and_adds_no_black_border_when_warping():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert np.array_equal(augment(image, 0, np.random.default_rng(1)), image)
    flat = np.full((40, 40, 3), 150, dtype=np.uint8)
    for level in (1, 2):
        for seed in range(5):  # rotations/shifts reflect the border instead of padding black
            assert np.array_equal(augment(flat, level, np.random.default_rng(seed)), flat)
    outputs = [augment(image, 1, np.random.default_rng(s)) for s in range(4)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 3


def test_augment_degrades_mildly_only_when_level_three():
    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8), (0, 0), 2)
    differs = 0
    for seed in range(6):
        two = augment(image, 2, np.random.default_rng(seed))
        three = augment(image, 3, np.random.default_rng(seed))  # same geometry (same draws), then noise/blur/JPEG
        gap = np.abs(two.astype(int) - three.astype(int)).mean()
        differs += gap > 0
        assert gap < 12  # mild: the lesion stays recognisable
    assert differs >= 4


def write_images(folder: Path, labels: list[int]) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i, label in enumerate(labels):
        path = folder / f"img_{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (30, 36, 3), dtype=np.uint8))
        samples.append(Sample(path, label))
    return samples


def test_augmented_dataset_repeats_when_seed_epoch_draw_repeat(tmp_path):
    samples = write_images(tmp_path, [MEL, NV])
    levels = class_levels([1, 10, 0, 0, 0, 0, 0])  # MEL level 3, NV level 0
    a = AugmentedDataset(samples, 32, levels, seed=5)
    b = AugmentedDataset(samples, 32, levels, seed=5)
    x, label = a[(2, 7, 0)]
    assert tuple(x.shape) == (3, 32, 32) and x.dtype == torch.float32 and label == MEL
    assert torch.equal(x, b[(2, 7, 0)][0])
    assert not torch.equal(x, b[(2, 8, 0)][0])  # the same image drawn again gets a new augmentation
    assert not torch.equal(x, b[(3, 7, 0)][0])
    assert not torch.equal(x, AugmentedDataset(samples, 32, levels, seed=6)[(2, 7, 0)][0])
    assert torch.equal(a[(2, 7, 1)][0], a[(3, 9, 1)][0])  # NV: level 0, never augmented


# ------------------------------------------------------------------------------------- pretrained


def tiny_model(num_classes: int = 7) -> torch.nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes)


def test_load_pretrained_copies_every_tensor_when_file_matches(tmp_path):
    source = tiny_model()
    path = tmp_path / "w.pth"
    # DDP-saved and wrapped: {"state_dict": {"module.<name>": tensor}}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = tiny_model()
    report = load_pretrained(model, str(path), "resnet10t")
    assert report.excluded_head == {} and report.loaded == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_load_pretrained_raises_listing_keys_when_names_or_shapes_differ(tmp_path):
    state = tiny_model().state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(3)
    state["conv1.0.weight"] = torch.zeros(1, 3, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save({"model": state}, path)
    with pytest.raises(PretrainedMismatchError) as info:
        load_pretrained(tiny_model(), str(path), "resnet10t")
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 with another shape" in message
    assert "missing: layer1.0.conv1.weight" in message and "unexpected: extra.weight" in message
    assert "shape: conv1.0.weight [1, 3, 3, 3] in file vs [24, 3, 3, 3] in model" in message


def test_load_pretrained_leaves_head_out_and_says_so_when_head_shape_differs(tmp_path):
    imagenet = tiny_model(num_classes=1000)
    path = tmp_path / "in1k.pth"
    torch.save(imagenet.state_dict(), path)
    model = tiny_model()
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    report = load_pretrained(model, str(path), "resnet10t")
    assert report.excluded_head == {"fc.weight": ((1000, 512), (7, 512)), "fc.bias": ((1000,), (7,))}
    assert "classifier head NOT loaded" in report.describe() and "fc.weight [1000, 512]" in report.describe()
    assert torch.equal(model.conv1[0].weight, imagenet.conv1[0].weight)
    assert not model.fc.weight.any()  # the head keeps its zero init


def test_unwrap_state_dict_raises_when_no_tensor_mapping_found():
    with pytest.raises(PretrainedMismatchError, match="no state dict found"):
        unwrap_state_dict({"epoch": 3, "optimizer": {"lr": 1}})


def test_load_pretrained_says_pass_a_file_when_hub_unreachable(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # As on a machine without network, minus the connection timeouts: huggingface_hub read
    # HF_HUB_OFFLINE when it was imported, so set its constant; an empty cache has nothing to offer.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedUnavailableError, match="no network access.*--pretrained /path/to/weights"):
        load_pretrained(tiny_model(), "resnet10t.c3_in1k", "resnet10t")
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a timm model name"):
        load_pretrained(tiny_model(), str(tmp_path / "missing.pth"), "resnet10t")


# ---------------------------------------------------------------------------------- curves, schedule


def test_plot_curves_writes_png_when_history_given(tmp_path):
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.5 / e, "val_bacc": 0.2 * e, "lr": 1e-3 / e}
               for e in (1, 2, 3)]
    path = plot_curves(history, tmp_path / "curves.png", title="resnet50")
    image = cv2.imread(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image is not None and image.shape[1] > 600
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="history is empty"):
        plot_curves([], tmp_path / "empty.png")


def test_warmup_cosine_ramps_then_decays_to_floor_when_stepped():
    factor = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0)
    assert factor(9) == pytest.approx(0.55)  # half-way through the cosine
    assert factor(14) == pytest.approx(0.1) and factor(20) == pytest.approx(0.1)
