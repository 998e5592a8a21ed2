"""Assemble the Triton model repository: copy exported weights and the calibration file into it.

    python -m export.assemble --artifacts runs/demo                      # into ./model_repository
    python -m export.assemble --artifacts runs/demo --out /tmp/repo --views 1
    python -m export.assemble --artifacts runs/demo --checkpoints        # also for the gpu_torch variant

The committed ``model_repository/`` holds configs and code exactly as served; this step adds the
generated, git-ignored files (``<backbone>/1/model.onnx``, ``fusion|threshold/1/calibration.json``,
and with ``--checkpoints`` ``<backbone>/1/checkpoint.pt``, which the gpu_torch variant serves).
With ``--out`` the committed repository is first copied there (for variants such as another view count).

Each backbone is served at the size its ONNX file takes, which export took from the checkpoint's
training config: a model trained at 128 px is served at 128 px. Where that differs from the
committed repository (224/224/300), the copy's size-dependent configs (preprocess and tta tensors,
the ensemble's routing, backbone input dims and TensorRT profiles) are rewritten; this needs ``--out``.
TensorRT plans are not placed here: ``python -m export.tensorrt`` builds them on the serving GPU.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Mapping

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lesionserve.calibration import Calibration
from lesionserve.spec import BACKBONE_INPUT, BACKBONE_NAMES, check_views

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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


def check_onnx(backbone: str, path: Path) -> tuple[int | None, list[str]]:
    """(input side S, problems) of ``path`` as ``backbone``'s model: the repository serves
    ``pixel_values`` [batch, 3, S, S] -> ``logits`` with a dynamic batch axis, at whatever S the
    file takes (the size it was trained at). S is None when the file does not say."""
    try:
        name, dims, output = onnx_signature(path)
    except Exception as exc:  # any parse failure means the file is not a usable ONNX model
        return None, [f"{path}: not a readable ONNX model ({exc})"]
    problems = []
    if (name, output) != (BACKBONE_INPUT, "logits"):
        problems.append(f"{path}: tensors are {name!r} -> {output!r}, expected {BACKBONE_INPUT!r} -> 'logits'")
    square = len(dims) == 4 and dims[1] == 3 and isinstance(dims[2], int) and dims[2] > 0 and dims[2] == dims[3]
    if not square or isinstance(dims[0], int):
        problems.append(
            f"{path}: input shape {dims}; {backbone} must take [batch, 3, S, S] with a symbolic batch axis "
            f"and a fixed square size S (export with `python -m export.onnx_export`)"
        )
        return None, problems
    return int(dims[2]), problems


def repository_input_sizes(repository: Path) -> dict[str, int]:
    """Backbone -> the input side its CPU config serves in ``repository``."""
    sizes = {}
    for b in BACKBONE_NAMES:
        config = read_config(repository / b / "config.pbtxt")
        sizes[b] = int(config.input[0].dims[-1])
    return sizes


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


#: Ensemble tensors that exist once per backbone resolution: ``pixel_values_<S>`` (preprocess -> tta)
#: and ``views_<S>`` (tta -> backbones).
PER_SIZE_TENSOR = re.compile(r"^(pixel_values|views)_(\d+)$")
#: TensorRT profile shapes in gpu_ort configs, e.g. ``pixel_values:32x3x300x300``.
PROFILE_SHAPE = re.compile(rf"^({BACKBONE_INPUT}:\d+x3x)\d+x\d+$")


def _copy(message):
    """A detached copy (the repeated field it came from is about to be cleared)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _resize_tensors(tensors, sizes: list[int]) -> list:
    """Replace each group of per-size tensors (same prefix) by one tensor per size, in place of the first."""
    out, seen = [], set()
    for tensor in tensors:
        match = PER_SIZE_TENSOR.match(tensor.name)
        if not match:
            out.append(_copy(tensor))
            continue
        prefix = match.group(1)
        if prefix in seen:
            continue
        seen.add(prefix)
        for size in sizes:
            copy = _copy(tensor)
            copy.name = f"{prefix}_{size}"
            del copy.dims[-2:]
            copy.dims.extend([size, size])
            out.append(copy)
    return out


def _resize_map(mapping, sizes: list[int]) -> None:
    """Same for an ensemble step's input_map/output_map, whose per-size entries map a name to itself."""
    prefixes = []
    for key in list(mapping):
        match = PER_SIZE_TENSOR.match(key)
        if match:
            if mapping[key] != key:
                raise AssembleError(f"ensemble maps {key!r} to {mapping[key]!r}; per-size tensors must keep their names")
            if match.group(1) not in prefixes:
                prefixes.append(match.group(1))
            del mapping[key]
    for prefix in prefixes:
        for size in sizes:
            mapping[f"{prefix}_{size}"] = f"{prefix}_{size}"


def resized_config(config: model_config_pb2.ModelConfig, sizes: Mapping[str, int]) -> model_config_pb2.ModelConfig:
    """A copy of ``config`` that serves each backbone at ``sizes[backbone]``.

    Per-size tensors become one per distinct size (two backbones at 128 px share ``views_128``);
    a backbone's input dims and TensorRT profile shapes take its size; the ensemble routes each
    backbone to its size's views. Configs with nothing size-dependent come back equal.
    """
    distinct = sorted(set(sizes.values()))
    new = model_config_pb2.ModelConfig()
    new.CopyFrom(config)
    for field in (new.input, new.output):
        tensors = _resize_tensors(list(field), distinct)
        del field[:]
        field.extend(tensors)
    if new.name in sizes:
        size = sizes[new.name]
        for tensor in new.input:
            if tensor.name == BACKBONE_INPUT:
                del tensor.dims[-2:]
                tensor.dims.extend([size, size])
        for accelerator in new.optimization.execution_accelerators.gpu_execution_accelerator:
            for key, value in list(accelerator.parameters.items()):
                accelerator.parameters[key] = PROFILE_SHAPE.sub(rf"\g<1>{size}x{size}", value)
    for step in new.ensemble_scheduling.step:
        _resize_map(step.input_map, distinct)
        _resize_map(step.output_map, distinct)
        if step.model_name in sizes and BACKBONE_INPUT in step.input_map:
            step.input_map[BACKBONE_INPUT] = f"views_{sizes[step.model_name]}"
    return new


def set_input_sizes(repository: Path, sizes: Mapping[str, int]) -> list[Path]:
    """Rewrite every config of ``repository`` (CPU and GPU variants) whose content depends on the
    backbones' input sizes, so that each backbone is served at ``sizes[backbone]``; returns the files
    rewritten. Use on a copy: the rewritten files lose the committed files' comments."""
    unknown = sorted(set(sizes) - set(BACKBONE_NAMES))
    if unknown:
        raise AssembleError(f"unknown backbone(s) {', '.join(unknown)}; choose from {', '.join(BACKBONE_NAMES)}")
    bad = {b: s for b, s in sizes.items() if not (isinstance(s, int) and s > 0)}
    if bad:
        raise AssembleError(f"input sizes must be positive integers, got {bad}")
    written = []
    listing = ", ".join(f"{b} {s} px" for b, s in sizes.items())
    for path in sorted([*repository.glob("*/config.pbtxt"), *repository.glob("*/configs/*.pbtxt")]):
        config = read_config(path)
        new = resized_config(config, sizes)
        if new == config:
            continue
        header = (f"# Written by export.assemble for the trained input sizes ({listing}): the size-dependent\n"
                  f"# fields of the committed model_repository/{path.relative_to(repository)} rewritten; its comments are there.\n")
        path.write_text(header + text_format.MessageToString(new))
        written.append(path)
    return written


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


def served_input_sizes(artifacts: Path, checkpoints: bool = False) -> dict[str, int]:
    """Backbone -> the input side its ONNX file takes; raises AssembleError listing every problem.

    With ``checkpoints``, each checkpoint's trained size must equal its ONNX file's (the gpu_torch
    variant serves the checkpoint at that size): a stale export is refused here, not at run time.
    """
    sizes, problems = {}, []
    for b in BACKBONE_NAMES:
        size, found = check_onnx(b, artifacts / b / "model.onnx")
        problems += found
        if size is not None:
            sizes[b] = size
    if checkpoints and not problems:
        from lesionserve.models import checkpoint_input_size  # torch: only needed with checkpoints

        for b in BACKBONE_NAMES:
            try:
                trained = checkpoint_input_size(artifacts / b / "checkpoint.pt")
            except Exception as exc:  # unpickling can fail in many ways; each means an unusable file
                problems.append(f"{artifacts / b / 'checkpoint.pt'}: not a readable LesionServe checkpoint ({exc})")
                continue
            if trained != sizes[b]:
                problems.append(
                    f"{artifacts / b / 'checkpoint.pt'} was trained at {trained} px but {artifacts / b / 'model.onnx'} "
                    f"takes {sizes[b]} px: export it again (python -m export.onnx_export)"
                )
    if problems:
        raise AssembleError("artifacts do not fit the model repository:\n  " + "\n  ".join(problems))
    return sizes


def assemble(
    artifacts: str | Path,
    repository: str | Path = DEFAULT_REPOSITORY,
    out: str | Path | None = None,
    views: int | None = None,
    checkpoints: bool = False,
) -> Path:
    """Place the artifacts into ``repository`` (or into a copy of it at ``out``); return the served path.

    ``checkpoints`` also places each backbone's checkpoint.pt (needed by the gpu_torch variant only).
    Backbones are served at the sizes their ONNX files take (see served_input_sizes); sizes other
    than ``repository``'s need ``out``.
    """
    artifacts, repository = Path(artifacts), Path(repository)
    files = artifact_files(artifacts, checkpoints)
    missing = [str(src) for src in files if not src.is_file()]
    if missing:
        raise AssembleError(
            "missing artifacts (train, calibrate and export first):\n  " + "\n  ".join(missing)
        )
    sizes = served_input_sizes(artifacts, checkpoints)
    Calibration.load(artifacts / "calibration.json")  # refuse a malformed file before serving it
    current = repository_input_sizes(repository)
    if sizes != current and out is None:
        differ = ", ".join(f"{b} {sizes[b]} px (repository: {current[b]})" for b in BACKBONE_NAMES if sizes[b] != current[b])
        raise AssembleError(
            f"the models were trained at other input sizes than {repository} serves: {differ}; "
            f"assemble into a copy with --out DIR (its configs are rewritten) and serve that with --repository DIR"
        )
    if views is not None and out is None:
        raise AssembleError("--views changes a config: use it together with --out")
    if out is not None:
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(repository, out, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.plan", "*.plan.json", "*.pt", "*.tmp", "calibration.json"))
        repository = out
    if views is not None:
        set_views(repository, views)
    if sizes != current:
        set_input_sizes(repository, sizes)
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
