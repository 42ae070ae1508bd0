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

    Decay goes to the >= 2-D weights of Linear, Conv, Embedding, attention and recurrent layers,
    by module type and shape, not name (a parametrized weight's >= 2-D originals too, weight_norm's
    g included); biases and norm layers get none. Each trainable parameter appears once (tied
    weights too); frozen ones and empty groups are left out.

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
    if not 0 <= weight_decay < float("inf"):  # nan: one AdamW step would make every weight nan
        raise ValueError(f"'weight_decay' must be finite and >= 0, but got {weight_decay!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}")
    decayed: dict[nn.Parameter, bool] = {}  # by identity, first use wins: tied weights once
    for module in model.modules():  # an owner comes before its parametrizations' originals
        found = getattr(module, "parametrizations", None)  # as torch's is_parametrized judges
        lists = found.values() if isinstance(found, nn.ModuleDict) else ()
        for param in (p for owner in (module, *lists) for p in owner.parameters(recurse=False)):
            if param.requires_grad:
                decayed.setdefault(param, isinstance(module, _DECAYED_LAYERS) and param.dim() >= 2)
    split = [[p for p, d in decayed.items() if d == on] for on in (True, False)]
    decays = zip(split, (float(weight_decay), 0.0), strict=True)
    return [{"params": params, "weight_decay": decay} for params, decay in decays if params]
