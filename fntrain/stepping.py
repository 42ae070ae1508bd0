"""How train_epoch turns batch losses into optimizer steps: accumulation, AMP, clipping."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import attrs
import torch

if TYPE_CHECKING:
    from fntrain.nonfinite import Check

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{name}' must be an int >= 1, but got {value!r}")


@attrs.frozen
class StepOptions:
    """train_epoch's stepping options, checked once per call.

    Attributes:
        accumulate: batches whose gradients add up before each optimizer step.
        autocast: dtype for ``torch.autocast`` over forward and loss, or None.
        scaler: a ``torch.amp.GradScaler``, or None.
        clip_grad_norm: the largest total gradient norm allowed, or None.
        scheduler: an LR scheduler stepped after every optimizer step, or None.
    """

    accumulate: int = 1
    autocast: torch.dtype | None = None
    scaler: Any = None
    clip_grad_norm: float | None = None
    scheduler: Any = None

    def check(self, optimizer: torch.optim.Optimizer, device: torch.device) -> StepOptions:
        """Raise a ValueError/TypeError naming the first bad option; return self."""
        _positive_int("accumulate", self.accumulate)
        if self.autocast is not None and self.autocast not in _AUTOCAST_DTYPES:
            raise ValueError(
                f"'autocast' must be None, torch.bfloat16 or torch.float16, "
                f"but got {self.autocast!r}"
            )
        if self.autocast is torch.float16 and device.type == "cuda" and self.scaler is None:
            raise ValueError(
                "'autocast' is torch.float16 on CUDA but 'scaler' is None; float16 gradients "
                "underflow without loss scaling: pass scaler=torch.amp.GradScaler('cuda')"
            )
        if self.scaler is not None and not all(
            hasattr(self.scaler, name) for name in ("scale", "step", "update", "unscale_")
        ):
            raise TypeError(
                f"'scaler' must be a torch.amp.GradScaler, but got {type(self.scaler).__name__}"
            )
        clip = self.clip_grad_norm
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)):
            raise TypeError(f"'clip_grad_norm' must be a positive number, but got {clip!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"'clip_grad_norm' must be a positive number, but got {clip!r}")
        if self.scheduler is not None:
            if not callable(getattr(self.scheduler, "step", None)):
                raise TypeError(
                    f"'scheduler' must be an LR scheduler with .step(), "
                    f"but got {type(self.scheduler).__name__}"
                )
            if getattr(self.scheduler, "optimizer", optimizer) is not optimizer:
                raise ValueError("'scheduler' schedules another optimizer than 'optimizer'")
        return self

    def autocast_context(self, device: torch.device) -> AbstractContextManager[Any]:
        """Return the autocast context for forward and loss (a no-op without autocast)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)


class Stepper:
    """Accumulates gradients over a window of batches and takes the step (private, per call)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        options: StepOptions,
        device: torch.device,
        check: Check,
    ) -> None:
        self.optimizer = optimizer
        self.options = options
        self.check = check
        self.index = 0
        self.autocast = options.autocast_context(device)
        self.window_batches = 0
        self.window_samples = 0
        self.steps = 0
        self.skipped_steps = 0
        self.norms: list[torch.Tensor] = []

    def begin_batch(self, index: int) -> None:
        """Note the batch index; zero the gradients at the start of each window."""
        self.index = index
        if self.window_batches == 0:
            self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor, samples: int) -> None:
        """Back-propagate one batch's mean loss; step when the window is full."""
        if self.options.accumulate > 1:
            loss = loss * samples  # the window's grads are divided by its samples at the step
        if self.options.scaler is not None:
            loss = self.options.scaler.scale(loss)
        loss.backward()
        self.window_batches += 1
        self.window_samples += samples
        if self.window_batches == self.options.accumulate:
            self.step()

    def _params(self) -> list[torch.Tensor]:
        """Return the optimizer's parameters."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self) -> None:
        """Take the optimizer step for the current window (no-op for an empty window)."""
        if self.window_batches == 0:
            return
        options, scaler = self.options, self.options.scaler
        if options.accumulate > 1:
            grads = [p.grad for p in self._params() if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, float(self.window_samples))
        if options.clip_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self._params(), options.clip_grad_norm)
            self.norms.append(norm.detach())
        self.check.before_step(self.index)
        try:
            taken = self._optimizer_step(scaler)
        finally:
            self.check.after_step()
        self.steps += taken
        self.skipped_steps += not taken
        if taken and options.scheduler is not None:
            options.scheduler.step()
        self.window_batches = self.window_samples = 0

    def _optimizer_step(self, scaler: Any) -> bool:
        """Step the optimizer (through the scaler); return False if the scaler skipped it."""
        if scaler is None:
            self.optimizer.step()
            return True
        scaler.step(self.optimizer)
        # The scaler's own record of inf/NaN gradients for this step; update() clears it.
        found_inf = scaler._found_inf_per_device(self.optimizer) if scaler.is_enabled() else {}
        scaler.update()
        return not any(bool(flag) for flag in found_inf.values())

    def grad_norm(self) -> float | None:
        """Return the largest finite gradient norm seen before clipping, if clipping."""
        if self.options.clip_grad_norm is None:
            return None
        if not self.norms:
            return float("nan")
        norms = torch.stack(self.norms).float().cpu()
        finite = norms[torch.isfinite(norms)]
        return float(finite.max()) if finite.numel() else float("inf")
