"""Stage 1 of export: PyTorch checkpoint -> ONNX, checked against PyTorch on the same batch.

    python -m export.onnx_export --checkpoint runs/demo/resnet50/checkpoint.pt --out runs/demo/resnet50/model.onnx
    python -m export.onnx_export ... --no-explain   # logits only (the explain ensemble then cannot load)

The graph's second output ``cams`` (N x 2 x C x h x w: lesionserve.explain's closed forms of Grad-CAM
and Grad-CAM++ at the pooling's input) is checked against PyTorch as well; ``logits`` stay the first
output, and a request for logits alone does not compute the maps.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from lesionserve.explain import CAMS_OUTPUT, explained
from lesionserve.export.checks import NORMALIZATION_KEY, check_batch, ort_session
from lesionserve.models import load_checkpoint, trained_input_size
from lesionserve.spec import BACKBONE_INPUT, BACKBONE_OUTPUT

INPUT_NAME = BACKBONE_INPUT
OUTPUT_NAME = BACKBONE_OUTPUT
#: Largest |ORT - PyTorch| allowed on logits (FP32 on CPU typically agrees to ~1e-5).
DEFAULT_ATOL = 1e-3
#: Largest |ORT - PyTorch| on the maps, relative to the largest map value (their scale follows the features').
CAMS_RTOL = 1e-4
OPSET = 17


class ExportCheckError(RuntimeError):
    """The exported model disagrees with the model it was exported from."""


@dataclass
class OnnxExportReport:
    backbone: str
    onnx_path: str
    input_size: int
    opset: int
    check_batch: int
    max_abs_diff: float
    atol: float
    argmax_agreement: float
    seconds: float
    cams_max_rel_diff: float | None = None  # with explain: the maps' check, relative to their largest value


def export_onnx(checkpoint: str | Path, out: str | Path, atol: float = DEFAULT_ATOL, batch: int = 3,
                explain: bool | None = None) -> OnnxExportReport:
    """Export ``checkpoint`` to ``out`` with a dynamic batch axis; fail if ORT and PyTorch disagree.

    ``explain``: the graph also outputs ``cams`` (lesionserve.explain), checked the same way;
    None: where the architecture is explainable (pooling + linear head).
    """
    start = time.perf_counter()
    arch, model, payload = load_checkpoint(checkpoint)
    # The resolution the model was trained at (reduced-resolution CPU runs differ from the declaration);
    # assembly serves the model at the size of this file's input.
    size = trained_input_size(payload, arch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    example = torch.zeros(2, 3, size, size)
    explain = arch.explainable if explain is None else explain
    graph = explained(model).eval() if explain else model
    outputs = [OUTPUT_NAME, CAMS_OUTPUT] if explain else [OUTPUT_NAME]
    # The TorchScript exporter: deterministic, fast on these CNNs, names tensors as asked. Its
    # deprecation notice is silenced here; the ORT comparison below is what vouches for the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning, FutureWarning))
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=OPSET,
            dynamo=False,
        )
    # The training statistics travel with the file: assembly refuses a pipeline that would normalise
    # otherwise, and the TensorRT check feeds the engine inputs normalised the same way.
    exported = onnx.load(str(tmp))
    onnx.helper.set_model_props(exported, {NORMALIZATION_KEY: arch.normalization.to_parameter(),
                                           NORMALIZATION_KEY + ".name": arch.normalization.name})
    onnx.save(exported, str(tmp))
    onnx.checker.check_model(str(tmp))

    x = check_batch(size, batch, normalization=arch.normalization)  # a batch size unlike the export example: proves the dynamic axis
    with torch.no_grad():
        result = graph(torch.from_numpy(x))
    expected_all = [t.numpy() for t in (result if explain else (result,))]
    got_all = ort_session(tmp).run(outputs, {INPUT_NAME: x})
    expected, got = expected_all[0], got_all[0]
    max_diff = float(np.abs(got - expected).max())
    cams_diff = None
    if explain:
        want, have = expected_all[1], got_all[1]
        cams_diff = float(np.abs(have - want).max() / max(float(np.abs(want).max()), 1e-12))
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    report = OnnxExportReport(
        backbone=arch.name,
        onnx_path=str(out),
        input_size=size,
        opset=OPSET,
        check_batch=batch,
        max_abs_diff=max_diff,
        atol=atol,
        argmax_agreement=agreement,
        seconds=round(time.perf_counter() - start, 2),
        cams_max_rel_diff=cams_diff,
    )
    if not max_diff <= atol:
        tmp.unlink(missing_ok=True)
        raise ExportCheckError(
            f"{arch.name}: ONNX Runtime differs from PyTorch by {max_diff:.3e} (> atol {atol:.1e}) on a batch of {batch}"
        )
    if cams_diff is not None and not cams_diff <= CAMS_RTOL:
        tmp.unlink(missing_ok=True)
        raise ExportCheckError(
            f"{arch.name}: ONNX Runtime's {CAMS_OUTPUT} differ from PyTorch's by {cams_diff:.3e} of their largest "
            f"value (> {CAMS_RTOL:.0e}) on a batch of {batch}"
        )
    tmp.replace(out)
    out.with_suffix(".export.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by training.train")
    parser.add_argument("--out", required=True, help="where to write model.onnx")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max allowed |ORT - PyTorch| on logits (default %(default)s)")
    parser.add_argument("--no-explain", dest="explain", action="store_false", default=None,
                        help=f"omit the `{CAMS_OUTPUT}` output (Grad-CAM and Grad-CAM++ per class) the explain ensemble serves")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    r = export_onnx(args.checkpoint, args.out, atol=args.atol, explain=args.explain)
    print(f"{r.backbone}: wrote {r.onnx_path} (opset {r.opset}, {r.seconds}s); "
          f"max |ORT - torch| = {r.max_abs_diff:.2e} <= {r.atol:.0e}, argmax agreement {r.argmax_agreement:.0%}"
          + (f"; {CAMS_OUTPUT}: {r.cams_max_rel_diff:.1e} of their largest value" if r.cams_max_rel_diff is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
