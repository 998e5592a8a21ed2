"""Network construction and checkpoints (needs torch + timm; not imported by the CPU Triton models)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lesionserve.architectures import Architecture, get_architecture

CHECKPOINT_FORMAT = "lesionserve-checkpoint-v1"


def create_backbone(name: str | Architecture) -> torch.nn.Module:
    """A randomly initialised network of a registered architecture (weights are loaded separately)."""
    arch = name if isinstance(name, Architecture) else get_architecture(name)
    return arch.create()


def save_checkpoint(
    path: str | Path, backbone: str | Architecture, model: torch.nn.Module, extra: dict[str, Any] | None = None
) -> None:
    """Save weights with their architecture, so loading cannot pair them with the wrong network and
    a checkpoint describes itself (a served model needs no registry entry to be rebuilt)."""
    arch = backbone if isinstance(backbone, Architecture) else get_architecture(backbone)
    payload = {"format": CHECKPOINT_FORMAT, "backbone": arch.name, "architecture": arch.to_dict(),
               "state_dict": model.state_dict()}
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


def payload_architecture(payload: dict[str, Any]) -> Architecture:
    """The architecture a checkpoint holds: its own description, else (older files) the registry's."""
    if "architecture" in payload:
        return Architecture.from_dict(payload["architecture"])
    return get_architecture(payload["backbone"])


def load_checkpoint(path: str | Path) -> tuple[Architecture, torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint written by save_checkpoint; returns (architecture, model in eval mode, payload)."""
    payload = _read_payload(path)
    arch = payload_architecture(payload)
    model = create_backbone(arch)
    model.load_state_dict(payload["state_dict"], strict=True)
    return arch, model.eval(), payload


def trained_input_size(payload: dict[str, Any], arch: Architecture) -> int:
    """The side length a checkpoint was trained at (its resolved training config), else the architecture's.

    Export, assembly and the runtimes all serve a model at this size: a model trained at 128 px
    is served at 128 px.
    """
    return int((payload.get("config") or {}).get("input_size") or arch.input_size)


def checkpoint_input_size(path: str | Path) -> int:
    """trained_input_size of the checkpoint at ``path``, without building the model."""
    payload = _read_payload(path)
    return trained_input_size(payload, payload_architecture(payload))
