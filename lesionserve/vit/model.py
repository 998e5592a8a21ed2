"""The network: a timm ViT/DeiT backbone shared by one MLP head per dataset, attention made
observable, attention maps, strict loading of pretrained weights and the parameter groups that
gradual unfreezing works on.

timm runs attention fused (``F.scaled_dot_product_attention``), which never materialises the
weights; :class:`AttentionRecorder` switches each block to timm's own unfused path for as long as
it is active and records the softmax weights at ``attn_drop`` (the identity in eval). Both paths
compute the same function; ``tests/unit/test_vit.py`` checks the logits agree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lesionserve.vit.spec import MAP_KINDS, ViTModel, get_head

#: Abnar and Zuidema's residual mixing: each block's attention is 0.5 A + 0.5 I before the product.
ROLLOUT_RESIDUAL = 0.5


class PretrainedError(ValueError):
    """A --pretrained file does not fit the network; the message lists the mismatched keys."""


def create_backbone(spec: ViTModel) -> nn.Module:
    """The timm ViT without its classifier (``num_classes=0``: the CLS token's features)."""
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=spec.input_size)


def make_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Seed 001's head: Linear - ReLU - Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


class MultiHeadViT(nn.Module):
    """One backbone, one head per name in ``spec.heads``; ``forward`` returns {head: logits}."""

    def __init__(self, spec: ViTModel):
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec)
        width = int(self.backbone.num_features)
        self.heads = nn.ModuleDict({h: make_head(width, spec.head_hidden, get_head(h).num_classes) for h in spec.heads})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


class AttentionRecorder:
    """While active: every block of ``vit`` runs timm's unfused attention and its softmax weights
    (B x heads x T x T) are appended to ``weights``, first block first."""

    def __init__(self, vit: nn.Module):
        self.blocks = list(vit.blocks)
        self.weights: list[torch.Tensor] = []
        self._hooks: list[Any] = []
        self._fused: list[bool] = []

    def __enter__(self) -> "AttentionRecorder":
        self.weights = []
        for block in self.blocks:
            self._fused.append(bool(block.attn.fused_attn))
            block.attn.fused_attn = False
            self._hooks.append(block.attn.attn_drop.register_forward_hook(self._record))
        return self

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.weights.append(inputs[0])

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        for block, fused in zip(self.blocks, self._fused):
            block.attn.fused_attn = fused
        self._hooks, self._fused = [], []


def cls_attention(weights: Sequence[torch.Tensor], prefix: int, grid: int) -> torch.Tensor:
    """The last block's attention from the CLS token to each patch, averaged over heads: B x grid x grid."""
    last = weights[-1].mean(dim=1)
    return last[:, 0, prefix:].reshape(-1, grid, grid)


def attention_rollout(weights: Sequence[torch.Tensor], prefix: int, grid: int, residual: float = ROLLOUT_RESIDUAL) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020): per block the head-averaged attention mixed with
    the identity (the residual path), rows renormalised, multiplied from the first block to the
    last; the CLS row over the patches: B x grid x grid."""
    joint = None
    for a in weights:
        a = a.mean(dim=1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * a + (1.0 - residual) * eye
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    assert joint is not None, "no attention weights were recorded"
    return joint[:, 0, prefix:].reshape(-1, grid, grid)


def maps_of(weights: Sequence[torch.Tensor], vit: nn.Module, grid: int) -> dict[str, torch.Tensor]:
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    return {"rollout": attention_rollout(weights, prefix, grid), "cls": cls_attention(weights, prefix, grid)}


def forward_with_attention(model: MultiHeadViT, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({head: logits}, {map kind: B x grid x grid}) in one pass."""
    with AttentionRecorder(model.backbone) as recorder:
        logits = model(x)
    return logits, maps_of(recorder.weights, model.backbone, model.spec.grid)


class ExportModule(nn.Module):
    """What the exported graph computes: each head's logits (in ``spec.heads`` order), then the maps
    (``MAP_KINDS`` order) - ``spec.output_names``."""

    def __init__(self, model: MultiHeadViT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, maps = forward_with_attention(self.model, x)
        return tuple(logits[h] for h in self.model.spec.heads) + tuple(maps[k] for k in MAP_KINDS)


# -- weights ---------------------------------------------------------------------------------------

def load_pretrained(model: MultiHeadViT, path: str | Path) -> list[str]:
    """Load a backbone checkpoint strictly (seed 001's weights silently failed to load with
    ``strict=False``). Accepts a timm/DeiT state dict (``model`` or ``state_dict`` wrappers too);
    the timm classifier ``head.*`` keys are dropped, since our heads replace it. Raises
    PretrainedError listing missing, unexpected and mis-shaped keys; returns the dropped keys."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise PretrainedError(f"{path}: not a state dict (got {type(state).__name__})")
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    dropped = sorted(k for k in state if k.startswith(("head.", "head_dist.")))
    state = {k: v for k, v in state.items() if k not in dropped}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise PretrainedError(f"{path} does not fit {model.spec.timm_name} at {model.spec.input_size} px: " + "; ".join(parts))
    model.backbone.load_state_dict(state, strict=True)
    return dropped


def save_checkpoint(model: MultiHeadViT, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # loadable without the training device
    torch.save({"spec": model.spec.to_dict(), "state_dict": state, **(extra or {})}, tmp)
    tmp.replace(path)  # never a half-written checkpoint


def load_checkpoint(path: str | Path) -> tuple[MultiHeadViT, dict[str, Any]]:
    """(model in eval mode, the whole checkpoint dict)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=False)
    if "spec" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a ViT checkpoint of `lesionserve vit-train` (keys: {', '.join(ckpt)})")
    model = MultiHeadViT(ViTModel.from_dict(ckpt["spec"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval(), ckpt


# -- parameter groups (gradual unfreezing) ----------------------------------------------------------

def group_names(model: MultiHeadViT) -> list[str]:
    """Every group, in seed 001's unfreezing order after the heads: final norm, encoder blocks from
    the last to the first, position embedding, class token, patch embedding."""
    blocks = [f"block{i}" for i in reversed(range(len(model.backbone.blocks)))]
    return ["heads", "norm", *blocks, "pos_embed", "cls_token", "patch_embed"]


def parameter_groups(model: MultiHeadViT) -> dict[str, list[nn.Parameter]]:
    """Group name -> its parameters; every parameter is in exactly one group (checked)."""
    vit = model.backbone
    groups: dict[str, list[nn.Parameter]] = {"heads": list(model.heads.parameters()),
                                             "norm": [p for m in (vit.norm, vit.fc_norm) for p in m.parameters()]}
    for i, block in enumerate(vit.blocks):
        groups[f"block{i}"] = list(block.parameters())
    groups["pos_embed"] = [vit.pos_embed]
    groups["cls_token"] = [vit.cls_token]
    groups["patch_embed"] = list(vit.patch_embed.parameters()) + list(vit.norm_pre.parameters())
    seen = {id(p) for ps in groups.values() for p in ps}
    left = [n for n, p in model.named_parameters() if id(p) not in seen]
    if left:
        raise ValueError(f"parameters in no unfreezing group: {', '.join(left)}")
    return {name: groups[name] for name in group_names(model)}


def group_kind(name: str) -> str:
    """The learning-rate kind of a group: heads, blocks, norm, patch_embed or tokens."""
    if name.startswith("block"):
        return "blocks"
    return {"pos_embed": "tokens", "cls_token": "tokens"}.get(name, name)


def iter_trainable(groups: Mapping[str, Sequence[nn.Parameter]]) -> Iterator[str]:
    for name, params in groups.items():
        if params and all(p.requires_grad for p in params):
            yield name
