"""train_epoch, evaluate and predict: one pass over a loader each, nothing kept between calls."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from fntrain import distributed, sharded
from fntrain import metrics as metric_lib
from fntrain.data import (
    as_device,
    check_lengths,
    check_model_on,
    concat,
    count,
    describe,
    float_dtypes,
    inputs_and_targets,
    pair,
    to_device,
)
from fntrain.progress import Progress
from fntrain.records import EvalResult, NonFiniteLossError, Predictions, Step, TrainResult, reword
from fntrain.restore import BatchGuard, mode
from fntrain.stepping import StepOptions, Stepper
from fntrain.sums import Tally

LossFn = Callable[[Any, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], tuple[Any, Any]]
OnStep = Callable[[Step], object]


def _run(
    model: nn.Module, forward: Forward | None, batch: Any, index: int, device: torch.device
) -> tuple[Any, Any, int]:
    """Move a batch to ``device`` and run the model on it; return outputs, targets, samples.

    Without ``forward`` the batch is ``(inputs, targets)`` and the model is called as
    ``model(inputs)``; a batch whose targets hold no samples is not run at all.
    """
    if forward is not None:
        result = _call(model, lambda: forward(model, to_device(batch, device)), batch, index)
        outputs, targets = pair(result, index, "'forward' must return")
        return outputs, targets, count(outputs, targets, index)
    inputs, targets = pair(batch, index)
    targets = to_device(targets, device)
    if isinstance(targets, torch.Tensor) and targets.dim() and not targets.shape[0]:
        return None, targets, 0
    outputs = _call(model, lambda: model(to_device(inputs, device)), inputs, index)
    check_lengths(inputs, outputs, targets, index)
    return outputs, targets, count(outputs, targets, index)


def _call(model: nn.Module, run: Callable[[], Any], inputs: Any, index: int) -> Any:
    """Return ``run()``; a dtype error gets the batch's and the model's float dtypes added."""
    try:
        return run()
    except RuntimeError as error:
        wanted = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        found = float_dtypes(inputs) - {wanted}
        if wanted is None or not found or "type" not in str(error).lower():
            raise
        raise reword(error, suffix=(
            f" (batch {index} holds {', '.join(map(str, sorted(found, key=str)))} inputs but "
            f"the model's parameters are {wanted}: convert the data, e.g. x.float() or "
            f"torch.from_numpy(x).float(), or the model, e.g. model.to({wanted}))"
        )) from None  # fmt: skip


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


def _check_callable(name: str, value: Any, shape: str, optional: bool = True) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is callable (or None if optional)."""
    if not callable(value) and not (optional and value is None):
        raise TypeError(f"'{name}' must be callable as {shape}, but got {type(value).__name__}")


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
    forward: Forward | None = None,
    on_step: OnStep | None = None,
    on_nonfinite: Literal["raise", "skip"] = "raise",
    progress: bool = False,
    accumulate: int = 1,
    autocast: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    scheduler: Any = None,
) -> TrainResult:
    """Train ``model`` for one pass over ``loader``; return the epoch's loss and metrics.

    Per batch, exactly as the hand-written loop: ``optimizer.zero_grad()``, forward,
    loss, ``backward()``, ``optimizer.step()``, in train mode. Every submodule's own
    train/eval flag is restored afterwards. The loss and metrics are averaged over
    samples, so an uneven last batch counts by its size. Each loss is read on the host
    once (``.item()``), before its backward pass; that is the one host sync per batch.

    Args:
        model: the model, already on ``device``.
        loader: yields ``(inputs, targets)``; inputs may be a tensor, a tuple/list or a
            mapping of tensors, moved to ``device`` and passed as ``model(inputs)``.
            With ``forward``, any batch structure.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss (a scalar)
            or per-sample losses (shape ``(batch,)``, from ``reduction="none"``).
        optimizer: the optimizer over the model's parameters.
        device: where the model is and the batches go.
        metrics: name to metric (``ft.accuracy()``, a torchmetrics object, ...).
        forward: ``forward(model, batch) -> (outputs, targets)``, called with the whole
            batch already on ``device``, for every other call shape: keyword models
            (``model(**batch)``), several inputs, mixup, a teacher's outputs as targets.
            Samples are counted from the targets, or from the outputs when the targets
            hold no tensor with a batch dimension.
        on_step: ``on_step(step)``, called after every optimizer step (and scheduler
            step) with a frozen ``ft.Step``: log every N steps, update an EMA. An
            exception from it ends the epoch with that step fully applied.
        on_nonfinite: ``"raise"`` a ``NonFiniteLossError`` before the step, or ``"skip"``
            such batches (counted in ``TrainResult.skipped_batches``).
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
            The norm is read on the host once per step.
        scheduler: an LR scheduler stepped after every optimizer step (warmup,
            OneCycleLR, cosine per step). Step per-epoch schedulers yourself.

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
    _check_callable("loss_fn", loss_fn, "loss_fn(outputs, targets)", optional=False)
    _check_optimizer(model, optimizer)
    _check_callable("forward", forward, "forward(model, batch) -> (outputs, targets)")
    _check_callable("on_step", on_step, "on_step(step)")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"'on_nonfinite' must be 'raise' or 'skip', but got {on_nonfinite!r}")
    if clip_grad_norm is not None:
        sharded.refuse_fsdp1(model, "the gradient norm clipped by")
    options = StepOptions(accumulate, autocast, scaler, clip_grad_norm, scheduler)
    stepper = Stepper(optimizer, options.check(optimizer, resolved), resolved, on_step is not None)
    tally = Tally(metrics, resolved)
    guard = BatchGuard(model)
    skipped = 0
    together = on_nonfinite == "skip" and distributed.active()  # all ranks skip a batch, or none
    batches = distributed.in_step(loader)  # every rank must step as often
    start = time.perf_counter()
    with mode(model, True), Progress(progress, loader, "train") as bar:
        index = -1
        for index, batch in enumerate(batches):
            stepper.begin_batch()
            with guard:  # an error before the optimizer step puts buffers and metrics back
                with stepper.autocast:
                    outputs, targets, samples = _run(model, forward, batch, index, resolved)
                    if not samples:
                        continue  # an empty batch: no forward, no step
                    loss = _mean_loss(loss_fn(outputs, targets), samples, index)
                stepper.check_loss(loss, index)
                value = loss.item()  # the one host sync per batch
                finite = math.isfinite(value)
                if together:
                    finite = not distributed.any_rank(not finite)
                if not finite:
                    if on_nonfinite == "raise":
                        raise NonFiniteLossError(index, value)
                    guard.restore()
                    skipped += 1
                    continue
                parts = tally.stage(metric_lib.parts(tally.metrics, outputs, targets, guard.undo))
                stepper.backward(loss, value, samples)
                step = stepper.step(index, guard, on_nonfinite) if stepper.full else None
            del outputs, loss  # free this batch's outputs before the next forward
            tally.add(value, samples, parts)  # checked by stage(): cannot fail
            bar.tick(samples, tally.running_loss)
            if step is not None and on_step is not None:
                on_step(step)
        with guard:
            last = stepper.step(index, guard, on_nonfinite)  # a partial window at the end
        if last is not None and on_step is not None:
            on_step(last)
    loss_mean, values = tally.finish()  # an all-reduce under DDP: every rank reaches it
    if tally.batches == 0 and skipped == 0:
        raise _no_batches()
    return TrainResult(
        loss=loss_mean,
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


def _check_optimizer(model: nn.Module, optimizer: Any) -> None:
    """Raise unless ``optimizer`` is an optimizer over (at least some of) the model's parameters."""
    if not all(hasattr(optimizer, name) for name in ("param_groups", "zero_grad", "step")):
        raise TypeError(
            f"'optimizer' must be a torch.optim.Optimizer, but got {type(optimizer).__name__}"
        )
    owned = {id(p) for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in owned for p in params)
    if params and foreign == len(params):
        raise ValueError(
            f"'optimizer' holds none of the model's parameters (it holds {len(params)} others), "
            f"so training would change nothing; build it from model.parameters() after the "
            f"model is created and moved"
        )
    if foreign:
        warnings.warn(
            f"{foreign} of the {len(params)} parameters of 'optimizer' are not the model's; "
            f"they train only if 'loss_fn' or 'forward' uses them (a loss with parameters)",
            UserWarning,
            stacklevel=3,
        )


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn,
    device: torch.device | str,
    *,
    metrics: Mapping[str, Any] | None = None,
    forward: Forward | None = None,
    inference_mode: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Measure ``model``'s loss and metrics over ``loader`` without changing the model.

    Runs in eval mode under ``torch.no_grad()`` (or ``torch.inference_mode()`` with
    ``inference_mode=True``): parameters, buffers such as BatchNorm statistics, and
    ``.grad`` are left bit-identical, and every submodule's own train/eval flag is
    restored afterwards. A non-finite loss is reported, not raised. On an accelerator
    the sums stay on the device until the end: no host sync per batch.

    Args:
        model: the model, already on ``device``.
        loader: yields ``(inputs, targets)``, as for ``train_epoch``.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar mean or per-sample losses.
        device: where the model is and the batches go.
        metrics: name to metric (``ft.accuracy()``, a torchmetrics object, ...).
        forward: ``forward(model, batch) -> (outputs, targets)``, as for ``train_epoch``.
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
    _check_callable("loss_fn", loss_fn, "loss_fn(outputs, targets)", optional=False)
    _check_callable("forward", forward, "forward(model, batch) -> (outputs, targets)")
    tally = Tally(metrics, resolved)
    no_grad = torch.inference_mode() if inference_mode else torch.no_grad()
    start = time.perf_counter()
    batches = distributed.in_step(loader) if sharded.is_sharded(model) else loader
    with mode(model, False), no_grad, Progress(progress, loader, "eval") as bar:
        for index, batch in enumerate(batches):
            outputs, targets, samples = _run(model, forward, batch, index, resolved)
            if not samples:
                continue
            loss = _mean_loss(loss_fn(outputs, targets), samples, index)
            tally.add(loss, samples, tally.stage(metric_lib.parts(tally.metrics, outputs, targets)))
            bar.tick(samples, tally.running_loss)
    loss_mean, values = tally.finish()  # an all-reduce under DDP: every rank reaches it
    if tally.batches == 0:
        raise _no_batches()
    return EvalResult(
        loss=loss_mean,
        metrics=values,
        samples=tally.samples,
        batches=tally.batches,
        seconds=time.perf_counter() - start,
    )


def _predict_batch(
    model: nn.Module, forward: Forward | None, batch: Any, index: int, device: torch.device
) -> tuple[Any, Any]:
    """Return one prediction batch's outputs and targets (None when it has none)."""
    if forward is None:
        inputs, targets = inputs_and_targets(batch, index)
        return _call(model, lambda: model(to_device(inputs, device)), inputs, index), targets
    result = _call(model, lambda: forward(model, to_device(batch, device)), batch, index)
    return pair(result, index, "'forward' must return")


def predict(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    *,
    forward: Forward | None = None,
    progress: bool = False,
    gather: Literal["main", "all", "none"] = "main",
) -> Predictions:
    """Return ``model``'s outputs over ``loader``, in loader order, on the CPU.

    Runs in eval mode under ``torch.no_grad()`` and changes nothing in the model. The
    loader may yield bare inputs (a tensor or mapping), ``(inputs,)`` or
    ``(inputs, targets)``; a tuple or list of two is always read as inputs and targets.

    Args:
        model: the model, already on ``device``.
        loader: yields inputs, ``(inputs,)`` or ``(inputs, targets)``.
        device: where the model is and the inputs go.
        forward: ``forward(model, batch) -> (outputs, targets or None)``, called with the
            whole batch on ``device``, for any other batch or call shape.
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
    _check_callable("forward", forward, "forward(model, batch) -> (outputs, targets)")
    if gather not in ("main", "all", "none"):
        raise ValueError(f"'gather' must be 'main', 'all' or 'none', but got {gather!r}")
    gathering = distributed.active() and gather != "none"
    indices = distributed.sampler_indices(loader) if gathering else []
    cpu = torch.device("cpu")
    outputs: list[Any] = []
    targets: list[Any] = []
    samples = 0
    batches = distributed.in_step(loader) if sharded.is_sharded(model) else loader
    with mode(model, False), torch.no_grad(), Progress(progress, loader, "predict") as bar:
        for index, batch in enumerate(batches):
            batch_outputs, batch_targets = _predict_batch(model, forward, batch, index, resolved)
            if index and (batch_targets is None) != (not targets):
                raise TypeError(
                    f"'loader' must yield targets in every batch or in none, but batch "
                    f"{index} {'has none' if batch_targets is None else 'has targets'} "
                    f"and batch 0 {'has targets' if targets else 'has none'}"
                )
            samples += count(batch_outputs, None, index)
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
