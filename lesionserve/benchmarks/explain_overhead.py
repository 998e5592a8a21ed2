"""What explanations cost: classification alone vs classification with heatmaps, side by side.

    python -m benchmarks.explain_overhead                 # T=8, 3 interleaved rounds (about 4 min on 2 cores)
    python -m benchmarks.explain_overhead --views 1 --rounds 1 --calls 1     # a smoke run

One server, the same images and weights, measured in turn each round:
  (a) classify        8 images per request (the SDK's default)
  (b) classify        1 image per request, max_workers concurrent (the request shape of (c))
  (c) explain         classify(explain=True): 1 image per request, max_workers concurrent
and, in process, each member's logits from the graph exported without ``cams``, from the served
classification session (the graph with ``cams``, pruned to its logits) and from that graph whole
(what classification would pay if it ran the maps too). Figures are medians of rounds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


from lesionserve import prog
from lesionserve.benchmarks.common import (DEFAULT_OUT, cycle, load_images, machine_info, measure, median,
                                           random_artifacts, served, write_json)
from lesionserve.spec import ALLOWED_VIEWS

#: The issue's bound: explanations may cost at most this much more than classification alone at T=8.
GOAL_RATIO = 1.15


def graph_cost(artifacts: Path, images: list[bytes], repeats: int = 7) -> dict[str, dict[str, float]]:
    """Per member: ms per 8-row ORT run for logits from (a) the graph exported without ``cams``
    (``artifacts/<member>/plain.onnx``, exported again from the same checkpoint), (b) the served
    classification session (the graph with ``cams`` pruned to its logits) and (c) that graph whole."""
    from lesionserve.export.onnx_export import export_onnx
    from lesionserve.onnx_session import make_session
    from lesionserve.pipelines import LESION_ENSEMBLE
    from lesionserve.preprocessing import preprocess_batch
    from lesionserve.spec import BACKBONE_OUTPUT

    out = {}
    for member in LESION_ENSEMBLE.members:
        folder = artifacts / member.name
        plain_path = folder / "plain.onnx"
        if not plain_path.is_file():
            export_onnx(folder / "checkpoint.pt", plain_path, explain=False)
        sessions = {"plain": make_session(plain_path, 2),
                    "served": make_session(folder / "model.onnx", 2, outputs=[BACKBONE_OUTPUT]),
                    "whole_graph": make_session(folder / "model.onnx", 2)}
        x = preprocess_batch(images[:8], [member.preprocessing])[member.preprocessing]
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):  # interleaved: drift touches all alike
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run([BACKBONE_OUTPUT], {"pixel_values": x})
                times[name].append(time.perf_counter() - start)
        figures = {k: round(1000 * median(v[1:]), 1) for k, v in times.items()}
        figures["served_vs_plain"] = round(figures["served"] / figures["plain"], 3)
        figures["whole_vs_plain"] = round(figures["whole_graph"] / figures["plain"], 3)
        out[member.name] = figures
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m benchmarks.explain_overhead"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=8, choices=ALLOWED_VIEWS, help="view count T (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (real HAM10000 if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--calls", type=int, default=2, help="calls of 8 images per pipeline per round (default %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent single-image requests in (b) and (c) (default %(default)s)")
    parser.add_argument("--method", default="gradcam", choices=("gradcam", "gradcampp"), help="(default %(default)s)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts (default: random-weight ones under --out)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "explain_overhead", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lesionserve_client import LesionClient

    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images, source = load_images(args.images, 16)
    artifacts = args.artifacts or random_artifacts(args.out.parent / "artifacts")
    print(f"images: {source}\nmachine: {machine_info()}", flush=True)
    rates: dict[str, list[float]] = {"classify_batched": [], "classify_single": [], "explain": []}
    with served(artifacts, args.views, args.out, log_name="tritonserver.log") as server:
        with LesionClient(server.grpc_url, timeout=900, max_workers=args.workers) as batched, \
                LesionClient(server.grpc_url, timeout=900, max_workers=args.workers, max_images_per_request=1) as single:
            runs = {
                "classify_batched": lambda take=cycle(images, 8): batched.classify(take()),
                "classify_single": lambda take=cycle(images, 8): single.classify(take()),
                "explain": lambda take=cycle(images, 8): single.classify(take(), explain=True, explain_method=args.method),
            }
            for index in range(args.rounds):
                for name, run in runs.items():
                    rates[name].append(measure(run, 8, args.calls).per_second)
                print(f"round {index + 1}: " + ", ".join(f"{k} {v[-1]:.3f} img/s" for k, v in rates.items()), flush=True)
    figures = {k: round(median(v), 3) for k, v in rates.items()}
    ratios = {"explain_vs_classify_batched": round(figures["classify_batched"] / figures["explain"], 3),
              "explain_vs_classify_single": round(figures["classify_single"] / figures["explain"], 3)}
    graphs = graph_cost(artifacts, images)
    report = {"views": args.views, "method": args.method, "images": source, "rounds": rates, "images_per_s": figures,
              "cost_ratios": ratios, "graph_ms_per_8_rows": graphs, "goal": f"explain / classify <= {GOAL_RATIO}"}
    write_json(args.out / "explain_overhead.json", report)
    lines = [f"T={args.views}, {args.method}, images/s (median of {args.rounds} rounds):",
             *(f"  {k}: {v}" for k, v in figures.items()),
             f"  cost of explaining: x{ratios['explain_vs_classify_batched']} vs classification batched 8 per request, "
             f"x{ratios['explain_vs_classify_single']} vs classification 1 per request "
             f"(goal <= x{GOAL_RATIO}: {'met' if ratios['explain_vs_classify_batched'] <= GOAL_RATIO else 'NOT met'})",
             "  logits, ms per 8 rows: plain export / served (pruned) / whole graph with cams: "
             + ", ".join(f"{m} {g['plain']} / {g['served']} (x{g['served_vs_plain']}) / {g['whole_graph']} "
                         f"(x{g['whole_vs_plain']})" for m, g in graphs.items())]
    (args.out / "explain_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
