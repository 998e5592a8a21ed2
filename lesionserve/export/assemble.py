"""Assemble a served model repository: the pipelines' generated configs plus exported weights and calibration.

    python -m export.assemble --artifacts runs/demo                      # into ./model_repository
    python -m export.assemble --artifacts runs/demo --out /tmp/repo --views 1
    python -m export.assemble --artifacts runs/demo --checkpoints        # also for the gpu_torch variant

The committed ``model_repository/`` holds the configs and code generated from the pipeline
declarations (``lesionserve repository``); this step adds the git-ignored files
(``<member>/1/model.onnx``, ``<fusion|threshold>/1/calibration.json``, and with ``--checkpoints``
``<member>/1/checkpoint.pt``, which the gpu_torch variant serves).

Each member is served at the size its ONNX file takes, which export took from the checkpoint's
training config: a model trained at 128 px is served at 128 px. When that, or ``--views``, makes
the served pipeline differ from its committed declaration, the repository is generated anew from
the changed declaration into ``--out`` (the committed folder is never rewritten by assembly).
TensorRT plans are not placed here: ``python -m export.tensorrt`` builds them on the serving GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import onnx

from lesionserve.architectures import Normalization
from lesionserve.calibration import Calibration, CalibrationError
from lesionserve.explain import CAMS_OUTPUT
from lesionserve.export.checks import NORMALIZATION_KEY
from lesionserve.pipelines import GENERATED_PIPELINES, LESION_CROP_CLASSIFIER, LESION_ENSEMBLE, PIPELINES, EnsemblePipeline, Member, get_pipeline
from lesionserve.repository import DEFAULT_REPOSITORY, SEGMENTER_TORCHSCRIPT, check_repository, write_repository
from lesionserve.detection.spec import LESION_DETECT, DetectionPipeline
from lesionserve.vit.spec import MELANOMA_VIT, MelanomaPipeline, ViTModel
from lesionserve.segmentation.spec import CROP_MODES, LESION_CROP, CropPipeline, SegmentationPipeline
from lesionserve.spec import ALLOWED_VIEWS, BACKBONE_INPUT, BACKBONE_OUTPUT, check_views


class AssembleError(RuntimeError):
    """Artifacts are missing or invalid; the message lists every problem found."""


def artifact_files(artifacts: Path, pipeline: EnsemblePipeline = LESION_ENSEMBLE, checkpoints: bool = False) -> dict[Path, list[str]]:
    """Source file -> destination paths (relative to the repository) for one pipeline's artifacts folder
    (a segmentation pipeline's: the segmenter's folder, ``model.onnx`` from ``export-segmenter``)."""
    if isinstance(pipeline, DetectionPipeline):
        return {artifacts / "model.onnx": [f"{pipeline.detector}/1/model.onnx"], artifacts / "model.export.json": []}
    if isinstance(pipeline, MelanomaPipeline):  # the folder of vit-export's model.onnx and vit-evaluate's thresholds.json
        return {artifacts / "model.onnx": [f"{pipeline.step('backbone')}/1/model.onnx"], artifacts / "model.export.json": [],
                artifacts / "thresholds.json": [f"{pipeline.step('post')}/1/thresholds.json"]}
    if isinstance(pipeline, SegmentationPipeline):
        # With checkpoints, checkpoint.pt is traced into <segmenter>/1/model.ts (assemble_pipelines), not copied.
        return {artifacts / "model.onnx": [f"{pipeline.segmenter.name}/1/model.onnx"],
                **({artifacts / "checkpoint.pt": []} if checkpoints else {})}
    files = {artifacts / m / "model.onnx": [f"{m}/1/model.onnx"] for m in pipeline.member_names}
    roles = ("fusion", "threshold", "heatmap") if pipeline.explainable else ("fusion", "threshold")
    files[artifacts / "calibration.json"] = [f"{pipeline.step(r)}/1/calibration.json" for r in roles]
    if checkpoints:
        files.update({artifacts / m / "checkpoint.pt": [f"{m}/1/checkpoint.pt"] for m in pipeline.member_names})
    return files


def onnx_signature(path: Path) -> tuple[str, list[int | str], list[str], dict[str, str]]:
    """(input name, input dims, output names, metadata) of an ONNX file; symbolic dims as their names."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    return graph.input[0].name, dims, [o.name for o in graph.output], {p.key: p.value for p in model.metadata_props}


def check_onnx(member: str | Member, path: Path) -> tuple[int | None, list[str]]:
    """(input side S, problems) of ``path`` as ``member``'s model: the repository serves
    ``pixel_values`` [batch, 3, S, S] -> ``logits`` with a dynamic batch axis, at whatever S the
    file takes (the size it was trained at). S is None when the file does not say. Given the
    declared Member, the statistics the file was trained with (its metadata) must be the ones the
    pipeline will normalise with."""
    try:
        name, dims, outputs, meta = onnx_signature(path)
        output = outputs[0]
    except Exception as exc:  # any parse failure means the file is not a usable ONNX model
        return None, [f"{path}: not a readable ONNX model ({exc})"]
    problems = []
    trained = meta.get(NORMALIZATION_KEY)
    needs_cams = not isinstance(member, Member) or member.arch.explainable
    if isinstance(member, Member):
        declared = member.preprocessing.normalization
        if trained is not None and Normalization.from_parameter(declared.name, trained) != declared:
            problems.append(f"{path} was trained with normalisation {trained!r}; {member.name} ({member.architecture}) "
                            f"is declared with {declared.name} ({declared.to_parameter()})")
        member = member.name
    if (name, output) != (BACKBONE_INPUT, BACKBONE_OUTPUT):
        problems.append(f"{path}: tensors are {name!r} -> {output!r}, expected {BACKBONE_INPUT!r} -> {BACKBONE_OUTPUT!r}")
    if CAMS_OUTPUT not in outputs and needs_cams:
        problems.append(f"{path} has no {CAMS_OUTPUT!r} output, which the explain ensemble serves: export it again "
                        "(python -m export.onnx_export; explanations are on by default)")
    square = len(dims) == 4 and dims[1] == 3 and isinstance(dims[2], int) and dims[2] > 0 and dims[2] == dims[3]
    if not square or isinstance(dims[0], int):
        problems.append(
            f"{path}: input shape {dims}; {member} must take [batch, 3, S, S] with a symbolic batch axis "
            f"and a fixed square size S (export with `python -m export.onnx_export`)"
        )
        return None, problems
    return int(dims[2]), problems


def segmenter_input_size(path: Path, pipeline: SegmentationPipeline) -> int:
    """The side S of a segmenter ONNX file (``pixel_values`` [batch, 3, S, S] -> ``mask_logits``,
    trained with the declared statistics); AssembleError naming every problem."""
    from lesionserve.segmentation.spec import SEGMENTER_INPUT, SEGMENTER_OUTPUT

    try:
        name, dims, outputs, meta = onnx_signature(path)
    except Exception as exc:  # any parse failure means the file is not a usable ONNX model
        raise AssembleError(f"{path}: not a readable ONNX model ({exc})") from None
    problems = []
    if (name, outputs[:1]) != (SEGMENTER_INPUT, [SEGMENTER_OUTPUT]):
        problems.append(f"{path}: tensors are {name!r} -> {outputs}, expected {SEGMENTER_INPUT!r} -> [{SEGMENTER_OUTPUT!r}] "
                        "(export it with `lesionserve export-segmenter`)")
    declared = pipeline.segmenter.normalization
    trained = meta.get(NORMALIZATION_KEY)
    if trained is not None and Normalization.from_parameter(declared.name, trained) != declared:
        problems.append(f"{path} was trained with normalisation {trained!r}; {pipeline.segmenter.name} is declared with "
                        f"{declared.name}")
    square = len(dims) == 4 and dims[1] == 3 and isinstance(dims[2], int) and dims[2] == dims[3] and not isinstance(dims[0], int)
    if not square:
        problems.append(f"{path}: input shape {dims}; the segmenter takes [batch, 3, S, S] with a symbolic batch axis")
    if problems:
        raise AssembleError(f"segmenter artifacts of {pipeline.name} do not fit the model repository:\n  " + "\n  ".join(problems))
    return int(dims[2])


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)  # a server reading the repository never sees a half-copied file


def served_input_sizes(artifacts: Path, pipeline: EnsemblePipeline = LESION_ENSEMBLE, checkpoints: bool = False) -> dict[str, int]:
    """Member -> the input side its ONNX file takes; raises AssembleError listing every problem.

    With ``checkpoints``, each checkpoint's trained size must equal its ONNX file's (the gpu_torch
    variant serves the checkpoint at that size): a stale export is refused here, not at run time.
    """
    sizes, problems = {}, []
    for member in pipeline.members:
        m = member.name
        size, found = check_onnx(member, artifacts / m / "model.onnx")
        problems += found
        if size is not None:
            sizes[m] = size
    if checkpoints and not problems:
        from lesionserve.models import checkpoint_input_size  # torch: only needed with checkpoints

        for m in pipeline.member_names:
            try:
                trained = checkpoint_input_size(artifacts / m / "checkpoint.pt")
            except Exception as exc:  # unpickling can fail in many ways; each means an unusable file
                problems.append(f"{artifacts / m / 'checkpoint.pt'}: not a readable LesionServe checkpoint ({exc})")
                continue
            if trained != sizes[m]:
                problems.append(
                    f"{artifacts / m / 'checkpoint.pt'} was trained at {trained} px but {artifacts / m / 'model.onnx'} "
                    f"takes {sizes[m]} px: export it again (python -m export.onnx_export)"
                )
    if problems:
        raise AssembleError(f"artifacts of {pipeline.name} do not fit the model repository:\n  " + "\n  ".join(problems))
    return sizes


def served_pipeline(pipeline: EnsemblePipeline, artifacts: Path, views: int | None = None,
                    checkpoints: bool = False) -> EnsemblePipeline:
    """``pipeline`` as these artifacts serve it: members at their trained sizes, ``views`` if given.

    Refuses (AssembleError listing every problem) missing files, unusable ONNX files and a
    calibration that does not fit the pipeline's members and classes.
    """
    missing = [str(src) for src in artifact_files(artifacts, pipeline, checkpoints) if not src.is_file()]
    if missing:
        raise AssembleError(f"missing artifacts of {pipeline.name} (train, calibrate and export first):\n  " + "\n  ".join(missing))
    if isinstance(pipeline, DetectionPipeline):
        meta = json.loads((artifacts / "model.export.json").read_text())
        if tuple(meta.get("class_names", ())) != pipeline.class_names:
            raise AssembleError(f"{artifacts / 'model.onnx'} detects {meta.get('class_names')}, {pipeline.name} declares "
                                f"{list(pipeline.class_names)}: train on a dataset from `lesionserve detect-dataset`")
        return pipeline.with_imgsz(int(meta["imgsz"]))
    if isinstance(pipeline, MelanomaPipeline):
        from lesionserve.vit.reference import load_thresholds

        exported = json.loads((artifacts / "model.export.json").read_text())
        model = ViTModel.from_dict(exported["model"])
        try:
            load_thresholds(artifacts / "thresholds.json", model.heads)
        except ValueError as exc:
            raise AssembleError(str(exc)) from None
        calibrated = json.loads((artifacts / "thresholds.json").read_text()).get("checkpoint_sha256")
        if calibrated and exported.get("checkpoint_sha256") and calibrated != exported["checkpoint_sha256"]:
            # Thresholds chosen on another model's validation scores would not give its sensitivity.
            raise AssembleError(f"{artifacts / 'thresholds.json'} was chosen for another checkpoint than {artifacts / 'model.onnx'} "
                                "was exported from: run vit-evaluate and vit-export on the same checkpoint.pt")
        return pipeline.with_model(model)
    if isinstance(pipeline, SegmentationPipeline):
        return pipeline.with_input_size(segmenter_input_size(artifacts / "model.onnx", pipeline))
    served = pipeline.with_input_sizes(served_input_sizes(artifacts, pipeline, checkpoints))
    try:  # refuse a malformed or foreign file before serving it
        Calibration.load(artifacts / "calibration.json").check(pipeline.member_names, pipeline.class_names)
    except CalibrationError as exc:
        raise AssembleError(f"{artifacts / 'calibration.json'}: {exc}") from None
    return served if views is None else served.with_views(check_views(views))


def served_crop(pipeline: CropPipeline, served: dict[str, tuple[object, Path]]) -> CropPipeline:
    """``pipeline`` over the served forms of its parts, which must be assembled with it; refuses
    classifier members trained on whole images or with another crop margin (their config.json)."""
    missing = [name for name in pipeline.requires if name not in served]
    if missing:
        raise AssembleError(f"{pipeline.name} calls {' and '.join(missing)}: assemble them in the same repository "
                            "(--segmenter DIR and --crop-artifacts DIR)")
    (segmentation, _), (classifier, artifacts) = served[pipeline.segmentation.name], served[pipeline.classifier.name]
    problems = []
    for member in pipeline.classifier.member_names:
        config = artifacts / member / "config.json"
        if not config.is_file():
            continue  # random-weight artifacts (tests) record no training
        trained = json.loads(config.read_text())
        if not trained.get("crop_boxes"):
            problems.append(f"{member} was trained on whole images ({config}: crop_boxes is null); train it with --crop-boxes")
        elif trained.get("crop_margin") != pipeline.margin:
            problems.append(f"{member} was trained on crops with margin {trained.get('crop_margin')}, "
                            f"{pipeline.name} cuts {pipeline.margin}")
    if problems:
        raise AssembleError(f"{pipeline.name} would classify crops its members never saw: " + "; ".join(problems))
    return pipeline.with_parts(segmentation, classifier)  # type: ignore[arg-type]


def _differences(served: EnsemblePipeline, declared: EnsemblePipeline) -> str:
    changes = [f"{m} at {s} px (declared {declared.input_sizes[m]})" for m, s in served.input_sizes.items()
               if s != declared.input_sizes[m]]
    if served.views != declared.views:
        changes.append(f"{served.views} views (declared {declared.views})")
    return ", ".join(changes)


def assemble_pipelines(
    artifacts: Sequence[tuple[EnsemblePipeline, str | Path]],
    repository: str | Path = DEFAULT_REPOSITORY,
    out: str | Path | None = None,
    views: int | None = None,
    checkpoints: bool = False,
) -> Path:
    """Serve several pipelines from one repository: (declaration, artifacts folder) pairs.

    Without ``out``, the artifacts go into ``repository`` (the committed one), which must already
    serve exactly these declarations. With ``out``, a fresh repository is generated there from the
    served declarations (trained sizes, ``views``) and the artifacts are placed into it.
    """
    pairs = [(p, Path(a)) for p, a in artifacts if not isinstance(p, CropPipeline)]
    served = [(served_pipeline(p, a, views, checkpoints), p, a) for p, a in pairs]
    by_name = {s.name: (s, a) for s, _, a in served}
    for p, _ in ((p, a) for p, a in artifacts if isinstance(p, CropPipeline)):
        served.append((served_crop(p, by_name), p, None))
    if out is None:
        problems = []
        for s, p, _ in served:
            if PIPELINES.get(p.name) != p:
                problems.append(f"{p.name} is not a pipeline of the committed repository")
            elif s != p:
                problems.append(f"{p.name} would serve {_differences(s, p)}")
        if problems:
            raise AssembleError(
                f"{repository} serves the committed declarations; " + "; ".join(problems)
                + ": assemble into a generated copy with --out DIR and serve that with --repository DIR"
            )
        target = Path(repository)
        stale = check_repository(target, [p for _, p, _ in served])
        if stale:  # weights beside configs of another declaration would be served wrongly
            raise AssembleError(f"{target} is not the repository these declarations generate "
                                f"(regenerate it with `lesionserve repository`):\n  " + "\n  ".join(stale))
    else:
        target = Path(out)
        if target.resolve() == DEFAULT_REPOSITORY.resolve():
            raise AssembleError(f"--out {out} is the committed repository: give another folder for the generated copy")
        if target.exists():
            if not target.is_dir() or any(not (child / "config.pbtxt").is_file() for child in target.iterdir()):
                # Only a previous generated repository is replaced, never an arbitrary folder.
                raise AssembleError(f"--out {out} exists and is not a model repository (every entry a model "
                                    "folder with config.pbtxt): remove it or choose a new path")
            shutil.rmtree(target)
        write_repository(target, [s for s, _, _ in served])
    for s, _, a in served:
        if a is None:
            continue  # a crop pipeline: its weights are its parts'
        for src, destinations in artifact_files(a, s, checkpoints).items():
            for rel in destinations:
                _atomic_copy(src, target / rel)
        if checkpoints and isinstance(s, SegmentationPipeline):
            from lesionserve.segmentation.model import trace_segmenter  # torch: only for the gpu_torch variant

            trace_segmenter(a / "checkpoint.pt", target / s.segmenter.name / "1" / SEGMENTER_TORCHSCRIPT)
    return target


def assemble(
    artifacts: str | Path,
    repository: str | Path = DEFAULT_REPOSITORY,
    out: str | Path | None = None,
    views: int | None = None,
    checkpoints: bool = False,
    pipeline: EnsemblePipeline = LESION_ENSEMBLE,
) -> Path:
    """Place one pipeline's artifacts into ``repository`` (or a generated repository at ``out``); return the served path.

    ``checkpoints`` also places each member's checkpoint.pt (needed by the gpu_torch variant only).
    Members are served at the sizes their ONNX files take (see served_input_sizes); sizes or a view
    count other than the declaration's need ``out``.
    """
    return assemble_pipelines([(pipeline, artifacts)], repository, out, views, checkpoints)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="folder with <member>/model.onnx and calibration.json")
    parser.add_argument("--pipeline", default=LESION_ENSEMBLE.name, choices=sorted({**PIPELINES, **GENERATED_PIPELINES}),
                        help="the declared pipeline these artifacts are for (default %(default)s)")
    parser.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="committed repository (default %(default)s)")
    parser.add_argument("--out", help="generate a repository at this path instead of filling the committed one")
    parser.add_argument("--views", type=int, choices=ALLOWED_VIEWS, help="TTA view count for the generated copy")
    parser.add_argument("--checkpoints", action="store_true",
                        help="also place <member>/checkpoint.pt (the gpu_torch variant serves them)")
    parser.add_argument("--segmenter", metavar="DIR",
                        help="also serve the lesion_segment pipeline from DIR/model.onnx (lesionserve export-segmenter); "
                             "needs --out: the committed repository does not carry the segmenter")
    parser.add_argument("--crop-artifacts", metavar="DIR",
                        help="also serve crop-guided classification (lesion_crop) with the crop-trained members in DIR "
                             "(<crop member>/model.onnx, calibration.json); needs --segmenter")
    parser.add_argument("--detector", metavar="DIR",
                        help="also serve the lesion_detect pipeline from DIR/model.onnx and DIR/model.export.json "
                             "(lesionserve detect-export); needs --out")
    parser.add_argument("--melanoma", metavar="DIR",
                        help="also serve the melanoma_vit pipeline from DIR/model.onnx, DIR/model.export.json "
                             "(lesionserve vit-export) and DIR/thresholds.json (lesionserve vit-evaluate); needs --out")
    parser.add_argument("--crop-mode", choices=CROP_MODES, default=LESION_CROP.mode,
                        help="serve lesion_crop as a Triton ensemble or a BLS model (default %(default)s; "
                             "docs/segmentation.md says why)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    pairs = [(get_pipeline(args.pipeline), args.artifacts)]
    if args.segmenter:
        from lesionserve.segmentation.spec import LESION_SEGMENT

        if not args.out:
            print("error: --segmenter needs --out DIR (a generated repository): the committed one serves the classifier alone",
                  file=sys.stderr)
            return 2
        pairs.append((LESION_SEGMENT, args.segmenter))
    if args.detector:
        if not args.out:
            print("error: --detector needs --out DIR (a generated repository)", file=sys.stderr)
            return 2
        pairs.append((LESION_DETECT, args.detector))
    if args.melanoma:
        if not args.out:
            print("error: --melanoma needs --out DIR (a generated repository)", file=sys.stderr)
            return 2
        pairs.append((MELANOMA_VIT, args.melanoma))
    if args.crop_artifacts:
        if not args.segmenter:
            print("error: --crop-artifacts needs --segmenter DIR: lesion_crop segments before it classifies", file=sys.stderr)
            return 2
        pairs += [(LESION_CROP_CLASSIFIER, args.crop_artifacts), (dataclasses.replace(LESION_CROP, mode=args.crop_mode), None)]
    try:
        path = assemble_pipelines(pairs, args.repository, args.out, args.views, args.checkpoints)
    except AssembleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model repository ready: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
