"""ViT checkpoint -> ONNX with every head's logits and both attention maps as outputs, checked
against PyTorch before the file appears.

    lesionserve vit-export --checkpoint runs/vit/gradual/checkpoint.pt --out runs/vit/gradual/served/model.onnx

Outputs (``ViTModel.output_names``): ``logits_<head>`` per head, ``attention_rollout`` and
``attention_cls`` (N x grid x grid). The graph runs the unfused attention (model.AttentionRecorder),
so the maps are part of it. The check feeds synthetic lesions through the served preprocessing and
requires max |ORT - PyTorch| <= 1e-4 on each head's softmax probabilities and <= 1e-3 on each map
scaled to [0, 1] as it is served (explain.scale_map). The network's declaration is written beside it (model.export.json)
and its normalisation into the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lesionserve import prog
from lesionserve.export.checks import NORMALIZATION_KEY, check_batch, ort_session
from lesionserve.vit.spec import MAP_KINDS, VIT_INPUT, logits_name, map_name

PROB_ATOL = 1e-4
MAP_ATOL = 1e-3
OPSET = 17


class ViTExportError(RuntimeError):
    """The exported graph disagrees with the checkpoint it was exported from."""


@dataclass
class ViTExportReport:
    onnx_path: str
    input_size: int
    check_batch: int
    prob_diff: dict[str, float] = field(default_factory=dict)
    map_diff: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def export_vit(checkpoint: str | Path, out: str | Path, batch: int = 3) -> ViTExportReport:
    """Export and check; the file appears at ``out`` only when the check passes."""
    import onnx
    import torch

    from lesionserve.explain import scale_map
    from lesionserve.vit.decision import softmax
    from lesionserve.vit.model import ExportModule, load_checkpoint

    start = time.perf_counter()
    model, _ = load_checkpoint(checkpoint)
    spec = model.spec
    wrapper = ExportModule(model).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    names = list(spec.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning, FutureWarning, torch.jit.TracerWarning))
        torch.onnx.export(wrapper, (torch.zeros(2, 3, spec.input_size, spec.input_size),), str(tmp), input_names=[VIT_INPUT],
                          output_names=names, opset_version=OPSET, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [VIT_INPUT, *names]})
    exported = onnx.load(str(tmp))
    onnx.helper.set_model_props(exported, {NORMALIZATION_KEY: spec.normalization.to_parameter(),
                                           NORMALIZATION_KEY + ".name": spec.normalization.name,
                                           "lesionserve.vit": json.dumps(spec.to_dict())})
    onnx.save(exported, str(tmp))
    onnx.checker.check_model(str(tmp))
    x = check_batch(spec.input_size, batch, normalization=spec.normalization)
    with torch.no_grad():
        want = dict(zip(names, (t.numpy() for t in wrapper(torch.from_numpy(x)))))
    got = dict(zip(names, ort_session(tmp).run(names, {VIT_INPUT: x})))
    report = ViTExportReport(str(out), spec.input_size, batch)
    for h in spec.heads:
        report.prob_diff[h] = float(np.abs(softmax(got[logits_name(h)]) - softmax(want[logits_name(h)])).max())
    for k in MAP_KINDS:
        report.map_diff[k] = float(max(np.abs(scale_map(g) - scale_map(w)).max() for g, w in zip(got[map_name(k)], want[map_name(k)])))
    report.seconds = round(time.perf_counter() - start, 2)
    bad = [f"{h} probabilities {d:.2e} > {PROB_ATOL:.0e}" for h, d in report.prob_diff.items() if not d <= PROB_ATOL]
    bad += [f"{k} map {d:.2e} > {MAP_ATOL:.0e}" for k, d in report.map_diff.items() if not d <= MAP_ATOL]
    if bad:
        tmp.unlink(missing_ok=True)
        raise ViTExportError("ONNX Runtime differs from PyTorch: " + "; ".join(bad))
    tmp.replace(out)
    from lesionserve.export.tensorrt import file_sha256

    out.with_suffix(".export.json").write_text(json.dumps({**asdict(report), "model": spec.to_dict(),
                                                           "checkpoint_sha256": file_sha256(checkpoint)}, indent=2) + "\n")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m lesionserve.vit.export"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by vit-train")
    parser.add_argument("--out", required=True, type=Path, help="where to write model.onnx (model.export.json beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        r = export_vit(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError, ViTExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"vit: wrote {r.onnx_path} ({r.input_size} px, {r.seconds}s); max |ORT - torch| on probabilities "
          + ", ".join(f"{h} {d:.2e}" for h, d in r.prob_diff.items()) + f" (limit {PROB_ATOL:.0e}); on maps "
          + ", ".join(f"{k} {d:.2e}" for k, d in r.map_diff.items()) + f" (limit {MAP_ATOL:.0e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
