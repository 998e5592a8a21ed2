"""Training stage: dataset loading and errors, the eval transform, metrics, end-to-end run."""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lesionserve.models import load_checkpoint
from lesionserve.preprocessing import decode_image, preprocess_rgb
from lesionserve.architectures import ARCHITECTURES
from lesionserve.spec import CLASS_NAMES
from lesionserve.training.data import (
    DatasetError,
    LesionDataset,
    load_dataset,
    load_isic_dir,
    validation_samples,
)
import lesionserve.training.train
from lesionserve.training.metrics import balanced_accuracy, confusion_matrix, per_class_recall
from lesionserve.training.splits import load_or_create_splits
from lesionserve.training.train import TrainConfig, main, train

INPUT = "ISIC2018_Task3_Training_Input"
TRUTH = "ISIC2018_Task3_Training_GroundTruth"
HEADER = "image," + ",".join(CLASS_NAMES)


def one_hot(label: int) -> list[str]:
    return ["1.0" if i == label else "0.0" for i in range(len(CLASS_NAMES))]


def make_isic(root: Path, labels: list[int], width: int = 40, height: int = 32) -> Path:
    """Write a tiny ISIC-layout dataset: one JPEG per label (class-tinted noise) and the CSV."""
    (root / INPUT).mkdir(parents=True)
    (root / TRUTH).mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [HEADER]
    for i, label in enumerate(labels):
        image_id = f"ISIC_{i:07d}"
        bgr = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        bgr[..., label % 3] += np.uint8(30 * (label + 1))
        assert cv2.imwrite(str(root / INPUT / f"{image_id}.jpg"), bgr)
        lines.append(",".join([image_id, *one_hot(label)]))
    (root / TRUTH / f"{TRUTH}.csv").write_text("\n".join(lines) + "\n")
    return root


def rewrite_csv(root: Path, lines: list[str]) -> None:
    (root / TRUTH / f"{TRUTH}.csv").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------- loading


def test_load_isic_dir_returns_samples_in_csv_order_when_layout_valid(tmp_path):
    labels = [0, 1, 6, 3, 1]
    make_isic(tmp_path, labels)
    samples = load_isic_dir(tmp_path)
    assert [s.label for s in samples] == labels
    assert [s.image_id for s in samples] == [f"ISIC_{i:07d}" for i in range(len(labels))]
    assert all(s.path.is_file() and s.path.parent.name == INPUT for s in samples)


def test_load_isic_dir_raises_file_not_found_naming_path_when_root_missing(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_isic_dir(missing)


def test_load_isic_dir_names_expected_input_folder_when_input_folder_missing(tmp_path):
    make_isic(tmp_path, [0, 1])
    (tmp_path / INPUT).rename(tmp_path / "images")
    with pytest.raises(DatasetError, match=r"_Input.*ISIC2018_Task3_Training_Input"):
        load_isic_dir(tmp_path)


def test_load_isic_dir_names_expected_truth_folder_when_groundtruth_folder_missing(tmp_path):
    make_isic(tmp_path, [0, 1])
    (tmp_path / TRUTH).rename(tmp_path / "labels")
    with pytest.raises(DatasetError, match=r"_GroundTruth.*ISIC2018_Task3_Training_GroundTruth"):
        load_isic_dir(tmp_path)


def test_load_isic_dir_names_expected_csv_when_csv_missing(tmp_path):
    make_isic(tmp_path, [0, 1])
    (tmp_path / TRUTH / f"{TRUTH}.csv").unlink()
    with pytest.raises(DatasetError, match=f"no ground-truth CSV.*{TRUTH}.csv"):
        load_isic_dir(tmp_path)


@pytest.mark.parametrize(
    "header",
    [
        "image,NV,MEL,BCC,AKIEC,BKL,DF,VASC",  # two classes swapped
        "image,MEL,NV,BCC,AKIEC,BKL,DF",  # a class missing
        "id,MEL,NV,BCC,AKIEC,BKL,DF,VASC",  # first column renamed
    ],
)
def test_load_isic_dir_reports_expected_header_when_header_differs(tmp_path, header):
    make_isic(tmp_path, [0])
    rewrite_csv(tmp_path, [header, "ISIC_0000000," + ",".join(one_hot(0))])
    with pytest.raises(DatasetError, match="expected 'image,MEL,NV,BCC,AKIEC,BKL,DF,VASC'"):
        load_isic_dir(tmp_path)


@pytest.mark.parametrize(
    "values",
    [
        ["1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"],  # two classes
        ["0.0"] * 7,  # no class
        ["0.5", "0.5", "0.0", "0.0", "0.0", "0.0", "0.0"],  # soft label
    ],
)
def test_load_isic_dir_names_row_and_image_when_row_not_one_hot(tmp_path, values):
    make_isic(tmp_path, [0, 1])
    rewrite_csv(tmp_path, [HEADER, "ISIC_0000000," + ",".join(one_hot(0)), "ISIC_0000001," + ",".join(values)])
    with pytest.raises(DatasetError, match=r"line 3 \(image 'ISIC_0000001'\).*not one-hot"):
        load_isic_dir(tmp_path)


def test_load_isic_dir_names_image_when_listed_file_absent(tmp_path):
    make_isic(tmp_path, [0, 1, 2])
    (tmp_path / INPUT / "ISIC_0000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"not found: .*ISIC_0000001\.jpg"):
        load_isic_dir(tmp_path)


def test_load_isic_dir_names_image_when_listed_twice(tmp_path):
    make_isic(tmp_path, [0, 1])
    rewrite_csv(tmp_path, [HEADER] + ["ISIC_0000000," + ",".join(one_hot(0))] * 2)
    with pytest.raises(DatasetError, match="'ISIC_0000000' already listed on line 2"):
        load_isic_dir(tmp_path)


# --------------------------------------------------------------------------------------- datasets


def test_lesion_dataset_item_equals_serving_preprocess_when_image_not_square(tmp_path):
    make_isic(tmp_path, [4, 2], width=50, height=37)  # non-square: resize is exercised
    samples = load_isic_dir(tmp_path)
    dataset = LesionDataset(samples, size=48)
    for index, sample in enumerate(samples):
        tensor, label = dataset[index]
        expected = preprocess_rgb(decode_image(sample.path.read_bytes()), 48)
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 48, 48)
        assert np.array_equal(tensor.numpy(), expected)
        assert label == sample.label



def test_validation_samples_raises_when_config_records_no_split_file():
    with pytest.raises(DatasetError, match="records no split file"):
        validation_samples({"data": "somewhere", "val_fraction": 0.2, "seed": 0})

# ---------------------------------------------------------------------------------------- metrics


def test_confusion_matrix_counts_true_rows_and_predicted_columns_when_given_labels():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_per_class_recall_is_nan_for_absent_class_when_class_missing_from_y_true():
    recall = per_class_recall([0, 0, 0, 0, 2, 2], [0, 0, 0, 1, 2, 1], num_classes=4)
    np.testing.assert_allclose(recall[[0, 2]], [0.75, 0.5])
    assert math.isnan(recall[1]) and math.isnan(recall[3])  # class 1 only predicted, class 3 nowhere


def test_balanced_accuracy_excludes_absent_class_when_class_missing_from_y_true():
    # recalls: class 0 = 1/2, class 1 = 2/2, class 2 absent -> (0.5 + 1.0) / 2
    assert balanced_accuracy([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3) == pytest.approx(0.75)


def test_balanced_accuracy_differs_from_accuracy_when_classes_imbalanced():
    y_true, y_pred = [0, 0, 0, 1], [0, 0, 0, 0]  # accuracy 0.75
    assert balanced_accuracy(y_true, y_pred, num_classes=2) == pytest.approx(0.5)


def test_metrics_raise_when_labels_out_of_range_or_empty():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 7], [0, 0], num_classes=7)
    with pytest.raises(ValueError, match="length"):
        confusion_matrix([0, 1], [0], num_classes=7)
    with pytest.raises(ValueError, match="empty"):
        balanced_accuracy([], [], num_classes=7)


# -------------------------------------------------------------------------------------- train/CLI


def test_train_cli_writes_reloadable_checkpoint_and_metrics_when_run_one_epoch(tmp_path, capsys):
    data = make_isic(tmp_path / "data", [c for c in range(7) for _ in range(2)])  # 14 images
    out = tmp_path / "out" / "resnet50"
    argv = ["--backbone", "resnet50", "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--input-size", "64", "--threads", "1", "--seed", "1"]
    assert main(argv) == 0

    for name in ("checkpoint.pt", "config.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))

    for name in ("curves.png", "last.pt"):
        assert (out / name).is_file(), name
    assert (tmp_path / "out" / "splits.csv").is_file()  # shared by the backbones of one artifacts folder

    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "resnet50" and config["input_size"] == 64 and config["native_input_size"] == 224
    assert config["class_names"] == list(CLASS_NAMES)
    assert config["data"] == str(data.resolve()) and config["seed"] == 1 and config["epochs"] == 1
    assert config["splits"] == str((tmp_path / "out" / "splits.csv").resolve())
    # The recipe's values for resnet50, untouched by the flags above.
    assert (config["lr"], config["focal_gamma"], config["label_smoothing"], config["sampler"]) == (1e-4, 1.0, 0.1, "balanced")
    assert "resolved config" in capsys.readouterr().err

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"best_epoch", "val_balanced_accuracy", "per_class_recall", "history"} <= set(metrics)
    # 2 images (2 lesions) per class over 60/20/20: 1 train and 1 val per class, test stays empty.
    assert metrics["best_epoch"] == 1 and metrics["val_samples"] == 7 and metrics["train_samples"] == 7
    assert list(metrics["per_class_recall"]) == list(CLASS_NAMES)
    assert len(metrics["history"]) == 1
    assert {"train_loss", "val_bacc", "val_loss", "lr", "seconds"} <= set(metrics["history"][0])
    assert 0.0 <= metrics["val_balanced_accuracy"] <= 1.0
    assert metrics["history"][0]["val_bacc"] == metrics["val_balanced_accuracy"]

    spec, model, payload = load_checkpoint(out / "checkpoint.pt")
    assert spec.name == "resnet50" and payload["config"] == config
    assert payload["metrics"]["val_balanced_accuracy"] == metrics["val_balanced_accuracy"]
    # The reloaded weights reproduce the recorded validation score on the split calibration reads.
    val_samples = validation_samples(config)
    assert len(val_samples) == 7
    with torch.inference_mode():
        batch = torch.stack([LesionDataset(val_samples, 64)[i][0] for i in range(len(val_samples))])
        preds = model(batch).argmax(dim=1).numpy()
    assert balanced_accuracy([s.label for s in val_samples], preds) == pytest.approx(metrics["val_balanced_accuracy"])


def test_train_cli_lists_backbone_choices_when_backbone_unknown(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--backbone", "vgg16", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown architecture 'vgg16'" in err and all(name in err for name in ARCHITECTURES)


def test_train_raises_naming_path_when_data_dir_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data directory not found: .*nowhere"):
        train(TrainConfig(backbone="resnet50", data=str(missing), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_train_cli_exits_with_message_when_data_dir_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--backbone", "densenet121", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "data directory not found" in capsys.readouterr().err


def test_recompute_bn_stats_sets_exact_feature_mean_when_batches_are_equal_sized():
    from torch.utils.data import DataLoader, TensorDataset

    from lesionserve.training.train import recompute_bn_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    x = torch.randn(12, 3, 8, 8) * 3 + 1
    loader = DataLoader(TensorDataset(x, torch.zeros(12)), batch_size=4)
    recompute_bn_stats(model, loader)
    with torch.no_grad():
        features = model[0](x)
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


# ------------------------------------------------------------------------- the recipe, end to end (tiny)


def _tiny_backbone(name: str) -> torch.nn.Module:
    """timm's 0.4 M-parameter test ResNet (BatchNorm, ``fc`` head) in place of the real architecture."""
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASS_NAMES))


@pytest.fixture
def tiny_backbone(monkeypatch):
    """Train loops below check the loop's logic, not ResNet50: a small model keeps them fast on 2 CPUs."""
    monkeypatch.setattr(lesionserve.training.train, "create_backbone", _tiny_backbone)


def tiny(tmp_path: Path, data: Path, out: str = "runs/r50", **overrides) -> dict:
    """A CPU-sized run of the real recipe: 32 px, 2 steps of 4 images, 1 precise-BN batch."""
    return {"backbone": "resnet50", "data": str(data), "out": str(tmp_path / out), "splits": str(tmp_path / "splits.csv"),
            "epochs": 2, "batch_size": 4, "input_size": 32, "threads": 1, "max_steps_per_epoch": 2,
            "precise_bn_batches": 1, "lr": 1e-3, "device": "cpu", **overrides}


def two_per_class(root: Path) -> Path:
    return make_isic(root, [c for c in range(7) for _ in range(2)])


def fake_val_bacc(monkeypatch, values: list[float]) -> None:
    """Real validation, but the balanced accuracy the loop sees follows ``values`` epoch by epoch."""
    real, scripted = lesionserve.training.train.validate, iter(values)

    def validate(model, loader, rt):
        return {**real(model, loader, rt), "balanced_accuracy": next(scripted)}

    monkeypatch.setattr(lesionserve.training.train, "validate", validate)


def test_train_resume_reaches_same_weights_when_split_into_one_plus_one_epochs(tmp_path, tiny_backbone):
    data = two_per_class(tmp_path / "data")
    straight = train(tiny(tmp_path, data, out="a/r50", epochs=2))
    train(tiny(tmp_path, data, out="b/r50", epochs=1))
    resumed = train(tiny(tmp_path, data, out="b/r50", epochs=2, resume=str(tmp_path / "b/r50/last.pt")))

    a = torch.load(tmp_path / "a/r50/last.pt", weights_only=False)
    b = torch.load(tmp_path / "b/r50/last.pt", weights_only=False)
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"][0].items():  # Adam moments of the first parameter
        assert torch.equal(value, b["optimizer"]["state"][0][key]), key
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    for field in ("train_loss", "val_loss", "val_bacc", "lr"):
        assert [h[field] for h in resumed["history"]] == [h[field] for h in straight["history"]], field


def test_train_refuses_resume_when_run_differs(tmp_path, tiny_backbone):
    data = two_per_class(tmp_path / "data")
    train(tiny(tmp_path, data, epochs=1))
    with pytest.raises(ValueError, match="cannot resume .*input_size: 32 there, 48 here"):
        train(tiny(tmp_path, data, epochs=2, input_size=48, resume=str(tmp_path / "runs/r50/last.pt")))


def test_train_stops_early_when_val_bacc_stalls_for_patience_epochs(tmp_path, monkeypatch, tiny_backbone):
    fake_val_bacc(monkeypatch, [0.3, 0.5, 0.4, 0.5, 0.45, 0.9, 0.9, 0.9])
    metrics = train(tiny(tmp_path, two_per_class(tmp_path / "data"), epochs=8, early_stop_patience=3,
                         max_steps_per_epoch=1))
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]  # 3 epochs after the best (2), then stop
    assert metrics["best_epoch"] == 2 and metrics["val_balanced_accuracy"] == 0.5  # a tie is no improvement
    assert metrics["stop_reason"].startswith("early stop: no better val BACC for 3 epochs")
    saved = json.loads((tmp_path / "runs/r50/metrics.json").read_text())
    assert saved["stop_reason"] == metrics["stop_reason"] and saved["best_epoch"] == 2


def test_train_halves_lr_when_val_bacc_stalls_past_plateau_patience(tmp_path, monkeypatch, tiny_backbone):
    fake_val_bacc(monkeypatch, [0.5, 0.4, 0.4, 0.4])
    metrics = train(tiny(tmp_path, two_per_class(tmp_path / "data"), epochs=4, plateau_patience=1,
                         early_stop_patience=None, max_steps_per_epoch=1, save_state=False))
    assert [h["lr"] for h in metrics["history"]] == [1e-3, 1e-3, 1e-3, 5e-4]
    assert not (tmp_path / "runs/r50/last.pt").exists()  # save_state=False


def test_train_follows_warmup_then_cosine_when_schedule_cosine(tmp_path, tiny_backbone):
    # 2 steps/epoch x 3 epochs, 1 warmup epoch: per-step factors 0.5, 1 | 1, 0.854 | 0.5, 0.146
    metrics = train(tiny(tmp_path, two_per_class(tmp_path / "data"), epochs=3, schedule="cosine", warmup_epochs=1))
    lrs = [h["lr"] for h in metrics["history"]]  # the lr of each epoch's last step
    assert lrs == pytest.approx([1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2])


def test_train_starts_from_pretrained_file_and_reports_head_when_head_shape_differs(tmp_path, tiny_backbone):
    import timm

    imagenet = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "in1k.pth")
    data = two_per_class(tmp_path / "data")
    metrics = train(tiny(tmp_path, data, epochs=1, pretrained=str(tmp_path / "in1k.pth")))
    assert "loaded strictly from" in metrics["pretrained"] and "classifier head NOT loaded" in metrics["pretrained"]
    assert "fc.weight [1000," in metrics["pretrained"]
    broken = imagenet.state_dict()
    broken.pop("conv1.0.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="do not match the model .*1 missing.*\n  missing: conv1.0.weight"):
        train(tiny(tmp_path, data, out="b/r50", epochs=1, pretrained=str(tmp_path / "broken.pth")))


def test_train_never_reads_test_images_when_split_has_test_part(tmp_path, tiny_backbone):
    data = make_isic(tmp_path / "data", [c for c in range(7) for _ in range(5)])
    splits = load_or_create_splits(tmp_path / "splits.csv", load_dataset(data), val_fraction=0.2, test_fraction=0.2)
    assert len(splits["test"]) == 7
    for sample in splits["test"]:
        sample.path.write_bytes(b"not an image")  # reading one would raise ImageDecodeError
    metrics = train(tiny(tmp_path, data, epochs=1, precise_bn_batches=50))
    assert metrics["test_samples"] == 7 and metrics["train_samples"] == 21 and metrics["val_samples"] == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, config: dict, results: str) -> None:
    # What torchrun sets for each process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    lesionserve.training.train.create_backbone = _tiny_backbone  # a fresh process: the fixture's patch does not reach it
    metrics = train(config)
    Path(results, f"rank{rank}.json").write_text(json.dumps(metrics))


def test_train_ddp_shares_draws_and_validation_when_two_gloo_processes(tmp_path):
    data = two_per_class(tmp_path / "data")  # 7 train images: 4 draws per rank (padded to 8), 7 val images
    config = tiny(tmp_path, data, epochs=1, threads=1, max_steps_per_epoch=None)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)

    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["history"][0]["train_images"] == 8  # summed over both processes
    assert sum(map(sum, rank0["confusion_matrix"])) == 7  # each process scored its half of val
    for field in ("train_loss", "val_loss", "val_bacc"):
        assert rank0["history"][0][field] == rank1["history"][0][field], field
    out = Path(config["out"])
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "config.json", "metrics.json", "curves.png", "last.pt"}
    assert json.loads((out / "metrics.json").read_text())["history"][0]["train_images"] == 8
