"""Smoke runs of the benchmark scripts on tiny settings (figures are not checked: benchmarks are
scripts, not timed tests), and the check that the in-process ONNX Runtime baseline computes what
the reference computes."""
from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest

from lesionserve.benchmarks import harness, perf_analyzer, replicas, scaling, tuning
from lesionserve.benchmarks.common import load_images
from lesionserve.server import PROJECT_ROOT

pytestmark = pytest.mark.integration
TINY_IMAGES = ["--images", "synthetic", "--num-images", "2"]


def test_ort_pipeline_matches_the_reference_pipeline(artifacts, reference_t8):
    from lesionserve.benchmarks.pipelines import OrtPipeline

    images, _ = load_images("synthetic", 3)
    ort_out = OrtPipeline.from_onnx(artifacts, views=8, threads=1).run(images)
    ref_out = reference_t8.run(images)
    np.testing.assert_allclose(ort_out.probs, ref_out.probs, atol=1e-4)
    assert ort_out.labels == ref_out.labels


def test_harness_measures_all_four_pipelines(artifacts, tmp_path):
    argv = ["--views", "1", "--batch", "2", "--throughput-views", "2", "--latency-views", "1", "--bound-repeats", "1", "--rounds", "2",
            "--artifacts", str(artifacts), "--out", str(tmp_path), *TINY_IMAGES]
    assert harness.main(argv) == 0
    report = json.loads((tmp_path / "harness.json").read_text())
    assert set(report["views"]["1"]) == {"triton", "torch", "ort", "bound"}
    assert all(r["throughput"]["images_per_s"] > 0 for r in report["views"]["1"].values())
    assert set(report["ratios"]["1"]) == {"triton/bound", "triton/torch", "triton/ort"}
    assert "(a)/(d) goal >= 0.90" in (tmp_path / "harness.md").read_text() and (tmp_path / "harness.png").stat().st_size > 0


def test_scaling_sweeps_views_and_images_per_call(artifacts, tmp_path):
    argv = ["--views", "1", "--images-per-call", "1", "3", "--views-budget", "1",
            "--artifacts", str(artifacts), "--out", str(tmp_path), *TINY_IMAGES]
    assert scaling.main(argv) == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert set(report["views"]) == {"1"} and set(report["images_per_call"]) == {"1", "3"}
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_tuning_serves_a_variant_with_its_settings(artifacts, tmp_path):
    argv = ["--views", "1", "--batch", "1", "--calls", "1", "--latency-calls", "1",
            "--variant", "t1:threads=1,spin=0,decode=2", "--artifacts", str(artifacts), "--out", str(tmp_path), *TINY_IMAGES]
    assert tuning.main(argv) == 0
    result = json.loads((tmp_path / "tuning_t1.json").read_text())["variants"]["t1"]
    assert result["threads"] == 1 and result["images_per_s_c1"] > 0
    assert 'allow_spinning" value: { string_value: "0"' in (tmp_path / "repository_t1" / "resnet50" / "config.pbtxt").read_text()


def test_perf_analyzer_sweeps_a_running_server(server_t1, tmp_path):
    install = subprocess.run(["bash", str(PROJECT_ROOT / "benchmarks/install_perf_analyzer.sh")], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"perf_analyzer could not be installed (needs PyPI and Debian's package index): {install.stderr[-500:]}")
    argv = ["--url", server_t1.grpc_url, "--concurrency", "1", "2", "--min-requests", "2", "--requests-per-concurrency", "1",
            "--stability", "100", "--out", str(tmp_path), *TINY_IMAGES]
    assert perf_analyzer.main(argv) == 0
    with open(tmp_path / "perf.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["Concurrency"] for r in rows] == ["1", "2"] and all(float(r["Inferences/Second"]) > 0 for r in rows)
    with open(tmp_path / "breakdown.csv") as f:
        models = {r["model"] for r in csv.DictReader(f)}
    assert {"preprocess", "tta", "resnet50", "densenet121", "efficientnet_b3", "fusion", "threshold"} <= models
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "latency.png").stat().st_size > 0


def test_run_batch_profiles_each_backbone(artifacts, tmp_path):
    from benchmarks import run_batch

    argv = ["--batches", "1", "2", "--views", "2", "--repeats", "1", "--images", "synthetic",
            "--artifacts", str(artifacts), "--out", str(tmp_path)]
    assert run_batch.main(argv) == 0
    table = json.loads((tmp_path / "run_batch.json").read_text())["ms_per_view"]
    assert set(table) == {"resnet50", "densenet121", "efficientnet_b3"}
    assert all(set(row) == {"1", "2"} and min(row.values()) > 0 for row in table.values())


def test_segment_benchmark_measures_served_pytorch_and_onnxrt_side_by_side(tmp_path):
    from lesionserve.benchmarks import segment

    argv = ["--size", "64", "--rounds", "1", "--calls", "1", "--images", "synthetic", "--out", str(tmp_path)]
    assert segment.main(argv) == 0
    report = json.loads((tmp_path / "segment.json").read_text())
    assert set(report["medians"]) == {"served", "pytorch", "onnxrt"} and report["size"] == 64
    assert all(v["images_per_s"] > 0 for v in report["medians"].values())
    assert set(report["time_split_8_images"]) == {"decode_preprocess_ms", "network_ms", "postprocess_ms"}


def test_crop_benchmark_measures_both_modes_beside_whole_images_and_pytorch(tmp_path):
    from lesionserve.benchmarks import crop

    argv = ["--size", "64", "--segmenter-size", "64", "--rounds", "1", "--calls", "1", "--images", "synthetic",
            "--out", str(tmp_path)]
    assert crop.main(argv) == 0
    report = json.loads((tmp_path / "crop.json").read_text())
    assert set(report["medians"]) == {"whole", "ensemble", "bls", "pytorch", "onnxrt"} and report["views"] == 1
    assert all(v["images_per_s"] > 0 for v in report["medians"].values())
    assert set(report["time_split_8_images"]) == {"decode_preprocess_ms", "segmenter_ms", "boxes_ms", "crop_and_classify_ms"}


def test_melanoma_benchmark_measures_served_pytorch_and_onnxrt_side_by_side(tmp_path):
    from lesionserve.benchmarks import melanoma

    argv = ["--size", "32", "--rounds", "1", "--calls", "1", "--images", "synthetic", "--out", str(tmp_path)]
    assert melanoma.main(argv) == 0
    report = json.loads((tmp_path / "melanoma.json").read_text())
    assert set(report["medians"]) == {"served", "pytorch", "pytorch_no_maps", "onnxrt"} and report["network"]["input_size"] == 32
    assert all(v["images_per_s"] > 0 for v in report["medians"].values())


def test_replicas_measures_one_and_two_local_replicas(small_artifacts, tmp_path):
    argv = ["--replicas", "1", "2", "--requests", "2", "--latency-requests", "1", "--rounds", "1", "--concurrency", "2",
            "--artifacts", str(small_artifacts), "--out", str(tmp_path), *TINY_IMAGES]
    assert replicas.main(argv) == 0
    report = json.loads((tmp_path / "replicas.json").read_text())
    assert set(report["settings"]) == {"1", "2"} and all(r["images_per_s"] > 0 for r in report["settings"].values())
    assert "| 2 |" in (tmp_path / "replicas.md").read_text()
