"""The soak run's checks on constructed measurements: each check can fail (benchmarks/soak.py)."""
from __future__ import annotations

import pytest

from lesionserve.benchmarks.soak import MB, LoadResult, Sample, SoakConfig, main, summarize, windows

CLEAN = {"stubs": [], "regions": []}


def load(n: int = 200, latency: float = 0.05, errors: dict[int, str] | None = None, seconds: float = 100.0) -> LoadResult:
    starts = [i * seconds / n for i in range(n)]
    return LoadResult(starts=starts, latencies=[latency] * n, errors=[(errors or {}).get(i) for i in range(n)], seconds=seconds)


def samples(start_mb: float = 800, end_mb: float = 800, shm_start: float = 224, shm_end: float = 224) -> list[Sample]:
    return [Sample(0, {"tritonserver": int(start_mb * MB)}, int(shm_start * MB), 0),
            Sample(99, {"tritonserver": int(end_mb * MB)}, int(shm_end * MB), 0)]


CFG = SoakConfig(requests=200, window=20, min_window_requests=10)


def test_summary_passes_every_check_when_run_is_clean():
    s = summarize(CFG, load(), samples(), CLEAN)
    assert s["passed"] and s["failures"] == 0 and s["requests_per_s"] == 2.0
    assert [w["requests"] for w in s["windows"]] == [40] * 5 and s["p99_ms"] == 50.0


@pytest.mark.parametrize(
    ("measured", "check"),
    [
        (dict(run=load(errors={7: "ServerUnavailableError: gone"})), "failures"),
        (dict(run=load(n=150)), "failures"),  # fewer requests than planned
        (dict(resources=samples(end_mb=881)), "rss"),  # +81 MB > 10 % of 800 MB
        (dict(resources=samples(shm_end=256)), "shm"),
        (dict(leftover={"stubs": ["tta_0_0"], "regions": []}), "cleanup"),
    ],
)
def test_summary_fails_the_matching_check_when_measurement_is_out_of_bounds(measured, check):
    s = summarize(CFG, measured.get("run", load()), measured.get("resources", samples()), measured.get("leftover", CLEAN))
    assert not s["passed"] and not s["checks"][check]["passed"]
    assert [name for name, c in s["checks"].items() if not c["passed"]] == [check]


def test_summary_fails_p99_stability_when_one_window_is_much_slower():
    run = load()
    run.latencies[150:190] = [0.2] * 40  # window 3 of 5: p99 200 ms vs median 50 ms
    s = summarize(CFG, run, samples(), CLEAN)
    assert not s["checks"]["p99_stability"]["passed"]
    assert "worst window p99 200.0 ms (window 3)" in s["checks"]["p99_stability"]["detail"]


def test_windows_group_requests_by_start_time_when_width_given():
    ws = windows([0.0, 5.0, 12.0, 31.0], [0.01, 0.03, 0.02, 0.04], width=10)
    assert [(w["window"], w["requests"]) for w in ws] == [(0, 2), (1, 1), (3, 1)]


def test_main_exits_2_naming_every_bad_setting_before_starting_anything(capsys, tmp_path):
    assert main(["--requests", "0", "--views", "3", "--input-size", "16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--requests must be > 0" in err and "--views must be one of 1, 2, 4, 8" in err and "--input-size must be >= 32" in err
    assert not any(tmp_path.iterdir())
