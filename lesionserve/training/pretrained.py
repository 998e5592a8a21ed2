"""Start a backbone from pretrained weights, strictly.

A seed system loaded its weights with ``strict=False`` into mismatched names and trained a random
encoder without noticing. Here every parameter and buffer must match by name and shape; the only
exception is the classifier head when its shape differs (an ImageNet 1000-class head for our 7
classes), which is left out and reported. Anything else raises ``PretrainedMismatchError`` listing
the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

# Saved by BatchNorm since torch 0.4.1; older or converted weights lack it and torch itself
# tolerates that on strict loading (it is a counter, not a weight).
_TOLERATED_MISSING_SUFFIXES = ("num_batches_tracked",)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class PretrainedMismatchError(ValueError):
    """The pretrained weights do not fit the model. The message lists every offending key."""


class PretrainedUnavailableError(RuntimeError):
    """A timm hub name was given but its weights could not be fetched (typically: no network)."""


@dataclass
class PretrainedReport:
    """What was loaded: the source, how many tensors, and the head keys left out (with both shapes)."""

    source: str
    loaded: int
    excluded_head: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"pretrained: {self.loaded} tensors loaded strictly from {self.source}"
        if self.excluded_head:
            shapes = "; ".join(f"{k} {list(a)} in file vs {list(b)} here" for k, (a, b) in self.excluded_head.items())
            text += f"; classifier head NOT loaded (shape differs: {shapes}); it starts from zero"
        return text


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint: unwraps {"state_dict": ...} / {"model": ...} and strips "module."."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise PretrainedMismatchError(
            f"no state dict found (expected a mapping of parameter names to tensors, possibly under "
            f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}); found {found}"
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def head_keys(model: torch.nn.Module) -> set[str]:
    """Names of the classifier head's parameters in ``model.state_dict()`` (timm's pretrained_cfg['classifier'])."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not classifier:
        return set()
    return {k for k in model.state_dict() if k.startswith(classifier + ".")}


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> PretrainedReport:
    """Copy ``state`` into ``model``; every key must match by name and shape except a differently shaped head."""
    own = model.state_dict()
    heads = head_keys(model)
    missing = sorted(k for k in own if k not in state and not k.endswith(_TOLERATED_MISSING_SUFFIXES))
    unexpected = sorted(k for k in state if k not in own)
    mis_shaped = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)}
    excluded = {k: s for k, s in mis_shaped.items() if k in heads}
    mis_shaped = {k: s for k, s in mis_shaped.items() if k not in heads}
    if excluded and set(excluded) != {k for k in heads if k in state}:
        # Half a head (weight but not bias, say) cannot be used: report it rather than guess.
        mis_shaped.update(excluded)
        excluded = {}
    if missing or unexpected or mis_shaped:
        lines = [f"pretrained weights from {source} do not match the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mis_shaped)} with another shape):"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape: {k} {list(a)} in file vs {list(b)} in model" for k, (a, b) in mis_shaped.items()]
        raise PretrainedMismatchError("\n".join(lines))
    kept = {k: v for k, v in state.items() if k not in excluded}
    result = model.load_state_dict(kept, strict=False)
    # Only the excluded head (and tolerated counters) may be missing; anything else is a bug here.
    leftover = [k for k in result.missing_keys if k not in excluded and not k.endswith(_TOLERATED_MISSING_SUFFIXES)]
    if leftover or result.unexpected_keys:
        raise PretrainedMismatchError(f"unexpected load result: missing {leftover}, unexpected {result.unexpected_keys}")
    return PretrainedReport(source=source, loaded=len(kept), excluded_head=excluded)


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read weights from a .safetensors file or a torch file (tensors and plain containers only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path)))
    try:
        # weights_only: a weights file must not be able to run code when read.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; the message is what matters
        raise PretrainedMismatchError(f"cannot read {path} as a torch weights file: {exc}") from None
    return unwrap_state_dict(obj)


def load_pretrained(model: torch.nn.Module, source: str, timm_name: str) -> PretrainedReport:
    """Load ``source`` into ``model``: an existing file, else a timm hub name (needs network)."""
    path = Path(source).expanduser()
    if path.is_file():
        return load_state_dict_strict(model, read_state_dict_file(path), str(path))
    if path.exists():
        raise PretrainedMismatchError(f"--pretrained {source}: is a directory, expected a weights file")
    import timm

    if not source.startswith("hf-hub:") and not timm.is_model(source):
        raise FileNotFoundError(
            f"--pretrained {source!r} is neither an existing file nor a timm model name "
            f"(e.g. {timm_name}.tv_in1k or hf-hub:timm/{timm_name}.a1_in1k)"
        )
    try:
        hub_model = timm.create_model(source, pretrained=True)
    except Exception as exc:  # download/cache failures surface as many exception types
        raise PretrainedUnavailableError(
            f"could not fetch pretrained weights {source!r} through timm ({type(exc).__name__}: {exc}). "
            "This machine may have no network access: download the weights elsewhere and pass the file, "
            "e.g. --pretrained /path/to/weights.pth (or .safetensors)"
        ) from exc
    return load_state_dict_strict(model, hub_model.state_dict(), f"timm hub {source}")
