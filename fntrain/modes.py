"""Train/eval mode that is restored module by module afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
