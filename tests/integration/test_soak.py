"""The soak run (benchmarks/soak.py), CI-sized: the same code path as the 10 000-request run."""
from __future__ import annotations

import json

import pytest

from lesionserve.benchmarks.soak import SoakConfig, run_soak
from tests.integration.conftest import PYTHON_MODELS

pytestmark = pytest.mark.integration


def test_soak_holds_300_requests_from_4_clients_with_no_failure_growth_or_leftover(small_artifacts, tmp_path):
    # 3 s windows: a 300-request run (~10-20 s here) still has several, so the p99 check runs.
    cfg = SoakConfig(requests=300, clients=4, window=3, sample_every=2, min_window_requests=30,
                     artifacts=small_artifacts, out=tmp_path / "soak", progress=False, max_minutes=10)
    report = run_soak(cfg)
    print(report["text"])
    summary = report["summary"]
    assert summary["requests"] == 300 and summary["failures"] == 0
    assert len(report["samples"]) >= 3  # start, at least one periodic sample, end
    assert len(summary["rss_start"]) == 1 + len(PYTHON_MODELS)  # tritonserver + one stub per python model
    assert report["server"].startswith("127.0.0.1:")
    assert "not assessed" not in summary["checks"]["p99_stability"]["detail"]
    failed = {name: check["detail"] for name, check in summary["checks"].items() if not check["passed"]}
    assert not failed, failed
    saved = json.loads((tmp_path / "soak" / "soak.json").read_text())
    assert saved["summary"]["passed"] is True and (tmp_path / "soak" / "soak.png").stat().st_size > 10_000
