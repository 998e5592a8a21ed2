"""Load and soak run against a local tritonserver. Bounded, loopback only, stops by itself.

    python -m benchmarks.soak                                   # 10 000 requests, 4 clients, T=1, 64 px
    python -m benchmarks.soak --requests 300 --window 10 --out runs/soak_ci

Builds random-weight artifacts "trained" at ``--input-size`` (export.random_artifacts; served at that
size, so the run measures the serving machinery, not 224/300 px convolutions), assembles them with
``--views``, starts tritonserver on free 127.0.0.1 ports, and sends ``--requests`` classify calls
(``--images-per-request`` images each) from ``--clients`` threads, each with its own LesionClient
(own gRPC channel, no retries: every failure counts). A sampler reads the RSS of tritonserver and
each of its python stubs, and the bytes of their shared-memory regions in /dev/shm, at the start
(after ``--warmup`` requests), every ``--sample-every`` seconds and at the end.

Checks (exit status 1 if any fails): zero failed requests; every request done within
``--max-minutes``; RSS of tritonserver + stubs grows by at most ``--rss-margin-pct`` of its start
value; the regions' /dev/shm bytes grow by at most ``--shm-margin-mb``; the p99 latency of every
``--window``-second window (with at least ``--min-window-requests`` requests) is within
``--p99-factor`` times the median window p99; after stop, no stub process or region is left.
Writes ``soak.json`` (settings, machine, summary, windows, samples, errors) and ``soak.png``
(p50/p99 per window; RSS and shm over time) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lesionserve import prog
from lesionserve.processes import rss_bytes, shm_region_bytes, shm_used_bytes
from lesionserve.server import PROJECT_ROOT, TritonServer

MB = 1024 * 1024
DEFAULT_OUT = PROJECT_ROOT / "runs" / "soak"


@dataclass
class SoakConfig:
    """Settings of one run; the defaults are the documented 10 000-request soak."""

    requests: int = 10_000
    clients: int = 4
    views: int = 1
    input_size: int = 64
    images_per_request: int = 1
    timeout: float = 30.0
    warmup: int = 20
    sample_every: float = 5.0
    window: float = 60.0
    min_window_requests: int = 50
    p99_factor: float = 2.0
    rss_margin_pct: float = 10.0
    shm_margin_mb: float = 0.0
    max_minutes: float = 60.0
    distinct_images: int = 16
    seed: int = 0
    artifacts: Path | None = None
    out: Path = DEFAULT_OUT
    progress: bool = True

    def validate(self) -> None:
        positive = {"requests": self.requests, "clients": self.clients, "images_per_request": self.images_per_request,
                    "timeout": self.timeout, "sample_every": self.sample_every, "window": self.window,
                    "max_minutes": self.max_minutes, "distinct_images": self.distinct_images, "p99_factor": self.p99_factor}
        bad = [f"--{k.replace('_', '-')} must be > 0, got {v}" for k, v in positive.items() if not v > 0]
        if self.views not in (1, 2, 4, 8):
            bad.append(f"--views must be one of 1, 2, 4, 8, got {self.views}")
        if not 1 <= self.images_per_request <= 8:
            bad.append(f"--images-per-request must lie in 1..8 (the ensemble's max_batch_size), got {self.images_per_request}")
        if self.input_size < 32:
            bad.append(f"--input-size must be >= 32 (the backbones downsample by 32), got {self.input_size}")
        if self.warmup < 0 or self.rss_margin_pct < 0 or self.shm_margin_mb < 0:
            bad.append("--warmup, --rss-margin-pct and --shm-margin-mb must be >= 0")
        if bad:
            raise ValueError("; ".join(bad))


@dataclass
class Sample:
    """Resources at one instant: RSS per process (tritonserver, and each stub by instance name)."""

    t: float
    rss: dict[str, int]
    shm_regions: int
    shm_used: int

    @property
    def rss_total(self) -> int:
        return sum(self.rss.values())


@dataclass
class LoadResult:
    """Per request: start offset (s, from the measured start), latency (s), error text or None."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    seconds: float = 0.0
    completed: bool = True


def synthetic_images(count: int, seed: int) -> list[bytes]:
    """``count`` distinct 600x450 synthetic lesion JPEGs (ISIC-like size, as the demo's)."""
    import cv2

    from lesionserve.spec import CLASS_NAMES
    from lesionserve.synthetic import render_lesion

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        rgb = render_lesion(CLASS_NAMES[i % len(CLASS_NAMES)], rng, (600, 450))
        ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError("OpenCV failed to encode a synthetic lesion")
        images.append(buf.tobytes())
    return images


def sample(server: TritonServer, t0: float, regions: set[str]) -> Sample:
    """RSS of tritonserver and each live stub, and the bytes of the server's regions in /dev/shm."""
    rss = {"tritonserver": rss_bytes(server.process.pid) or 0}
    for stub in server.stubs():
        rss[stub.name] = rss_bytes(stub.pid) or 0
    return Sample(round(time.monotonic() - t0, 2), rss, shm_region_bytes(regions), shm_used_bytes())


class Sampler(threading.Thread):
    """Samples every ``every`` seconds until stopped."""

    def __init__(self, server: TritonServer, t0: float, regions: set[str], every: float) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.server, self.t0, self.regions, self.every = server, t0, regions, every
        self.samples: list[Sample] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.samples.append(sample(self.server, self.t0, self.regions))

    def stop(self) -> None:
        self._done.set()
        self.join()


class _Recorder(LoadResult):
    """LoadResult filled from several threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def add(self, start: float, latency: float, error: str | None) -> None:
        with self._lock:
            self.starts.append(start)
            self.latencies.append(latency)
            self.errors.append(error)


def run_load(url: str, images: Sequence[bytes], cfg: SoakConfig, count: int, t0: float | None = None,
             progress: Any = None) -> LoadResult:
    """``count`` classify calls from ``cfg.clients`` threads, each its own LesionClient; never raises for a failed call."""
    from lesionserve_client import LesionClient

    result = _Recorder()
    next_index = iter(range(count))
    lock = threading.Lock()
    start = time.monotonic() if t0 is None else t0
    deadline = time.monotonic() + cfg.max_minutes * 60

    def client_loop(client_id: int) -> None:
        with LesionClient(url, timeout=cfg.timeout, retries=0, max_workers=1) as client:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                if time.monotonic() > deadline:
                    result.completed = False
                    return
                batch = [images[(i * cfg.images_per_request + k) % len(images)] for k in range(cfg.images_per_request)]
                t = time.monotonic()
                error = None
                try:
                    client.classify(batch)
                except Exception as exc:  # every failure is a finding: record it and go on
                    error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                result.add(t - start, time.monotonic() - t, error)
                if progress is not None:
                    progress.update(1)

    threads = [threading.Thread(target=client_loop, args=(c,), name=f"soak-client-{c}") for c in range(cfg.clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - began
    return result


def windows(starts: Sequence[float], latencies: Sequence[float], width: float) -> list[dict[str, float]]:
    """Latency percentiles per ``width``-second window of request start times."""
    if not starts:
        return []
    index = np.floor(np.asarray(starts) / width).astype(int)
    lat = np.asarray(latencies) * 1000
    out = []
    for w in range(int(index.max()) + 1):
        values = lat[index == w]
        if len(values):
            out.append({"window": w, "start_s": w * width, "requests": int(len(values)),
                        "p50_ms": round(float(np.percentile(values, 50)), 2),
                        "p99_ms": round(float(np.percentile(values, 99)), 2)})
    return out


def summarize(cfg: SoakConfig, load: LoadResult, samples: list[Sample], leftover: dict[str, Any]) -> dict[str, Any]:
    """Figures and checks of one run."""
    ok = [lat for lat, err in zip(load.latencies, load.errors) if err is None]
    failures = [err for err in load.errors if err is not None]
    lat = np.asarray(load.latencies) * 1000 if load.latencies else np.zeros(1)
    per_window = windows(load.starts, load.latencies, cfg.window)
    counted = [w for w in per_window if w["requests"] >= cfg.min_window_requests]
    start, end = samples[0], samples[-1]
    rss_limit = start.rss_total * cfg.rss_margin_pct / 100
    shm_limit = cfg.shm_margin_mb * MB
    checks: dict[str, dict[str, Any]] = {
        "failures": {"passed": not failures and len(load.errors) == cfg.requests,
                     "detail": f"{len(failures)} failed of {len(load.errors)} sent ({cfg.requests} planned); must be 0"},
        "bounded": {"passed": load.completed,
                    "detail": f"all requests done within --max-minutes {cfg.max_minutes:g}" if load.completed
                    else f"stopped at --max-minutes {cfg.max_minutes:g} with requests left"},
        "rss": {"passed": end.rss_total - start.rss_total <= rss_limit,
                "detail": f"{start.rss_total / MB:.1f} MB -> {end.rss_total / MB:.1f} MB "
                          f"({(end.rss_total - start.rss_total) / MB:+.1f} MB; margin +{cfg.rss_margin_pct:g}% = {rss_limit / MB:.1f} MB)"},
        "shm": {"passed": end.shm_regions - start.shm_regions <= shm_limit,
                "detail": f"{start.shm_regions / MB:.1f} MB -> {end.shm_regions / MB:.1f} MB "
                          f"({(end.shm_regions - start.shm_regions) / MB:+.1f} MB; margin {cfg.shm_margin_mb:g} MB)"},
        "cleanup": {"passed": not leftover["stubs"] and not leftover["regions"],
                    "detail": "no stub process or shared-memory region left after stop" if not leftover["stubs"] and not leftover["regions"]
                    else f"left after stop: stubs {leftover['stubs']}, regions {leftover['regions']}"},
    }
    if len(counted) >= 2:
        median_p99 = statistics.median(w["p99_ms"] for w in counted)
        worst = max(counted, key=lambda w: w["p99_ms"])
        checks["p99_stability"] = {
            "passed": worst["p99_ms"] <= cfg.p99_factor * median_p99,
            "detail": f"worst window p99 {worst['p99_ms']:.1f} ms (window {worst['window']}) <= {cfg.p99_factor:g} x median "
                      f"window p99 {median_p99:.1f} ms = {cfg.p99_factor * median_p99:.1f} ms, over {len(counted)} windows of {cfg.window:g} s",
        }
    else:
        checks["p99_stability"] = {"passed": True, "detail": f"not assessed: {len(counted)} window(s) of {cfg.window:g} s "
                                                            f"with >= {cfg.min_window_requests} requests (needs 2)"}
    return {
        "requests": len(load.errors),
        "failures": len(failures),
        "seconds": round(load.seconds, 2),
        "requests_per_s": round(len(load.errors) / load.seconds, 2) if load.seconds else 0.0,
        "images_per_s": round(len(ok) * cfg.images_per_request / load.seconds, 2) if load.seconds else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
        "windows": per_window,
        "rss_start": start.rss, "rss_end": end.rss,
        "shm_regions_start": start.shm_regions, "shm_regions_end": end.shm_regions,
        "shm_used_start": start.shm_used, "shm_used_end": end.shm_used,
        "first_errors": sorted(set(failures))[:5],
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
    }


def format_summary(cfg: SoakConfig, summary: dict[str, Any], server_url: str) -> str:
    """The printed summary (quoted in docs/reliability.md)."""
    c = summary["checks"]
    verdict = lambda name: "PASS" if c[name]["passed"] else "FAIL"  # noqa: E731
    stubs = len(summary["rss_start"]) - 1
    lines = [
        f"soak: {summary['requests']} requests x {cfg.images_per_request} image(s), T={cfg.views}, {cfg.input_size} px, "
        f"{cfg.clients} concurrent clients -> tritonserver {server_url}",
        f"  failures       {summary['failures']} (must be 0)  [{verdict('failures')}]  {c['bounded']['detail']} [{verdict('bounded')}]",
        f"  throughput     {summary['requests_per_s']:.1f} requests/s, {summary['images_per_s']:.1f} images/s over {summary['seconds']:.1f} s",
        f"  latency        p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms, max {summary['max_ms']:.1f} ms (all requests)",
        f"  {f'per {cfg.window:g} s':<15}" + " | ".join(f"#{w['window']}: n={w['requests']} p50 {w['p50_ms']:.1f} p99 {w['p99_ms']:.1f}"
                                                   for w in summary["windows"]),
        f"  p99 stability  {c['p99_stability']['detail']}  [{verdict('p99_stability')}]",
        f"  RSS            tritonserver + {stubs} stubs: {c['rss']['detail']}  [{verdict('rss')}]",
        f"  /dev/shm       the server's {stubs} regions: {c['shm']['detail']}  [{verdict('shm')}]; "
        f"whole /dev/shm {summary['shm_used_start'] / MB:.0f} -> {summary['shm_used_end'] / MB:.0f} MB (all processes)",
        f"  cleanup        {c['cleanup']['detail']}  [{verdict('cleanup')}]",
    ]
    for error in summary["first_errors"]:
        lines.append(f"  error          {error}")
    lines.append(f"verdict: {'PASS' if summary['passed'] else 'FAIL'}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], samples: list[Sample], cfg: SoakConfig, path: Path) -> None:
    """p50/p99 per window, and RSS (total and per process) with /dev/shm over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    ws = summary["windows"]
    x = [w["start_s"] / 60 for w in ws]
    top.plot(x, [w["p99_ms"] for w in ws], "o-", label="p99")
    top.plot(x, [w["p50_ms"] for w in ws], "s-", label="p50")
    top.set_xlabel(f"minutes since start (window {cfg.window:g} s)")
    top.set_ylabel("latency (ms)")
    top.set_ylim(bottom=0)
    top.set_title(f"{summary['requests']} requests, {cfg.clients} clients, T={cfg.views}, {cfg.input_size} px: "
                  f"{summary['failures']} failed")
    top.legend()
    t = [s.t / 60 for s in samples]
    bottom.plot(t, [s.rss_total / MB for s in samples], "k-", linewidth=2, label="RSS total")
    for name in samples[0].rss:
        bottom.plot(t, [s.rss.get(name, 0) / MB for s in samples], linewidth=0.8, label=name)
    bottom.plot(t, [s.shm_regions / MB for s in samples], "k--", label="/dev/shm regions")
    bottom.set_xlabel("minutes since start")
    bottom.set_ylabel("MB")
    bottom.set_ylim(bottom=0)
    bottom.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, str]:
    """What the figures depend on."""
    import onnxruntime

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "tritonserver": "2.51.0 (nvidia-pytriton 0.7.0)",
            "load_average_at_start": " ".join(f"{x:.2f}" for x in load)}


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """One whole run: artifacts, repository, server, warmup, load, samples, stop, checks, files."""
    from lesionserve.export.assemble import assemble
    from lesionserve.export.random_artifacts import build_random_artifacts

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = Path(cfg.artifacts) if cfg.artifacts else build_random_artifacts(out / "artifacts", input_size=cfg.input_size)
    repo = assemble(artifacts, out=out / "repository", views=cfg.views)
    images = synthetic_images(cfg.distinct_images, cfg.seed)
    info = machine()
    server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=out / "tritonserver.log", startup_timeout=300)
    server.start()
    try:
        regions = {stub.shm_region for stub in server.stubs()}
        t0 = time.monotonic()
        ready = sample(server, t0, regions)
        warm = run_load(server.grpc_url, images, cfg, cfg.warmup) if cfg.warmup else LoadResult()
        warm_failures = [e for e in warm.errors if e]
        progress = None
        if cfg.progress:
            from tqdm import tqdm

            progress = tqdm(total=cfg.requests, unit="req", desc="soak", smoothing=0.05)
        t0 = time.monotonic()
        samples = [sample(server, t0, regions)]
        sampler = Sampler(server, t0, regions, cfg.sample_every)
        sampler.start()
        try:
            load = run_load(server.grpc_url, images, cfg, cfg.requests, t0=t0, progress=progress)
        finally:
            sampler.stop()
            if progress is not None:
                progress.close()
        samples += sampler.samples + [sample(server, t0, regions)]
    finally:
        server.stop()
    leftover = {"stubs": [s.name for s in server.stubs()], "regions": sorted(r for r in regions if (Path("/dev/shm") / r).exists())}
    summary = summarize(cfg, load, samples, leftover)
    if warm_failures:
        summary["checks"]["failures"]["passed"] = False
        summary["checks"]["failures"]["detail"] += f"; and {len(warm_failures)} of {cfg.warmup} warmup requests failed"
        summary["passed"] = False
        summary["first_errors"] = sorted(set(warm_failures))[:5] + summary["first_errors"]
    text = format_summary(cfg, summary, server.grpc_url)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "machine": info, "artifacts": str(artifacts), "repository": str(repo), "server": server.grpc_url,
              "ready_sample": asdict(ready), "summary": summary, "samples": [asdict(s) for s in samples], "text": text}
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, samples, cfg, out / "soak.png")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    parser = argparse.ArgumentParser(prog=prog("python -m benchmarks.soak"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--requests", type=int, default=d.requests, help="classify calls to send (default %(default)s)")
    add("--clients", type=int, default=d.clients, help="concurrent clients, each its own LesionClient (default %(default)s)")
    add("--views", type=int, default=d.views, help="TTA views T of the served repository: 1, 2, 4 or 8 (default %(default)s)")
    add("--input-size", type=int, default=d.input_size, help="side every backbone is trained and served at (default %(default)s)")
    add("--images-per-request", type=int, default=d.images_per_request, help="images per call, 1..8 (default %(default)s)")
    add("--timeout", type=float, default=d.timeout, help="client timeout per call in seconds (default %(default)s)")
    add("--warmup", type=int, default=d.warmup, help="calls before the start sample, not measured (default %(default)s)")
    add("--sample-every", type=float, default=d.sample_every, help="seconds between resource samples (default %(default)s)")
    add("--window", type=float, default=d.window, help="seconds per latency window (default %(default)s: per minute)")
    add("--min-window-requests", type=int, default=d.min_window_requests, help="requests a window needs to count in the p99 check (default %(default)s)")
    add("--p99-factor", type=float, default=d.p99_factor, help="allowed worst window p99 / median window p99 (default %(default)s)")
    add("--rss-margin-pct", type=float, default=d.rss_margin_pct, help="allowed RSS growth, %% of the start total (default %(default)s)")
    add("--shm-margin-mb", type=float, default=d.shm_margin_mb, help="allowed growth of the server's /dev/shm regions (default %(default)s)")
    add("--max-minutes", type=float, default=d.max_minutes, help="stop sending after this long, failing the run (default %(default)s)")
    add("--artifacts", type=Path, help="use these artifacts instead of building random ones at --input-size")
    add("--seed", type=int, default=d.seed, help="seed of the synthetic images (default %(default)s)")
    add("--out", type=Path, default=d.out, help="folder for soak.json, soak.png, the repository and the server log (default %(default)s)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cfg = SoakConfig(**vars(args))
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_soak(cfg)
    print(report["text"])
    print(f"wrote {Path(cfg.out) / 'soak.json'} and {Path(cfg.out) / 'soak.png'}")
    return 0 if report["summary"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
