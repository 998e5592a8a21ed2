"""Servable artifacts without training: seeded random backbones, exported exactly as trained ones are.

    python -m export.random_artifacts --out runs/random64 --input-size 64
    python -m export.random_artifacts --out runs/other --pipeline NAME     # any declared pipeline

Used by the integration tests and the soak run (benchmarks/soak.py), where what the weights learned
does not matter but the shapes, the export path and the served pipeline do. Each classifier head is
rescaled so that probabilities are far from uniform: parity with the reference is then a real check.
``--input-size`` records a training size in each checkpoint (as ``training.train`` does for a
reduced-resolution run), so export and assembly serve the models at that size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lesionserve.export.onnx_export import export_onnx
from lesionserve.calibration import Calibration
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.pipelines import LESION_ENSEMBLE, PIPELINES, EnsemblePipeline, get_pipeline


def spread_head(model: torch.nn.Module, size: int, target_std: float = 2.0) -> None:
    """Rescale the classifier so logits on image-like input have std ~target_std."""
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        std = model.eval()(x).std().item()
        head = model.get_classifier()
        head.weight.mul_(target_std / max(std, 1e-6))
        head.bias.normal_(0, 0.5)


def build_random_artifacts(
    out: str | Path,
    calibration: Calibration | None = None,
    input_size: int | None = None,
    seed: int = 0,
    pipeline: EnsemblePipeline = LESION_ENSEMBLE,
) -> Path:
    """Write ``<out>/<member>/{checkpoint.pt, model.onnx}`` and ``<out>/calibration.json`` for each
    member of ``pipeline``; return ``out``.

    ``input_size``: the side every member is "trained" (and so served) at; None = the size each one
    is declared at in the pipeline. ``calibration``: default uniform weights and no thresholds.
    """
    if input_size is not None and input_size < 32:
        # Every backbone downsamples by 32: smaller inputs leave nothing for the last stage.
        raise ValueError(f"input_size must be >= 32 (the backbones downsample by 32), got {input_size}")
    out = Path(out)
    torch.manual_seed(seed)
    for member in pipeline.members:
        arch = member.arch
        size = input_size or member.preprocessing.size
        model = create_backbone(arch)
        spread_head(model, size)
        # Recorded as training does for a run at another size: export and assembly then serve it there.
        extra = {"config": {"input_size": size}} if size != arch.input_size else None
        save_checkpoint(out / member.name / "checkpoint.pt", arch, model, extra)
        export_onnx(out / member.name / "checkpoint.pt", out / member.name / "model.onnx")
    (calibration or Calibration.uniform(pipeline.member_names)).save(out / "calibration.json")
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the artifacts into")
    parser.add_argument("--input-size", type=int, help="side length every backbone is served at (default: native 224/224/300)")
    parser.add_argument("--pipeline", default=LESION_ENSEMBLE.name, choices=sorted(PIPELINES),
                        help="whose members to build (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        path = build_random_artifacts(args.out, input_size=args.input_size, seed=args.seed, pipeline=get_pipeline(args.pipeline))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"random-weight artifacts ready: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
