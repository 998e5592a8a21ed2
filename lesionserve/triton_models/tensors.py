"""Tensors into and out of the python models: numpy on the host, or torch on a CUDA device via DLPack.

``device`` None is the CPU variant: inputs are numpy (Triton copies them to the host) and outputs
are numpy, exactly as before the GPU variants existed. With ``device="cuda:N"`` (a KIND_GPU
instance, configs with ``FORCE_CPU_ONLY_INPUT_TENSORS: no``) inputs are taken without a copy where
Triton already holds them on the GPU, and outputs are handed back through DLPack, so consecutive
steps exchange GPU memory without a round trip through the host.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from lesionserve.arrays import is_torch, to_torch


def read(request: Any, name: str, device: str | None) -> Any:
    """Input ``name`` of ``request``: numpy when ``device`` is None, else a torch tensor on ``device``."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if device is None:
        return tensor.as_numpy()
    if tensor.is_cpu():  # Triton does not promise where an input lives; either must work
        return to_torch(tensor.as_numpy(), device)
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).to(device)  # no copy when already on `device`


def read_host(request: Any, name: str) -> np.ndarray:
    """Input ``name`` as a host array wherever it lives (small control tensors such as num_views)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


def write(name: str, value: Any) -> Any:
    """An output tensor from a numpy array or a torch tensor (CUDA tensors leave through DLPack)."""
    if not is_torch(value):
        return pb_utils.Tensor(name, value)
    if value.device.type == "cpu":
        return pb_utils.Tensor(name, value.numpy())
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))  # from_dlpack needs C order


def synchronize(device: str | None) -> None:
    """Wait for queued GPU work before returning responses: Triton reads the outputs from another
    process, which does not order itself after torch's stream."""
    if device is not None:
        import torch

        torch.cuda.synchronize(device)
