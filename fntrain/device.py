"""Choosing a device, checking the model is on it, and moving batches there."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fntrain.batches import map_tensors


def default_device() -> torch.device:
    """Return the best available device: CUDA, then Apple's MPS, then the CPU.

    Example:
        >>> import fntrain as ft
        >>> ft.default_device().type in {"cuda", "mps", "cpu"}
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def as_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a ``torch.device``; a bare ``"cuda"`` gets the current index."""
    if not isinstance(device, torch.device | str):
        raise TypeError(
            f"'device' must be a torch.device or a str such as 'cpu' or 'cuda:0', "
            f"but got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"'device' must name a device, but got {device!r}: {error}") from None
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def _same(a: torch.device, b: torch.device) -> bool:
    """Tell whether two devices are the same, an unset index matching any."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_model_on(model: nn.Module, device: torch.device) -> None:
    """Raise if a parameter or buffer of ``model`` is not on ``device``."""
    for kind, tensors in (("parameters", model.parameters()), ("buffers", model.buffers())):
        for tensor in tensors:
            if not _same(tensor.device, device):
                raise ValueError(
                    f"'device' is {device} but the model's {kind} are on {tensor.device}; "
                    f"move the model first with model.to({str(device)!r})"
                )


def to_device(data: Any, device: torch.device) -> Any:
    """Move tensors in ``data`` (nested tuples, lists, dicts) to ``device``.

    Copies to CUDA are ``non_blocking``: asynchronous from pinned memory, and harmless
    otherwise. Anything that is not a tensor is returned as it is.
    """
    if isinstance(data, torch.Tensor):  # the common case, without the structural walk
        return data if data.device == device else _move(data, device)
    return map_tensors(lambda tensor: _move(tensor, device), data)


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy ``tensor`` to ``device``; to CUDA without blocking the host."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type == "cuda")
