"""Segmenter checkpoint -> ONNX, checked against PyTorch on synthetic lesions.

    lesionserve export-segmenter --checkpoint runs/seg/segmenter/checkpoint.pt --out runs/seg/segmenter/model.onnx

The graph maps N x 3 x S x S preprocessed images (S: the size the checkpoint was trained at) to
N x 1 x S x S lesion logits; the batch axis is dynamic. The check runs a batch of a size unlike the
export example through both and requires max |ORT - PyTorch| on the logits <= atol and the masks
(probability > the declared threshold) to agree on at least ``MIN_MASK_AGREEMENT`` of the pixels.
The training statistics are written into the file's metadata, as for the classifiers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lesionserve import prog
from lesionserve.export.checks import NORMALIZATION_KEY, check_batch, ort_session
from lesionserve.segmentation.spec import SEGMENTER_INPUT, SEGMENTER_OUTPUT

DEFAULT_ATOL = 1e-3
#: Share of pixels whose thresholded mask must agree between ORT and PyTorch.
MIN_MASK_AGREEMENT = 0.999
OPSET = 17


class SegmenterExportError(RuntimeError):
    """The exported segmenter disagrees with the checkpoint it was exported from."""


@dataclass
class SegmenterExportReport:
    onnx_path: str
    input_size: int
    check_batch: int
    max_abs_diff: float
    atol: float
    mask_agreement: float
    seconds: float


def export_segmenter(checkpoint: str | Path, out: str | Path, atol: float = DEFAULT_ATOL, batch: int = 3) -> SegmenterExportReport:
    """Export and check; the file appears at ``out`` only when both checks pass."""
    import onnx
    import torch

    from lesionserve.segmentation.model import load_segmenter

    start = time.perf_counter()
    spec, model, size, _ = load_segmenter(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning, FutureWarning))
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(tmp), input_names=[SEGMENTER_INPUT],
                          output_names=[SEGMENTER_OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={SEGMENTER_INPUT: {0: "batch"}, SEGMENTER_OUTPUT: {0: "batch"}})
    exported = onnx.load(str(tmp))
    onnx.helper.set_model_props(exported, {NORMALIZATION_KEY: spec.normalization.to_parameter(),
                                           NORMALIZATION_KEY + ".name": spec.normalization.name})
    onnx.save(exported, str(tmp))
    onnx.checker.check_model(str(tmp))
    x = check_batch(size, batch, normalization=spec.normalization)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = ort_session(tmp).run([SEGMENTER_OUTPUT], {SEGMENTER_INPUT: x})[0]
    diff = float(np.abs(got - want).max())
    logit = float(np.log(spec.threshold / (1 - spec.threshold)))  # probability > threshold <=> logit > this
    agreement = float(((got > logit) == (want > logit)).mean())
    report = SegmenterExportReport(str(out), size, batch, diff, atol, agreement, round(time.perf_counter() - start, 2))
    if not (diff <= atol and agreement >= MIN_MASK_AGREEMENT):
        tmp.unlink(missing_ok=True)
        raise SegmenterExportError(f"segmenter: ONNX Runtime differs from PyTorch by {diff:.3e} on the logits (atol {atol:.0e}) "
                                   f"and its masks agree on {agreement:.4%} of the pixels (need {MIN_MASK_AGREEMENT:.1%})")
    tmp.replace(out)
    out.with_suffix(".export.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m export.segmenter_export"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by segment-train")
    parser.add_argument("--out", required=True, type=Path, help="where to write model.onnx")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max |ORT - PyTorch| on the logits (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        r = export_segmenter(args.checkpoint, args.out, atol=args.atol)
    except (ValueError, FileNotFoundError, SegmenterExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"segmenter: wrote {r.onnx_path} ({r.input_size} px, {r.seconds}s); max |ORT - torch| on logits "
          f"{r.max_abs_diff:.2e} <= {r.atol:.0e}; masks agree on {r.mask_agreement:.4%} of the pixels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
