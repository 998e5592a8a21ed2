"""Throughput and latency against the number of replicas one LesionClient spreads over.

    python -m benchmarks.replicas                                  # 1, 2, 3 local replicas, native sizes, T=1
    python -m benchmarks.replicas --replicas 1 2 --requests 8 --rounds 1 --num-images 2   # smoke

Starts max(--replicas) tritonservers on loopback (one after the other; each the ensemble at
--views), then, in interleaved rounds (machine drift touches every setting alike), for n in
--replicas: a client over the first n servers sends --requests one-image requests from
--concurrency threads; images/s is the median over rounds, latencies are pooled. The servers a
setting does not use stay idle (memory, no CPU).

The SDK's own cost of spreading: (a) at concurrency 1 (no contention), the p50/p95 of one request
through 1 replica vs through n; (b) in process, the time of one pick and release of a replica
(ReplicaSet.acquire + release, no network).

Local replicas on one machine share its cores: on 2 cores expect no gain from a second or third
replica, only their memory and the scheduling between them. What replicas buy is measured where
each has its own cores or GPU, with this same script:
  - one GPU host, k GPUs: start one `lesionserve serve` per GPU (CUDA_VISIBLE_DEVICES=i, its own
    ports), then run this script's measurement against them with --urls host:p1,host:p2,... ;
  - several nodes (the Kubernetes Deployment behind its Service): --urls with each pod's address
    (or the Service's, where the client then sees one endpoint and kube-proxy spreads connections,
    which is not per request: gRPC keeps one connection), raising --concurrency until images/s stops
    growing; report img/s and p50/p95 per replica count, with the GPU model and the variant.
Writes replicas.json and replicas.md into --out.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from lesionserve.benchmarks.common import DEFAULT_OUT, Timing, load_images, machine_info, median, random_artifacts, write_json
from lesionserve.spec import ALLOWED_VIEWS


def concurrent_timing(client, images: list[bytes], requests: int, concurrency: int) -> Timing:
    """``requests`` one-image classify calls from ``concurrency`` threads; each call's latency."""
    latencies: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    position = [0]

    def worker() -> None:
        while True:
            with lock:
                index = position[0]
                position[0] += 1
            if index >= requests:
                return
            t0 = time.perf_counter()
            try:
                client.classify([images[index % len(images)]])
            except Exception as exc:  # reported below: a benchmark with failed requests measures nothing
                failures.append(exc)
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed, the first: {failures[0]}")
    return Timing(requests, time.perf_counter() - start, tuple(latencies))


def pick_cost_us(replicas: int, picks: int = 20000) -> float:
    """Microseconds of one ReplicaSet.acquire + release (the SDK's bookkeeping per attempt)."""
    from lesionserve_client.replicas import ReplicaSet

    made = ReplicaSet([f"r{i}:1" for i in range(replicas)], make_client=lambda url: None, probe_interval=60)
    start = time.perf_counter()
    for _ in range(picks):
        made.release(made.acquire(), answered=True)
    return 1e6 * (time.perf_counter() - start) / picks


def run(args: argparse.Namespace, urls: list[str], images: list[bytes]) -> dict:
    from lesionserve_client import LesionClient

    settings = {n: urls[:n] for n in args.replicas}
    with ExitStack() as stack:
        # The API key, if any, from $LESIONSERVE_API_KEY (the client's default).
        tls = dict(ssl=True, root_certificates=args.root_certificates) if args.root_certificates else {}
        clients = {n: stack.enter_context(LesionClient(u, timeout=900, max_workers=1, **tls)) for n, u in settings.items()}
        for client in clients.values():  # warm-up: config fetched, every replica's models touched
            concurrent_timing(client, images, 2 * len(client.urls), args.concurrency)
        loaded: dict[int, list[Timing]] = {n: [] for n in settings}
        single: dict[int, list[Timing]] = {n: [] for n in settings}
        for index in range(args.rounds):
            for n, client in clients.items():
                loaded[n].append(concurrent_timing(client, images, args.requests, args.concurrency))
                single[n].append(concurrent_timing(client, images, args.latency_requests, 1))
            print(f"round {index + 1}: " + ", ".join(f"{n} replica(s) {loaded[n][-1].per_second:.2f} img/s" for n in settings), flush=True)
    report: dict = {"concurrency": args.concurrency, "requests_per_round": args.requests, "rounds": args.rounds, "settings": {}}
    base = median([t.per_second for t in loaded[min(settings)]])
    for n in settings:
        pooled, alone = Timing.combine(loaded[n]), Timing.combine(single[n])
        rate = median([t.per_second for t in loaded[n]])
        report["settings"][str(n)] = {
            "images_per_s": round(rate, 3), "vs_fewest": round(rate / base, 3),
            "p50_ms": round(1000 * pooled.percentile(50), 1), "p95_ms": round(1000 * pooled.percentile(95), 1),
            "c1_p50_ms": round(1000 * alone.percentile(50), 1), "c1_p95_ms": round(1000 * alone.percentile(95), 1),
            "pick_us": round(pick_cost_us(n), 2),
        }
    return report


def markdown(report: dict) -> str:
    c = report["concurrency"]
    lines = [f"| replicas | images/s at concurrency {c} (median of {report['rounds']} rounds) | vs {min(map(int, report['settings']))} | "
             f"p50 / p95 ms at concurrency {c} | p50 / p95 ms at concurrency 1 | SDK pick + release (µs) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['images_per_s']:.2f} | ×{r['vs_fewest']:.2f} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} | "
              f"{r['c1_p50_ms']:.0f} / {r['c1_p95_ms']:.0f} | {r['pick_us']:.1f} |" for n, r in report["settings"].items()]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts (default %(default)s)")
    parser.add_argument("--urls", help="measure running servers (comma-separated host:port) instead of starting local ones")
    parser.add_argument("--root-certificates", metavar="CA.pem", help="with --urls: speak TLS, trusting this CA")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default %(default)s)")
    parser.add_argument("--requests", type=int, default=32, help="one-image requests per setting and round (default %(default)s)")
    parser.add_argument("--latency-requests", type=int, default=8, help="requests at concurrency 1 per setting and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--views", type=int, default=1, choices=ALLOWED_VIEWS, help="T of the served ensemble (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (default)")
    parser.add_argument("--num-images", type=int, default=16, help="distinct images (default %(default)s)")
    parser.add_argument("--artifacts", type=Path, help="exported artifacts (default: random weights at the native sizes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "replicas", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    problems = [f"{name} must be >= 1, got {value}" for name, value in (
        ("--replicas", min(args.replicas)), ("--concurrency", args.concurrency), ("--requests", args.requests),
        ("--latency-requests", args.latency_requests), ("--rounds", args.rounds)) if value < 1]
    if problems:
        raise SystemExit("; ".join(problems))
    args.replicas = sorted(set(args.replicas))
    args.out.mkdir(parents=True, exist_ok=True)
    images, source = load_images(args.images, args.num_images)
    print(f"images: {source}", flush=True)
    load_before = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine change every figure: say so
    with ExitStack() as stack:
        if args.urls:
            urls = [u.strip() for u in args.urls.split(",")]
            if len(urls) < max(args.replicas):
                raise SystemExit(f"--urls names {len(urls)} servers; --replicas asks for up to {max(args.replicas)}")
        else:
            from lesionserve.export.assemble import assemble
            from lesionserve.server import TritonServer

            artifacts = args.artifacts or random_artifacts(DEFAULT_OUT / "artifacts")
            repo = assemble(artifacts, out=args.out / f"repository_t{args.views}", views=args.views)
            urls = []
            for i in range(max(args.replicas)):  # from this thread: a server dies with the thread that started it
                server = TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, startup_timeout=300,
                                      log_path=args.out / f"tritonserver_{i}.log")
                urls.append(stack.enter_context(server).grpc_url)
                print(f"replica {i + 1} ready at {server.grpc_url}", flush=True)
        report = dict(run(args, urls, images), images=source, views=args.views, machine=machine_info(),
                      servers="given by --urls" if args.urls else f"{max(args.replicas)} local tritonservers",
                      load_average_1_5_15min={"start": load_before, "end": [round(x, 2) for x in os.getloadavg()]})
    write_json(args.out / "replicas.json", report)
    table = markdown(report)
    (args.out / "replicas.md").write_text(table + "\n")
    print("\n" + table + f"\n\nload average (1, 5, 15 min) at start {load_before}, at end {report['load_average_1_5_15min']['end']}"
          f"\nwritten: {args.out / 'replicas.json'}, {args.out / 'replicas.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
