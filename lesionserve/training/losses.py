"""Training loss: focal loss with label smoothing (the seed recipe); validation uses plain cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothed_targets(targets: torch.Tensor, num_classes: int, label_smoothing: float) -> torch.Tensor:
    """One-hot targets mixed with the uniform distribution: (1 - e) * onehot + e / K."""
    one_hot = F.one_hot(targets, num_classes).to(torch.float32)
    return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Mean over the batch of ``-sum_c q_c (1 - p_c)^gamma log p_c``.

    ``p = softmax(logits)`` and ``q`` the label-smoothed target. Each class term is down-weighted by
    how well it is already predicted, so confident easy examples contribute little. With
    ``gamma = 0`` this is exactly ``F.cross_entropy(logits, targets, label_smoothing=...)``.
    Computed in float32 so autocast (float16) logits do not lose the small terms.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    log_p = F.log_softmax(logits.float(), dim=1)
    q = smoothed_targets(targets, logits.shape[1], label_smoothing)
    weight = (1.0 - log_p.exp()).clamp(min=0.0).pow(gamma) if gamma > 0 else 1.0
    return -(q * weight * log_p).sum(dim=1).mean()


class FocalLoss(torch.nn.Module):
    """``focal_loss`` as a module."""

    def __init__(self, gamma: float = 1.0, label_smoothing: float = 0.1):
        super().__init__()
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}"
