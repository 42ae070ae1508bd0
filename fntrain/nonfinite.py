"""The check for non-finite losses: per batch on the host, or deferred on the device.

By default (``on_nonfinite="raise"`` or ``"skip"``) each loss is read with ``.item()``
before its backward pass; on CUDA that is a host sync per batch. With
``on_nonfinite="defer"`` and a fused optimizer (``fused=True``: SGD, Adam, AdamW,
Adagrad) the check stays on the device instead: a scalar that turns NaN at the first bad
batch, and stays NaN, is handed to the optimizer as ``found_inf``, the flag through which
``GradScaler`` makes fused optimizers skip a step inside the kernel. So from the first
bad batch on no step changes anything. Every few steps a copy of the flag travels to the
host without blocking; once one arrives NaN the epoch stops, everything the skipped steps
touched is put back, and NonFiniteLossError is raised.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from typing import Any

import torch
from torch import nn

from fntrain import distributed
from fntrain.errors import NonFiniteLossError
from fntrain.guard import BufferGuard, DeviceBufferGuard

_FUSED_KINDS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)


def _groups_without_params(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Copy every param group's settings (lr, momentum, ...), tensors cloned, not the params."""
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


_STACK = 1024  # losses kept as single tensors before they are stacked into one
_FLAG_EVERY = 8  # on CUDA, steps between copies of the flag to the host


class HostCheck:
    """Reads each batch's loss on the host and raises before its backward pass (private)."""

    stopped = False  # a bad batch raises at once, so the loop never has to stop early

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


class DeferredCheck:
    """Keeps the check on the device and skips steps there from the first bad batch on.

    Private to one ``train_epoch(on_nonfinite="defer")`` call. Per batch one kernel adds
    ``0 * loss`` to a scalar, which stays 0 while every loss is finite and turns NaN for
    good at the first that is not; per step one more turns it into ``found_inf`` for the
    fused optimizer. Before each step it notes the hyperparameters, scheduler state and
    number of optimizer states; after it, a copy of the flag starts for the host. Flags
    that arrived finite let the notes of their steps go; one that arrived NaN sets
    ``stopped``. Then :meth:`undo` puts the model's buffers, hyperparameters, scheduler and
    optimizer states back as they were after the last good batch.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: Any
    ) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self.poison = torch.zeros((), device=device)
        self.losses: list[torch.Tensor] = []  # batch losses, stacked every _STACK batches
        self.stacked: list[torch.Tensor] = []
        self.indices: list[int] = []
        self.steps = 0
        # (step, batch index of the step, param group settings, scheduler, optimizer states)
        self.snapshots: deque[tuple[int, int, list[dict[str, Any]], Any, int]] = deque()
        self.flags: deque[tuple[int, torch.Tensor, Any]] = deque()  # step, host copy, event
        self.stopped = False
        self.buffers = DeviceBufferGuard(model, self.halted)

    @staticmethod
    def check_usable(optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        """Raise a ValueError naming 'on_nonfinite' unless deferring can work here."""
        fused = [group.get("fused") for group in optimizer.param_groups]
        if not isinstance(optimizer, _FUSED_KINDS) or not all(fused):
            shown = next((f for f in fused if not f), None)
            raise ValueError(
                "'on_nonfinite' is 'defer', which needs an optimizer that can skip a step on "
                "the device: torch.optim.SGD, Adam, AdamW or Adagrad with fused=True, but got "
                f"{type(optimizer).__name__} with fused={shown}"
            )
        if scaler is not None:
            raise ValueError(
                "'on_nonfinite' is 'defer' but a 'scaler' is given: GradScaler sets the same "
                "skip flag itself; use on_nonfinite='raise' with a scaler"
            )
        if distributed.active():
            raise ValueError(
                "'on_nonfinite' is 'defer' under torch.distributed, where each rank would "
                "skip steps on its own while DDP averages their gradients; use 'raise'"
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
            self.stacked.append(torch.stack(self.losses).double())
            self.losses = []
        return detached

    def before_step(self, index: int) -> None:
        """Note what the step may change; make it a no-op on the device once halted."""
        scheduler = self.scheduler
        saved = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
        groups = _groups_without_params(self.optimizer)
        self.snapshots.append((self.steps, index, groups, saved, len(self.optimizer.state)))
        found_inf = torch.nan_to_num(self.poison, nan=1.0)  # 1.0 once halted, else 0.0
        self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]

    def after_step(self) -> None:
        """Take the flag off the optimizer; send a copy of it to the host; read arrived ones.

        On CUDA a copy starts every ``_FLAG_EVERY`` steps, without blocking; on the CPU the
        flag is on the host already and is read after every step.
        """
        del self.optimizer.found_inf  # type: ignore[attr-defined]
        step, self.steps = self.steps, self.steps + 1
        if not self.poison.is_cuda:
            self.flags.append((step, self.poison.clone(), None))
        elif step % _FLAG_EVERY == 0:
            host = torch.empty((), pin_memory=True)
            host.copy_(self.poison, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.flags.append((step, host, event))
        while self.flags and self._arrived():
            step, host, _ = self.flags.popleft()
            if math.isnan(float(host)):
                self.stopped = True
                return
            while self.snapshots and self.snapshots[0][0] <= step:  # that step was taken
                self.snapshots.popleft()

    def _arrived(self) -> bool:
        """Tell whether the oldest flag copy has reached the host (CPU flags: at once)."""
        event = self.flags[0][2]
        return event is None or bool(event.query())

    def _first_bad(self) -> tuple[int, float] | None:
        """Return the first bad batch's index and loss (one host read), or None."""
        if not bool(self.halted()):
            return None
        parts = [*self.stacked, torch.stack(self.losses).double()] if self.losses else self.stacked
        losses = torch.cat(parts).cpu()
        position = int(torch.isfinite(losses).logical_not_().nonzero()[0, 0])
        return self.indices[position], float(losses[position])

    def undo(self) -> tuple[int, float] | None:
        """Put back what steps after the first bad batch changed; return that batch, if any.

        The gradients are left zeroed (``zero_grad``), not as after the last good batch.
        """
        bad = self._first_bad()
        if bad is None:
            return None
        self.buffers.restore()
        self.optimizer.zero_grad()
        for _, index, groups, scheduler, states in self.snapshots:
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
            raise NonFiniteLossError(*bad, deferred=True)


# The check one train_epoch call uses: HostCheck unless on_nonfinite="defer".
Check = HostCheck | DeferredCheck
