"""A per-batch copy of the model's buffers, to undo what a failed batch did to them."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import torch
from torch import nn


class _RestoreOnError:
    """Base of the guards: ``with guard:`` calls ``restore()`` when the block raises."""

    def restore(self) -> None:
        """Put the copy back into the model's buffers."""
        raise NotImplementedError

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.restore()


class BufferGuard(_RestoreOnError):
    """A copy of the model's persistent buffers, refreshed before each batch (private).

    A bad batch can change BatchNorm's running statistics during the forward pass, before
    its loss or shape is checked; restoring the copy undoes that. Used as ``with guard:``
    around one batch: one fused copy on entry, a restore only if the block raises. Only
    the buffers the model's ``state_dict`` holds are copied (not non-persistent caches).
    """

    def __init__(self, model: nn.Module) -> None:
        self.live = _persistent_buffers(model)
        self.copy = [buffer.detach().clone() for buffer in self.live]

    def __enter__(self) -> BufferGuard:
        if self.live:
            torch._foreach_copy_(self.copy, self.live)
        return self

    def restore(self) -> None:
        """Put the copy back into the model's buffers."""
        if self.live:
            torch._foreach_copy_(self.live, self.copy)


class DeviceBufferGuard(_RestoreOnError):
    """A buffer copy that stops following the model once a device flag is set (private).

    For the check that stays on the device: before each batch the copy takes the model's
    buffers only while ``halted()`` is False, so after a bad batch it keeps the buffers
    as they were after the last good one, with no host sync. All buffers, whatever their
    dtype, are copied as the bytes of one flat tensor: three kernels per batch in all.
    """

    def __init__(self, model: nn.Module, halted: Callable[[], torch.Tensor]) -> None:
        self.live = _persistent_buffers(model)
        self.halted = halted
        self.saved = _as_bytes(self.live) if self.live else None

    def __enter__(self) -> DeviceBufferGuard:
        if self.saved is not None:
            torch.where(self.halted(), self.saved, _as_bytes(self.live), out=self.saved)
        return self

    def restore(self) -> None:
        """Put the copy back into the model's buffers."""
        if self.saved is None:
            return
        pieces = self.saved.split([t.numel() * t.element_size() for t in self.live])
        for piece, buffer in zip(pieces, self.live, strict=True):
            # clone: a slice may start at an offset its dtype cannot be viewed from
            buffer.copy_(piece.clone().view(buffer.dtype).view(buffer.shape))


def _persistent_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Return the buffers the model's state_dict holds, each once."""
    state = model.state_dict(keep_vars=True).values()
    unique = {id(t): t for t in state if isinstance(t, torch.Tensor)}
    return [t for t in unique.values() if not isinstance(t, nn.Parameter)]


def _as_bytes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Return the tensors' contents as one new flat uint8 tensor."""
    return torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors])
