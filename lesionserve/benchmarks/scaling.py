"""How the served ensemble's cost grows: with T, and with images per classify() call.

    python -m benchmarks.scaling                          # T in 1 2 4 8; 1, 8, 32 images per call
    python -m benchmarks.scaling --views 1 2 --images-per-call 1 8 --views-budget 16   # smoke

Throughput against concurrency (1..32) is perf_analyzer's sweep (benchmarks/perf_analyzer.py).
Here, through the SDK at concurrency 1:
  - vs T: requests of 8 images; images/s and backbone views/s (= images/s x T);
  - vs images per call (at --per-call-views): 1 and 8 images are one request; 32 images are split
    by the SDK into 4 requests of 8 sent side by side (max_workers 4).
Writes scaling.json, scaling.md and scaling.png into --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lesionserve.benchmarks.common import DEFAULT_OUT, calls_for, cycle, load_images, measure, random_artifacts, served, write_json
from lesionserve.spec import ALLOWED_VIEWS


def run(args: argparse.Namespace, artifacts: Path, images: list[bytes]) -> dict:
    from lesionserve_client import LesionClient

    report: dict = {"views": {}, "images_per_call": {}}
    for views in args.views:
        with served(artifacts, views, args.out, log_name=f"tritonserver_t{views}.log") as server:
            with LesionClient(server.grpc_url, timeout=900, max_workers=4) as client:
                timing = measure(lambda take=cycle(images, 8): client.classify(take()), 8, calls_for(args.views_budget, views, 8, 2))
                report["views"][str(views)] = {"images_per_s": round(timing.per_second, 3),
                                               "views_per_s": round(timing.per_second * views, 2),
                                               "p50_request_ms": round(1000 * timing.percentile(50), 1)}
                print(f"  T={views}: {timing.per_second:6.2f} images/s, {timing.per_second * views:6.1f} views/s", flush=True)
                if views != args.per_call_views:
                    continue
                for count in args.images_per_call:
                    timing = measure(lambda take=cycle(images, count): client.classify(take()), count,
                                     calls_for(args.views_budget, views, count, 2))
                    report["images_per_call"][str(count)] = {"images_per_s": round(timing.per_second, 3),
                                                             "p50_call_ms": round(1000 * timing.percentile(50), 1)}
                    print(f"  T={views}, {count:>2} images per call: {timing.per_second:6.2f} images/s, "
                          f"p50 {1000 * timing.percentile(50):7.0f} ms per call", flush=True)
    return report


def markdown(report: dict, per_call_views: int) -> str:
    lines = ["| T | images/s | backbone views/s | p50 per 8-image request (ms) |", "|---|---|---|---|"]
    lines += [f"| {t} | {r['images_per_s']:.2f} | {r['views_per_s']:.1f} | {r['p50_request_ms']:.0f} |" for t, r in report["views"].items()]
    if report["images_per_call"]:
        lines += ["", f"| images per classify() call (T={per_call_views}) | images/s | p50 per call (ms) |", "|---|---|---|"]
        lines += [f"| {n} | {r['images_per_s']:.2f} | {r['p50_call_ms']:.0f} |" for n, r in report["images_per_call"].items()]
    return "\n".join(lines)


def plot(report: dict, path: Path, per_call_views: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    t = [int(v) for v in report["views"]]
    axes[0].plot(t, [r["images_per_s"] for r in report["views"].values()], "o-", label="images/s")
    axes[0].plot(t, [r["views_per_s"] for r in report["views"].values()], "s--", label="backbone views/s")
    axes[0].set(xscale="log", xlabel="views per image T", title="cost vs T (8 images per request)")
    axes[0].set_xticks(t, [str(v) for v in t])
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    n = [int(v) for v in report["images_per_call"]]
    axes[1].plot(n, [r["images_per_s"] for r in report["images_per_call"].values()], "o-")
    axes[1].set(xscale="log", xlabel="images per classify() call", ylabel="images/s",
                title=f"cost vs images per call (T={per_call_views})")
    axes[1].set_xticks(n, [str(v) for v in n]) if n else None
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", default=list(ALLOWED_VIEWS), choices=ALLOWED_VIEWS, help="T values (default all)")
    parser.add_argument("--images-per-call", type=int, nargs="+", default=[1, 8, 32], help="(default %(default)s)")
    parser.add_argument("--per-call-views", type=int, default=1, choices=ALLOWED_VIEWS, help="T of the images-per-call sweep (default %(default)s)")
    parser.add_argument("--views-budget", type=int, default=128, help="backbone views per measurement, at least 2 calls (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (default)")
    parser.add_argument("--num-images", type=int, default=32, help="distinct images (default %(default)s)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts (default: random weights)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "scaling", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if min(args.images_per_call) < 1:
        raise SystemExit("--images-per-call values must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    images, source = load_images(args.images, args.num_images)
    artifacts = args.artifacts or random_artifacts(DEFAULT_OUT / "artifacts")
    print(f"images: {source}", flush=True)
    report = dict(run(args, artifacts, images), images=source)
    write_json(args.out / "scaling.json", report)
    table = markdown(report, args.per_call_views)
    (args.out / "scaling.md").write_text(table + "\n")
    plot(report, args.out / "scaling.png", args.per_call_views)
    print("\n" + table + f"\n\nwritten: {args.out / 'scaling.json'}, {args.out / 'scaling.md'}, {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
