"""Backbone construction and checkpoints (needs torch + timm; not imported by the Triton models)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from lesionserve.spec import NUM_CLASSES, BackboneSpec, get_backbone

CHECKPOINT_FORMAT = "lesionserve-checkpoint-v1"


def create_backbone(name: str) -> torch.nn.Module:
    """A timm backbone with a 7-class head, randomly initialised (weights are loaded separately)."""
    spec = get_backbone(name)
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=NUM_CLASSES)


def save_checkpoint(path: str | Path, backbone: str, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Save weights with the backbone name so loading cannot pair them with the wrong architecture."""
    payload = {"format": CHECKPOINT_FORMAT, "backbone": backbone, "state_dict": model.state_dict()}
    payload.update(extra or {})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def _read_payload(path: str | Path) -> dict[str, Any]:
    """The dict saved by save_checkpoint; precise errors for a missing file or a foreign one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a LesionServe checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[BackboneSpec, torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint written by save_checkpoint; returns (spec, model in eval mode, payload)."""
    payload = _read_payload(path)
    spec = get_backbone(payload["backbone"])
    model = create_backbone(spec.name)
    model.load_state_dict(payload["state_dict"], strict=True)
    return spec, model.eval(), payload


def trained_input_size(payload: dict[str, Any], spec: BackboneSpec) -> int:
    """The side length a checkpoint was trained at (its resolved training config), else the spec's.

    Export, assembly and the runtimes all serve a model at this size: a model trained at 128 px
    is served at 128 px.
    """
    return int((payload.get("config") or {}).get("input_size") or spec.input_size)


def checkpoint_input_size(path: str | Path) -> int:
    """trained_input_size of the checkpoint at ``path``, without building the model."""
    payload = _read_payload(path)
    return trained_input_size(payload, get_backbone(payload["backbone"]))
