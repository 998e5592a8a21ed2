"""The benchmark scripts' plain functions: input data, report parsing, variants, image loading."""
from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

from lesionserve.benchmarks.common import Timing, calls_for, cycle, load_images
from lesionserve.benchmarks.harness import ratios
from lesionserve.benchmarks.perf_analyzer import composing_breakdown, input_data
from lesionserve.benchmarks.tuning import apply_variant, parse_variant, set_parameter

PERF_ANALYZER_STDOUT = """\
Request concurrency: 2
  Client:
    Request count: 8
    Throughput: 4.66 infer/sec
  Server:
    Inference count: 8
    Execution count: 8
    Successful request count: 8
    Avg request latency: 400000 usec (overhead 10 usec + queue 5000 usec + compute 395000 usec)

  Composing models:
  densenet121, version: 1
      Inference count: 8
      Execution count: 4
      Successful request count: 8
      Avg request latency: 182000 usec (overhead 3 usec + queue 12600 usec + compute input 60 usec + compute infer 170000 usec + compute output 20 usec)

  preprocess, version: 1
      Inference count: 8
      Execution count: 8
      Successful request count: 8
      Avg request latency: 31000 usec (overhead 1 usec + queue 900 usec + compute input 50 usec + compute infer 30000 usec + compute output 49 usec)
"""


def test_input_data_prefixes_each_image_with_its_little_endian_length():
    images = [b"\xff\xd8jpeg\x00\x00", b"png"]
    data = input_data(images)["data"]
    assert len(data) == 2
    for entry, image in zip(data, images):
        raw = base64.b64decode(entry["raw_image"]["content"]["b64"])
        assert struct.unpack("<I", raw[:4])[0] == len(image) and raw[4:] == image  # trailing NULs kept
        assert entry["raw_image"]["shape"] == [1]


def test_composing_breakdown_reads_each_model_but_not_the_ensemble_total():
    rows = composing_breakdown(PERF_ANALYZER_STDOUT)
    assert [r["model"] for r in rows] == ["densenet121", "preprocess"]
    assert rows[0]["queue_us"] == 12600 and rows[0]["compute_infer_us"] == 170000
    assert rows[0]["inference_count"] == 8 and rows[0]["execution_count"] == 4


def test_parse_variant_reads_settings_and_names_a_bad_one():
    assert parse_variant("fast:threads=1,spin=0") == ("fast", {"threads": 1, "spin": 0})
    assert parse_variant("committed:") == ("committed", {})
    with pytest.raises(ValueError, match=r"bad setting 'cores=2'; keys are"):
        parse_variant("x:cores=2")
    with pytest.raises(ValueError, match="has no name"):
        parse_variant(":threads=1")


def test_set_parameter_replaces_an_existing_value_and_adds_a_missing_one():
    text = 'parameters: { key: "intra_op_threads" value: { string_value: "2" } }\n'
    assert '"intra_op_threads" value: { string_value: "1" }' in set_parameter(text, "intra_op_threads", "1")
    added = set_parameter(text, "allow_spinning", "0")
    assert '"intra_op_threads" value: { string_value: "2" }' in added and '"allow_spinning" value: { string_value: "0" }' in added


def test_apply_variant_edits_every_backbone_and_preprocess(tmp_path):
    from lesionserve.server import PROJECT_ROOT
    from lesionserve.pipelines import LESION_ENSEMBLE

    BACKBONE_NAMES = LESION_ENSEMBLE.member_names

    for name in (*BACKBONE_NAMES, "preprocess"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text((PROJECT_ROOT / "model_repository" / name / "config.pbtxt").read_text())
    apply_variant(tmp_path, {"threads": 1, "spin": 0, "instances": 2, "delay": 500, "decode": 3, "chunk": 16, "lock": 0})
    for name in BACKBONE_NAMES:
        text = (tmp_path / name / "config.pbtxt").read_text()
        assert 'intra_op_threads" value: { string_value: "1"' in text and 'allow_spinning" value: { string_value: "0"' in text
        assert "count: 2" in text and "max_queue_delay_microseconds: 500" in text
        assert 'run_batch" value: { string_value: "16"' in text and 'core_lock" value: { string_value: "" }' in text
    assert 'decode_threads" value: { string_value: "3"' in (tmp_path / "preprocess" / "config.pbtxt").read_text()


def test_load_images_synthetic_gives_distinct_isic_size_jpegs():
    import cv2

    images, source = load_images("synthetic", 3)
    assert len(set(images)) == 3 and "600x450" in source
    assert cv2.imdecode(np.frombuffer(images[0], np.uint8), cv2.IMREAD_COLOR).shape == (450, 600, 3)


def test_load_images_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_images(str(tmp_path / "nope"), 2)
    with pytest.raises(ValueError, match="has 0 .jpg files; 2 are needed"):
        load_images(str(tmp_path), 2)


def test_cycle_wraps_around_and_timing_reports_rates():
    take = cycle([1, 2, 3], 2)
    assert [take(), take(), take()] == [[1, 2], [3, 1], [2, 3]]
    timing = Timing(items=10, seconds=2.0, latencies=(0.1, 0.2, 0.3))
    assert timing.per_second == 5.0 and timing.summary()["p50_ms"] == 200.0


def test_calls_for_and_ratios():
    assert calls_for(128, 8, 8, 2) == 2 and calls_for(128, 1, 8, 2) == 16 and calls_for(1, 1, 1, 4) == 4
    results = {name: {"throughput": {"images_per_s": v}} for name, v in
               {"triton": 9.0, "torch": 4.0, "ort": 9.0, "bound": 10.0}.items()}
    assert ratios(results) == {"triton/bound": 0.9, "triton/torch": 2.25, "triton/ort": 1.0}


def test_tuning_markdown_states_each_variant_against_the_bound():
    from lesionserve.benchmarks.tuning import markdown

    payload = {"views": 1, "batch": 8, "bound_images_per_s": 8.0, "variants": {
        "before": {"spin": 1, "images_per_s_c1": 4.0, "images_per_s_c2": 6.0, "p50_ms": 250.0, "p99_ms": 300.0},
        "committed": {"images_per_s_c1": 7.6, "images_per_s_c2": 8.0, "p50_ms": 140.0, "p99_ms": 150.0}}}
    text = markdown(payload)
    assert "| before | spin=1 | 4.00 (0.50) | 6.00 (0.75) | 250 | 300 |" in text
    assert "| committed | as committed | 7.60 (0.95) | 8.00 (1.00) | 140 | 150 |" in text
