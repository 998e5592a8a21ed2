"""Helpers for reading a parsed Triton model config (the JSON the python backend receives).

Plain functions so they are unit-tested without Triton.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_args_config(args: dict[str, str]) -> dict[str, Any]:
    """The model config from the python backend's ``initialize`` args."""
    return json.loads(args["model_config"])


def parameter(config: dict[str, Any], key: str, default: str | None = None) -> str:
    """A string parameter from ``parameters { key: ... value { string_value: ... } }``.

    Without a default, a missing key is a broken model: raise naming the model and key.
    """
    params = config.get("parameters") or {}
    if key in params:
        return str(params[key]["string_value"])
    if default is None:
        raise KeyError(f"model {config.get('name')!r}: config has no parameter {key!r}")
    return default


def version_dir(args: dict[str, str]) -> Path:
    """Folder of the model version being loaded (holds model.onnx, calibration.json)."""
    return Path(args["model_repository"]) / args["model_version"]


def square_size(dims: list[int] | list[str]) -> int:
    """Side of a [..., 3, S, S] tensor's dims, checking that it is square RGB."""
    d = [int(x) for x in dims]
    if len(d) < 3 or d[-3] != 3 or d[-1] != d[-2]:
        raise ValueError(f"expected dims ending in [3, S, S], got {d}")
    return d[-1]
