"""Command-line interface: ``python -m lesionserve_client classify IMG [IMG ...]``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence, TextIO

from .client import (CROP_MODEL, DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, DETECT_MODEL, DEFAULT_MODEL, DEFAULT_RETRIES, DEFAULT_URL, EXPLAIN_METHODS, MELANOMA_MODEL, SEGMENT_MODEL, LesionClient,
                     validate_urls)
from .credentials import API_KEY_ENV
from .encoding import encode_png
from .errors import LesionServeError, ServerUnavailableError
from .results import LesionResult

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_UNAVAILABLE = 3

_CLASSIFY_DESCRIPTION = """\
Classify skin-lesion images with the LesionServe ensemble on a Triton server (gRPC).

Each IMG is a path to an encoded image file (JPEG, PNG, or any format the server can
decode); the file's bytes are sent unchanged and decoded on the server.

Output: one table row per image (label, its confidence, the top-3 classes with their
probabilities, and the classes whose decision threshold fired), or a JSON list with --json.

Exit status: 0 on success, 2 on an error (bad input, undecodable image, server error,
timeout, unusable CA or API key file, API key refused), 3 when the server cannot be reached
(after the retries).
"""

_CLASSIFY_EPILOG = """\
examples:
  python -m lesionserve_client classify lesion.jpg
  python -m lesionserve_client classify *.png --url triton.example.org:8001 --json
  python -m lesionserve_client classify lesion.jpg --url triton.example.org:8001 --ssl --root-certificates ca.pem
"""


def _url(value: str) -> tuple[str, ...]:
    """argparse type: one host:port or several, comma-separated; scheme-prefixed urls are rejected."""
    try:
        return validate_urls(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(value: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return seconds


def _count(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return count


def _connection_args(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--url",
        type=_url,
        default=DEFAULT_URL,
        help=f"Triton gRPC endpoint as host:port, no scheme, or several replicas comma-separated (default: {DEFAULT_URL})",
    )
    command.add_argument(
        "--timeout", type=_seconds, default=60.0, metavar="S",
        help="per-request timeout in seconds, retries included (default: 60)",
    )
    command.add_argument(
        "--retries", type=_count, default=DEFAULT_RETRIES, metavar="N",
        help=f"retries, with exponential backoff, while the server is unavailable (default: {DEFAULT_RETRIES})",
    )
    command.add_argument("--ssl", action="store_true", help="connect over TLS (the server runs with --grpc-ssl-cert)")
    command.add_argument(
        "--root-certificates", metavar="CA.pem",
        help="PEM file of the CA that signed the server's certificate (with --ssl; default: the system's CAs)",
    )
    command.add_argument(
        "--api-key-file", metavar="FILE",
        help=f"file holding the API key a server started with one requires (default: ${API_KEY_ENV}, if set)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its ``classify`` and ``segment`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m lesionserve_client",
        description="Client for LesionServe, the Triton skin-lesion classification ensemble.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    classify = commands.add_parser(
        "classify",
        help="classify one or more image files",
        description=_CLASSIFY_DESCRIPTION,
        epilog=_CLASSIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classify.add_argument("images", nargs="+", metavar="IMG", help="image file(s) to classify")
    _connection_args(classify)
    classify.add_argument("--model", default=DEFAULT_MODEL, help=f"ensemble model name (default: {DEFAULT_MODEL})")
    classify.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    classify.add_argument("--explain", metavar="OUTDIR",
                          help="also write one overlay PNG per image (the image under its heatmap) into OUTDIR; needs Pillow")
    classify.add_argument("--explain-class", metavar="NAME", help="with --explain: the class to explain (default: each predicted label)")
    classify.add_argument("--explain-method", default="gradcam", choices=EXPLAIN_METHODS,
                          help="with --explain: the map (default: %(default)s)")
    classify.add_argument("--crop", action="store_true",
                          help="crop-guided: segment, classify the lesion's crop (the lesion_crop pipeline); the table "
                               "gains the rectangle classified")
    classify.add_argument("--crop-model", default=CROP_MODEL, help=f"with --crop: the crop pipeline (default: {CROP_MODEL})")
    classify.add_argument("--crop-overlay", metavar="OUTDIR",
                          help="with --crop: write one PNG per image (the rectangle classified and the label) into OUTDIR")
    segment = commands.add_parser(
        "segment", help="segment the lesion of one or more image files",
        description="Segment each image's lesion (the lesion_segment ensemble): prints its box (x0, y0, x1, y1 in "
                    "the image's pixels, x1/y1 exclusive) and area fraction, or that none was found.",
    )
    segment.add_argument("images", nargs="+", metavar="IMG", help="image file(s) to segment")
    _connection_args(segment)
    segment.add_argument("--model", default=SEGMENT_MODEL, help=f"segmentation ensemble (default: {SEGMENT_MODEL})")
    segment.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    segment.add_argument("--overlay", metavar="OUTDIR",
                         help="also write one PNG per image (mask outline and box on the image) into OUTDIR; needs Pillow")
    detect = commands.add_parser(
        "detect", help="detect lesions in one or more image files",
        description="Detect lesions (the lesion_detect pipeline: YOLO11 with NMS on the server): prints each box "
                    "(x0, y0, x1, y1 in the image's pixels), its class and score.",
    )
    detect.add_argument("images", nargs="+", metavar="IMG", help="image file(s)")
    _connection_args(detect)
    detect.add_argument("--model", default=DETECT_MODEL, help=f"detection ensemble (default: {DETECT_MODEL})")
    detect.add_argument("--conf", type=float, default=DEFAULT_CONF, help="score threshold in [0, 1] (default: %(default)s)")
    detect.add_argument("--iou", type=float, default=DEFAULT_IOU, help="NMS overlap in [0, 1] (default: %(default)s)")
    detect.add_argument("--max-det", type=int, default=DEFAULT_MAX_DET, help="boxes per image at most (default: %(default)s)")
    detect.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    detect.add_argument("--overlay", metavar="OUTDIR", help="also write one PNG per image with its boxes drawn into OUTDIR; needs Pillow")
    melanoma = commands.add_parser(
        "melanoma", help="melanoma or not, by the ViT classifier's head of your choice",
        description="Classify each image with the ViT melanoma pipeline (melanoma_vit): one head per dataset it was "
                    "trained on (e.g. ham10000: melanoma vs rest; ph2: common nevus / atypical nevus / melanoma). Prints each "
                    "head's probabilities and its decision at the head's calibrated threshold; --overlay writes the "
                    "attention map over each image.")
    melanoma.add_argument("images", nargs="+", metavar="IMG", help="image file(s)")
    _connection_args(melanoma)
    melanoma.add_argument("--model", default=MELANOMA_MODEL, help=f"melanoma ensemble (default: {MELANOMA_MODEL})")
    melanoma.add_argument("--head", help="only this head (default: every head the server has; an unknown name lists them)")
    melanoma.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    melanoma.add_argument("--overlay", metavar="OUTDIR",
                          help="also write one PNG per image with its attention map (rollout) blended in; needs Pillow")
    return parser


def format_table(images: Sequence[str], results: Sequence[LesionResult]) -> str:
    """An aligned text table, one row per image (with a CROP column for crop-guided results)."""
    crop = any(r.crop_box is not None for r in results)
    header = ("IMAGE", "LABEL", "CONFIDENCE", "TOP-3", "THRESHOLDS FIRED") + (("CROP",) if crop else ())
    rows = [header]
    for image, result in zip(images, results):
        top3 = ", ".join(f"{name} {prob:.3f}" for name, prob in result.top(3))
        fired = ",".join(result.thresholds_fired) or "-"
        where = ((",".join(map(str, result.crop_box)) if result.cropped else "whole image (no lesion found)",) if crop else ())
        rows.append((image, result.label, f"{result.confidence:.3f}", top3, fired) + where)
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def write_pngs(images: Sequence[str], pictures: Sequence[Any], suffixes: Sequence[str], outdir: str) -> list[str]:
    """``<stem>_<suffix>.png`` in ``outdir`` per image: each picture (HxWx3 uint8) made lazily by a callable."""
    os.makedirs(outdir, exist_ok=True)
    written = []
    for image, draw, suffix in zip(images, pictures, suffixes):
        path = os.path.join(outdir, f"{os.path.splitext(os.path.basename(image))[0]}_{suffix}.png")
        with open(path, "wb") as f:
            f.write(encode_png(draw()))
        written.append(path)
    return written


def write_overlays(images: Sequence[str], results: Sequence[LesionResult], outdir: str) -> list[str]:
    """One ``<stem>_<method>.png`` per image in ``outdir``: the image under its heatmap."""
    return write_pngs(images, [lambda r=r, i=i: r.overlay(i) for r, i in zip(results, images)],
                      [r.explain_method for r in results], outdir)


def _classify(args: argparse.Namespace, client: LesionClient, out: TextIO) -> None:
    with client:
        if args.explain:
            results = client.classify(args.images, explain=True, explain_class=args.explain_class,
                                      explain_method=args.explain_method)
        else:
            results = client.classify(args.images, crop=args.crop, crop_model=args.crop_model)
    if args.json:
        payload = [{"image": image, **result.to_dict()} for image, result in zip(args.images, results)]
        json.dump(payload, out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(args.images, results) + "\n")
    if args.explain:
        written = write_overlays(args.images, results, args.explain)
        print(f"{len(written)} overlay(s) in {args.explain}", file=sys.stderr)
    if args.crop_overlay:
        written = write_pngs(args.images, [lambda r=r, i=i: r.crop_overlay(i) for r, i in zip(results, args.images)],
                             ["crop"] * len(results), args.crop_overlay)
        print(f"{len(written)} overlay(s) in {args.crop_overlay}", file=sys.stderr)


def _segment(args: argparse.Namespace, client: LesionClient, out: TextIO) -> None:
    with client:
        results = client.segment(args.images, model_name=args.model)
    if args.json:
        json.dump([{"image": image, **r.to_dict()} for image, r in zip(args.images, results)], out, indent=2)
        out.write("\n")
    else:
        rows = [("IMAGE", "FOUND", "BOX", "AREA")] + [
            (image, "yes" if r.found else "no", ",".join(map(str, r.box)) if r.box else "-", f"{r.area_fraction:.3f}")
            for image, r in zip(args.images, results)]
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        out.write("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows) + "\n")
    if args.overlay:
        written = write_pngs(args.images, [lambda r=r, i=i: r.overlay(i) for r, i in zip(results, args.images)],
                             ["lesion"] * len(results), args.overlay)
        print(f"{len(written)} overlay(s) in {args.overlay}", file=sys.stderr)


def _detect(args: argparse.Namespace, client: LesionClient, out: TextIO) -> None:
    with client:
        results = client.detect(args.images, conf=args.conf, iou=args.iou, max_det=args.max_det, model_name=args.model)
    if args.json:
        json.dump([{"image": image, **r.to_dict()} for image, r in zip(args.images, results)], out, indent=2)
        out.write("\n")
    else:
        rows = [("IMAGE", "CLASS", "SCORE", "BOX")]
        for image, r in zip(args.images, results):
            rows += [(image, d.class_name, f"{d.score:.3f}", ",".join(f"{v:.1f}" for v in d.box)) for d in r.detections]
            if not r.detections:
                rows.append((image, "-", "-", f"no lesion above conf {args.conf}"))
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        out.write("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows) + "\n")
    if args.overlay:
        written = write_pngs(args.images, [lambda r=r, i=i: r.overlay(i) for r, i in zip(results, args.images)],
                             ["boxes"] * len(results), args.overlay)
        print(f"{len(written)} overlay(s) in {args.overlay}", file=sys.stderr)


def format_melanoma(images: Sequence[str], results: Sequence[Any]) -> str:
    """One row per image and head: the decision, P(melanoma) against the threshold, every probability."""
    rows = [("IMAGE", "HEAD", "DECISION", "P(MELANOMA)", "THRESHOLD", "PROBABILITIES")]
    for image, r in zip(images, results):
        for p in r.heads.values():
            rows.append((image, p.head, p.label + (" (melanoma)" if p.melanoma else ""), f"{p.p_melanoma:.3f}", f"{p.threshold:.3f}",
                         ", ".join(f"{c} {v:.3f}" for c, v in zip(p.class_names, p.probs))))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _melanoma(args: argparse.Namespace, client: LesionClient, out: TextIO) -> None:
    with client:
        results = client.melanoma(args.images, head=args.head, model_name=args.model)
    if args.json:
        json.dump([{"image": image, **r.to_dict()} for image, r in zip(args.images, results)], out, indent=2)
        out.write("\n")
    else:
        out.write(format_melanoma(args.images, results) + "\n")
    if args.overlay:
        written = write_pngs(args.images, [lambda r=r, i=i: r.overlay(i) for r, i in zip(results, args.images)],
                             ["attention"] * len(results), args.overlay)
        print(f"{len(written)} overlay(s) in {args.overlay}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root_certificates is not None and not args.ssl:
        parser.error("--root-certificates is only used over TLS: add --ssl")
    if args.command == "classify" and args.explain_class is not None and not args.explain:
        parser.error("--explain-class goes with --explain OUTDIR")
    if args.command == "classify" and args.crop and args.explain:
        parser.error("--crop and --explain cannot be combined: the crop pipeline serves no heatmaps")
    if args.command == "classify" and args.crop_overlay and not args.crop:
        parser.error("--crop-overlay goes with --crop")
    try:
        client = LesionClient(
            args.url, model_name=args.model, timeout=args.timeout, retries=args.retries,
            ssl=args.ssl, root_certificates=args.root_certificates, api_key_file=args.api_key_file,
        )
    except (OSError, ValueError) as exc:  # an unusable CA or key file: the message names it, never its content
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        {"classify": _classify, "segment": _segment, "detect": _detect, "melanoma": _melanoma}[args.command](args, client, sys.stdout)
    except ValueError as exc:  # NMS parameters out of range, an unknown head: checked before anything is sent
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except LesionServeError as exc:
        # Collapse whitespace: server messages can span several lines, the report must not.
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(exc, ServerUnavailableError) else EXIT_ERROR
    return EXIT_OK
