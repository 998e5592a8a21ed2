"""Try serving settings side by side: each variant is the committed repository with a few edits.

    python -m benchmarks.tuning --views 1                       # the built-in variants
    python -m benchmarks.tuning --views 8 --variant spin0:threads=2,spin=0 --variant t1:threads=1

A variant is ``name:key=value,...`` with keys
  threads    intra-op threads of each backbone's ONNX Runtime session (parameter intra_op_threads)
  spin       1/0: idle ORT threads busy-wait or sleep (parameter allow_spinning)
  instances  instance count of each backbone
  delay      each backbone's dynamic batcher max_queue_delay_microseconds
  pre        instance count of preprocess
  decode     decoding threads inside preprocess (parameter decode_threads)
  chunk      rows per ORT run inside each backbone (parameter run_batch)
  lock       1/0: the backbones take turns on the cores (parameter core_lock, lesionserve/core_lock.py)
All variants are served at once and measured in turn through the SDK, --rounds times (medians):
images/s with requests of --batch images at concurrency 1 and 2, and single-image latency. The committed config.pbtxt files
hold the winner; benchmarks/RESULTS.md explains the choice.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lesionserve.benchmarks.common import DEFAULT_OUT, cycle, load_images, measure, median, random_artifacts, write_json
from lesionserve.benchmarks.pipelines import BackboneBound
from lesionserve.server import TritonServer
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.spec import ALLOWED_VIEWS

KEYS = {"threads", "spin", "instances", "delay", "pre", "decode", "lock", "chunk"}
#: The path from the first served settings to the committed ones, one change at a time.
BEFORE = "before:threads=2,spin=1,lock=0,decode=1,chunk=64"
DEFAULT_VARIANTS = (
    BEFORE,
    "spin0:threads=2,spin=0,lock=0,decode=1,chunk=64",
    "spin0-decode2:threads=2,spin=0,lock=0,decode=2,chunk=64",
    "spin0-decode2-lock:threads=2,spin=0,lock=1,decode=2,chunk=64",
    "committed:",
)


def parse_variant(text: str) -> tuple[str, dict[str, int]]:
    """``name:key=value,...`` -> (name, {key: int}); raises ValueError naming the bad part."""
    name, _, body = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name; write name:key=value,...")
    edits = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS or not value.isdigit():
            raise ValueError(f"variant {text!r}: bad setting {item!r}; keys are {sorted(KEYS)} with integer values")
        edits[key] = int(value)
    return name, edits


def set_parameter(text: str, key: str, value: str) -> str:
    """Set ``parameters { key: KEY ... }`` in a config's text, adding it when absent."""
    pattern = re.compile(rf'(parameters: \{{ key: "{key}" value: \{{ string_value: ")[^"]*(")')
    if pattern.search(text):
        return pattern.sub(rf"\g<1>{value}\g<2>", text)
    return text + f'\nparameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def set_field(text: str, field: str, value: int, path: Path) -> str:
    new, n = re.subn(rf"({field}:\s*)\d+", rf"\g<1>{value}", text)
    if n != 1:
        raise ValueError(f"{path}: expected one '{field}', found {n}")
    return new


def apply_variant(repository: Path, edits: dict[str, int]) -> None:
    """Edit the CPU config.pbtxt files of an assembled repository copy in place."""
    for name in LESION_ENSEMBLE.member_names:
        path = repository / name / "config.pbtxt"
        text = path.read_text()
        if "threads" in edits:
            text = set_parameter(text, "intra_op_threads", str(edits["threads"]))
        if "spin" in edits:
            text = set_parameter(text, "allow_spinning", str(edits["spin"]))
        if "chunk" in edits:
            text = set_parameter(text, "run_batch", str(edits["chunk"]))
        if "lock" in edits:
            text = set_parameter(text, "core_lock", "backbones" if edits["lock"] else "")
        if "instances" in edits:
            text = set_field(text, "count", edits["instances"], path)
        if "delay" in edits:
            text = set_field(text, "max_queue_delay_microseconds", edits["delay"], path)
        path.write_text(text)
    path = repository / "preprocess" / "config.pbtxt"
    text = path.read_text()
    if "pre" in edits:
        text = set_field(text, "count", edits["pre"], path)
    if "decode" in edits:
        text = set_parameter(text, "decode_threads", str(edits["decode"]))
    path.write_text(text)


def measure_round(url: str, images: list[bytes], batch: int, calls: int, latency_calls: int) -> dict[str, float]:
    """One round on one variant: images/s at concurrency 1 and 2, single-image latency."""
    from lesionserve_client import LesionClient

    out = {}
    for concurrency in (1, 2):
        with LesionClient(url, timeout=600, max_workers=concurrency, max_images_per_request=batch) as client:
            size = batch * concurrency
            timing = measure(lambda take=cycle(images, size): client.classify(take()), size, max(1, calls // concurrency))
            out[f"images_per_s_c{concurrency}"] = timing.per_second
    with LesionClient(url, timeout=600, max_workers=1) as client:
        latency = measure(lambda take=cycle(images, 1): client.classify(take()), 1, latency_calls)
    out["latencies"] = list(latency.latencies)
    return out


def summarize(rounds: list[dict]) -> dict[str, float]:
    """Median images/s over rounds; latency percentiles over every round's calls."""
    latencies = [x for r in rounds for x in r["latencies"]]
    return {
        "images_per_s_c1": round(median([r["images_per_s_c1"] for r in rounds]), 3),
        "images_per_s_c2": round(median([r["images_per_s_c2"] for r in rounds]), 3),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
        "rounds": len(rounds),
    }


def markdown(payload: dict) -> str:
    """The Tuning table of RESULTS.md from a tuning_t<T>.json payload."""
    bound = payload["bound_images_per_s"]
    lines = [f"T={payload['views']}, requests of {payload['batch']} images; backbone bound {bound:.2f} images/s", "",
             "| variant | settings | images/s c=1 (of bound) | images/s c=2 (of bound) | 1-image p50 ms | p99 ms |",
             "|---|---|---|---|---|---|"]
    for name, r in payload["variants"].items():
        settings = ", ".join(f"{k}={r[k]}" for k in sorted(KEYS) if k in r) or "as committed"
        lines.append(f"| {name} | {settings} | {r['images_per_s_c1']:.2f} ({r['images_per_s_c1'] / bound:.2f}) | "
                     f"{r['images_per_s_c2']:.2f} ({r['images_per_s_c2'] / bound:.2f}) | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=1, choices=ALLOWED_VIEWS, help="T (default %(default)s)")
    parser.add_argument("--variant", action="append", help="name:key=value,... (repeatable; default: the built-in set)")
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds, variants interleaved (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per request (default %(default)s)")
    parser.add_argument("--calls", type=int, default=6, help="throughput requests per variant at concurrency 1 (default %(default)s)")
    parser.add_argument("--latency-calls", type=int, default=8, help="single-image requests per variant (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (default)")
    parser.add_argument("--num-images", type=int, default=16, help="distinct images (default %(default)s)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts (default: random weights)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "tuning", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lesionserve.export.assemble import assemble

    args = get_args_parser().parse_args(argv)
    try:
        variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    images, source = load_images(args.images, args.num_images)
    artifacts = args.artifacts or random_artifacts(DEFAULT_OUT / "artifacts")
    print(f"images: {source}; T={args.views}; {args.batch} images per request", flush=True)
    with contextlib.ExitStack() as stack:
        # Every variant is served at once and measured in turn, round after round: drift and
        # neighbours on the machine then touch every variant alike. Idle servers use no CPU.
        servers = {}
        for name, edits in variants:
            repo = assemble(artifacts, out=args.out / f"repository_{name}", views=args.views)
            apply_variant(repo, edits)
            server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=args.out / f"{name}.log")
            servers[name] = stack.enter_context(server)
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        bound, bound_rates = BackboneBound(artifacts, threads=os.cpu_count() or 1), []
        for round_index in range(args.rounds):
            per_view = bound.seconds_per_view(images[: args.batch], args.views, repeats=1)
            bound_rates.append(1 / (args.views * sum(per_view.values())))
            order = list(servers)[round_index % len(servers):] + list(servers)[: round_index % len(servers)]
            for name in tqdm(order, desc=f"round {round_index + 1}/{args.rounds}", leave=False):
                rounds[name].append(measure_round(servers[name].grpc_url, images, args.batch, args.calls, args.latency_calls))
    results = {name: dict(edits, **summarize(rounds[name])) for name, edits in variants}
    bound_rate = median(bound_rates)
    print(f"  backbone bound: {bound_rate:.2f} images/s (median of {len(bound_rates)}, measured between rounds)")
    for name, r in results.items():
        print(f"  {name:<18} c1 {r['images_per_s_c1']:6.2f} images/s ({r['images_per_s_c1'] / bound_rate:.2f} of bound)  "
              f"c2 {r['images_per_s_c2']:6.2f} ({r['images_per_s_c2'] / bound_rate:.2f})  "
              f"1-image p50 {r['p50_ms']:7.0f} ms  p99 {r['p99_ms']:7.0f} ms")
    payload = {"views": args.views, "images": source, "batch": args.batch,
               "bound_images_per_s": round(bound_rate, 3), "variants": results}
    write_json(args.out / f"tuning_t{args.views}.json", payload)
    (args.out / f"tuning_t{args.views}.md").write_text(markdown(payload) + "\n")
    print(f"written: {args.out / f'tuning_t{args.views}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
