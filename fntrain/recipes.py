"""Two tutorial recipes as plain functions: weight decay without biases, and mixup."""

from __future__ import annotations

from typing import Any

import torch
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


def _probabilities(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return targets as class-probability rows (one-hot for class indices)."""
    if targets.is_floating_point() and targets.dim() == 2 and targets.shape[1] == num_classes:
        return targets
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and targets.dim() == 1:
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(
                f"'targets' must be class indices in [0, {num_classes}), but range from "
                f"{int(targets.min())} to {int(targets.max())}"
            )
        return torch.nn.functional.one_hot(targets.long(), num_classes).float()
    raise ValueError(
        f"'targets' must be class indices of shape (N,) or probabilities of shape "
        f"(N, {num_classes}), but got {targets.dtype} of shape {tuple(targets.shape)}"
    )


def _sample_lambda(alpha: float, generator: torch.Generator | None) -> float:
    """Draw lambda ~ Beta(alpha, alpha), from ``generator`` when one is given."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        return float(beta.sample())
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(beta.sample())


def mixup(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    num_classes: int,
    generator: torch.Generator | None = None,
    lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with a shuffled copy of itself; return mixed inputs and soft targets.

    With ``lam ~ Beta(alpha, alpha)`` and a random permutation ``p`` of the batch, returns
    ``lam * x + (1 - lam) * x[p]`` and ``lam * y + (1 - lam) * y[p]``, where ``y`` are
    one-hot targets. The soft targets work with ``CrossEntropyLoss`` (class
    probabilities) and with ``ft.accuracy()`` (their most probable class counts).

    Args:
        inputs: a floating-point batch of shape (N, ...).
        targets: class indices (N,) or class probabilities (N, num_classes).
        alpha: the Beta distribution's parameter (> 0); 0.2 to 0.4 is usual.
        num_classes: the number of classes.
        generator: a CPU ``torch.Generator`` for lambda and the permutation, for
            reproducibility independent of the global RNG.
        lam: use this mixing weight instead of drawing one (1.0 leaves the batch as is).

    Returns:
        ``(mixed_inputs, soft_targets)``.

    Example:
        >>> import functools, torch, fntrain as ft
        >>> x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
        >>> mixed, soft = ft.mixup(x, y, alpha=0.2, num_classes=4)
        >>> soft.shape, bool(torch.allclose(soft.sum(1), torch.ones(8)))
        (torch.Size([8, 4]), True)
        >>> per_batch = functools.partial(ft.mixup, alpha=0.2, num_classes=4)  # transform=
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError(f"'inputs' must be a floating-point tensor, but got {inputs!r:.60}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ValueError(f"'alpha' must be a positive number, but got {alpha!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"'num_classes' must be an int >= 2, but got {num_classes!r}")
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise ValueError(f"'lam' must be in [0, 1], but got {lam!r}")
    if targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(
            f"'targets' has {targets.shape[0]} samples but 'inputs' has {inputs.shape[0]}"
        )
    soft = _probabilities(targets, num_classes).to(inputs.dtype)
    weight = _sample_lambda(alpha, generator) if lam is None else float(lam)
    order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    mixed = inputs.lerp(inputs[order], 1.0 - weight)
    return mixed, soft.lerp(soft[order], 1.0 - weight)
