"""What the client reads from the ensemble's model config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ModelConfigError


@dataclass(frozen=True)
class ModelInfo:
    """Class order, backbone order and batch limit, as declared by the served ensemble."""

    class_names: tuple[str, ...]
    backbones: tuple[str, ...]
    #: 0 means the model declares no batch limit.
    max_batch_size: int


def _string_list(params: Mapping[str, Any], key: str, model_name: str) -> tuple[str, ...]:
    """Read a comma-separated string parameter; missing or empty is a config error."""
    value = params.get(key, {})
    text = value.get("string_value", "") if isinstance(value, Mapping) else ""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        # No fallback constant on purpose: a guessed class order would silently mislabel results.
        raise ModelConfigError(
            f"model {model_name!r} config has no {key!r} parameter; the ensemble's config.pbtxt must "
            f'declare parameters {{ key: "{key}" value {{ string_value: "A,B,..." }} }}'
        )
    return items


def parse_model_config(response: Mapping[str, Any], model_name: str) -> ModelInfo:
    """Build ModelInfo from ``get_model_config(name, as_json=True)``'s result."""
    # The gRPC JSON wraps the config in {"config": {...}}; accept the bare config too.
    config = response.get("config", response)
    params = config.get("parameters", {})
    # MessageToJson omits zero-valued fields, so an absent max_batch_size means 0.
    max_batch_size = int(config.get("max_batch_size", 0))
    return ModelInfo(
        class_names=_string_list(params, "class_names", model_name),
        backbones=_string_list(params, "backbones", model_name),
        max_batch_size=max_batch_size,
    )
