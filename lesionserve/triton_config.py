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


def weights_file(args: dict[str, str], config: dict[str, Any], key: str, default: str, hint: str) -> Path:
    """The weights file named by parameter ``key`` in the version folder.

    A missing file is a broken deployment: raise naming the model, the path and ``hint`` (how to
    put it there), so the server's load error says what to do.
    """
    path = version_dir(args) / parameter(config, key, default)
    if not path.is_file():
        raise FileNotFoundError(f"model {config.get('name')!r}: {path} not found; {hint}")
    return path


def output_preprocessing(config: dict[str, Any], output: dict[str, Any]) -> Any:
    """The Preprocessing (size, normalisation) a preprocess output carries: the size from its dims,
    the statistics from parameter ``normalize_<output name>``; a missing one is a broken config."""
    from lesionserve.architectures import Normalization
    from lesionserve.pipelines import Preprocessing

    name = output["name"]
    try:
        value = parameter(config, f"normalize_{name}")
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]} (the statistics of output {name!r}; regenerate with `lesionserve repository`)") from None
    return Preprocessing(square_size(output["dims"]), Normalization.from_parameter(name, value))


def square_size(dims: list[int] | list[str]) -> int:
    """Side of a [..., 3, S, S] tensor's dims, checking that it is square RGB."""
    d = [int(x) for x in dims]
    if len(d) < 3 or d[-3] != 3 or d[-1] != d[-2]:
        raise ValueError(f"expected dims ending in [3, S, S], got {d}")
    return d[-1]


#: Backbone implementations a python-backend backbone config may ask for with ``parameters { runtime }``.
BACKBONE_RUNTIMES = ("onnxruntime", "torch")


def device_for(args: dict[str, str]) -> str | None:
    """Where a python model instance does its tensor work: ``"cuda:<id>"`` for a KIND_GPU instance,
    None (numpy on the host) for KIND_CPU. The variant's instance_group decides; nothing else."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id') or 0)}"
    return None


def flag(config: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean parameter ("true"/"false", "1"/"0", "yes"/"no"); anything else is a broken config."""
    value = parameter(config, key, "true" if default else "false").strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"model {config.get('name')!r}: parameter {key!r} must be true or false, got {value!r}")


def backbone_runtime(config: dict[str, Any]) -> str:
    """The ``runtime`` parameter of a python backbone config (default onnxruntime), validated."""
    runtime = parameter(config, "runtime", "onnxruntime")
    if runtime not in BACKBONE_RUNTIMES:
        raise ValueError(
            f"model {config.get('name')!r}: runtime {runtime!r} is not one of {', '.join(BACKBONE_RUNTIMES)}"
        )
    return runtime


def batch_buckets(config: dict[str, Any]) -> tuple[int, ...]:
    """Batch sizes to capture CUDA graphs for: the dynamic batcher's preferred sizes plus max_batch_size.

    A batch of n rows runs in the smallest bucket >= n, so these sizes cover every batch Triton forms.
    """
    max_batch = int(config.get("max_batch_size") or 0)
    if max_batch <= 0:
        raise ValueError(f"model {config.get('name')!r}: CUDA graph buckets need max_batch_size > 0")
    preferred = (config.get("dynamic_batching") or {}).get("preferred_batch_size") or []
    return tuple(sorted({int(b) for b in preferred if 0 < int(b) <= max_batch} | {max_batch}))
