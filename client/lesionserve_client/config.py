"""What the client reads from the ensemble's model config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ModelConfigError

#: The ensemble output carrying each image's decode error (b"" when decoded), as the client needs it.
ERROR_OUTPUT = "error"
_ERROR_OUTPUT_DECL = f'output {{ name: "{ERROR_OUTPUT}", data_type: TYPE_STRING, dims: [ 1 ] }}'


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


def _check_error_output(config: Mapping[str, Any], model_name: str) -> None:
    """The ensemble must report undecodable images per row, in output ``error`` (TYPE_STRING [1]).

    A server without it (older than this client) fails a whole request on one bad image and names
    the row only in message text, which this client does not parse: refuse it up front, precisely,
    rather than misreport its errors.
    """
    outputs = [o for o in config.get("output", []) if isinstance(o, Mapping)]
    declared = next((o for o in outputs if o.get("name") == ERROR_OUTPUT), None)
    if declared is None:
        names = ", ".join(str(o.get("name")) for o in outputs) or "none"
        raise ModelConfigError(
            f"model {model_name!r} config has no {ERROR_OUTPUT!r} output (outputs: {names}): the server "
            f"predates per-image decode errors; this client needs the ensemble to declare {_ERROR_OUTPUT_DECL} "
            "(serve the current model_repository)"
        )
    data_type = declared.get("data_type", "")
    dims = [int(d) for d in declared.get("dims", [])]  # the JSON form writes int64 dims as strings
    if data_type != "TYPE_STRING" or dims != [1]:
        raise ModelConfigError(
            f"model {model_name!r} declares output {ERROR_OUTPUT!r} as {data_type or '?'} {dims}; "
            f"expected {_ERROR_OUTPUT_DECL}"
        )


def parse_model_config(response: Mapping[str, Any], model_name: str) -> ModelInfo:
    """Build ModelInfo from ``get_model_config(name, as_json=True)``'s result."""
    # The gRPC JSON wraps the config in {"config": {...}}; accept the bare config too.
    config = response.get("config", response)
    params = config.get("parameters", {})
    # MessageToJson omits zero-valued fields, so an absent max_batch_size means 0.
    max_batch_size = int(config.get("max_batch_size", 0))
    info = ModelInfo(
        class_names=_string_list(params, "class_names", model_name),
        backbones=_string_list(params, "backbones", model_name),
        max_batch_size=max_batch_size,
    )
    _check_error_output(config, model_name)
    return info
