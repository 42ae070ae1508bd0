"""What a pass puts back: every module's train/eval flag, and the buffers a failed batch changed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Set ``model``'s train/eval mode; restore every submodule's own flag on exit or error."""
    before = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in before:
            module.training = flag


class BatchGuard:
    """Puts a batch's buffers back and runs ``undo`` if it fails before its step (private)."""

    def __init__(self, model: nn.Module) -> None:
        state = model.state_dict(keep_vars=True).values()
        unique = {id(t): t for t in state if isinstance(t, torch.Tensor)}
        self.live = [t for t in unique.values() if not isinstance(t, nn.Parameter)]
        self.copy = [buffer.detach().clone() for buffer in self.live]
        self.undo: list[Callable[[], object]] = []
        self.committed = False

    def __enter__(self) -> BatchGuard:
        if self.live:
            torch._foreach_copy_(self.copy, self.live)
        self.undo.clear()
        self.committed = False
        return self

    def restore(self) -> None:
        """Put the buffers back and undo what was registered since entry."""
        if self.live:
            torch._foreach_copy_(self.live, self.copy)
        while self.undo:
            self.undo.pop()()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and not self.committed:
            self.restore()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Set eval mode; torch.ao observers (they observe in eval mode too) stop; all put back."""
    observers = [m for m in model.modules() if hasattr(m, "calculate_qparams")]  # torchao's too
    saved = [(b, b.clone()) for m in observers for b in m.buffers(recurse=False)]
    try:
        for module in observers:  # fake-quant (prepare_qat) stops; bare (prepare) gets buffers back
            getattr(module, "disable_observer", lambda: None)()
        with mode(model, False):
            yield
    finally:
        for live, copy in saved:  # a per-channel observer's first batch resizes its buffers
            live.resize_(copy.shape).copy_(copy)
