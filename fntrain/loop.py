"""train_epoch, evaluate and predict: one pass over a loader each, nothing kept between calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from fntrain import distributed
from fntrain import metrics as metric_lib
from fntrain.batches import concat, count, describe, inputs_and_targets, pair
from fntrain.device import as_device, check_model_on, to_device
from fntrain.errors import NonFiniteLossError
from fntrain.modes import mode
from fntrain.nonfinite import Check, DeferredCheck, HostCheck
from fntrain.progress import Progress
from fntrain.records import EvalResult, Predictions, TrainResult
from fntrain.stepping import StepOptions, Stepper
from fntrain.tally import Tally

LossFn = Callable[[Any, Any], torch.Tensor]
Transform = Callable[[Any, Any], tuple[Any, Any]]


def _mean_loss(loss: Any, samples: int, index: int) -> torch.Tensor:
    """Return the batch's mean loss from a scalar or a per-sample loss vector."""
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError(
            f"'loss_fn' must return a floating-point tensor, but returned {describe(loss)} "
            f"for batch {index}"
        )
    if loss.dim() == 0:
        return loss
    if loss.shape == (samples,):
        return loss.mean()
    raise ValueError(
        f"'loss_fn' must return a scalar or a per-sample vector of shape ({samples},), "
        f"but returned a tensor of shape {tuple(loss.shape)} for batch {index}"
    )


def _prepare(
    batch: Any, index: int, device: torch.device, transform: Transform | None = None
) -> tuple[Any, Any, int]:
    """Split a batch, move it to ``device`` and transform it; return inputs, targets, count."""
    inputs, targets = pair(batch, index)
    inputs, targets = to_device(inputs, device), to_device(targets, device)
    if transform is not None:
        inputs, targets = pair(transform(inputs, targets), index, "'transform' must return")
    if isinstance(targets, torch.Tensor) and targets.dim():
        return inputs, targets, targets.shape[0]
    return inputs, targets, count(targets, index, "targets")


def _train_batch(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    index: int,
    device: torch.device,
    transform: Transform | None,
    stepper: Stepper,
    check: Check,
) -> tuple[float | torch.Tensor, int, Any, Any] | None:
    """Forward, check and backward one batch; return (loss, samples, outputs, targets).

    Returns None for a batch without samples. The host check raises NonFiniteLossError
    before backward; the deferred check leaves the loss on the device.
    """
    inputs, targets, samples = _prepare(batch, index, device, transform)
    if not samples:
        return None
    with stepper.autocast:
        outputs, loss = _forward(model, loss_fn, inputs, targets, samples, index)
    if not loss.requires_grad:
        raise ValueError(
            f"'loss_fn' returned a loss that does not require grad for batch {index}; was it "
            f"detached or computed under torch.no_grad(), or are all parameters frozen?"
        )
    value = check.batch(loss, index)
    stepper.backward(loss, samples)
    return value, samples, outputs, targets


def _forward(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, samples: int, index: int
) -> tuple[Any, torch.Tensor]:
    """Run the model on a batch; return its outputs and mean loss."""
    outputs = model(inputs)
    return outputs, _mean_loss(loss_fn(outputs, targets), samples, index)


def _undo_deferred(check: Check, error: BaseException) -> None:
    """Put back what deferred steps changed; say so on the escaping ``error``."""
    try:
        bad = check.undo()
    except Exception as failure:  # keep the user's error; this one is secondary
        _note(error, f"fntrain could not put the model back after this error: {failure!r}")
        return
    if bad is not None:
        _note(
            error,
            f"batch {bad[0]} had a non-finite loss ({bad[1]}) before this error; the model "
            f"was put back as after the last finite batch",
        )


def _note(error: BaseException, text: str) -> None:
    """Add ``text`` to the error's traceback (Python >= 3.11; dropped before)."""
    if hasattr(error, "add_note"):
        error.add_note(text)


def _check_args(model: Any, loader: Any, device: torch.device | str) -> torch.device:
    """Check the arguments every function shares; return the resolved device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(loader, Iterable):
        raise TypeError(
            f"'loader' must be an iterable of batches (e.g. a DataLoader), "
            f"but got {type(loader).__name__}"
        )
    resolved = as_device(device)
    check_model_on(model, resolved)
    return resolved


def _check_loss_fn(loss_fn: Any) -> None:
    """Check ``loss_fn`` is callable."""
    if not callable(loss_fn):
        raise TypeError(
            f"'loss_fn' must be callable as loss_fn(outputs, targets), "
            f"but got {type(loss_fn).__name__}"
        )


def _check_optimizer(optimizer: Any) -> None:
    """Check ``optimizer`` looks like a ``torch.optim.Optimizer``."""
    if not all(hasattr(optimizer, name) for name in ("param_groups", "zero_grad", "step")):
        raise TypeError(
            f"'optimizer' must be a torch.optim.Optimizer, but got {type(optimizer).__name__}"
        )


def _no_batches() -> ValueError:
    """Return the error for a loader that yielded nothing."""
    return ValueError(
        "'loader' yielded no batches; expected at least one (is the dataset empty, or is "
        "drop_last=True with fewer samples than batch_size?)"
    )


def train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    *,
    metrics: Mapping[str, Any] | None = None,
    on_nonfinite: Literal["raise", "skip", "defer"] = "raise",
    progress: bool = False,
    accumulate: int = 1,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    scheduler: Any = None,
    transform: Transform | None = None,
) -> TrainResult:
    """Train ``model`` for one pass over ``loader``; return the epoch's loss and metrics.

    Per batch, exactly as the hand-written loop: ``optimizer.zero_grad()``, forward,
    loss, ``backward()``, ``optimizer.step()``, in train mode. Every submodule's own
    train/eval flag is restored afterwards. The loss and metrics are averaged over
    samples, so an uneven last batch counts by its size.

    Args:
        model: the model, already on ``device``.
        loader: yields ``(inputs, targets)``; inputs may be a tensor, a tuple/list or a
            dict of tensors, moved to ``device`` and passed as ``model(inputs)``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss (a scalar)
            or per-sample losses (shape ``(batch,)``, from ``reduction="none"``).
        optimizer: the optimizer over the model's parameters.
        device: where the model is and the batches go.
        metrics: name to metric (``ft.accuracy()``, a torchmetrics object, ...).
        on_nonfinite: ``"raise"`` a ``NonFiniteLossError`` before the step, ``"skip"``
            such batches (counted in ``TrainResult.skipped_batches``), or ``"defer"`` the
            check to the device: no ``.item()`` (a host sync on CUDA) per batch. It needs
            a fused optimizer (``fused=True``), which skips every step from the bad batch
            on inside its kernel; the error comes a few batches later, with the model,
            buffers, optimizer and scheduler put back as after the last good batch.
        progress: show a tqdm progress bar (hidden when output is not a terminal).
        accumulate: add up the gradients of this many batches before each step; the
            step's gradient is that of the sample-weighted mean loss over the window, and
            a partial window at the end of the epoch is stepped too.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run forward and loss under
            ``torch.autocast``; None for full precision.
        scaler: a ``torch.amp.GradScaler`` for float16; steps it skips for inf/NaN
            gradients are counted in ``TrainResult.skipped_steps``.
        clip_grad_norm: clip the total gradient norm to this before each step (after
            unscaling); the largest norm before clipping is ``TrainResult.grad_norm``.
        scheduler: an LR scheduler stepped after every optimizer step (warmup,
            OneCycleLR, cosine per step). Step per-epoch schedulers yourself.
        transform: ``transform(inputs, targets) -> (inputs, targets)`` applied to every
            batch on the device before the forward pass, e.g. ``ft.mixup``.

    Returns:
        A frozen ``TrainResult``.

    Example:
        >>> import torch, fntrain as ft
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> result = ft.train_epoch(model, data, torch.nn.functional.cross_entropy, opt, "cpu")
        >>> result.samples, result.steps
        (32, 4)
    """
    resolved = _check_args(model, loader, device)
    _check_loss_fn(loss_fn)
    _check_optimizer(optimizer)
    if on_nonfinite not in ("raise", "skip", "defer"):
        raise ValueError(
            f"'on_nonfinite' must be 'raise', 'skip' or 'defer', but got {on_nonfinite!r}"
        )
    if transform is not None and not callable(transform):
        raise TypeError(f"'transform' must be callable, but got {type(transform).__name__}")
    distributed.warn_if_epoch_not_set(loader)
    options = StepOptions(accumulate, autocast, scaler, clip_grad_norm, scheduler)
    options.check(optimizer, resolved)
    tally = Tally(metric_lib.check(metrics), resolved)
    if on_nonfinite == "defer":
        DeferredCheck.check_usable(optimizer, scaler)
    check: Check = (
        DeferredCheck(model, optimizer, scheduler, resolved)
        if on_nonfinite == "defer"
        else HostCheck(model)
    )
    stepper = Stepper(optimizer, options, resolved, check)
    skipped = 0
    start = time.perf_counter()
    try:
        with mode(model, True), Progress(progress, loader, "train") as bar:
            for index, batch in enumerate(loader):
                stepper.begin_batch(index)
                try:
                    with check.buffers:
                        done = _train_batch(
                            model, loss_fn, batch, index, resolved, transform, stepper, check
                        )
                except NonFiniteLossError:
                    if on_nonfinite == "raise":
                        raise
                    skipped += 1
                    continue
                if done is not None:
                    tally.add(*done)
                    bar.tick(done[1], tally.running_loss)
                if check.stopped:  # the deferred check saw a bad batch
                    break
            else:
                stepper.step()
    except BaseException as error:
        _undo_deferred(check, error)
        raise
    check.finish()  # deferred: one host read, NonFiniteLossError if a batch was bad
    loss, values = tally.finish()  # an all-reduce under DDP: every rank reaches it
    if tally.batches == 0 and skipped == 0:
        raise _no_batches()
    return TrainResult(
        loss=loss,
        metrics=values,
        samples=tally.samples,
        batches=tally.batches,
        steps=stepper.steps,
        seconds=time.perf_counter() - start,
        lr=float(optimizer.param_groups[0]["lr"]),
        skipped_batches=skipped,
        skipped_steps=stepper.skipped_steps,
        grad_norm=stepper.grad_norm(),
    )


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    device: torch.device | str,
    *,
    metrics: Mapping[str, Any] | None = None,
    inference_mode: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Measure ``model``'s loss and metrics over ``loader`` without changing the model.

    Runs in eval mode under ``torch.no_grad()`` (or ``torch.inference_mode()`` with
    ``inference_mode=True``): parameters, buffers such as BatchNorm statistics, and
    ``.grad`` are left bit-identical, and every submodule's own train/eval flag is
    restored afterwards. A non-finite loss is reported, not raised.

    Args:
        model: the model, already on ``device``.
        loader: yields ``(inputs, targets)``, as for ``train_epoch``.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar mean or per-sample losses.
        device: where the model is and the batches go.
        metrics: name to metric (``ft.accuracy()``, a torchmetrics object, ...).
        inference_mode: use ``torch.inference_mode()`` instead of ``torch.no_grad()``.
        progress: show a tqdm progress bar (hidden when output is not a terminal).

    Returns:
        A frozen ``EvalResult``.

    Example:
        >>> import torch, fntrain as ft
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
        >>> model = torch.nn.Linear(4, 3)
        >>> result = ft.evaluate(model, data, torch.nn.functional.cross_entropy, "cpu",
        ...                      metrics={"acc": ft.accuracy()})
        >>> result.samples, 0.0 <= result.metrics["acc"] <= 1.0
        (24, True)
    """
    resolved = _check_args(model, loader, device)
    _check_loss_fn(loss_fn)
    tally = Tally(metric_lib.check(metrics), resolved)
    no_grad = torch.inference_mode() if inference_mode else torch.no_grad()
    start = time.perf_counter()
    with mode(model, False), no_grad, Progress(progress, loader, "eval") as bar:
        for index, batch in enumerate(loader):
            inputs, targets, samples = _prepare(batch, index, resolved)
            if not samples:
                continue
            outputs, loss = _forward(model, loss_fn, inputs, targets, samples, index)
            tally.add(loss, samples, outputs, targets)
            bar.tick(samples, tally.running_loss)
    loss, values = tally.finish()  # an all-reduce under DDP: every rank reaches it
    if tally.batches == 0:
        raise _no_batches()
    return EvalResult(
        loss=loss,
        metrics=values,
        samples=tally.samples,
        batches=tally.batches,
        seconds=time.perf_counter() - start,
    )


def predict(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    *,
    progress: bool = False,
    gather: Literal["main", "all", "none"] = "main",
) -> Predictions:
    """Return ``model``'s outputs over ``loader``, in loader order, on the CPU.

    Runs in eval mode under ``torch.no_grad()`` and changes nothing in the model. The
    loader may yield bare inputs (a tensor or dict), ``(inputs,)`` or
    ``(inputs, targets)``; a tuple or list of two is always read as inputs and targets.

    Args:
        model: the model, already on ``device``.
        loader: yields inputs, ``(inputs,)`` or ``(inputs, targets)``.
        device: where the model is and the inputs go.
        progress: show a tqdm progress bar (hidden when output is not a terminal).
        gather: under torch.distributed, collect every rank's outputs in data set order
            (padding removed) on rank 0 (``"main"``; the other ranks get None outputs and
            targets), on every rank (``"all"``), or keep each rank's own (``"none"``).
            The loader's sampler must be a ``ShardSampler`` or ``DistributedSampler``.

    Returns:
        A frozen ``Predictions``; ``targets`` is None when the loader gave none.

    Example:
        >>> import torch, fntrain as ft
        >>> model = torch.nn.Linear(4, 3)
        >>> preds = ft.predict(model, [torch.randn(5, 4), torch.randn(2, 4)], "cpu")
        >>> preds.outputs.shape, preds.targets
        (torch.Size([7, 3]), None)
    """
    resolved = _check_args(model, loader, device)
    if gather not in ("main", "all", "none"):
        raise ValueError(f"'gather' must be 'main', 'all' or 'none', but got {gather!r}")
    gathering = distributed.active() and gather != "none"
    indices = distributed.sampler_indices(loader) if gathering else []
    cpu = torch.device("cpu")
    outputs: list[Any] = []
    targets: list[Any] = []
    samples = 0
    with mode(model, False), torch.no_grad(), Progress(progress, loader, "predict") as bar:
        for index, batch in enumerate(loader):
            inputs, batch_targets = inputs_and_targets(batch, index)
            if index and (batch_targets is None) != (not targets):
                raise TypeError(
                    f"'loader' must yield targets in every batch or in none, but batch "
                    f"{index} {'has none' if batch_targets is None else 'has targets'} "
                    f"and batch 0 {'has targets' if targets else 'has none'}"
                )
            batch_outputs = model(to_device(inputs, resolved))
            samples += count(batch_outputs, index, "outputs")
            outputs.append(to_device(batch_outputs, cpu))
            if batch_targets is not None:
                targets.append(to_device(batch_targets, cpu))
            bar.tick()
    local = (concat(outputs) if outputs else None, concat(targets) if targets else None)
    if gathering:  # a collective: every rank reaches it, also with no batches
        return Predictions(*distributed.gather_in_order(*local, indices, samples, gather))
    if not outputs:
        raise _no_batches()
    return Predictions(outputs=local[0], targets=local[1], samples=samples)
