"""How train_epoch turns batch losses into optimizer steps: windows, AMP, clipping, DDP sync."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import operator
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn
from torch.optim import Optimizer

from fntrain import distributed, sharded
from fntrain.records import NonFiniteLossError, Step


def _required(method: Callable[..., Any]) -> list[str]:
    """Return the names of the arguments ``method`` cannot be called without."""
    function = getattr(method, "__func__", None)  # a bound method: its class's function
    return list(_needs(method, False) if function is None else _needs(function, True))


@functools.lru_cache(maxsize=256)  # inspect.signature costs more than the rest of a call
def _needs(function: Callable[..., Any], bound: bool) -> tuple[str, ...]:
    """Return the required positional arguments of ``function`` (after ``self`` if bound)."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: assume it needs none
        return ()
    if bound and params and params[0].kind <= params[0].POSITIONAL_OR_KEYWORD:
        params = params[1:]  # self
    return tuple(
        p.name for p in params if p.default is p.empty and p.kind <= p.POSITIONAL_OR_KEYWORD
    )


def amp(dtype: Any, device: torch.device) -> torch.autocast | None:
    """Return the autocast context for ``dtype`` on ``device`` (None: none); raise if unknown."""
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(
            f"'autocast' must be None, torch.bfloat16 or torch.float16, but got {dtype!r}"
        )
    return None if dtype is None else torch.autocast(device.type, dtype=dtype)


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
        amp(autocast, device)
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


def refuse_detached(index: int) -> None:
    """Raise for a loss that cannot be back-propagated, naming 'loss_fn'."""
    raise ValueError(
        f"'loss_fn' returned a loss that does not require grad for batch {index}; was it "
        f"detached or computed under torch.no_grad(), or are all parameters frozen?"
    )


VERSION = operator.attrgetter("_version")  # bumped by every in-place update of a tensor
_tuple = tuple.__new__  # builds a NamedTuple in C: a per-batch value costs no Python call


class Window(NamedTuple):
    """The batches back-propagated since the last step: a value, each batch makes a new one."""

    batches: int = 0
    samples: int = 0
    items: float = 0  # what the window's loss averages over: samples, or the items counted
    loss: float = 0.0  # the batch losses' sum over those samples or items
    summed: bool = False  # its gradients are of sums: the step divides them by ``items``
    by_items: bool = False  # of (sum, count) under DDP/FSDP2: by the ranks' mean items


EMPTY = Window()  # where every window starts


class Stepper:
    """One call's optimizer, options and parameters, and the steps it took (private)."""

    def __init__(
        self, optimizer: Optimizer, options: StepOptions, device: torch.device, model: nn.Module,
        params: list[nn.Parameter], record: tuple[int, Any] | None = None,
    ) -> None:  # fmt: skip
        self.optimizer, self.options = optimizer, options.check(optimizer, device)
        self.autocast, self.scaler = amp(options.autocast, device), options.scaler
        self.many = many = options.accumulate > 1
        self.params = params  # the optimizer's, in the model's order first (as clip_grad_norm_)
        self.lockstep = sharded.in_lockstep(model)  # DDP/FSDP2 average the grads over ranks
        ddp = nn.parallel.DistributedDataParallel
        self.ddp = model if isinstance(model, ddp) and self.lockstep and many else None
        self.unsynced = False  # ddp: all-reduces a window's last backward; this one skipped it
        self.steps = self.skipped_steps = 0
        self.largest_norm = math.nan  # the largest finite norm before clipping (inf: none was)
        self.record = record  # for on_step: the pass's first Step.index and its RNG origin
        clip, scheduler = options.clip_grad_norm, options.scheduler
        self.plain = clip is None and self.scaler is None and scheduler is None  # step only
        self.simple = self.plain and not many  # a mean loss: backward() and step() as by hand

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *_: object) -> None:
        if self.ddp is not None:  # the user's own loop syncs again
            self.ddp.require_backward_grad_sync = True

    def version(self) -> int:
        """Return the sum of the parameters' version counters: in-place updates raise it."""
        return sum(map(VERSION, self.params))

    def sync(self, last: bool) -> None:
        """Under DDP with accumulation, all-reduce the gradients on a window's last batch only."""
        if self.ddp is not None:  # read by DDP's forward: set before it
            self.ddp.require_backward_grad_sync = last
            self.unsynced = not last

    def backward(
        self, window: Window, loss: torch.Tensor, total: Any, value: float, samples: int,
        weight: float, index: int,
    ) -> Window:  # fmt: skip
        """Back-propagate a batch's loss over ``weight`` samples or items; return the window."""
        summed, by_items = window.summed, window.by_items
        if self.many or total is not None or self.scaler is not None:
            if total is not None and (self.many or self.lockstep or not weight):
                loss, summed = total, True  # divided by the window's (global) items at the step
                by_items = by_items or self.lockstep
            elif self.many:
                loss, summed = loss * weight, True  # divided by the window's samples
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
        if not loss.requires_grad:
            refuse_detached(index)
        loss.backward()
        return _tuple(Window, (
            window.batches + 1, window.samples + samples, window.items + weight,
            window.loss + value * weight, summed, by_items,
        ))  # fmt: skip

    def _clip(self, window: Window) -> float | None:
        """Average a summed window's gradients; clip them; return the norm before clipping."""
        if not (window.summed or self.unsynced or self.options.clip_grad_norm is not None):
            return None
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.unsynced and grads:  # the loader ended before its len(): all-reduce now
            for grad in grads:
                torch.distributed.all_reduce(grad)
            torch._foreach_div_(grads, float(distributed.world()[1]))
            self.unsynced = False
        if window.summed and grads:
            items = window.items
            if window.by_items:  # the ranks' grads were averaged: divide by their mean items
                items = distributed.all_reduce_sum(items) / distributed.world()[1]
            torch._foreach_div_(grads, float(items or 1))  # no items: zero grads stay zero
        if self.options.clip_grad_norm is None:
            return None
        if self.options.scaler is not None:
            self.options.scaler.unscale_(self.optimizer)
        total = torch.nn.utils.clip_grad_norm_(self.params, self.options.clip_grad_norm)
        norm = float(getattr(total, "full_tensor", lambda: total)())  # FSDP2: a DTensor
        finite = [value for value in (norm, self.largest_norm) if math.isfinite(value)]
        self.largest_norm = max(finite) if finite else math.inf
        return norm

    def step(self, window: Window, index: int) -> Step | None:
        """Step on ``window``; return the Step taken when ``record`` asks (None: none, skipped)."""
        if self.plain and not window.summed and not self.unsynced:  # the hand loop's step
            lr = None if self.record is None else self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.steps += 1
            return None if lr is None else self._record(window, index, None, lr)
        norm, scaler = self._clip(window), self.scaler
        if norm is not None and not math.isfinite(norm) and not (scaler and scaler.is_enabled()):
            if self.options.on_nonfinite == "raise":
                raise NonFiniteLossError(index, norm, "gradient norm")
            self.skipped_steps += 1
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        if scaler is None:
            self.optimizer.step()
            taken = True
        else:  # read the scaler's record of inf/NaN gradients before update() clears it
            scaler.step(self.optimizer)
            found = scaler._found_inf_per_device(self.optimizer) if scaler.is_enabled() else {}
            scaler.update()
            taken = not any(bool(flag) for flag in found.values())
        if taken and self.options.scheduler is not None:
            self.options.scheduler.step()
        self.steps += taken
        self.skipped_steps += not taken
        return None if not taken or self.record is None else self._record(window, index, norm, lr)

    def _record(self, window: Window, index: int, norm: float | None, lr: Any) -> Step:
        """Return the Step just taken, for on_step (``lr``: the one it used)."""
        first, origin = self.record or (0, None)
        loss = window.loss / (window.items or 1)
        return Step(first + self.steps - 1, index, loss, window.samples, float(lr), norm, origin)
