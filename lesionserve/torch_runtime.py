"""PyTorch backbone runner for the ``gpu_torch`` variant: FP16 on CUDA, replayed from CUDA graphs.

Plain torch (no Triton), so it is tested without a server: on CPU in FP32 without graphs, and on
CUDA with FP16 graphs where a GPU is present. The Triton model (``triton_models/torch_backbone.py``)
only feeds it batches.

Why CUDA graphs and not torch.compile: capture needs nothing beyond torch (Inductor needs a C
compiler and Python headers in the serving image) and takes seconds per batch size, not minutes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lesionserve.arrays import is_torch, to_torch

#: The backbone configs' preferred batch sizes and max_batch_size (see triton_config.batch_buckets).
DEFAULT_BUCKETS: tuple[int, ...] = (8, 16, 32, 64)
WARMUP_ITERATIONS = 3


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest captured batch size that holds ``rows``; callers split batches above the largest."""
    if rows < 1:
        raise ValueError(f"batch must have at least one row, got {rows}")
    for size in sorted(buckets):
        if size >= rows:
            return size
    raise ValueError(f"batch of {rows} rows exceeds the largest captured batch size {max(buckets)}")


class TorchBackbone:
    """``TorchBackbone(model, 224, "cuda:0")(x)``: logits of N x 3 x S x S images as float32.

    ``half`` runs weights and activations in FP16 (the inputs arrive as FP32 and are cast while being
    copied into the graph's input buffer). ``cuda_graphs`` captures one graph per bucket at start-up;
    a batch is padded to the next bucket, so replay costs one launch instead of hundreds.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_size: int,
        device: str = "cuda:0",
        half: bool = True,
        cuda_graphs: bool = True,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
    ) -> None:
        self.device = torch.device(device)
        if (half or cuda_graphs) and self.device.type != "cuda":
            raise ValueError(f"FP16 and CUDA graphs need a CUDA device, got {self.device} (use half=False, cuda_graphs=False)")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graphs capture on the current device
            torch.backends.cudnn.benchmark = True  # fixed shapes per bucket: autotuning pays off once
        self.input_size = int(input_size)
        self.dtype = torch.float16 if half else torch.float32
        # channels_last on CUDA: cuDNN's FP16 tensor-core convolutions are NHWC kernels. On CPU keep
        # the reference pipeline's layout, so the CPU path computes what the reference computes.
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.model = model.eval().to(device=self.device, dtype=self.dtype, memory_format=self.memory_format)
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        if cuda_graphs:
            self._capture()

    def _static_input(self, rows: int) -> torch.Tensor:
        s = self.input_size
        return torch.zeros(rows, 3, s, s, device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        # Largest first: the smaller graphs then share its memory pool instead of adding their own.
        for rows in sorted(self.buckets, reverse=True):
            static_in = self._static_input(rows)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside capture: cuDNN autotuning and lazy inits
                for _ in range(WARMUP_ITERATIONS):
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = self.model(static_in)
            pool = graph.pool()
            self.graphs[rows] = (graph, static_in, static_out)
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def __call__(self, x: Any) -> torch.Tensor:
        """N x 3 x S x S float32 (numpy, or a torch tensor on any device) -> the model's output (N x C
        logits; N x 1 x S x S for the segmenter) as float32 on ``device``."""
        x = x.to(self.device) if is_torch(x) else to_torch(np.asarray(x), str(self.device))
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"expected N x 3 x {self.input_size} x {self.input_size} images, got {tuple(x.shape)}")
        if not self.graphs:
            return self.model(x.to(self.dtype).contiguous(memory_format=self.memory_format)).to(torch.float32)
        largest = self.buckets[-1]
        parts = [self._replay(x[start : start + largest]) for start in range(0, x.shape[0], largest)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def explain(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, cams) of N x 3 x S x S images, float32 on ``device``: lesionserve.explain's closed
        form, run eagerly (explanations are rarer than classifications; no graphs are captured for them)."""
        from lesionserve.explain import explained

        x = x.to(self.device) if is_torch(x) else to_torch(np.asarray(x), str(self.device))
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"expected N x 3 x {self.input_size} x {self.input_size} images, got {tuple(x.shape)}")
        logits, cams = explained(self.model)(x.to(self.dtype).contiguous(memory_format=self.memory_format))
        return logits.to(torch.float32), cams.to(torch.float32)

    def _replay(self, chunk: torch.Tensor) -> torch.Tensor:
        rows = chunk.shape[0]
        graph, static_in, static_out = self.graphs[bucket_for(rows, self.buckets)]
        # Rows past `rows` keep whatever the previous batch left there: in eval mode rows never mix
        # (BatchNorm uses running statistics), so padding contents cannot change the real rows.
        static_in[:rows].copy_(chunk)
        graph.replay()
        # A copy, never a view: the next replay overwrites static_out.
        return static_out[:rows].to(torch.float32, copy=True)


def load_torch_backbone(
    checkpoint: str | Path,
    device: str = "cuda:0",
    half: bool = True,
    cuda_graphs: bool = True,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> tuple[str, TorchBackbone]:
    """(model name, runner) from a training checkpoint (a classifier's, or the segmenter's), at the
    resolution it was trained at."""
    if str(checkpoint).endswith(".ts"):  # the segmenter, traced (segmentation.model.trace_segmenter)
        from lesionserve.segmentation.model import load_traced_segmenter

        name, model, size = load_traced_segmenter(checkpoint)
        return name, TorchBackbone(model, size, device=device, half=half, cuda_graphs=cuda_graphs, buckets=buckets)
    from lesionserve.models import load_checkpoint, trained_input_size  # timm: only the torch variant needs it

    spec, model, payload = load_checkpoint(checkpoint)
    size = trained_input_size(payload, spec)
    return spec.name, TorchBackbone(model, size, device=device, half=half, cuda_graphs=cuda_graphs, buckets=buckets)

