"""Reproduce every table of benchmarks/RESULTS.md in one command (what `make bench` runs).

    python -m benchmarks.run_all              # full settings: about 15 minutes on 2 CPU cores
    python -m benchmarks.run_all --quick      # tiny settings, a few minutes: checks the scripts run

Installs perf_analyzer (benchmarks/install_perf_analyzer.sh), then runs the side-by-side harness
(T=1 and T=8), perf_analyzer's concurrency sweep, the scaling sweeps and the run-batch profile, and
collects their tables into <out>/TABLES.md. Leave the machine otherwise idle while it runs.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from lesionserve.benchmarks import harness, perf_analyzer, run_batch, scaling, tuning
from lesionserve.benchmarks.common import DEFAULT_OUT

QUICK = {
    "harness": ["--views", "1", "--num-images", "2", "--batch", "2", "--throughput-views", "2", "--latency-views", "1",
                "--bound-repeats", "1", "--rounds", "1"],
    "perf_analyzer": ["--concurrency", "1", "2", "--num-images", "2", "--min-requests", "2", "--requests-per-concurrency", "1",
                      "--stability", "100"],
    "scaling": ["--views", "1", "--images-per-call", "1", "2", "--views-budget", "2", "--num-images", "2"],
    "run_batch": ["--batches", "1", "2", "--views", "2", "--repeats", "1"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run, figures meaningless)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (default)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts (default: random weights, built once)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (default %(default)s)")
    parser.add_argument("--with-tuning", action="store_true",
                        help="also the Tuning tables: the settings ladder at T=1, before vs committed at T=8 (~12 min more)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    installer = Path(__file__).resolve().parents[2] / "benchmarks" / "install_perf_analyzer.sh"
    subprocess.run(["bash", str(installer)], check=True, stdout=subprocess.DEVNULL)
    common = ["--images", args.images] + (["--artifacts", str(args.artifacts)] if args.artifacts else [])
    sections = []
    for title, module, name in (
        ("Side by side: (a) Triton, (b) PyTorch eager, (c) ONNX Runtime, (d) backbone bound", harness, "harness"),
        ("perf_analyzer: the ensemble over gRPC, T=1, 1 image per request", perf_analyzer, "perf_analyzer"),
        ("Scaling: T and images per call", scaling, "scaling"),
        ("Run batch: ms per view of each backbone alone, by ORT run batch", run_batch, "run_batch"),
    ):
        print(f"\n######## {name}", flush=True)
        out = args.out / name
        extra = QUICK[name] if args.quick else []
        if module.main(common + extra + ["--out", str(out)]) != 0:
            raise SystemExit(f"{name} failed")
        table = out / f"{name}.md" if name != "perf_analyzer" else out / "perf.md"
        sections.append(f"## {title}\n\n{table.read_text()}")
    if args.with_tuning:
        quick = ["--rounds", "1", "--calls", "1", "--latency-calls", "1", "--batch", "2", "--num-images", "2"] if args.quick else []
        for argv in (["--views", "1", "--calls", "4", "--latency-calls", "6", "--rounds", "3"],
                     ["--views", "8", "--calls", "2", "--latency-calls", "2", "--rounds", "2",
                      "--variant", tuning.BEFORE, "--variant", "committed:"]):
            print(f"\n######## tuning {' '.join(argv[:2])}", flush=True)
            if tuning.main(common + argv + quick + ["--out", str(args.out / "tuning")]) != 0:
                raise SystemExit("tuning failed")
    (args.out / "TABLES.md").write_text("\n".join(sections))
    print(f"\nall benchmarks done in {(time.perf_counter() - start) / 60:.1f} min; tables: {args.out / 'TABLES.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
