"""Our own side-by-side benchmark: the served ensemble against in-process baselines, in one run.

    python -m benchmarks.harness                      # T=1 and T=8, real ISIC-size JPEGs if present
    python -m benchmarks.harness --views 1 --throughput-views 16 --latency-views 4   # a smoke run

Same images, same view count T, same weights, one after the other on this machine:
  (a) triton   the ensemble through the SDK (JPEG bytes in, results out), gRPC on loopback
  (b) torch    the in-process PyTorch eager reference pipeline (the seed's way of running it)
  (c) ort      the in-process ONNX Runtime pipeline (what a user without Triton would write)
  (d) bound    the three backbones alone on ready-made views, seconds per view x T: no pipeline
               on these cores, with these sessions, can beat it
Throughput: requests of --batch images, one at a time (concurrency 1). Latency: one image per
request, concurrency 1, p50/p95/p99. The four are measured in turn, --rounds times, so that the
machine's drift touches each alike; throughput is the median of the rounds' rates. Goals on the 2-core CPU: (a)/(d) >= 0.90, (a)/(b) >= 1.8.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lesionserve.benchmarks.common import (DEFAULT_OUT, Timing, calls_for, cycle, load_images, machine_info, measure, median, random_artifacts,
                               served, served_run_batch, write_json)
from lesionserve.spec import ALLOWED_VIEWS, GPU_VARIANTS

#: Ratio goals on the CPU (benchmarks/RESULTS.md), (numerator, denominator) -> minimum.
GOALS = {("triton", "bound"): 0.90, ("triton", "torch"): 1.8}
PIPELINES = ("triton", "torch", "ort", "bound")


def bench_views(args: argparse.Namespace, artifacts: Path, images: list[bytes], views: int) -> dict:
    """All four pipelines at one T, interleaved over --rounds rounds (the machine's drift then
    touches each alike); returns {pipeline: {"throughput": ..., "latency": ...}}."""
    import torch

    from lesionserve.benchmarks.pipelines import BackboneBound, OrtPipeline
    from lesionserve.reference import ReferencePipeline
    from lesionserve_client import LesionClient

    batch, rounds = args.batch, args.rounds
    throughput_calls = -(-calls_for(args.throughput_views, views, batch, 2) // rounds)
    latency_calls = -(-calls_for(args.latency_views, views, 1, 4) // rounds)
    print(f"\n== T={views}: {rounds} rounds of {throughput_calls} calls x {batch} images (throughput) and "
          f"{latency_calls} calls x 1 image (latency) per pipeline", flush=True)

    torch.set_num_threads(args.threads)
    # The baselines run their backbones in batches of the served run_batch: the same work per run.
    reference = ReferencePipeline.from_artifacts(artifacts, views=views, batch_size=args.run_batch)
    ort_pipeline = OrtPipeline.from_onnx(artifacts, views=views, threads=args.threads, batch_size=args.run_batch)
    bound = BackboneBound(artifacts, threads=args.threads)
    timings: dict[str, dict[str, list[Timing]]] = {n: {"throughput": [], "latency": []} for n in ("triton", "torch", "ort")}
    per_view_rounds, single_rounds = [], []

    def run(name: str, classify) -> None:
        timings[name]["throughput"].append(measure(lambda take=cycle(images, batch): classify(take()), batch, throughput_calls))
        timings[name]["latency"].append(measure(lambda take=cycle(images, 1): classify(take()), 1, latency_calls))
        time.sleep(0.5)  # let the idle threads of this runtime stop spinning before the next one runs

    with served(artifacts, views, args.out, log_name=f"tritonserver_t{views}.log", variant=args.variant) as server:
        with LesionClient(server.grpc_url, timeout=900, max_workers=1, max_images_per_request=batch) as client:
            for index in tqdm(range(rounds), desc=f"T={views} rounds"):
                run("triton", client.classify)
                run("torch", reference.run)
                run("ort", ort_pipeline.run)
                per_view_rounds.append(bound.seconds_per_view(images[:batch], views, repeats=args.bound_repeats))
                single_rounds.append(bound.seconds_per_view(images[:1], views, repeats=args.bound_repeats))

    results = {}
    for name, kinds in timings.items():
        thr, lat = (Timing.combine(kinds[k]) for k in ("throughput", "latency"))
        results[name] = {"throughput": thr.summary(), "latency": lat.summary(),
                         "rounds_images_per_s": [round(t.per_second, 3) for t in kinds["throughput"]]}
        # Median of the rounds' rates: one disturbed round does not decide the figure.
        results[name]["throughput"]["images_per_s"] = round(median([t.per_second for t in kinds["throughput"]]), 3)
        print(f"  {name:<7} {results[name]['throughput']['images_per_s']:7.2f} images/s "
              f"(rounds: {', '.join(f'{r:.2f}' for r in results[name]['rounds_images_per_s'])}); "
              f"latency p50 {lat.percentile(50) * 1000:7.0f} ms p99 {lat.percentile(99) * 1000:7.0f} ms", flush=True)
    per_view = {name: median([r[name] for r in per_view_rounds]) for name in per_view_rounds[0]}
    single = {name: median([r[name] for r in single_rounds]) for name in single_rounds[0]}
    seconds_per_image, latency = views * sum(per_view.values()), views * sum(single.values())
    results["bound"] = {
        "throughput": {"images_per_s": round(1 / seconds_per_image, 3)},
        "latency": {"p50_ms": round(1000 * latency, 1)},
        "rounds_images_per_s": [round(1 / (views * sum(r.values())), 3) for r in per_view_rounds],
        "ms_per_view": {name: round(1000 * s, 2) for name, s in per_view.items()},
        "ms_per_view_batch1": {name: round(1000 * s, 2) for name, s in single.items()},
    }
    print(f"  bound   {1 / seconds_per_image:7.2f} images/s; latency         {latency * 1000:7.0f} ms  "
          f"(ms per view at the best run batch: " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in per_view.items()) + ")")
    return results


def ratios(results: dict) -> dict[str, float]:
    a = results["triton"]["throughput"]["images_per_s"]
    return {f"triton/{other}": round(a / results[other]["throughput"]["images_per_s"], 3) for other in ("bound", "torch", "ort")}


def markdown(report: dict) -> str:
    """The tables of RESULTS.md, from a report."""
    lines = [
        "| T | pipeline | images/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"triton": "(a) Triton ensemble via SDK", "torch": "(b) PyTorch eager, in process",
              "ort": "(c) ONNX Runtime, in process", "bound": "(d) backbones alone (bound)"}
    for views, results in report["views"].items():
        for name in PIPELINES:
            r = results[name]
            lat = r["latency"]
            cells = [str(lat.get(k, "-")) for k in ("p50_ms", "p95_ms", "p99_ms")]
            lines.append(f"| {views} | {labels[name]} | {r['throughput']['images_per_s']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| T | (a)/(d) goal >= 0.90 | (a)/(b) goal >= 1.8 | (a)/(c) |", "|---|---|---|---|"]
    for views, results in report["views"].items():
        r = report["ratios"][views]
        mark = lambda key, goal: f"{r[key]:.3f} {'met' if r[key] >= goal else 'NOT met'}"  # noqa: E731
        lines.append(f"| {views} | {mark('triton/bound', 0.90)} | {mark('triton/torch', 1.8)} | {r['triton/ort']:.3f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = list(report["views"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    for i, name in enumerate(PIPELINES):
        xs = [j + (i - 1.5) * width for j in range(len(views))]
        axes[0].bar(xs, [report["views"][v][name]["throughput"]["images_per_s"] for v in views], width, label=name)
        axes[1].bar(xs, [report["views"][v][name]["latency"]["p50_ms"] for v in views], width, label=name)
    for ax, title in zip(axes, ("throughput (images/s, higher is better)", "latency p50, 1 image (ms, lower is better)")):
        ax.set_xticks(range(len(views)), [f"T={v}" for v in views])
        ax.set_title(title)
        ax.legend()
    axes[1].set_yscale("log")
    fig.suptitle(f"{report['images']['source']}; {report['machine']['cores']} cores: {report['machine']['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", default=[1, 8], choices=ALLOWED_VIEWS, help="view counts T (default 1 8)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (real HAM10000 if present)")
    parser.add_argument("--num-images", type=int, default=16, help="distinct images cycled through (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per request/call for throughput (default %(default)s, the ensemble's limit)")
    parser.add_argument("--throughput-views", type=int, default=128, help="backbone views per pipeline for throughput, at least 2 calls (default %(default)s)")
    parser.add_argument("--latency-views", type=int, default=64, help="backbone views per pipeline for latency, at least 4 calls (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over rounds (default %(default)s)")
    parser.add_argument("--bound-repeats", type=int, default=2, help="timed runs per backbone per round for the bound (default %(default)s)")
    parser.add_argument("--run-batch", type=int, default=served_run_batch(),
                        help="backbone rows per run in (b) and (c) (default: the served run_batch, %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for in-process pipelines (default: all cores, %(default)s)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts to serve (default: random-weight ones under --out)")
    parser.add_argument("--variant", choices=sorted(GPU_VARIANTS),
                        help="serve (a) as this GPU variant (--model-config-name); default the CPU variant. "
                             "The baselines (b)-(d) stay on the CPU")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "harness", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch < 1 or args.batch > 8:
        raise SystemExit(f"--batch must be 1..8 (the ensemble's max_batch_size), got {args.batch}")
    args.out.mkdir(parents=True, exist_ok=True)
    images, source = load_images(args.images, args.num_images)
    artifacts = args.artifacts or random_artifacts(args.out.parent / "artifacts")
    machine = machine_info()
    print(f"images: {source}\nmachine: {machine}", flush=True)
    report = {"machine": machine, "images": {"source": source, "count": len(images)}, "batch": args.batch,
              "command": " ".join(["python -m benchmarks.harness", *(argv if argv is not None else sys.argv[1:])]),
              "views": {}, "ratios": {}}
    for views in args.views:
        report["views"][str(views)] = bench_views(args, artifacts, images, views)
        report["ratios"][str(views)] = ratios(report["views"][str(views)])
        write_json(args.out / "harness.json", report)  # after each T: a crash keeps what was measured
    table = markdown(report)
    (args.out / "harness.md").write_text(table + "\n")
    plot(report, args.out / "harness.png")
    print("\n" + table + f"\n\nwritten: {args.out / 'harness.json'}, {args.out / 'harness.md'}, {args.out / 'harness.png'}")
    unmet = [f"T={v} {k} {r[k]:.3f} < {goal}" for v, r in report["ratios"].items()
             for (num, den), goal in GOALS.items() for k in [f"{num}/{den}"] if r[k] < goal]
    print("goals: " + ("all met" if not unmet else "NOT met: " + "; ".join(unmet)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
