"""How train_epoch turns batch losses into optimizer steps: accumulation, AMP, clipping."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import attrs
import torch
from torch import nn
from torch.optim import Optimizer

from fntrain import distributed, sharded
from fntrain.records import NonFiniteLossError, Step, reword
from fntrain.restore import BatchGuard


def _required(method: Callable[..., Any]) -> list[str]:
    """Return the names of the arguments ``method`` cannot be called without."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume it needs none
        return []
    return [p.name for p in params if p.default is p.empty and p.kind <= p.POSITIONAL_OR_KEYWORD]


@attrs.frozen
class StepOptions:
    """train_epoch's stepping options (its arguments of the same names), checked once per call."""

    accumulate: int = 1
    autocast: torch.dtype | None = None
    scaler: Any = None
    clip_grad_norm: float | None = None
    scheduler: Any = None
    on_nonfinite: str = "raise"

    def check(self, optimizer: Optimizer, device: torch.device) -> StepOptions:
        """Raise naming the first bad option (train_epoch checks on_nonfinite); return self."""
        accumulate, autocast, scaler, clip, scheduler, _ = attrs.astuple(self, recurse=False)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"'accumulate' must be an int >= 1, but got {accumulate!r}")
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"'autocast' must be None, torch.bfloat16 or torch.float16, but got {autocast!r}"
            )
        if autocast is torch.float16 and device.type == "cuda" and scaler is None:
            raise ValueError(
                "'autocast' is torch.float16 on CUDA but 'scaler' is None; float16 gradients "
                "underflow without loss scaling: pass scaler=torch.amp.GradScaler('cuda')"
            )
        methods = ("scale", "step", "update", "unscale_")
        if scaler is not None and not all(hasattr(scaler, name) for name in methods):
            kind = type(scaler).__name__
            raise TypeError(f"'scaler' must be a torch.amp.GradScaler, but got {kind}")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)):
            raise TypeError(f"'clip_grad_norm' must be a positive number, but got {clip!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"'clip_grad_norm' must be a positive number, but got {clip!r}")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            kind = type(scheduler).__name__
            raise TypeError(f"'scheduler' must be an LR scheduler with .step(), but got {kind}")
        if getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("'scheduler' schedules another optimizer than 'optimizer'")
        if scheduler is not None and (needs := _required(scheduler.step)):
            raise TypeError(
                f"'scheduler' is a {type(scheduler).__name__}, whose step() needs "
                f"{', '.join(map(repr, needs))}, so it cannot be stepped per batch; step it in "
                f"your epoch loop instead, e.g. scheduler.step(val.loss)"
            )
        if "closure" in _required(optimizer.step):
            raise TypeError(
                f"'optimizer' is a {type(optimizer).__name__}, whose step() needs a closure "
                f"that re-evaluates the loss; train_epoch steps once per batch without one, "
                f"so write this optimizer's loop by hand"
            )
        return self


def warn_if_built_for_epochs(scheduler: Any, loader: Any, accumulate: int) -> None:
    """Warn if ``scheduler`` would run out within one epoch (T_max=epochs), at its start only."""
    decays = getattr(scheduler, "end_factor", 1) < getattr(scheduler, "start_factor", 1)
    ends = "total_iters" if decays or hasattr(scheduler, "power") else "T_max"  # not warmups
    horizon, done = getattr(scheduler, ends, None), getattr(scheduler, "last_epoch", None)
    if type(horizon) is not int or type(done) is not int or done >= horizon:
        return
    with contextlib.suppress(TypeError):  # no len(): nothing to compare with
        if horizon < (steps := -(-len(loader) // accumulate)):  # a partial window steps too
            warnings.warn(
                f"'scheduler' is a {type(scheduler).__name__} with a horizon of {horizon} steps, "
                f"shorter than one epoch ({steps} optimizer steps), stepped per optimizer step: "
                f"build it in steps (T_max=epochs * len(loader)) or step it yourself per epoch",
                stacklevel=3,
            )


class Stepper:
    """Adds up a window of batches and takes its optimizer step (private; checks ``options``)."""

    def __init__(
        self, optimizer: Optimizer, options: StepOptions, device: torch.device, model: nn.Module
    ) -> None:
        self.optimizer, self.options = optimizer, options.check(optimizer, device)
        dtype = options.autocast
        self.autocast = nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
        params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        ordered = {id(p): p for p in model.parameters() if id(p) in params}  # as clip_grad_norm_
        self.params = [*ordered.values(), *(p for i, p in params.items() if i not in ordered)]
        self.window_batches, self.window_samples, self.window_loss = 0, 0, 0.0  # loss: sum(n*mean)
        self.window_items: float = 0  # what the window's loss averages over: samples or items
        self.summed = self.by_items = False  # the window's grads are of sums: divide them
        self.lockstep = sharded.in_lockstep(model)  # DDP/FSDP2 average the grads over ranks
        self.steps = self.skipped_steps = self.first = 0  # first: the pass's first Step.index
        self.origin: Any = None  # the pass's RNG states at its start, for Step
        self.largest_norm = math.nan  # the largest finite norm before clipping (inf: none was)
        self.cleared: bool | None = None  # zero_grad() sets .grad to None
        self.probe: torch.Tensor | None = None  # a parameter the first backward gave a grad

    def begin_batch(self) -> None:
        """Zero the gradients at the start of each window."""
        if self.window_batches == 0:
            self.optimizer.zero_grad()
            if self.cleared is None:  # does zero_grad() leave None (set_to_none)?
                self.cleared = all(p.grad is None for p in self.params)

    def check_loss(self, loss: torch.Tensor, index: int) -> None:
        """Raise unless ``loss`` can be back-propagated and nothing back-propagated before it."""
        if not loss.requires_grad:
            raise ValueError(
                f"'loss_fn' returned a loss that does not require grad for batch {index}; was "
                f"it detached or computed under torch.no_grad(), or are all parameters frozen?"
            )
        probes = self.params if self.probe is None else (self.probe,)  # O(1) after batch 0
        if not self.window_batches and self.cleared and any(p.grad is not None for p in probes):
            raise ValueError(
                f"'loss_fn' called backward() itself for batch {index} (or 'forward' did): the "
                f"gradients are already set, and train_epoch's own backward() would double "
                f"them; return the loss without calling backward()"
            )

    def backward(
        self, loss: torch.Tensor, value: float, samples: int, weight: float, total: Any
    ) -> None:
        """Back-propagate a batch's ``loss`` over ``weight`` samples or items into the window."""
        many = self.options.accumulate > 1
        if total is not None and (many or self.lockstep or not weight):
            loss, self.summed = total, True  # divided by the window's (global) items at the step
            self.by_items = self.by_items or self.lockstep
        elif many:
            loss, self.summed = loss * weight, True  # divided by the window's samples
        if self.options.scaler is not None:
            loss = self.options.scaler.scale(loss)
        loss.backward()
        if self.probe is None:
            self.probe = next((p for p in self.params if p.grad is not None), None)
        self.window_batches += 1
        self.window_samples += samples
        self.window_items += weight
        self.window_loss += value * weight

    def _clip(self) -> float | None:
        """Average an accumulated window's gradients; clip them; return the norm before clipping."""
        options, scaler = self.options, self.options.scaler
        if self.summed and (grads := [p.grad for p in self.params if p.grad is not None]):
            items = self.window_items
            if self.by_items:  # DDP/FSDP2 averaged the grads: divide by the mean rank's items
                items = distributed.all_reduce_sum(items) / distributed.world()[1]
            torch._foreach_div_(grads, float(items or 1))  # no items: zero grads stay zero
        if options.clip_grad_norm is None:
            return None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        total = torch.nn.utils.clip_grad_norm_(self.params, options.clip_grad_norm)
        norm = float(getattr(total, "full_tensor", lambda: total)())  # FSDP2: a DTensor
        finite = [value for value in (norm, self.largest_norm) if math.isfinite(value)]
        self.largest_norm = max(finite) if finite else math.inf
        return norm

    def step(self, batch_index: int, guard: BatchGuard, final: bool = False) -> Step | None:
        """Step on a full window (any if ``final``); return the Step taken (None: none, skipped)."""
        if self.window_batches < (1 if final else self.options.accumulate):
            return None
        norm, scaler = self._clip(), self.options.scaler
        samples, loss = self.window_samples, self.window_loss / (self.window_items or 1)
        self.window_batches, self.window_samples, self.window_loss = 0, 0, 0.0
        self.window_items, self.summed, self.by_items = 0, False, False
        if norm is not None and not math.isfinite(norm) and not (scaler and scaler.is_enabled()):
            if self.options.on_nonfinite == "raise":
                raise NonFiniteLossError(batch_index, norm, "gradient norm")
            self.skipped_steps += 1
            return None
        lr = float(self.optimizer.param_groups[0]["lr"])
        version = sum(p._version for p in self.params)  # in-place updates bump these
        try:
            if scaler is None:
                self.optimizer.step()
                taken = True
            else:  # read the scaler's record of inf/NaN gradients before update() clears it
                scaler.step(self.optimizer)
                found = scaler._found_inf_per_device(self.optimizer) if scaler.is_enabled() else {}
                scaler.update()
                taken = not any(bool(flag) for flag in found.values())
            guard.committed = True
            if taken and self.options.scheduler is not None:
                self.options.scheduler.step()
        except BaseException as error:  # Ctrl-C too: judged by the parameters, any of them
            changed = sum(p._version for p in self.params) != version
            guard.committed = guard.committed or changed
            if guard.committed:
                raise reword(error, suffix=f" (raised after optimizer.step() of batch "
                             f"{batch_index}: that batch's update of the weights, buffers and "
                             f"optimizer state stays applied)") from None  # fmt: skip
            raise
        if not taken:
            self.skipped_steps += 1
            return None
        self.steps += 1
        return Step(self.first + self.steps - 1, batch_index, loss, samples, lr, norm, self.origin)
