"""Segmenter checkpoints: weights with their declaration and the size they were trained at."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lesionserve.segmentation.spec import SEGMENTER, Segmenter

CHECKPOINT_FORMAT = "lesionserve-segmenter-1"


def save_segmenter(path: str | Path, model: torch.nn.Module, input_size: int, segmenter: Segmenter = SEGMENTER,
                   extra: dict[str, Any] | None = None) -> None:
    """Atomically write weights, declaration and training size (what export and serving read)."""
    payload = {"format": CHECKPOINT_FORMAT, "segmenter": segmenter.to_dict(), "input_size": int(input_size),
               "state_dict": model.state_dict(), **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_segmenter(path: str | Path) -> tuple[Segmenter, torch.nn.Module, int, dict[str, Any]]:
    """(declaration, model in eval mode, the input size it was trained at, the payload)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a segmenter checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    segmenter = Segmenter.from_dict(payload["segmenter"])
    model = segmenter.create()
    model.load_state_dict(payload["state_dict"])
    return segmenter, model.eval(), int(payload["input_size"]), payload


def load_pretrained_encoder(model: torch.nn.Module, path: str | Path) -> None:
    """Strictly load an encoder state dict (e.g. ImageNet ResNet34 weights saved with
    ``torch.save(resnet34().state_dict())``): every encoder tensor must be there with its shape,
    the classifier's ``fc`` is ignored, anything else is an error naming the keys."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    encoder = model.encoder
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit the {type(encoder).__name__} encoder: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    encoder.load_state_dict(state, strict=True)


#: TorchScript of the segmenter for the gpu_torch variant: the python backend loads it without
#: importing segmentation_models_pytorch, whose hub import pulls in ssl, which the bundled stub's
#: interpreter cannot load (measured: "_ssl...so: undefined symbol: _PyModule_Add").
TORCHSCRIPT_META = "lesionserve.json"


def trace_segmenter(checkpoint: str | Path, out: str | Path, atol: float = 1e-5) -> Path:
    """Trace the checkpoint to TorchScript at ``out``, checked against the eager model on a batch of
    another size than the trace example (the batch axis must stay free); written only if it agrees."""
    import json

    segmenter, model, size, _ = load_segmenter(checkpoint)
    with torch.inference_mode():
        traced = torch.jit.trace(model, torch.zeros(2, 3, size, size), check_trace=False)
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        diff = float((traced(x) - model(x)).abs().max())
    if not diff <= atol:
        raise ValueError(f"{checkpoint}: traced segmenter differs from the eager one by {diff:.2e} (atol {atol:.0e})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_META: json.dumps({"name": segmenter.name, "input_size": size})})
    tmp.replace(out)
    return out


def load_traced_segmenter(path: str | Path) -> tuple[str, torch.nn.Module, int]:
    """(name, TorchScript module, input size) of a trace_segmenter file."""
    import json

    extra = {TORCHSCRIPT_META: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra[TORCHSCRIPT_META] or "{}")
    if "input_size" not in meta:
        raise ValueError(f"{path} is not a traced segmenter (no {TORCHSCRIPT_META}); assemble with --checkpoints again")
    return meta["name"], module.eval(), int(meta["input_size"])
