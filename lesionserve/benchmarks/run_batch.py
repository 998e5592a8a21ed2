"""Per-view cost of each backbone against the ORT run batch, standalone (why run_batch is 4).

    python -m benchmarks.run_batch                      # batches 1 4 8 16 32 64
    python -m benchmarks.run_batch --batches 1 4 --views 8   # smoke

Each backbone's ONNX Runtime session (configured as served: make_session, --threads) runs the
views of real images in runs of each batch size; prints ms per view and writes run_batch.md/.json.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from lesionserve.benchmarks.common import DEFAULT_OUT, load_images, random_artifacts, write_json
from lesionserve.benchmarks.pipelines import input_size, onnx_sessions, seconds_per_view
from lesionserve.preprocessing import preprocess_batch
from lesionserve.views import make_views


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64], help="run batches (default %(default)s)")
    parser.add_argument("--views", type=int, default=64, help="views per pass, a multiple of every batch (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per batch (default %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (default)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts (default: random weights)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "run_batch", help="results folder (default %(default)s)")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or any(args.views % b for b in args.batches):
        raise SystemExit(f"--views ({args.views}) must be a multiple of every --batches value (all >= 1)")
    images, source = load_images(args.images, max(1, args.views // 8))
    sessions = onnx_sessions(args.artifacts or random_artifacts(DEFAULT_OUT / "artifacts"), args.threads)
    sizes = {name: input_size(s) for name, s in sessions.items()}
    pixels = preprocess_batch(images, set(sizes.values()))
    print(f"views of {source}; {args.threads} threads; ms per view", flush=True)
    table = {}
    for name, session in sessions.items():
        views = np.resize(make_views(pixels[sizes[name]], 8), (args.views, 3, sizes[name], sizes[name]))
        table[name] = {str(b): round(1000 * seconds_per_view(session, views, b, args.repeats), 1) for b in args.batches}
        print(f"  {name:<16} " + "  ".join(f"b{b}: {v:5.1f}" for b, v in table[name].items()), flush=True)
    lines = ["| backbone | " + " | ".join(f"{b} rows" for b in args.batches) + " |", "|---|" + "---|" * len(args.batches)]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |" for name, row in table.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run_batch.md").write_text("\n".join(lines) + "\n")
    write_json(args.out / "run_batch.json", {"images": source, "threads": args.threads, "ms_per_view": table})
    print("\n" + "\n".join(lines) + f"\n\nwritten: {args.out / 'run_batch.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
