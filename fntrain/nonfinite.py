"""The check for non-finite losses: per batch on the host, or on the device without a sync.

On the CPU, and with optimizers that cannot skip a step on the device, the loss is read
with ``.item()`` before each backward pass (on CUDA that is a host sync per batch). On
CUDA with a fused optimizer (``fused=True``: SGD, Adam, AdamW, Adagrad) the check stays on
the device: a scalar that turns NaN at the first bad batch, and stays NaN, is handed to
the optimizer as ``found_inf``, the flag through which ``GradScaler`` makes fused
optimizers skip a step inside the kernel. So from the first bad batch on no step changes
anything, and the epoch's end reads the flag once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fntrain import distributed
from fntrain.errors import NonFiniteLossError
from fntrain.guard import BufferGuard, DeviceBufferGuard


def _groups_without_params(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Copy every param group's settings (lr, momentum, ...), tensors cloned, not the params."""
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


_STACK = 1024  # losses kept as single tensors before they are stacked into one


class HostCheck:
    """Reads each batch's loss on the host and raises before its backward pass (private)."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = BufferGuard(model)

    def batch(self, loss: torch.Tensor, index: int) -> float:
        """Return the loss as a float; raise NonFiniteLossError if it is not finite."""
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(index, value)
        return value

    def before_step(self, index: int) -> None:
        """Nothing to prepare: a bad batch never reaches the step."""

    def after_step(self) -> None:
        """Nothing to undo."""

    def finish(self) -> None:
        """Nothing left to check."""

    def undo(self) -> tuple[int, float] | None:
        """Nothing to undo: each batch was checked before its step."""
        return None


class DeviceCheck:
    """Keeps the check on the device and skips steps there from the first bad batch on.

    Private to one ``train_epoch`` call. Per batch one kernel adds ``0 * loss`` to a
    scalar, which stays 0 while every loss is finite and turns NaN for good at the first
    that is not; per step one more turns it into ``found_inf`` for the fused optimizer.
    Before each step it notes the hyperparameters, scheduler state and number of optimizer
    states. At the end one host read tells whether a batch was bad; if so the model's
    buffers, hyperparameters, scheduler and new optimizer states are put back as they were
    after the last good batch, and NonFiniteLossError is raised.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: Any
    ) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self.poison = torch.zeros((), device=device)
        self.losses: list[torch.Tensor] = []  # batch losses, stacked every _STACK batches
        self.stacked: list[torch.Tensor] = []
        self.indices: list[int] = []
        self.snapshots: list[tuple[int, list[dict[str, Any]], Any, int]] = []
        self.buffers = DeviceBufferGuard(model, self.halted)

    @staticmethod
    def usable(
        optimizer: torch.optim.Optimizer, device: torch.device, on_nonfinite: str, scaler: Any
    ) -> bool:
        """Tell whether the check can stay on the device for this call."""
        return (
            device.type == "cuda"
            and on_nonfinite == "raise"
            and scaler is None  # GradScaler sets found_inf itself
            and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            and not distributed.active()  # each rank would halt on its own
        )

    def halted(self) -> torch.Tensor:
        """Return a device bool: True once any loss so far was not finite."""
        return torch.isnan(self.poison)

    def batch(self, loss: torch.Tensor, index: int) -> torch.Tensor:
        """Record the batch's loss on the device; return it detached."""
        detached = loss.detach()
        self.poison.add_(detached, alpha=0.0)  # 0 * inf and 0 * NaN are NaN
        self.losses.append(detached)
        self.indices.append(index)
        if len(self.losses) == _STACK:
            self.stacked.append(torch.stack(self.losses).float())
            self.losses = []
        return detached

    def before_step(self, index: int) -> None:
        """Note what the step may change; make it a no-op on the device once halted."""
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        groups = _groups_without_params(self.optimizer)
        self.snapshots.append((index, groups, scheduler, len(self.optimizer.state)))
        found_inf = torch.nan_to_num(self.poison, nan=1.0)  # 1.0 once halted, else 0.0
        self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]

    def after_step(self) -> None:
        """Take the flag off the optimizer again."""
        del self.optimizer.found_inf  # type: ignore[attr-defined]

    def _first_bad(self) -> tuple[int, float] | None:
        """Return the first bad batch's index and loss (one host read), or None."""
        if not bool(self.halted()):
            return None
        parts = [*self.stacked, torch.stack(self.losses).float()] if self.losses else self.stacked
        losses = torch.cat(parts).cpu()
        position = int(torch.isfinite(losses).logical_not_().nonzero()[0, 0])
        return self.indices[position], float(losses[position])

    def undo(self) -> tuple[int, float] | None:
        """Put back what steps after the first bad batch changed; return that batch, if any."""
        bad = self._first_bad()
        if bad is None:
            return None
        self.buffers.restore()
        for index, groups, scheduler, states in self.snapshots:
            if index >= bad[0]:  # the first step that the device skipped
                for group, saved in zip(self.optimizer.param_groups, groups, strict=True):
                    group.update(saved)
                if scheduler is not None:
                    self.scheduler.load_state_dict(scheduler)
                for param in list(self.optimizer.state)[states:]:
                    del self.optimizer.state[param]
                break
        return bad

    def finish(self) -> None:
        """Raise NonFiniteLossError for the first bad batch, after undoing what followed it."""
        bad = self.undo()
        if bad is not None:
            raise NonFiniteLossError(*bad)


Check = HostCheck | DeviceCheck
