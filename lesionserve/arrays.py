"""One small interface over numpy arrays and torch tensors, so each pipeline step is written once.

The CPU pipeline passes numpy arrays and gets exactly the numpy calls it always made; the GPU
variants pass CUDA torch tensors (taken from Triton through DLPack) and get the same step on the
device. ``tests/unit/test_array_steps.py`` proves the two agree.

torch is imported only when a torch tensor is seen: the CPU Triton models never import it.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (checked by module name, so torch is not imported)."""
    return type(x).__module__.split(".")[0] == "torch"


class NumpyOps:
    """numpy: what the CPU pipeline runs (and the reference the torch path is tested against)."""

    name = "numpy"

    @staticmethod
    def astype(x: np.ndarray, dtype: str) -> np.ndarray:
        return x.astype(dtype)

    @staticmethod
    def flip(x: np.ndarray, axes: int | tuple[int, ...]) -> np.ndarray:
        return np.flip(x, axes)

    @staticmethod
    def swapaxes(x: np.ndarray, a: int, b: int) -> np.ndarray:
        return np.swapaxes(x, a, b)

    @staticmethod
    def moveaxis(x: np.ndarray, source: int, destination: int) -> np.ndarray:
        return np.moveaxis(x, source, destination)

    @staticmethod
    def stack(xs: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.stack(xs, axis=axis)

    @staticmethod
    def contiguous(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    @staticmethod
    def exp(x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    @staticmethod
    def max(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        return x.max(axis=axis, keepdims=keepdims)

    @staticmethod
    def sum(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        return x.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x: np.ndarray, axis: int) -> np.ndarray:
        return x.mean(axis=axis)

    @staticmethod
    def argmax(x: np.ndarray, axis: int) -> np.ndarray:
        return x.argmax(axis=axis)

    @staticmethod
    def tensordot(a: np.ndarray, b: np.ndarray, axes: tuple[list[int], list[int]]) -> np.ndarray:
        return np.tensordot(a, b, axes=axes)

    @staticmethod
    def asarray(values: Any, dtype: str, like: Any = None) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    @staticmethod
    def zeros(shape: Sequence[int], dtype: str, like: Any = None) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def greater(x: Any, y: Any) -> Any:
        return np.greater(x, y)

    @staticmethod
    def where(condition: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(condition, a, b)

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return x


class TorchOps:
    """torch: the same operations on tensors, on whatever device the input lives on."""

    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def _dtype(self, name: str):
        return getattr(self.torch, name)  # "float32", "float64", "int64", "bool", "uint8"

    def astype(self, x, dtype: str):
        return x.to(self._dtype(dtype))

    def flip(self, x, axes: int | tuple[int, ...]):
        return self.torch.flip(x, dims=(axes,) if isinstance(axes, int) else tuple(axes))

    def swapaxes(self, x, a: int, b: int):
        return x.transpose(a, b)

    def moveaxis(self, x, source: int, destination: int):
        return self.torch.movedim(x, source, destination)

    def stack(self, xs, axis: int = 0):
        return self.torch.stack(list(xs), dim=axis)

    def contiguous(self, x):
        return x.contiguous()

    def exp(self, x):
        return self.torch.exp(x)

    def max(self, x, axis: int, keepdims: bool = False):
        return x.amax(dim=axis, keepdim=keepdims)

    def sum(self, x, axis: int, keepdims: bool = False):
        return x.sum(dim=axis, keepdim=keepdims)

    def mean(self, x, axis: int):
        return x.mean(dim=axis)

    def argmax(self, x, axis: int):
        return x.argmax(dim=axis)

    def tensordot(self, a, b, axes: tuple[list[int], list[int]]):
        return self.torch.tensordot(a, b, dims=(list(axes[0]), list(axes[1])))

    def asarray(self, values: Any, dtype: str, like: Any = None):
        device = like.device if like is not None else None
        if is_torch(values):
            return values.to(device=device, dtype=self._dtype(dtype))
        return self.torch.as_tensor(np.asarray(values), dtype=self._dtype(dtype), device=device)

    def zeros(self, shape: Sequence[int], dtype: str, like: Any = None):
        return self.torch.zeros(tuple(shape), dtype=self._dtype(dtype), device=like.device if like is not None else None)

    def greater(self, x, y):
        return self.torch.gt(x, y)

    def where(self, condition, a, b):
        return self.torch.where(condition, a, b)

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().cpu().numpy()


_NUMPY = NumpyOps()
_TORCH: TorchOps | None = None


def array_ops(x: Any) -> NumpyOps | TorchOps:
    """The operations for ``x``: torch's for a torch tensor, numpy's for anything else."""
    global _TORCH
    if is_torch(x):
        if _TORCH is None:
            _TORCH = TorchOps()
        return _TORCH
    return _NUMPY


def to_torch(array: np.ndarray, device: str):
    """Copy a host array to ``device`` as a torch tensor (the only host-to-device copy a step makes)."""
    import torch

    with warnings.catch_warnings():
        # Triton hands out read-only arrays; torch warns about that, but we copy to the device at once.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy array from a numpy array or a tensor on any device."""
    return array_ops(x).to_numpy(x)
