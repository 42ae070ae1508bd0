"""train_epoch, evaluate and predict: one pass over a loader each, nothing kept between calls."""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from fntrain import data, distributed, sharded, stepping, sums
from fntrain import metrics as metric_lib
from fntrain.progress import Progress
from fntrain.records import (
    Checkpoint,
    EvalResult,
    NonFiniteLossError,
    Predictions,
    Step,
    TrainResult,
    reword,
)
from fntrain.restore import BatchGuard, evaluating, mode
from fntrain.stepping import EMPTY, VERSION, StepOptions, Stepper, warn_if_built_for_epochs
from fntrain.stepping import amp as autocast_context

LossFn = Callable[[Any, Any], torch.Tensor]
Forward = Callable[[nn.Module, Any], tuple[Any, Any]]
OnStep = Callable[[Step], object]
_ALL_RUN = "under torch.distributed every rank runs every batch: drop empty ones in the loader"
_APPLIED = (
    " (raised after optimizer.step() of batch {}: that batch's update of the weights, buffers "
    "and optimizer state stays applied)"
)
_RETURNS = "'forward' must return"
_PAIRS = (tuple, list)
_sums = functools.partial(tuple.__new__, sums.Sums)  # a Sums built in C, not in Python
_NO_BATCHES = (
    "'loader' yielded no batches; expected at least one (is the dataset empty, or is "
    "drop_last=True with fewer samples than batch_size?)"
)


def _run(
    model: nn.Module, forward: Forward | None, batch: Any, index: int, device: torch.device
) -> tuple[Any, Any, int]:
    """Run one batch on ``device``; return outputs, targets, samples (0: empty targets, not run)."""
    if forward is not None:
        outputs, targets = _outputs(model, forward, batch, index, device)
        return outputs, targets, data.count(outputs, targets, index)
    if not isinstance(batch, _PAIRS) or len(batch) != 2:
        data.pair(batch, index)  # raises, saying what the batch is
    inputs, targets = batch
    samples: int | None
    if isinstance(targets, torch.Tensor) and targets.device == device and targets.ndim:
        samples = targets.shape[0]  # the common case, at the cost of three attributes
    else:
        targets = data.to_device(targets, device)
        samples = data.batch_size(targets)  # None: targets without a batch dimension
    if samples == 0:
        return None, targets, 0
    outputs = _call(model, None, inputs, index, device)
    if samples is None:
        return outputs, targets, data.count(outputs, targets, index)
    odd = isinstance(outputs, torch.Tensor) and outputs.ndim and outputs.shape[0] != samples
    if odd and isinstance(inputs, torch.Tensor) and inputs.shape[:1] == outputs.shape[:1]:
        raise ValueError(  # the model kept the inputs' length, not the targets'
            f"the inputs and outputs have {inputs.shape[0]} samples but the targets "
            f"{samples} in batch {index}; 'loader' must yield inputs and targets of one length"
        )
    return outputs, targets, samples


def _call(
    model: nn.Module, forward: Forward | None, given: Any, index: int, device: torch.device
) -> Any:
    """Return ``model(inputs)`` or ``forward(model, batch)``; errors get what explains them."""
    if not isinstance(given, torch.Tensor) or given.device != device:
        given = data.to_device(given, device)
    try:
        return model(given) if forward is None else forward(model, given)
    except (RuntimeError, AttributeError, TypeError) as error:
        if hint := _hint(error, model, given, index, forward):
            reword(error, suffix=hint)
        raise


def _hint(
    error: Exception, model: nn.Module, given: Any, index: int, forward: Forward | None
) -> str | None:
    """Say why a batch failed in the model: a mapping it cannot take, or a dtype mismatch."""
    if forward is None and isinstance(given, Mapping) and not isinstance(error, RuntimeError):
        return (
            f" (batch {index} is {data.describe(given)}, passed as model(batch); for "
            f"model(**batch) pass forward=lambda model, batch: (model(**batch), batch['labels']))"
        )
    if not isinstance(error, RuntimeError):
        return None
    wanted = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    dtypes: set[torch.dtype] = set()

    def note(tensor: torch.Tensor) -> torch.Tensor:
        dtypes.add(tensor.dtype)
        return tensor

    data.map_tensors(note, given)
    found = {dtype for dtype in dtypes if dtype.is_floating_point} - {wanted}
    if wanted is None or not found or "type" not in str(error).lower():
        return None
    return (
        f" (batch {index} holds {', '.join(map(str, sorted(found, key=str)))} inputs but "
        f"the model's parameters are {wanted}: convert the data, e.g. x.float() or "
        f"torch.from_numpy(x).float(), or the model, e.g. model.to({wanted}))"
    )


def _loss(loss: Any, samples: int, index: int) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Return a batch's mean loss, its sum (None: per sample) and the items it averages.

    For what is not a scalar mean, which the loops take as it is.
    """
    if isinstance(loss, tuple) and len(loss) == 2:  # (sum, count): a per-item mean
        total, items = loss
        number = isinstance(items, int | float) and not isinstance(items, bool)
        summed = isinstance(total, torch.Tensor) and total.is_floating_point() and not total.dim()
        if not summed or not (number or (isinstance(items, torch.Tensor) and items.numel() == 1)):
            raise TypeError(
                f"'loss_fn' returned (sum, count) for batch {index} as ({data.describe(total)}, "
                f"{data.describe(items)}); expected a floating-point scalar tensor and a number "
                f"or one-element tensor"
            )
        return total / items, total, items
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError(
            f"'loss_fn' must return a floating-point tensor or (sum, count), but returned "
            f"{data.describe(loss)} for batch {index}"
        )
    if loss.shape == (samples,):
        return loss.mean(), None, samples
    raise ValueError(
        f"'loss_fn' must return a scalar, a per-sample vector of shape ({samples},) or "
        f"(sum, count), but returned a tensor of shape {tuple(loss.shape)} for batch {index}"
    )


def _check_args(model: Any, loader: Any, device: Any, forward: Any) -> torch.device:
    """Check the arguments every function shares; return the resolved device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}")
    if not isinstance(loader, Iterable):
        kind = type(loader).__name__
        raise TypeError(f"'loader' must be an iterable of batches (a DataLoader), but got {kind}")
    _check_callable("forward", forward, "forward(model, batch) -> (outputs, targets)")
    resolved = data.as_device(device)
    data.check_model_on(model, resolved)
    return resolved


def _check_callable(name: str, value: Any, shape: str, optional: bool = True) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is callable (or None if optional)."""
    if not callable(value) and not (optional and value is None):
        raise TypeError(f"'{name}' must be callable as {shape}, but got {type(value).__name__}")


def _finish(
    totals: sums.Sums, metrics: Mapping[str, Any], start: float, empty_is_fine: bool = False
) -> dict[str, Any]:
    """End a pass: return the record fields all passes share; raise if it had no batches."""
    loss, values, totals = sums.finish(totals, metrics)  # an all-reduce: every rank reaches it
    if totals.batches == 0 and not empty_is_fine:
        raise ValueError(_NO_BATCHES)
    seconds, samples, batches = time.perf_counter() - start, totals.samples, totals.batches
    return dict(loss=loss, metrics=values, samples=samples, batches=batches, seconds=seconds)


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
    scheduler: LRScheduler | None = None,
    max_steps: int | None = None,
    resume: Checkpoint | None = None,
    keep_eval: bool = False,
) -> TrainResult:
    """Train ``model`` for one pass over ``loader``; return the epoch's loss and metrics.

    Per batch, as the hand-written loop: ``optimizer.zero_grad()``, forward, loss, ``backward()``,
    ``optimizer.step()``, in train mode; every submodule's train/eval flag is restored afterwards.
    Loss and metrics are averaged over samples (an uneven last batch counts by its size), or
    over items when ``loss_fn`` counts them. Each loss is read on the host once (``.item()``)
    before its backward: one host sync per batch.

    Args:
        model: the model, already on ``device``.
        loader: yields ``(inputs, targets)``; inputs (a tensor, tuple/list or mapping of tensors)
            are moved to ``device`` and passed as ``model(inputs)``. With ``forward``, any batch.
        loss_fn: ``loss_fn(outputs, targets)``: a scalar mean loss, per-sample losses (batch,),
            or ``(sum, count)``: the loss summed over the items it covers (tokens that are not
            padding) and their number, so that accumulation and DDP average over all items.
        optimizer: the optimizer over the model's parameters.
        device: where the model is and the batches go.
        metrics: name to metric (``ft.accuracy()``, a torchmetrics object, ...).
        forward: ``forward(model, batch) -> (outputs, targets)`` on the whole batch on ``device``,
            for other call shapes (``model(**batch)``, several inputs, mixup, distillation).
            Samples are counted from the targets, or the outputs if no target has a batch dim.
        on_step: ``on_step(step)`` with a frozen ``ft.Step`` after every optimizer (and scheduler)
            step, to log, update an EMA, evaluate or ``save_checkpoint(..., step=step)``; an
            exception from it propagates out of train_epoch, that step applied.
        on_nonfinite: ``"raise"`` a ``NonFiniteLossError`` before the step, or ``"skip"`` the batch.
        progress: show progress on rank 0: a tqdm bar (terminal, notebook) with the running
            loss and fntrain metrics, kept with all final ones; else plain lines on stderr.
        accumulate: add up the gradients of this many batches per step (the gradient of their
            mean loss over samples or items); a partial window at the end is stepped too.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run forward and loss under autocast.
        scaler: a ``torch.amp.GradScaler`` for float16 (its skipped steps: ``.skipped_steps``).
        clip_grad_norm: clip the total gradient norm (after unscaling) to this before each step,
            read on the host once per step; the largest before clipping is ``.grad_norm``.
        scheduler: an LR scheduler stepped after every optimizer step (warmup, OneCycleLR,
            cosine over all steps); one built in epochs that runs out in the first (T_max=
            epochs) warns. Step per-epoch schedulers yourself.
        max_steps: end the pass after this many optimizer steps (train by steps).
        resume: a ``Checkpoint`` saved from ``on_step`` with ``step=step``: continue its pass
            after its last batch, in the same data order and RNG stream (skipped batches are
            not loaded from a DataLoader or TensorLoader; other iterables are drawn and
            dropped; random transforms in DataLoader workers and persistent workers' seeds
            are not reproduced); one from an epoch boundary is ignored.
        keep_eval: leave every module's train/eval flag as it is instead of ``model.train()``,
            so that submodules put in eval stay in eval (frozen BatchNorm statistics).

    Returns:
        A frozen ``TrainResult`` of what this call ran.

    Example:
        >>> import torch, fntrain as ft
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> result = ft.train_epoch(model, data, torch.nn.functional.cross_entropy, opt, "cpu")
        >>> result.samples, result.steps
        (32, 4)
    """
    resolved = _check_args(model, loader, device, forward)
    _check_callable("loss_fn", loss_fn, "loss_fn(outputs, targets)", optional=False)
    sharded.reshard(model)  # the parameters the optimizer holds, for the checks below
    params = _check_optimizer(model, optimizer)  # the model's order first, as clip_grad_norm_
    _check_callable("on_step", on_step, "on_step(step)")
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"'on_nonfinite' must be 'raise' or 'skip', but got {on_nonfinite!r}")
    if max_steps is not None and (type(max_steps) is not int or max_steps < 1):
        raise ValueError(f"'max_steps' must be None or an int >= 1, but got {max_steps!r}")
    position = _position(resume, accumulate)
    if clip_grad_norm is not None:
        sharded.refuse_fsdp1(model, "the gradient norm clipped by")
    options = StepOptions(accumulate, autocast, scaler, clip_grad_norm, scheduler, on_nonfinite)
    warn_if_built_for_epochs(scheduler, loader, accumulate)
    metrics = metric_lib.prepare(metrics, resolved)
    together = on_nonfinite == "skip" and distributed.active()  # all ranks skip it, or none
    source = distributed.in_step(loader)  # every rank must step as often
    if position is None:
        first, batches = 0, source
        record = (0, data.origin(loader, accumulate)) if on_step else None
    else:
        first, batches = position["batch_index"] + 1, data.resumed(loader, source, position)
        record = (position["index"] + 1, position["start"]) if on_step else None
    stepper = Stepper(optimizer, options, resolved, model, params, record)
    length = None  # under DDP with accumulation: tells a partial last window
    with contextlib.suppress(TypeError):  # a DataLoader of an IterableDataset may have none
        length = len(loader) if stepper.ddp is not None and isinstance(loader, Sized) else None
    totals, window, skipped, index, start = sums.Sums(), EMPTY, 0, first - 1, time.perf_counter()
    simple, cleared, step = stepper.simple, False, None  # simple: backward, step as by hand
    run, score = _run, loss_fn
    if stepper.autocast is not None:  # forward and loss under autocast; backward and step not
        run, score = stepper.autocast(_run), stepper.autocast(loss_fn)
    with mode(model, True, keep_eval), Progress(progress, loader, "train") as bar, stepper:
        guard = BatchGuard(model)  # the buffers of the modules in train mode
        for index, batch in enumerate(batches, first):
            if not window.batches:
                optimizer.zero_grad()
                if index == first:  # once: zero_grad() sets .grad to None, or zeroes it
                    cleared = all(p.grad is None for p in params)  # then set: a backward
            full = window.batches + 1 == accumulate
            if length is not None:  # DDP with accumulation: sync the window's last backward
                stepper.sync(full or index + 1 == length)
            guard.save()
            version = None  # the weights' version before the step: tells whether it changed them
            try:
                outputs, targets, samples = run(model, forward, batch, index, resolved)
                if not samples:  # an empty batch: no step, buffers as before
                    if stepper.lockstep:  # the other ranks would step
                        raise ValueError(f"batch {index} is empty on this rank; {_ALL_RUN}")
                    guard.restore()  # (forward= ran the model on it)
                    continue
                loss, total = score(outputs, targets), None
                if not isinstance(loss, Tensor) or loss.ndim or not loss.dtype.is_floating_point:
                    loss, total, items = _loss(loss, samples, index)  # per sample, (sum, count)
                if index == first and cleared and any(p.grad is not None for p in params):
                    raise ValueError(  # once: loss_fn (or forward) called backward() itself
                        f"'loss_fn' called backward() itself for batch {index} (or 'forward' did): "
                        f"the gradients are already set, and train_epoch's own backward() would "
                        f"double them; return the loss without calling backward()"
                    )
                value: float
                weight: float  # what the loss averages over: samples, or the items counted
                if total is None:
                    value, weight = loss.item(), samples  # the one host sync per batch
                else:  # (sum, count): the mean over the items counted
                    weight = items.item() if isinstance(items, Tensor) else items
                    value = total.item() / weight if weight else total.item()
                bad = not math.isfinite(value)
                if distributed.agree(bad)[0] if together else bad:
                    if on_nonfinite == "raise":
                        raise NonFiniteLossError(index, value)
                    guard.restore()
                    skipped += 1
                    del outputs, targets, loss, total  # a graph not back-propagated: free it now
                    continue
                parts = totals.parts  # the pass's parts with this batch's, checked to fit
                if metrics:
                    with torch.no_grad():
                        parts = metric_lib.added(parts, metrics, outputs, targets, guard.undo)
                del outputs, targets  # the graph keeps what backward needs; backward frees it
                if simple and total is None:  # a mean loss, a step per batch: as by hand
                    if not loss.requires_grad:
                        stepping.refuse_detached(index)
                    loss.backward()
                    if on_step:
                        window = stepping.Window(1, samples, weight, value * weight)
                else:
                    window = stepper.backward(window, loss, total, value, samples, weight, index)
                if full:
                    version = sum(map(VERSION, params))
                    step = stepper.step(window, index)
            except BaseException as error:  # Ctrl-C too: the weights tell whether it stepped
                _failed(error, index, guard, stepper, version)
                raise
            totals = _sums((  # the batch's sums join the pass's: nothing can fail here
                totals.loss + value * weight, totals.items + weight, totals.samples + samples,
                totals.batches + 1, parts,
            ))  # fmt: skip
            if bar.on:
                bar.tick(samples, functools.partial(sums.running, totals, metrics))
            if full:
                window = EMPTY
                if step is not None:
                    on_step(step)  # type: ignore[misc]  # a Step only when on_step is given
                if stepper.steps == max_steps:
                    break
        if window.batches:  # a partial window at the end
            version = stepper.version()
            try:
                step = stepper.step(window, index)
            except BaseException as error:
                _failed(error, index, guard, stepper, version)
                raise
            if step is not None:
                on_step(step)  # type: ignore[misc]
        result = _finish(totals, metrics, start, bool(skipped) or position is not None)
        bar.finish(result)
    return TrainResult(
        **result,
        steps=stepper.steps,
        lr=float(optimizer.param_groups[0]["lr"]),
        skipped_batches=skipped,
        skipped_steps=stepper.skipped_steps,
        grad_norm=None if clip_grad_norm is None else stepper.largest_norm,
    )


def _failed(
    error: BaseException, index: int, guard: BatchGuard, stepper: Stepper, version: int | None
) -> None:
    """Put a failed batch's buffers back, or say in its error that its step changed weights."""
    if version is not None and stepper.version() != version:
        reword(error, suffix=_APPLIED.format(index))
    else:
        guard.restore()


def _position(resume: Any, accumulate: int) -> dict[str, Any] | None:
    """Return where ``resume`` continues its pass (None: at an epoch boundary, a full pass)."""
    if not isinstance(resume, Checkpoint | None):
        kind = type(resume).__name__
        raise TypeError(f"'resume' must be a Checkpoint from ft.load_checkpoint, but got {kind}")
    position = None if resume is None else resume.position
    if position is not None and position["start"]["accumulate"] != accumulate:
        raise ValueError(
            f"'accumulate' is {accumulate!r} but 'resume' was saved with accumulate="
            f"{position['start']['accumulate']}; resume with the same window"
        )
    return position


def _check_optimizer(model: nn.Module, optimizer: Any) -> list[nn.Parameter]:
    """Return the optimizer's parameters, the model's first in its order; raise if none is."""
    if not all(hasattr(optimizer, name) for name in ("param_groups", "zero_grad", "step")):
        kind = type(optimizer).__name__
        raise TypeError(f"'optimizer' must be a torch.optim.Optimizer, but got {kind}")
    held = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    owned = {id(p): p for p in model.parameters() if id(p) in held}
    if held and not owned:
        raise ValueError(
            f"'optimizer' holds none of the model's parameters (it holds {len(held)} others), "
            f"so training would change nothing; build it from model.parameters() after the "
            f"model is created and moved"
        )
    if foreign := len(held) - len(owned):
        warnings.warn(
            f"{foreign} of the {len(held)} parameters of 'optimizer' are not the model's; "
            f"they train only if 'loss_fn' or 'forward' uses them (a loss with parameters)",
            stacklevel=3,
        )
    return [*owned.values(), *(p for i, p in held.items() if i not in owned)]


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
    autocast: torch.dtype | None = None,
) -> EvalResult:
    """Measure ``model``'s loss and metrics over ``loader`` without changing the model.

    In eval mode under ``torch.no_grad()`` (or ``torch.inference_mode()``): parameters, buffers
    (BatchNorm statistics) and ``.grad`` stay bit-identical, every module's train/eval flag is
    restored, a non-finite loss is reported, not raised, and no host sync happens per batch.

    Args:
        model: the model, already on ``device``.
        loader: yields ``(inputs, targets)``, as for ``train_epoch``.
        loss_fn: ``loss_fn(outputs, targets)``, a scalar mean or per-sample losses.
        device: where the model is and the batches go.
        metrics: name to metric (``ft.accuracy()``, a torchmetrics object, ...).
        forward: ``forward(model, batch) -> (outputs, targets)``, as for ``train_epoch``.
        inference_mode: use ``torch.inference_mode()`` instead of ``torch.no_grad()``.
        progress: show progress on rank 0, as for ``train_epoch``.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run forward and loss under autocast,
            as ``train_epoch`` does (not inherited from it: pass the same dtype).

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
    resolved = _check_args(model, loader, device, forward)
    _check_callable("loss_fn", loss_fn, "loss_fn(outputs, targets)", optional=False)
    metrics, totals = metric_lib.prepare(metrics, resolved), sums.Sums()
    start = time.perf_counter()
    with Progress(progress, loader, "eval") as bar:
        with _inference(model, resolved, autocast, inference_mode), distributed.told():
            for index, batch in enumerate(_in_step(model, loader)):
                outputs, targets, samples = _run(model, forward, batch, index, resolved)
                if not samples:
                    continue
                loss, total, items = loss_fn(outputs, targets), None, samples
                if not isinstance(loss, Tensor) or loss.ndim or not loss.dtype.is_floating_point:
                    loss, total, items = _loss(loss, samples, index)  # per sample, (sum, count)
                parts = totals.parts  # the pass's parts with this batch's
                if metrics:
                    parts = metric_lib.added(parts, metrics, outputs, targets)
                if total is None:  # a mean over the samples (items: the samples)
                    loss_sum = sums.add_loss(totals.loss, loss, samples)
                else:  # (sum, count): the count may be a device tensor
                    loss_sum = sums.add_loss(totals.loss, total, 1)
                    items = items.detach() if isinstance(items, torch.Tensor) else items
                totals = _sums((  # the batch's sums join the pass's
                    loss_sum, totals.items + items, totals.samples + samples, totals.batches + 1,
                    parts,
                ))  # fmt: skip
                if bar.on:
                    bar.tick(samples, functools.partial(sums.running, totals, metrics))
        result = _finish(totals, metrics, start)  # outside no_grad: tensor metrics are ordinary
        bar.finish(result)
    return EvalResult(**result)


@contextlib.contextmanager
def _inference(
    model: nn.Module, device: torch.device, autocast: Any, inference_mode: bool = False
) -> Iterator[None]:
    """Run evaluate's and predict's batches: eval mode, no_grad (or inference_mode), autocast."""
    amp = autocast_context(autocast, device) or contextlib.nullcontext()
    with evaluating(model), torch.inference_mode() if inference_mode else torch.no_grad(), amp:
        yield


def _in_step(model: nn.Module, loader: Iterable[Any]) -> Iterable[Any]:
    """Return ``loader``, checked to run in step on every rank if ``model`` is sharded."""
    return distributed.in_step(loader) if sharded.is_sharded(model) else loader


def _outputs(
    model: nn.Module, forward: Forward | None, batch: Any, index: int, device: torch.device
) -> tuple[Any, Any]:
    """Return a batch's outputs and targets (None when a prediction batch has none)."""
    if forward is None:
        inputs, targets = data.inputs_and_targets(batch, index)
        return _call(model, None, inputs, index, device), targets
    outputs, targets = data.pair(_call(model, forward, batch, index, device), index, _RETURNS)
    return outputs, targets


def predict(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    *,
    forward: Forward | None = None,
    progress: bool = False,
    gather: Literal["main", "all", "none"] = "main",
    autocast: torch.dtype | None = None,
) -> Predictions:
    """Return ``model``'s outputs over ``loader``, in loader order, on the CPU.

    Runs in eval mode under ``torch.no_grad()`` and changes nothing in the model. The loader may
    yield bare inputs (a tensor or mapping), ``(inputs,)`` or ``(inputs, targets)``; a tuple or
    list of two is always read as inputs and targets.

    Args:
        model: the model, already on ``device``.
        loader: yields inputs, ``(inputs,)`` or ``(inputs, targets)``.
        device: where the model is and the inputs go.
        forward: ``forward(model, batch) -> (outputs, targets or None)``, as for ``train_epoch``.
        progress: show progress on rank 0, as for ``train_epoch``.
        gather: under torch.distributed, collect every rank's outputs in data set order
            (padding removed) on rank 0 (``"main"``; the other ranks get None outputs and
            targets), on every rank (``"all"``), or keep each rank's own (``"none"``).
            The loader's sampler must be a ``ShardSampler`` or ``DistributedSampler``.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run forward under autocast.

    Returns:
        A frozen ``Predictions``; ``targets`` is None when the loader gave none.

    Example:
        >>> import torch, fntrain as ft
        >>> model = torch.nn.Linear(4, 3)
        >>> preds = ft.predict(model, [torch.randn(5, 4), torch.randn(2, 4)], "cpu")
        >>> preds.outputs.shape, preds.targets
        (torch.Size([7, 3]), None)
    """
    resolved = _check_args(model, loader, device, forward)
    if gather not in ("main", "all", "none"):
        raise ValueError(f"'gather' must be 'main', 'all' or 'none', but got {gather!r}")
    gathering = distributed.active() and gather != "none"
    indices = distributed.sampler_indices(loader) if gathering else []
    outputs, targets, cpu, samples = list[Any](), list[Any](), torch.device("cpu"), 0
    with _inference(model, resolved, autocast), Progress(progress, loader, "predict") as bar:
        for index, batch in enumerate(_in_step(model, loader)):
            batch_outputs, batch_targets = _outputs(model, forward, batch, index, resolved)
            if index and (batch_targets is None) != (not targets):
                raise TypeError(
                    f"'loader' must yield targets in every batch or in none, but batch "
                    f"{index} {'has none' if batch_targets is None else 'has targets'} "
                    f"and batch 0 {'has targets' if targets else 'has none'}"
                )
            counted = data.count(batch_outputs, None, index)
            samples += counted
            outputs.append(data.to_device(batch_outputs, cpu))
            if batch_targets is not None:
                targets.append(data.to_device(batch_targets, cpu))
            bar.tick(counted)
        bar.finish({"samples": samples})
    local = (data.concat(outputs) if outputs else None, data.concat(targets) if targets else None)
    if gathering:  # a collective: every rank reaches it, also with no batches
        return Predictions(*distributed.gather_in_order(*local, indices, samples, gather))
    if not outputs:
        raise ValueError(_NO_BATCHES)
    return Predictions(outputs=local[0], targets=local[1], samples=samples)
