"""A per-batch copy of the model's buffers, to undo what a failed batch did to them."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn


class BufferGuard:
    """A copy of the model's persistent buffers, refreshed before each batch (private).

    A bad batch can change BatchNorm's running statistics during the forward pass, before
    its loss or shape is checked; restoring the copy undoes that. Used as ``with guard:``
    around one batch: one fused copy on entry, a restore only if the block raises. Only
    the buffers the model's ``state_dict`` holds are copied (not non-persistent caches).
    """

    def __init__(self, model: nn.Module) -> None:
        state = model.state_dict(keep_vars=True).values()
        unique = {id(t): t for t in state if isinstance(t, torch.Tensor)}
        self.live = [t for t in unique.values() if not isinstance(t, nn.Parameter)]
        self.copy = [buffer.detach().clone() for buffer in self.live]

    def __enter__(self) -> BufferGuard:
        if self.live:
            torch._foreach_copy_(self.copy, self.live)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is not None and self.live:
            torch._foreach_copy_(self.live, self.copy)
