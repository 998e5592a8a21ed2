"""The served melanoma pipeline in-process: its parity oracle (PyTorch eager on the checkpoint) and
the benchmarks' baselines (PyTorch, or ONNX Runtime on the exported file).

The same decode and preprocessing (lesionserve.preprocessing, the ViT's own size and statistics),
the network, and the same post-processing (lesionserve.vit.decision.melanoma_of_batch).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lesionserve.preprocessing import DEFAULT_MAX_PIXELS, preprocess_batch_rows
from lesionserve.vit.decision import melanoma_of_batch
from lesionserve.vit.spec import VIT_INPUT, MelanomaPipeline, ViTModel, logits_name, map_name


def load_thresholds(path: str | Path, heads: Sequence[str]) -> dict[str, float]:
    """Each head's operating threshold from ``vit-evaluate``'s thresholds.json; ValueError naming
    the heads it lacks."""
    data = json.loads(Path(path).read_text())
    thresholds = data.get("thresholds", {})
    missing = [h for h in heads if h not in thresholds]
    if missing:
        raise ValueError(f"{path} has no threshold for head(s) {', '.join(missing)} (has: {', '.join(thresholds) or 'none'}); "
                         "run `lesionserve vit-evaluate` on this checkpoint")
    bad = {h: thresholds[h] for h in heads if not 0.0 <= float(thresholds[h]) <= 1.0}
    if bad:
        raise ValueError(f"{path}: thresholds must be in [0, 1], got {bad}")
    return {h: float(thresholds[h]) for h in heads}


class MelanomaReference:
    """``MelanomaReference.from_checkpoint(ckpt, thresholds).classify([jpeg_bytes, ...])`` -> the
    served post step's outputs (probs_<head>, label_<head>, melanoma_<head>, attention)."""

    def __init__(self, spec: ViTModel, run: Any, thresholds: Mapping[str, float], map_kind: str = "rollout",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.spec, self.run, self.thresholds = spec, run, dict(thresholds)
        self.pipeline = MelanomaPipeline(model=spec, map_kind=map_kind)
        self.max_pixels = max_pixels

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, thresholds: str | Path | Mapping[str, float], map_kind: str = "rollout",
                        threads: int | None = None) -> "MelanomaReference":
        import torch

        from lesionserve.vit.model import forward_with_attention, load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        model, _ = load_checkpoint(checkpoint)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                logits, maps = forward_with_attention(model, torch.from_numpy(x))
            return {**{logits_name(h): v.numpy() for h, v in logits.items()}, **{map_name(k): v.numpy() for k, v in maps.items()}}

        return cls(model.spec, run, _thresholds(thresholds, model.spec.heads), map_kind)

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, thresholds: str | Path | Mapping[str, float], map_kind: str = "rollout",
                  threads: int = 0) -> "MelanomaReference":
        from lesionserve.onnx_session import make_session

        session = make_session(onnx_path, threads)
        spec = ViTModel.from_dict(json.loads(session.get_modelmeta().custom_metadata_map["lesionserve.vit"]))
        names = list(spec.output_names)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, {VIT_INPUT: x})))

        return cls(spec, run, _thresholds(thresholds, spec.heads), map_kind)

    def classify(self, images: Sequence[bytes]) -> dict[str, np.ndarray]:
        pre = self.pipeline.preprocessing
        batch = preprocess_batch_rows(list(images), [pre], self.max_pixels)
        batch.raise_first_error()
        out = self.run(batch.pixels[pre])
        return melanoma_of_batch({h.name: out[logits_name(h.name)] for h in self.pipeline.heads}, self.pipeline.heads,
                                 self.thresholds, out[map_name(self.pipeline.map_kind)],
                                 np.asarray(batch.image_sizes), np.zeros(len(images), bool))


def served_against_reference(served: Sequence[Any], want: Mapping[str, np.ndarray]) -> tuple[float, float, int]:
    """(max |served - reference| over every head's probabilities, the same over the attention maps,
    how many images got every head's label and melanoma flag equal) of the SDK's MelanomaResults
    against ``MelanomaReference.classify`` of the same images."""
    prob_diff = map_diff = 0.0
    equal = 0
    for i, got in enumerate(served):
        prob_diff = max([prob_diff] + [float(np.abs(np.array(p.probs) - want[f"probs_{h}"][i]).max()) for h, p in got.heads.items()])
        h, w = got.attention.shape
        map_diff = max(map_diff, float(np.abs(got.attention - want["attention"][i, :h, :w]).max()))
        equal += all(p.label == want[f"label_{n}"][i, 0].decode() and p.melanoma == bool(want[f"melanoma_{n}"][i, 0])
                     for n, p in got.heads.items())
    return prob_diff, map_diff, equal


def _thresholds(value: str | Path | Mapping[str, float], heads: Sequence[str]) -> dict[str, float]:
    if isinstance(value, Mapping):
        missing = [h for h in heads if h not in value]
        if missing:
            raise ValueError(f"no threshold for head(s) {', '.join(missing)}")
        return {h: float(value[h]) for h in heads}
    return load_thresholds(value, heads)


