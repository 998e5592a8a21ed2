"""Which training images an epoch sees: class-balanced draws (the seed's WeightedRandomSampler) or a
shuffle, split across processes under DDP; and the seeded per-class cap used for reduced runs.

``EpochSampler`` yields ``(epoch, draw, index)`` keys rather than bare indices: ``draw`` is the
position in the epoch's global draw, so the augmentation of every draw is seeded by
``(seed, epoch, draw)`` whatever the worker count or the number of processes, and an image drawn
twice in one epoch gets two different augmentations.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

SAMPLERS = ("balanced", "shuffle")

#: A training key: (epoch, position in the epoch's global draw, index into the training samples).
DrawKey = tuple[int, int, int]


def balanced_weights(labels: Sequence[int]) -> np.ndarray:
    """Per-sample weight 1 / (count of its class): every class is drawn equally often on average."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("no training samples to draw from")
    counts = np.bincount(labels)
    return 1.0 / counts[labels]


def epoch_draw(labels: Sequence[int], mode: str, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order of sample indices, len(labels) long, identical in every process.

    ``balanced``: with replacement, probability proportional to 1/class count (WeightedRandomSampler);
    ``shuffle``: a permutation (each image once).
    """
    if mode not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {mode!r}")
    n = len(labels)
    rng = np.random.default_rng([seed, epoch, 0x5A3])  # the constant keeps it apart from augmentation streams
    if mode == "shuffle":
        return rng.permutation(n)
    weights = balanced_weights(labels)
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


class EpochSampler(Sampler[DrawKey]):
    """Yields this process's ``(epoch, draw, index)`` keys; call ``set_epoch`` before each epoch.

    Under DDP, rank r takes draws r, r + world_size, ... of the global draw; the draw is padded by
    wrapping around so every rank gets the same number of keys (unequal step counts hang DDP).
    """

    def __init__(self, labels: Sequence[int], mode: str = "balanced", seed: int = 0, rank: int = 0, world_size: int = 1):
        if mode not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.labels = list(labels)
        balanced_weights(self.labels)  # fail early on an empty training split
        self.mode, self.seed, self.rank, self.world_size = mode, int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.world_size)

    def __iter__(self) -> Iterator[DrawKey]:
        order = epoch_draw(self.labels, self.mode, self.seed, self.epoch)
        total = len(self) * self.world_size
        for draw in range(self.rank, total, self.world_size):
            yield (self.epoch, draw, int(order[draw % len(order)]))


def cap_per_class(samples: Sequence, max_per_class: int | None, seed: int) -> list:
    """At most ``max_per_class`` samples per class, taking whole lesions so a lesion is never cut.

    Samples are grouped by ``lesion_id`` (falling back to ``image_id`` when a sample has none);
    the groups of each class are visited in a seeded order and a group is taken when it still
    fits, so the result depends only on the pool and ``seed``, not on the input order. Returns
    the kept samples in input order; ``None`` returns the pool unchanged.
    """
    if max_per_class is None:
        return list(samples)
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    groups: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, sample in enumerate(samples):
        group = getattr(sample, "lesion_id", None) or sample.image_id
        groups[sample.label][str(group)].append(i)
    kept: set[int] = set()
    for label, by_group in groups.items():
        names = sorted(by_group)
        order = np.random.default_rng([seed, label, 0xCA9]).permutation(len(names))
        taken = 0
        for j in order:
            members = by_group[names[j]]
            if taken + len(members) <= max_per_class:
                kept.update(members)
                taken += len(members)
            if taken == max_per_class:
                break
    return [s for i, s in enumerate(samples) if i in kept]
