"""What a pass puts back: every module's train/eval flag, and the buffers a failed batch changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in train or eval mode; restore every submodule's own flag on exit.

    A submodule the user had put in eval mode (a frozen BatchNorm) is in eval mode again
    afterwards, also when an exception escapes.
    """
    before = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in before:
            module.training = flag


class BufferGuard:
    """A copy of the model's persistent buffers, refreshed before each batch (private).

    A bad batch can change BatchNorm's running statistics during the forward pass, before
    its loss or shape is checked; ``restore()`` undoes that. Used as ``with guard:`` around
    one batch: one fused copy on entry, a restore only if the block raises. Only the
    buffers the model's ``state_dict`` holds are copied (not non-persistent caches).
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

    def restore(self) -> None:
        """Put the copy back into the model's buffers."""
        if self.live:
            torch._foreach_copy_(self.live, self.copy)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.restore()
