"""A per-batch copy of the model's buffers, to undo what a failed batch did to them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class BufferGuard:
    """A copy of the model's persistent buffers, refreshed before each batch (private).

    A bad batch can change BatchNorm's running statistics during the forward pass, before
    its loss or shape is checked; restoring the copy undoes that. One fused copy per batch,
    only of the buffers the model's ``state_dict`` holds (not non-persistent caches).
    """

    def __init__(self, model: nn.Module) -> None:
        state = model.state_dict(keep_vars=True).values()
        unique = {id(t): t for t in state if isinstance(t, torch.Tensor)}
        self.live = [t for t in unique.values() if not isinstance(t, nn.Parameter)]
        self.copy = [buffer.detach().clone() for buffer in self.live]

    @contextmanager
    def protect(self) -> Iterator[None]:
        """Save the buffers; put them back if the block raises, then re-raise."""
        if self.live:
            torch._foreach_copy_(self.copy, self.live)
        try:
            yield
        except BaseException:
            if self.live:
                torch._foreach_copy_(self.live, self.copy)
            raise
