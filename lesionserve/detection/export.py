"""YOLO weights -> ONNX with a dynamic batch axis, checked against the PyTorch model.

    lesionserve detect-export --weights runs/det/yolo/train/weights/best.pt --out runs/det/yolo/model.onnx --imgsz 640

ultralytics' own exporter writes the graph (offline: no onnxslim, nothing installed); the check then
runs a batch of 3 synthetic lesions, letterboxed as served, through ONNX Runtime and the PyTorch
DetectionModel and requires the raw head outputs (boxes and class scores, B x (4 + classes) x
anchors) to agree within ``atol``. The file appears at ``--out`` only when they do.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionserve import prog
from lesionserve.detection.explain import FEATURES_OUTPUT
from lesionserve.detection.spec import DETECTOR_OUTPUT

DEFAULT_ATOL = 1e-3
OPSET = 17


class DetectorExportError(RuntimeError):
    """The exported detector disagrees with the weights it was exported from."""


@dataclass
class DetectorExportReport:
    onnx_path: str
    imgsz: int
    check_batch: int
    max_abs_diff: float
    atol: float


def check_inputs(imgsz: int, batch: int = 3, seed: int = 0) -> np.ndarray:
    """B x 3 x imgsz x imgsz float32 in [0, 1]: synthetic lesions of other aspect ratios, letterboxed."""
    from lesionserve.detection.preprocess import letterbox
    from lesionserve.synthetic import render_lesion
    from lesionserve.spec import CLASS_NAMES

    rng = np.random.default_rng(seed)
    sizes = [(240, 180), (200, 200), (180, 240)]
    return np.stack([letterbox(render_lesion(CLASS_NAMES[i % len(CLASS_NAMES)], rng, sizes[i % 3]), imgsz)[0]
                     for i in range(batch)])


def export_detector(weights: str | Path, out: str | Path, imgsz: int = 640, atol: float = DEFAULT_ATOL,
                    batch: int = 3) -> DetectorExportReport:
    from lesionserve.detection.train import offline_environment

    weights, out = Path(weights), Path(out)
    offline_environment(weights.parent / ".ultralytics")
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    from lesionserve.detection.explain import add_features_output

    written = Path(YOLO(str(weights)).export(format="onnx", dynamic=True, simplify=False, imgsz=imgsz, opset=OPSET))
    features = add_features_output(written)  # layer 8's activations: what the served EigenCAM reads
    x = check_inputs(imgsz, batch)
    session = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    got = session.run([DETECTOR_OUTPUT], {session.get_inputs()[0].name: x})[0]
    model = YOLO(str(weights)).model.float().eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    want = (want[0] if isinstance(want, (list, tuple)) else want).numpy()
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not diff <= atol:
        written.unlink(missing_ok=True)
        raise DetectorExportError(f"{weights}: ONNX Runtime differs from PyTorch by {diff:.3e} (atol {atol:.0e}; shapes "
                                  f"{got.shape} and {want.shape}); nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    if written.resolve() != out.resolve():
        shutil.move(str(written), out)
    names = [model.names[i] for i in sorted(model.names)]
    report = DetectorExportReport(str(out), imgsz, batch, diff, atol)
    # What assembly serves it at: the letterbox side, and the class order of the head.
    export_meta(out).write_text(json.dumps({**asdict(report), "class_names": names, "features": features,
                                            "features_channels": int(session.run([FEATURES_OUTPUT], {session.get_inputs()[0].name: x[:1]})[0].shape[1])},
                                           indent=2) + "\n")
    return report


def export_meta(onnx_path: str | Path) -> Path:
    """The JSON written beside an exported detector (imgsz, class names, the check)."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".export.json")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("lesionserve detect-export"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="ultralytics .pt weights (best.pt)")
    parser.add_argument("--out", required=True, type=Path, help="ONNX file to write")
    parser.add_argument("--imgsz", type=int, default=640, help="square letterbox side (default %(default)s)")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max |ORT - PyTorch| (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.weights.is_file():
        print(f"error: weights not found: {args.weights}", file=sys.stderr)
        return 2
    try:
        report = export_detector(args.weights, args.out, args.imgsz, args.atol)
    except DetectorExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{report.onnx_path}: max |ORT - PyTorch| {report.max_abs_diff:.2e} (atol {report.atol:.0e}) on {report.check_batch} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
