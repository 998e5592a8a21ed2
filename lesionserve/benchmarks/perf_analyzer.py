"""Triton's perf_analyzer against the ensemble, fed real image bytes, swept over concurrency.

    benchmarks/install_perf_analyzer.sh               # once: puts the binary in benchmarks/.tools
    python -m benchmarks.perf_analyzer                # local server (T=1), concurrency 1..32
    python -m benchmarks.perf_analyzer --url gpu-host:8001 --concurrency 1 8 32   # any Triton

Writes into --out: the input-data JSON, one CSV and one stdout log per concurrency, perf.csv
(all rows), breakdown.csv (per composing model: queue and compute time per request),
throughput.png and latency.png. With no --url it assembles the repository with random-weight
artifacts (or --artifacts) at --views and starts tritonserver on free loopback ports.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import json
import os
import re
import struct
import subprocess
from pathlib import Path

from lesionserve.benchmarks.common import DEFAULT_OUT, load_images, random_artifacts, served
from lesionserve.spec import ALLOWED_VIEWS

TOOLS = Path(__file__).resolve().parents[2] / "benchmarks" / ".tools"  # written by benchmarks/install_perf_analyzer.sh
INPUT_NAME = "raw_image"


def perf_analyzer_binary() -> Path:
    binary = TOOLS / "perf_analyzer"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} not found: run benchmarks/install_perf_analyzer.sh first")
    return binary


def input_data(images: list[bytes]) -> dict:
    """perf_analyzer's --input-data JSON: one entry per image, BYTES as base64.

    perf_analyzer sends a BYTES element as given, so the payload must be Triton's serialized
    form: a 4-byte little-endian length, then the bytes (directory mode would read text lines).
    """
    return {"data": [{INPUT_NAME: {"content": {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode()},
                                   "shape": [1]}} for b in images]}


_MODEL_RE = re.compile(r"^\s{2}(\S+), version:\s*(\S*)\s*$")
_LATENCY_RE = re.compile(
    r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ compute input (\d+) usec "
    r"\+ compute infer (\d+) usec \+ compute output (\d+) usec\)"
)
_COUNT_RE = re.compile(r"(Inference|Execution) count: (\d+)")


def composing_breakdown(stdout: str) -> list[dict]:
    """Per composing model server-side times from perf_analyzer's printed report (not in its CSV)."""
    rows, current = [], None
    for line in stdout.splitlines():
        model = _MODEL_RE.match(line)
        if model:
            current = {"model": model.group(1)}
            continue
        if current is None:
            continue
        count = _COUNT_RE.search(line)
        if count:
            current[f"{count.group(1).lower()}_count"] = int(count.group(2))
        latency = _LATENCY_RE.search(line)
        if latency:
            keys = ("avg_us", "overhead_us", "queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")
            current.update(dict(zip(keys, map(int, latency.groups()))))
            rows.append(current)
            current = None
    return rows


def run_perf_analyzer(url: str, model: str, data_file: Path, concurrency: int, batch: int, requests: int,
                      out: Path, timeout: float, stability: int = 30) -> tuple[list[dict], list[dict]]:
    """One perf_analyzer run at one concurrency; returns (CSV rows, composing breakdown)."""
    csv_path, log_path = out / f"perf_c{concurrency}.csv", out / f"perf_c{concurrency}.log"
    cmd = [
        str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
        "--input-data", str(data_file), f"--concurrency-range={concurrency}",
        "--measurement-mode=count_windows", f"--measurement-request-count={requests}",
        f"--stability-percentage={stability}", "--max-trials=10", "--percentile=95", "-f", str(csv_path),
    ]
    env = dict(os.environ, LD_LIBRARY_PATH=f"{TOOLS / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed (exit {proc.returncode}) at concurrency {concurrency}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}\n(full log: {log_path})")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    breakdown = [dict(row, concurrency=concurrency) for row in composing_breakdown(proc.stdout)]
    return rows, breakdown


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [int(r["Concurrency"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c, [float(r["Inferences/Second"]) for r in rows], "o-")
    ax.set(xscale="log", xlabel="concurrency (requests in flight)", ylabel="inferences/s")
    ax.set_title(f"throughput\n{title}", fontsize=8)
    ax.set_xticks(c, [str(x) for x in c])
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("p50 latency", "p90 latency", "p95 latency", "p99 latency"):
        ax.plot(c, [float(r[key]) / 1000 for r in rows], "o-", label=key.split()[0])
    ax.set(xscale="log", yscale="log", xlabel="concurrency (requests in flight)", ylabel="latency (ms)")
    ax.set_title(f"latency percentiles\n{title}", fontsize=8)
    ax.set_xticks(c, [str(x) for x in c])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], breakdown: list[dict]) -> str:
    """Throughput/latency per concurrency, then server-side time per composing model."""
    lines = ["| concurrency | inferences/s | p50 ms | p90 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = [f"{float(r[f'p{q} latency']) / 1000:.0f}" for q in (50, 90, 95, 99)]
        lines.append(f"| {r['Concurrency']} | {float(r['Inferences/Second']):.2f} | " + " | ".join(ms) + " |")
    if breakdown:
        lines += ["", "Server-side, per request of each composing model (queue / compute, ms; rows per execution):", "",
                  "| concurrency | " + " | ".join(dict.fromkeys(b["model"] for b in breakdown)) + " |",
                  "|---|" + "---|" * len(dict.fromkeys(b["model"] for b in breakdown))]
        models = list(dict.fromkeys(b["model"] for b in breakdown))
        for c in dict.fromkeys(b["concurrency"] for b in breakdown):
            cells = []
            for m in models:
                b = next((x for x in breakdown if x["concurrency"] == c and x["model"] == m), None)
                rows_per = b.get("inference_count", 0) / max(b.get("execution_count", 1), 1) if b else 0
                cells.append(f"{b['queue_us'] / 1000:.1f} / {b['compute_infer_us'] / 1000:.1f} ({rows_per:.1f})" if b else "-")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def sweep(args: argparse.Namespace, url: str, images_source: str) -> list[dict]:
    data_file = args.out / "input_data.json"
    rows, breakdown = [], []
    for concurrency in args.concurrency:
        requests = max(args.min_requests, args.requests_per_concurrency * concurrency)
        got, parts = run_perf_analyzer(url, args.model, data_file, concurrency, args.batch, requests, args.out,
                                       args.timeout, args.stability)
        rows += got
        breakdown += parts
        r = got[-1]
        print(f"  concurrency {concurrency:>3}: {float(r['Inferences/Second']):7.2f} inferences/s, "
              f"p50 {float(r['p50 latency']) / 1000:8.0f} ms, p99 {float(r['p99 latency']) / 1000:8.0f} ms", flush=True)
        for part in parts:
            n = max(part.get("execution_count", 1), 1)
            print(f"      {part['model']:<16} queue {part['queue_us'] / 1000:8.1f} ms  compute {part['compute_infer_us'] / 1000:8.1f} ms"
                  f"  (per request; {part.get('inference_count', 0) / n:.1f} rows per execution)")
    write_csv(args.out / "perf.csv", rows)
    write_csv(args.out / "breakdown.csv", breakdown)
    (args.out / "perf.md").write_text(markdown(rows, breakdown) + "\n")
    plot(rows, args.out, f"{args.model} @ {url}, {args.batch} image(s)/request\n{images_source}")
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="host:port of a running Triton's gRPC endpoint (default: start a local one)")
    parser.add_argument("--model", default="lesion_ensemble", help="model to measure (default %(default)s)")
    parser.add_argument("--views", type=int, default=1, choices=ALLOWED_VIEWS, help="T of the local server (default %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="values swept (default %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="images per request (perf_analyzer -b; default %(default)s)")
    parser.add_argument("--requests-per-concurrency", type=int, default=3,
                        help="requests per measurement window = this x concurrency (default %(default)s)")
    parser.add_argument("--min-requests", type=int, default=16, help="at least this many per window (default %(default)s)")
    parser.add_argument("--stability", type=int, default=30,
                        help="percent by which 3 consecutive windows may differ and count as stable (default %%(default)s; "
                             "perf_analyzer's 10 rarely settles on a shared 2-core machine)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (default)")
    parser.add_argument("--num-images", type=int, default=16, help="distinct images in the input data (default %(default)s)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts for the local server (default: random weights)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per perf_analyzer run (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "perf_analyzer", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if min(args.concurrency) < 1 or args.batch < 1:
        raise SystemExit("--concurrency values and --batch must be >= 1")
    perf_analyzer_binary()  # fail before any slow set-up
    args.out.mkdir(parents=True, exist_ok=True)
    images, source = load_images(args.images, args.num_images)
    (args.out / "input_data.json").write_text(json.dumps(input_data(images)))
    print(f"input data: {source} -> {args.out / 'input_data.json'}", flush=True)
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            artifacts = args.artifacts or random_artifacts(DEFAULT_OUT / "artifacts")
            url = stack.enter_context(served(artifacts, args.views, args.out)).grpc_url
        sweep(args, url, source)
    print(f"written: {args.out / 'perf.csv'}, {args.out / 'breakdown.csv'}, {args.out / 'throughput.png'}, {args.out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
