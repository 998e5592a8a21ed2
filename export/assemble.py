"""Assemble the Triton model repository: copy exported weights and the calibration file into it.

    python -m export.assemble --artifacts runs/demo                      # into ./model_repository
    python -m export.assemble --artifacts runs/demo --out /tmp/repo --views 1
    python -m export.assemble --artifacts runs/demo --checkpoints        # also for the gpu_torch variant

The committed ``model_repository/`` holds configs and code exactly as served; this step adds the
generated, git-ignored files (``<backbone>/1/model.onnx``, ``fusion|threshold/1/calibration.json``,
and with ``--checkpoints`` ``<backbone>/1/checkpoint.pt``, which the gpu_torch variant serves).
With ``--out`` the committed repository is first copied there (for variants such as another view count).
TensorRT plans are not placed here: ``python -m export.tensorrt`` builds them on the serving GPU.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import onnx

from lesionserve.calibration import Calibration
from lesionserve.spec import BACKBONE_NAMES, get_backbone, check_views

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
CALIBRATED_MODELS = ("fusion", "threshold")


class AssembleError(RuntimeError):
    """Artifacts are missing or invalid; the message lists every problem found."""


def artifact_files(artifacts: Path, checkpoints: bool = False) -> dict[Path, list[str]]:
    """Source file -> destination paths (relative to the repository) for one artifacts folder."""
    files = {artifacts / b / "model.onnx": [f"{b}/1/model.onnx"] for b in BACKBONE_NAMES}
    files[artifacts / "calibration.json"] = [f"{m}/1/calibration.json" for m in CALIBRATED_MODELS]
    if checkpoints:
        files.update({artifacts / b / "checkpoint.pt": [f"{b}/1/checkpoint.pt"] for b in BACKBONE_NAMES})
    return files


def onnx_signature(path: Path) -> tuple[str, list[int | str], str]:
    """(input name, input dims, output name) of an ONNX file; symbolic dims as their names."""
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    return graph.input[0].name, dims, graph.output[0].name


def check_onnx(backbone: str, path: Path) -> list[str]:
    """Problems that would make ``path`` unservable as ``backbone``'s CPU variant (empty if none)."""
    try:
        name, dims, output = onnx_signature(path)
    except Exception as exc:  # any parse failure means the file is not a usable ONNX model
        return [f"{path}: not a readable ONNX model ({exc})"]
    size = get_backbone(backbone).input_size
    problems = []
    if (name, output) != ("pixel_values", "logits"):
        problems.append(f"{path}: tensors are {name!r} -> {output!r}, expected 'pixel_values' -> 'logits'")
    if dims[1:] != [3, size, size] or isinstance(dims[0], int):
        problems.append(
            f"{path}: input shape {dims} but the repository serves {backbone} at [batch, 3, {size}, {size}] "
            f"(a model trained at another resolution cannot be served by this repository)"
        )
    return problems


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)  # a server reading the repository never sees a half-copied file


def set_views(repository: Path, views: int) -> None:
    """Rewrite the ``views`` parameter of every tta config, CPU and GPU variants alike (use on a copy,
    not the committed repository)."""
    check_views(views)
    for path in [repository / "tta" / "config.pbtxt", *sorted((repository / "tta" / "configs").glob("*.pbtxt"))]:
        text, n = re.subn(
            r'(key: "views" value: \{ string_value: ")\d+(")', rf"\g<1>{views}\g<2>", path.read_text()
        )
        if n != 1:
            raise AssembleError(f"{path}: expected exactly one 'views' parameter, found {n}")
        path.write_text(text)


def assemble(
    artifacts: str | Path,
    repository: str | Path = DEFAULT_REPOSITORY,
    out: str | Path | None = None,
    views: int | None = None,
    checkpoints: bool = False,
) -> Path:
    """Place the artifacts into ``repository`` (or into a copy of it at ``out``); return the served path.

    ``checkpoints`` also places each backbone's checkpoint.pt (needed by the gpu_torch variant only).
    """
    artifacts, repository = Path(artifacts), Path(repository)
    files = artifact_files(artifacts, checkpoints)
    missing = [str(src) for src in files if not src.is_file()]
    if missing:
        raise AssembleError(
            "missing artifacts (train, calibrate and export first):\n  " + "\n  ".join(missing)
        )
    problems = [p for b in BACKBONE_NAMES for p in check_onnx(b, artifacts / b / "model.onnx")]
    if problems:
        raise AssembleError("artifacts do not fit the model repository:\n  " + "\n  ".join(problems))
    Calibration.load(artifacts / "calibration.json")  # refuse a malformed file before serving it
    if out is not None:
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(repository, out, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.plan", "*.plan.json", "*.pt", "*.tmp", "calibration.json"))
        repository = out
    if views is not None:
        if out is None:
            raise AssembleError("--views changes a config: use it together with --out")
        set_views(repository, views)
    for src, destinations in files.items():
        for rel in destinations:
            _atomic_copy(src, repository / rel)
    return repository


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="folder with <backbone>/model.onnx and calibration.json")
    parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="committed repository (default %(default)s)")
    parser.add_argument("--out", help="assemble into a copy at this path instead of in place")
    parser.add_argument("--views", type=int, help="TTA view count for the copy: 1, 2, 4 or 8")
    parser.add_argument("--checkpoints", action="store_true",
                        help="also place <backbone>/checkpoint.pt (the gpu_torch variant serves them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    path = assemble(args.artifacts, args.repository, args.out, args.views, args.checkpoints)
    print(f"model repository ready: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
