"""``lesionserve`` command line: one entry point, a subcommand per job (each has its own --help).

    lesionserve demo                             # the main job, end to end
    lesionserve train --backbone resnet50 --data DIR --out runs/r50
    lesionserve evaluate --artifacts runs/demo --data DIR
    lesionserve repository --check               # committed model_repository/ == its declarations?
    lesionserve serve --artifacts runs/demo      # assemble runs/demo into model_repository, then serve
    lesionserve serve --grpc-port 9001           # serve model_repository as it is
    lesionserve bench [harness|perf_analyzer|scaling|tuning|run_batch|soak] ...
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from lesionserve_client.credentials import API_KEY_ENV, API_KEY_HEADER, resolve_api_key

from lesionserve.server import LOOPBACK, PROJECT_ROOT, ServerStartError, TritonServer
from lesionserve.spec import GPU_VARIANTS, get_variant

#: Backends of the tritonserver in the nvidia-pytriton wheel (see server.backend_dir).
BUNDLED_BACKENDS = ("python",)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=PROJECT_ROOT / "model_repository", help="model repository (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind gRPC and HTTP; beyond loopback (e.g. 0.0.0.0) needs --grpc-ssl-cert/--grpc-ssl-key "
                             "and an API key (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port, 0 = any free port (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port, 0 = any free port (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default %(default)s)")
    parser.add_argument("--metrics-host", default=LOOPBACK,
                        help="address to bind metrics (plain HTTP, no credential; default %(default)s)")
    parser.add_argument("--model-config-name", metavar="NAME",
                        help="serve a GPU variant: configs/<NAME>.pbtxt where a model has one "
                             f"({', '.join(GPU_VARIANTS)}); this bundled Triton runs gpu_torch (python backend only)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness (default %(default)s)")
    parser.add_argument("--grpc-ssl-cert", type=Path, metavar="PEM",
                        help="serve gRPC over TLS only, with this server certificate (needs --grpc-ssl-key); "
                             "clients then pass --ssl --root-certificates CA.pem")
    parser.add_argument("--grpc-ssl-key", type=Path, metavar="PEM", help="the certificate's private key (never printed or logged)")
    parser.add_argument("--api-key-file", type=Path, metavar="FILE",
                        help=f"require this file's API key for inference, metadata, configs and statistics (header "
                             f"{API_KEY_HEADER}; default: ${API_KEY_ENV} if set, else none); HTTP then answers health only")
    parser.add_argument("--admin-apis", action="store_true",
                        help="open Triton's shared-memory, model-repository, trace and logging APIs, closed by default "
                             "(a request could otherwise map the server's shared memory); no LesionServe client needs them")


def server_from_args(args: argparse.Namespace) -> TritonServer:
    return TritonServer(
        repository=args.repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_config_name=args.model_config_name,
        startup_timeout=args.startup_timeout,
        ssl_cert=args.grpc_ssl_cert,
        ssl_key=args.grpc_ssl_key,
        admin_apis=args.admin_apis,
        api_key=resolve_api_key(api_key_file=args.api_key_file),
        metrics_host=args.metrics_host,
    )


def variant_problem(name: str | None) -> str | None:
    """Why the bundled tritonserver cannot serve variant ``name`` (None: it can)."""
    if name is None:
        return None
    try:
        variant = get_variant(name)
    except ValueError as exc:
        return str(exc)
    missing = [b for b in variant.triton_backends if b not in BUNDLED_BACKENDS]
    if missing:
        return (
            f"variant {name} needs Triton's {' and '.join(missing)} backend, which the tritonserver bundled in "
            f"nvidia-pytriton lacks: serve it with docker compose (README, 'Deploying on a GPU host')"
        )
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    problem = variant_problem(args.model_config_name)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if (args.grpc_ssl_cert is None) != (args.grpc_ssl_key is None):
        print("error: --grpc-ssl-cert and --grpc-ssl-key go together (TLS needs both), or neither for plain gRPC", file=sys.stderr)
        return 2
    try:
        server = server_from_args(args)
    except (OSError, ValueError) as exc:  # exposure without TLS or key; an unusable key file (named, never its content)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.artifacts:
        from lesionserve.export.assemble import AssembleError, assemble

        checkpoints = bool(args.model_config_name) and get_variant(args.model_config_name).needs_checkpoints
        try:
            assemble(args.artifacts, args.repository, checkpoints=checkpoints)
        except AssembleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"assembled {args.artifacts} into {args.repository}")
    # Ctrl-C and SIGTERM (kill, container stop) both stop the server cleanly, even where the shell
    # started us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.start()
        grpc = f"gRPC {server.grpc_url}" + (" (TLS)" if server.tls else "") + (" (API key required)" if server.api_key else "")
        http = f"HTTP {server.http_url}" + (" (health only)" if server.http_health_only else "")
        print(f"tritonserver ready: {grpc}, {http}, log {server.log_path}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        while server.process.poll() is None:
            dead = server.dead_stubs()
            if dead:
                # Triton would stay "ready" and fail every request to that model: exit loudly instead,
                # so that whatever supervises this command restarts a whole server.
                names = ", ".join(f"{stub.name} (pid {stub.pid})" for stub in dead)
                print(f"error: python backend stub {names} died; Triton does not restart stubs and would fail "
                      f"every request to it ('Stub process ... is not healthy'): stopping tritonserver", file=sys.stderr)
                server.stop()
                return 1
            time.sleep(0.5)
        print(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr)
        server.stop()  # its stubs and shared memory
        return server.process.returncode or 1
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping tritonserver ...")
        code = server.stop()
        print(f"stopped (exit code {code})")
        return 0


#: Subcommands that run a module's own ``main(argv)``: name -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lesionserve.demo", "the main job: synthetic data -> training -> ONNX -> Triton -> SDK -> parity"),
    "synthetic": ("lesionserve.synthetic", "write a synthetic ISIC-layout dataset (lesions that know their masks)"),
    "splits": ("lesionserve.training.splits", "write lesion-grouped train/val/test splits once"),
    "train": ("lesionserve.training.train", "train one architecture (recipe + overrides, resumable)"),
    "multiseed": ("lesionserve.training.multiseed", "train every member over several seeds and summarise"),
    "calibrate": ("lesionserve.training.calibrate", "fusion weights and MEL/AKIEC thresholds on validation"),
    "evaluate": ("lesionserve.training.evaluate", "score artifacts on a split or on any labelled dataset folder"),
    "explain": ("lesionserve.heatmaps", "Grad-CAM and Grad-CAM++ overlays and a grid, for the ensemble or one checkpoint"),
    "segment-train": ("lesionserve.segmentation.train", "train the lesion segmenter (U-Net, ResNet34 encoder; seed 004's recipe)"),
    "segment-evaluate": ("lesionserve.segmentation.evaluate", "score segmenter checkpoints: Jaccard, Task 1 thresholded Jaccard, Dice"),
    "crop-boxes": ("lesionserve.segmentation.boxes", "lesion boxes per image (segmenter or expert masks) for crop-guided training"),
    "detect-boxes": ("lesionserve.detection.box_report", "seed 000's saliency boxes against the expert masks' boxes, per class"),
    "detect-dataset": ("lesionserve.detection.dataset", "write a lesion-grouped split in the ultralytics detection layout"),
    "detect-train": ("lesionserve.detection.train", "train the YOLO11 detector offline (ultralytics; seed 000's recipe)"),
    "detect-export": ("lesionserve.detection.export", "export YOLO weights to ONNX (dynamic batch), checked against PyTorch"),
    "detect-evaluate": ("lesionserve.detection.evaluate", "mAP, precision, recall, AP per class against mask and saliency boxes"),
    "detect-maps": ("lesionserve.detection.map_report", "detector heatmaps (Grad-CAM++, EigenCAM) against lesion masks"),
    "vit-train": ("lesionserve.vit.train", "train the multi-head ViT melanoma classifier with gradual unfreezing (seed 001's recipe)"),
    "vit-evaluate": ("lesionserve.vit.evaluate", "ViT heads: sensitivity, specificity, BACC, AUC (bootstrap), threshold for a target sensitivity"),
    "vit-export": ("lesionserve.vit.export", "export the ViT (logits per head + attention maps) to ONNX, checked against PyTorch"),
    "evaluate-maps": ("lesionserve.training.map_eval", "score heatmaps against lesion masks (mass inside, pointing game, baselines)"),
    "export": ("lesionserve.export.onnx_export", "export a checkpoint to ONNX, checked against PyTorch"),
    "export-segmenter": ("lesionserve.export.segmenter_export", "export a segmenter checkpoint to ONNX, checked against PyTorch"),
    "random-artifacts": ("lesionserve.export.random_artifacts", "servable random-weight artifacts for any pipeline"),
    "repository": ("lesionserve.repository", "generate (or --check) the model repository from the pipeline declarations"),
    "assemble": ("lesionserve.export.assemble", "place exported weights and calibration into a repository"),
    "tensorrt": ("lesionserve.export.tensorrt", "build TensorRT FP16 engines on the serving GPU"),
}
#: ``lesionserve bench NAME ...`` runs lesionserve.benchmarks.NAME; plain ``bench`` runs them all.
BENCHMARKS = ("run_all", "harness", "perf_analyzer", "scaling", "tuning", "run_batch", "soak", "explain_overhead", "segment", "crop", "detect",
              "melanoma")


def run_module(module: str, argv: list[str], prog: str) -> int:
    """Run ``module.main(argv)`` with its usage lines naming ``prog`` (argparse reads sys.argv[0])."""
    import importlib

    saved = sys.argv[0]
    sys.argv[0] = prog
    try:
        return int(importlib.import_module(module).main(argv) or 0)
    finally:
        sys.argv[0] = saved


def cmd_bench(argv: list[str]) -> int:
    name = argv[0] if argv and argv[0] in BENCHMARKS else "run_all"
    rest = argv[1:] if argv and argv[0] in BENCHMARKS else argv
    return run_module(f"lesionserve.benchmarks.{name}", rest, f"lesionserve bench {name}".replace(" run_all", ""))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # dispatched in main() before parsing
    sub.add_parser("bench", help=f"benchmarks: all of them, or one of {', '.join(BENCHMARKS[1:])}", add_help=False)
    serve = sub.add_parser("serve", help="assemble (optional) and run tritonserver until Ctrl-C")
    serve.add_argument("--artifacts", type=Path, help="copy <artifacts>/<backbone>/model.onnx and calibration.json in first")
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_module(COMMANDS[argv[0]][0], argv[1:], f"lesionserve {argv[0]}")
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = get_args_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
