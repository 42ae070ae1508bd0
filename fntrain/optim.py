"""Optimizer parameter groups: weight decay on weight matrices, never on biases or norms."""

from __future__ import annotations

from typing import Any

from torch import nn

_DECAYED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.MultiheadAttention,
    nn.RNNBase,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a weight-decay group and a no-decay group.

    Decay goes to the weight matrices and kernels (parameters with two or more
    dimensions) of Linear, Conv, Embedding, attention and recurrent layers. Biases,
    normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...) and parameters of any
    other module get no decay. The decision is by module type and parameter shape, not
    by name. Every trainable parameter appears once (tied weights too); frozen ones
    (``requires_grad=False``) are left out. Empty groups are dropped.

    Args:
        model: the model whose parameters to group.
        weight_decay: the decay of the first group.

    Returns:
        Param groups for any ``torch.optim`` optimizer.

    Example:
        >>> import torch, fntrain as ft
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> groups = ft.param_groups(model, weight_decay=0.01)
        >>> [(g["weight_decay"], len(g["params"])) for g in groups]
        [(0.01, 1), (0.0, 3)]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float):
        raise TypeError(f"'weight_decay' must be a number, but got {weight_decay!r}")
    if weight_decay < 0:
        raise ValueError(f"'weight_decay' must be >= 0, but got {weight_decay!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decayed = isinstance(module, _DECAYED_LAYERS) and param.dim() >= 2
            (decay if decayed else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
