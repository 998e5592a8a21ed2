"""The ViT melanoma classifier without a server: attention made observable without changing the
outputs, the two maps, strict pretrained loading, the unfreezing schedule, decisions, thresholds,
metrics, training with resume, export and the generated repository."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lesionserve.spec import CLASS_NAMES
from lesionserve.explain import upsample_map
from lesionserve.vit.decision import decide, melanoma_of_batch, softmax
from lesionserve.vit.evaluate import head_metrics, threshold_for_sensitivity
from lesionserve.vit.model import (AttentionRecorder, MultiHeadViT, PretrainedError, attention_rollout, cls_attention,
                                   forward_with_attention, group_names, load_pretrained, parameter_groups)
from lesionserve.vit.spec import DEIT, HAM10000_HEAD, PH2_HEAD, VIT_MODEL, MelanomaPipeline, ViTModel
from lesionserve.vit.train import RecipeError, describe_groups, load_recipe, trainable_groups

TINY = ViTModel(timm_name="deit_tiny_patch16_224", input_size=64)


@pytest.fixture(scope="module")
def tiny() -> MultiHeadViT:
    torch.manual_seed(0)
    return MultiHeadViT(TINY).eval()


def test_recording_attention_leaves_the_logits_unchanged_and_restores_fused_attention(tiny):
    x = torch.randn(3, 3, 64, 64)
    assert all(b.attn.fused_attn for b in tiny.backbone.blocks)
    with torch.no_grad():
        fused = tiny(x)
        logits, maps = forward_with_attention(tiny, x)
    for head in TINY.heads:
        assert torch.allclose(fused[head], logits[head], atol=1e-5), head
    assert all(b.attn.fused_attn for b in tiny.backbone.blocks)  # restored
    assert maps["rollout"].shape == maps["cls"].shape == (3, TINY.grid, TINY.grid)


def test_recorder_sees_one_softmax_per_block_whose_rows_sum_to_one(tiny):
    with torch.no_grad(), AttentionRecorder(tiny.backbone) as rec:
        tiny(torch.randn(2, 3, 64, 64))
    tokens = 1 + TINY.grid ** 2
    assert len(rec.weights) == len(tiny.backbone.blocks)
    assert rec.weights[0].shape == (2, 3, tokens, tokens)  # deit_tiny: 3 heads
    assert torch.allclose(rec.weights[-1].sum(-1), torch.ones(2, 3, tokens), atol=1e-5)


def test_rollout_and_cls_attention_match_a_hand_computation():
    rng = np.random.default_rng(0)
    layers = [rng.random((1, 2, 5, 5)) for _ in range(3)]
    layers = [a / a.sum(-1, keepdims=True) for a in layers]
    joint = np.eye(5)
    for a in layers:
        m = 0.5 * a.mean(1)[0] + 0.5 * np.eye(5)
        joint = (m / m.sum(-1, keepdims=True)) @ joint
    weights = [torch.from_numpy(a) for a in layers]
    np.testing.assert_allclose(attention_rollout(weights, 1, 2)[0].numpy().ravel(), joint[0, 1:], rtol=1e-10)
    np.testing.assert_allclose(cls_attention(weights, 1, 2)[0].numpy().ravel(), layers[-1].mean(1)[0, 0, 1:], rtol=1e-10)


def test_groups_cover_every_parameter_once_in_seed_001s_order(tiny):
    groups = parameter_groups(tiny)
    assert list(groups)[:3] == ["heads", "norm", "block11"] and list(groups)[-4:] == ["block0", "pos_embed", "cls_token", "patch_embed"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(tiny.parameters()))


def test_gradual_schedule_heads_first_then_more_pieces_each_epoch_and_all_at_once(tiny):
    names = group_names(tiny)
    config = {"schedule": "gradual", "head_only_epochs": 2, "unfreeze_per_epoch": 1}
    assert trainable_groups(names, 0, config) == trainable_groups(names, 1, config) == ["heads"]
    assert trainable_groups(names, 2, config) == ["heads", "norm"]
    assert trainable_groups(names, 3, config) == ["heads", "norm", "block11"]
    assert trainable_groups(names, 99, config) == names
    assert trainable_groups(names, 0, {**config, "schedule": "all_at_once"}) == names
    assert describe_groups(["heads", "norm", "block11", "block10", "block9", "pos_embed"]) == "heads, norm, block11-block9, pos_embed"


def test_recipe_defaults_are_seed_001s_and_bad_keys_are_refused_by_name():
    r = load_recipe()
    assert r["timm_name"] == "deit_base_patch16_224" and r["head_only_epochs"] == 5 and r["unfreeze_per_epoch"] == 1
    assert r["lr"] == {"heads": 1e-4, "blocks": 1e-5, "norm": 1e-6, "patch_embed": 1e-6, "tokens": 1e-7} and r["batch_size"] == 8
    with pytest.raises(RecipeError, match="unknown recipe key.*epochz"):
        load_recipe(overrides={"epochz": 3})
    with pytest.raises(RecipeError, match="schedule must be one of gradual, all_at_once"):
        load_recipe(overrides={"schedule": "sometimes"})
    with pytest.raises(RecipeError, match="lr must give a positive rate"):
        load_recipe(overrides={"lr": {"heads": 1e-3}})


def test_pretrained_loading_is_strict_and_lists_what_does_not_fit(tiny, tmp_path):
    import timm

    source = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64)  # with timm's own 1000-class head
    torch.save({"model": source.state_dict()}, tmp_path / "deit.pth")
    fresh = MultiHeadViT(TINY)
    dropped = load_pretrained(fresh, tmp_path / "deit.pth")
    assert dropped == ["head.bias", "head.weight"]
    assert torch.equal(fresh.backbone.pos_embed, source.pos_embed)
    broken = {k: v for k, v in source.state_dict().items() if k != "norm.bias"}
    broken["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    broken["extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(PretrainedError, match=r"missing \(1\): norm\.bias; unexpected \(1\): extra\.weight; shape mismatch \(1\): "
                                              r"blocks\.0\.attn\.qkv\.weight \(3, 3\) vs \(576, 192\)"):
        load_pretrained(fresh, tmp_path / "broken.pth")


def test_decision_takes_melanoma_at_the_threshold_else_the_likeliest_other_class():
    probs = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5]], np.float32)
    labels, melanoma = decide(probs, PH2_HEAD, 0.3)
    assert list(labels) == ["melanoma", "melanoma", "melanoma"] and melanoma.all()
    labels, melanoma = decide(probs, PH2_HEAD, 0.4)
    assert list(labels) == ["common_nevus", "atypical_nevus", "melanoma"] and list(melanoma) == [False, False, True]


def test_post_step_outputs_maps_at_each_images_size_and_blanks_failed_rows():
    grid = np.random.default_rng(0).random((2, 4, 4)).astype(np.float32)
    logits = {"ham10000": np.array([[0.0, 2.0], [1.0, 0.0]], np.float32), "ph2": np.zeros((2, 3), np.float32)}
    out = melanoma_of_batch(logits, [HAM10000_HEAD, PH2_HEAD], {"ham10000": 0.5, "ph2": 0.9}, grid,
                            np.array([[40, 30], [0, 0]]), np.array([False, True]))
    assert out["attention"].shape == (2, 30, 40) and out["attention"][0].max() == pytest.approx(1.0)
    assert out["attention"][0].min() == pytest.approx(0.0, abs=1e-6)  # scaled: least attended patch 0
    assert not out["attention"][1].any() and out["label_ham10000"][1, 0] == b"" and not out["probs_ph2"][1].any()
    assert out["label_ham10000"][0, 0] == b"melanoma" and out["threshold_ph2"][0, 0] == pytest.approx(0.9)
    np.testing.assert_allclose(out["probs_ham10000"][0], softmax(logits["ham10000"])[0])
    assert upsample_map(np.full((4, 4), 0.3, np.float32), 8, 6).shape == (6, 8) and not upsample_map(np.full((4, 4), 0.3, np.float32), 8, 6).any()


def test_threshold_reaches_the_target_sensitivity_on_validation_and_is_the_highest_that_does():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    positive = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 0], bool)
    t = threshold_for_sensitivity(scores, positive, 0.8)
    assert t == 0.4 and (scores[positive] >= t).mean() >= 0.8 and (scores[positive] >= 0.5).mean() < 0.8
    with pytest.raises(ValueError, match=r"target sensitivity must be in \(0, 1\]"):
        threshold_for_sensitivity(scores, positive, 0.0)


def test_head_metrics_give_sensitivity_specificity_bacc_and_auc_with_intervals():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    p_mel = np.clip(labels * 0.4 + rng.random(200) * 0.6, 0, 1)
    probs = np.stack([1 - p_mel, p_mel], 1).astype(np.float32)
    m = head_metrics(HAM10000_HEAD, probs, labels, probs, labels, 0.9, n_boot=200)
    assert m["val_sensitivity"] >= 0.9 and m["sensitivity"]["value"] >= 0.9
    for key in ("sensitivity", "specificity", "balanced_accuracy", "auc"):
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi
    assert sum(m["counts"].values()) == 200 and m["auc"]["value"] > 0.8


def test_training_records_groups_and_rates_resumes_and_exports_checked(tmp_path):
    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.data import load_dataset
    from lesionserve.vit.data import lesion_overlap, read_split_file, write_synthetic_ph2
    from lesionserve.vit.export import export_vit
    from lesionserve.vit.train import train_vit

    data = generate_dataset(tmp_path / "data", size=(96, 72), seed=2, class_counts={c: 4 for c in CLASS_NAMES},
                            repeat_fraction=0.3, progress=False)
    config = load_recipe(overrides={"timm_name": "deit_tiny_patch16_224", "input_size": 32, "epochs": 2, "head_only_epochs": 1,
                                    "unfreeze_per_epoch": 3, "val_fraction": 0.25, "test_fraction": 0.25})
    shared = write_synthetic_ph2(load_dataset(data.root), tmp_path / "shared_ph2.csv")  # the same images for both heads
    with pytest.raises(RecipeError, match=r"trained by one head and held out by another.*give the heads disjoint data"):
        train_vit(config, {"ham10000": str(data.root), "ph2": str(shared)}, tmp_path / "leaky", progress=False)
    ph2_data = generate_dataset(tmp_path / "ph2_data", size=(96, 72), seed=3, class_counts={"MEL": 4, "NV": 4, "BKL": 4},
                                repeat_fraction=0.3, progress=False)
    ph2 = write_synthetic_ph2(load_dataset(ph2_data.root), tmp_path / "ph2.csv")
    sources = {"ham10000": str(data.root), "ph2": str(ph2)}
    train_vit({**config, "epochs": 1}, sources, tmp_path / "run", progress=False)
    with pytest.raises(RecipeError, match="differs.*in batch_size"):
        train_vit({**config, "batch_size": 4}, sources, tmp_path / "run", resume=True, progress=False)
    checkpoint = train_vit(config, sources, tmp_path / "run", resume=True, progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["trainable"] == ["heads"] and history[0]["lr"] == {"heads": 1e-4}
    assert history[1]["trainable"] == ["heads", "norm", "block11", "block10"] and history[1]["lr"]["blocks"] == 1e-5
    split = read_split_file(tmp_path / "run" / "splits.json")
    assert all(not lesion_overlap(per) for per in split.values())
    assert any(s.lesion_id for s in split["ph2"]["train"])  # the synthetic PH2 CSV carries the renderer's lesions
    report = export_vit(checkpoint, tmp_path / "served" / "model.onnx")
    assert max(report.prob_diff.values()) <= 1e-4 and max(report.map_diff.values()) <= 1e-3
    import onnx

    names = [o.name for o in onnx.load(str(tmp_path / "served" / "model.onnx")).graph.output]
    assert names == ["logits_ham10000", "logits_ph2", "attention_rollout", "attention_cls"]
    assert json.loads((tmp_path / "served" / "model.export.json").read_text())["model"]["input_size"] == 32
    from lesionserve.vit.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, tmp_path / "run" / "splits.json", tmp_path / "eval", n_boot=20, progress=False,
                                  masks={"ham10000": str(data.masks_csv)})
    against = metrics["ham10000"]["attention_vs_masks"]
    assert against["images"] == len(read_split_file(tmp_path / "run" / "splits.json")["ham10000"]["test"])
    assert all(0.0 <= against[k]["mass"] <= 1.0 for k in ("rollout", "cls", "gaussian", "uniform"))
    assert (tmp_path / "eval" / "confidence_ph2.png").stat().st_size > 0 and "attention against" in (tmp_path / "eval" / "metrics.md").read_text()
    from lesionserve.export.assemble import AssembleError, assemble_pipelines
    from lesionserve.vit.spec import MELANOMA_VIT

    thresholds = json.loads((tmp_path / "eval" / "thresholds.json").read_text())
    (tmp_path / "served" / "thresholds.json").write_text(json.dumps({**thresholds, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(AssembleError, match="chosen for another checkpoint"):
        assemble_pipelines([(MELANOMA_VIT, tmp_path / "served")], out=tmp_path / "repo")
    (tmp_path / "served" / "thresholds.json").write_text(json.dumps(thresholds))
    repo = assemble_pipelines([(MELANOMA_VIT, tmp_path / "served")], out=tmp_path / "repo")
    assert (repo / "melanoma_vit_post" / "1" / "thresholds.json").is_file() and 'dims: [ 2, 2 ]' in (repo / "melanoma_vit_backbone" / "config.pbtxt").read_text()


def test_generated_repository_parses_and_routes_the_declared_heads_and_map():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from lesionserve.repository import render_repository

    files = render_repository([MelanomaPipeline(map_kind="cls")])
    for path, text in files.items():
        if path.endswith(".pbtxt"):
            text_format.Parse(text, model_config_pb2.ModelConfig())
    ensemble = text_format.Parse(files["melanoma_vit/config.pbtxt"], model_config_pb2.ModelConfig())
    assert [o.name for o in ensemble.output][:4] == ["probs_ham10000", "label_ham10000", "melanoma_ham10000", "threshold_ham10000"]
    assert ensemble.parameters["class_names_ph2"].string_value == "common_nevus,atypical_nevus,melanoma"
    assert ensemble.parameters["positive_ph2"].string_value == "melanoma"
    backbone = ensemble.ensemble_scheduling.step[1]
    assert backbone.input_map["pixel_values"] == "pixel_values_224_deit" and "attention_cls" in backbone.output_map
    pre = text_format.Parse(files["melanoma_vit_preprocess/config.pbtxt"], model_config_pb2.ModelConfig())
    assert pre.parameters["normalize_pixel_values_224_deit"].string_value == DEIT.to_parameter()


def test_declared_normalisation_and_size_are_timms_for_the_declared_configuration():
    import timm

    cfg = timm.create_model(VIT_MODEL.timm_name, pretrained=False).pretrained_cfg
    assert tuple(cfg["mean"]) == DEIT.mean and tuple(cfg["std"]) == DEIT.std
    assert tuple(cfg["input_size"]) == (3, VIT_MODEL.input_size, VIT_MODEL.input_size)


def test_each_head_reads_its_labels_in_its_own_class_order(tmp_path):
    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.data import load_dataset
    from lesionserve.vit.data import load_head_samples, write_synthetic_ph2
    from lesionserve.vit.spec import ISIC7_HEAD

    data = generate_dataset(tmp_path / "data", size=(64, 48), seed=4, class_counts={c: 2 for c in CLASS_NAMES}, progress=False)
    pool = {s.image_id: CLASS_NAMES[s.label] for s in load_dataset(data.root)}
    ham = load_head_samples(HAM10000_HEAD, data.root)
    assert all(s.label == int(pool[s.image_id] == "MEL") for s in ham) and sum(s.label for s in ham) == 2
    assert [CLASS_NAMES[s.label] for s in load_head_samples(ISIC7_HEAD, data.root)] == [pool[s.image_id] for s in ham]
    ph2 = load_head_samples(PH2_HEAD, write_synthetic_ph2(load_dataset(data.root), tmp_path / "ph2.csv"))
    assert sorted(PH2_HEAD.class_names[s.label] for s in ph2) == sorted(["melanoma", "common_nevus", "atypical_nevus"] * 2)
    (tmp_path / "bad.csv").write_text("image,path,diagnosis\nx,data/x.jpg,blue_nevus\n")
    with pytest.raises(ValueError, match="diagnosis 'blue_nevus' is not one of common_nevus, atypical_nevus, melanoma"):
        load_head_samples(PH2_HEAD, tmp_path / "bad.csv")


def test_a_plateau_cuts_only_the_groups_being_trained():
    from lesionserve.vit.train import step_plateau

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3, "name": "heads"}, {"params": [params[1]], "lr": 1e-5, "name": "block11"}])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    for loss in (1.0, 2.0):  # the second epoch is worse: a plateau
        step_plateau(sched, opt, ["heads"], loss)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-4), 1e-5]
    step_plateau(sched, opt, ["heads", "block11"], 3.0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-5), pytest.approx(1e-6)]
    from lesionserve.vit.train import rates_by_kind

    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-5, "name": "block10"})
    assert rates_by_kind(opt, ["heads", "block11", "block10"]) == {"heads": pytest.approx(1e-5), "blocks": [pytest.approx(1e-6), 1e-5]}


def test_threshold_needs_no_extra_positive_from_float_noise():
    scores = np.linspace(1.0, 0.01, 100)
    positive = np.ones(100, bool)
    assert threshold_for_sensitivity(scores, positive, 0.07) == scores[6]  # 7 positives, though 0.07 * 100 > 7 in floats
