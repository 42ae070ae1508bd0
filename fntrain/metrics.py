"""Metrics as summable state (see :class:`Metric`): built-ins, and torchmetrics objects as is."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any

import attrs
import torch

from fntrain.records import MetricValue, reword

Part = torch.Tensor | int | float
_REFUSALS = (
    "{n} target(s) are not class indices in [0, number of classes); pass ignore_index= "
    "for a label the loss ignores",
    "{n} target row(s) hold several classes (multi-label); use "
    "torchmetrics.classification.MultilabelAccuracy",
    "{n} target(s) are real values, neither classes nor 0/1 labels (regression?); use "
    "torchmetrics.MeanAbsoluteError or MeanSquaredError, or give the model one output per class",
)
_CLEAN = (0, 0, 0)
_SEQUENCES = (tuple, list)  # no target that cannot be judged
_INDICES = (torch.int64, torch.int32)  # what index_select takes
# classes -> a zero-stride tensor of that length: index_select into it checks a range
_slots = lru_cache(maxsize=64)(lambda classes: torch.zeros(1, dtype=torch.uint8).expand(classes))


@attrs.frozen
class Metric:
    """A metric whose per-batch states add up.

    Attributes:
        state: ``(outputs, targets) -> tuple (or list) of parts`` for one batch; a part is a
            tensor (of any fixed shape) or a number, and each part is summed over batches.
        compute: ``(summed parts as CPU tensors) -> value``.

    Example:
        >>> import torch, fntrain as ft
        >>> mse = ft.Metric(
        ...     state=lambda out, y: ((out - y).pow(2).sum(), y.numel()),
        ...     compute=lambda total: float(total[0] / total[1]),
        ... )
        >>> parts = mse.state(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        >>> mse.compute(tuple(torch.as_tensor(p) for p in parts))
        2.0
    """

    state: Callable[[Any, Any], tuple[Part, ...] | list[Part]]
    compute: Callable[[tuple[torch.Tensor, ...]], MetricValue]


def _refuse(name: str, bad: tuple[Part, ...]) -> None:
    """Raise ValueError for the first kind of target in ``bad`` that ``name`` cannot judge."""
    for count, message in zip(bad, _REFUSALS, strict=False):  # none when checked at once
        if int(count):
            raise ValueError(f"{name} cannot judge {message.format(n=int(count))}")


def _plainly_in_range(targets: torch.Tensor, classes: int) -> bool:
    """Tell whether 1-D int64/int32 CPU targets all lie in [0, classes), at one index's cost."""
    if not targets.is_cpu or targets.dtype not in _INDICES:
        return False
    try:  # torch checks every index in C, with no reduction and no host sync
        _slots(classes).index_select(0, targets)
    except IndexError:
        return False
    return True


def _judge(
    outputs: torch.Tensor, targets: torch.Tensor, name: str, threshold: float, k: int = 1
) -> tuple[torch.Tensor, tuple[Part, Part, Part]]:
    """Return per-position hits and counts of targets ``name`` cannot judge (see _REFUSALS)."""
    if outputs.dim() == 1 or outputs.shape[1] == 1:
        if k > 1 or name.startswith("top_k"):
            raise ValueError(f"{name} needs class scores in dim 1, but got one output column")
        labels = targets.reshape(outputs.shape)
        return (outputs > threshold) == (labels == 1), (0, 0, ((labels != 0) & (labels != 1)).sum())
    classes = outputs.shape[1]
    if targets.shape == outputs.shape:  # one value per class: probabilities or multi-hot
        inside = ((targets >= 0) & (targets <= 1)).all(dim=1)
        probability = inside & ((targets.sum(dim=1) - 1).abs() <= 1e-3)
        multi_hot = ((targets == 0) | (targets == 1)).all(dim=1) & ~probability
        bad: tuple[Part, Part, Part] = (0, multi_hot.sum(), (~probability & ~multi_hot).sum())
        labels = targets.argmax(dim=1)
    elif _plainly_in_range(targets.reshape(-1), classes):  # on the CPU: one index
        bad, labels = _CLEAN, targets
    else:
        outside = (targets < 0) | (targets >= classes)
        if targets.is_floating_point():
            outside |= targets != targets.round()
        bad = (outside.sum(), 0, 0)
        labels = targets.long().clamp(0, classes - 1)
    if k == 1:
        return outputs.argmax(dim=1) == labels, bad
    if classes < k:
        raise ValueError(f"{name}: 'k' is {k} but the outputs have only {classes} classes")
    return (outputs.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1), bad


def _classification(name: str, threshold: float, ignore_index: int | None, k: int) -> Metric:
    """Return the Metric ``name``: the fraction of hits over the targets that count."""
    plain = ignore_index is None and k == 1

    def state(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[Part, ...]:
        shape = outputs.shape if isinstance(outputs, torch.Tensor) else ()  # (N, C) scores?
        scores = plain and len(shape) == 2 and shape[1] > 1 and isinstance(targets, torch.Tensor)
        if scores and targets.shape == shape[:1] and _plainly_in_range(targets, shape[1]):
            return (outputs.argmax(1) == targets).sum().item(), shape[0]  # all on the CPU
        if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"{name} needs the outputs as a tensor of class scores and the targets as a "
                f"tensor, but got {type(outputs).__name__} and {type(targets).__name__}; for a "
                f"model with several outputs, write an ft.Metric whose state picks the logits"
            )
        dense = outputs.shape[:1] + outputs.shape[2:]
        if outputs.dim() == 0 or targets.shape not in (outputs.shape, dense):
            raise ValueError(
                f"{name} expects targets of shape {tuple(dense)} (class indices) or "
                f"{tuple(outputs.shape)} (one per output) for outputs of shape "
                f"{tuple(outputs.shape)}, but got targets of shape {tuple(targets.shape)}"
            )
        if ignore_index is None:
            hits, bad = _judge(outputs, targets, name, threshold, k)
            counted: Part = hits.numel()
        else:  # ignored targets are judged as 0, then stop counting
            keep = targets != ignore_index
            hits, bad = _judge(outputs, targets.masked_fill(~keep, 0), name, threshold, k)
            keep = keep.reshape(hits.shape) if keep.numel() == hits.numel() else keep.all(dim=1)
            hits, counted = hits & keep, keep.sum()
        if bad is not _CLEAN:
            if any(isinstance(b, torch.Tensor) and not b.is_cpu for b in bad):
                return (hits.sum(), counted, *bad)  # on a device: counted, refused by compute
            _refuse(name, bad)  # on the host: no sync, so refuse at once
        return hits.sum(), counted

    def compute(total: tuple[torch.Tensor, ...]) -> float:
        _refuse(name, total[2:])
        return float(total[0]) / float(total[1]) if total[1] else float("nan")

    return Metric(state=state, compute=compute)


def accuracy(threshold: float = 0.0, ignore_index: int | None = None) -> Metric:
    """Return the fraction of predictions that are right: top class, or score above a threshold.

    With class scores in dim 1, targets are class indices (any dense shape) or probability
    rows (by their argmax); with one output column or 1-D outputs, a score above ``threshold``
    predicts 1 (0.0 for logits). Targets it cannot judge (regression values, multi-hot rows,
    indices out of range) are refused. With ``ignore_index``, the fraction is per item (token).

    Example:
        >>> import torch, fntrain as ft
        >>> ft.accuracy().state(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))[:2]
        (1, 2)
        >>> ft.accuracy().state(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]))[:2]
        (tensor(1), 2)
    """
    finite = isinstance(threshold, int | float) and abs(threshold) < float("inf")  # nan: not
    if isinstance(threshold, bool) or not finite:
        raise ValueError(f"'threshold' must be a finite number, but got {threshold!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | None):
        raise TypeError(f"'ignore_index' must be an int or None, but got {ignore_index!r}")
    return _classification("accuracy()", threshold, ignore_index, 1)


def top_k_accuracy(k: int) -> Metric:
    """Return the fraction of samples whose target is among the ``k`` highest scores.

    Example:
        >>> import torch, fntrain as ft
        >>> top2 = ft.top_k_accuracy(2)
        >>> top2.state(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([1]))[:2]
        (tensor(1), 1)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"'k' must be a positive int, but got {k!r}")
    return _classification(f"top_k_accuracy({k})", 0.0, None, k)


def prepare(metrics: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """Check each metric; reset torchmetrics objects and move them to ``device``."""
    if not isinstance(metrics, Mapping | None):
        kind = type(metrics).__name__
        raise TypeError(f"'metrics' must be a mapping of name to metric, but got {kind}")
    for name, metric in (metrics or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"'metrics' keys must be str, but got {name!r}")
        if isinstance(metric, Metric):
            continue
        if not all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset")):
            raise TypeError(
                f"metrics[{name!r}] must be an fntrain.Metric (e.g. ft.accuracy()) or a "
                f"torchmetrics Metric, but got {type(metric).__name__}"
            )
        metric.reset()
        if isinstance(metric, torch.nn.Module):
            metric.to(device)
    return dict(metrics or {})


def _snapshot(metric: Any) -> Callable[[], None]:
    """Return a function that puts a torchmetrics object's (or collection's) states back."""
    members = [metric] if hasattr(metric, "_defaults") else list(getattr(metric, "values", list)())
    saved = [
        (member, name, value.clone() if isinstance(value, torch.Tensor) else list(value))
        for member in members
        for name, value in getattr(member, "metric_state", {}).items()
    ]
    counts = [(member, getattr(member, "_update_count", 0)) for member in members]

    def undo() -> None:
        for member, name, value in saved:  # in place: compute groups share these objects
            live = getattr(member, name)
            if isinstance(live, list):
                live[:] = value
            elif isinstance(value, torch.Tensor) and getattr(live, "shape", None) == value.shape:
                live.copy_(value)
            else:
                setattr(member, name, value)
        for member, count in counts:
            member._update_count, member._computed = count, None

    return undo


def _named(name: str, run: Callable[[], Any]) -> Any:
    """Return ``run()``; an exception it raises gets ``metrics[name]`` in its message."""
    try:
        return run()
    except Exception as error:
        raise reword(error, prefix=f"metrics[{name!r}]: ") from None


def added(
    had: Mapping[Any, Part],
    metrics: Mapping[str, Any],
    outputs: Any,
    targets: Any,
    undo: list[Callable[[], object]] | None = None,
) -> dict[Any, Part]:
    """Return the parts ``had``, keyed (name, position), with a batch's added: a new dict.

    Call it under ``torch.no_grad()``. torchmetrics objects are updated instead (``undo``
    gets what puts them back).
    """
    totals = dict(had)
    for name, metric in metrics.items():
        try:
            if not isinstance(metric, Metric):
                if undo is not None:
                    undo.append(_snapshot(metric))
                metric.update(outputs, targets)
                continue
            state = metric.state(outputs, targets)
        except Exception as error:
            raise reword(error, prefix=f"metrics[{name!r}]: ") from None
        for position, part in enumerate(state if isinstance(state, _SEQUENCES) else (state,)):
            key = name, position
            before = had.get(key)
            if isinstance(part, torch.Tensor):
                host = part.is_cpu and (not part.ndim or part.numel() == 1)  # summed there
                part = part.item() if host else _fitting(key, part, before)
            totals[key] = part if before is None else before + part
    return totals


def _fitting(key: tuple[str, int], part: torch.Tensor, before: Any) -> torch.Tensor:
    """Return a tensor part ready to add to ``before`` (cloned if first); raise if it misfits."""
    if before is None:  # a first tensor part is cloned: the batch's may be a view
        return part.detach().clone()
    if isinstance(before, torch.Tensor) and (
        (part.shape, torch.result_type(before, part)) != (before.shape, before.dtype)
    ):
        raise ValueError(
            f"metrics[{key[0]!r}]: part {key[1]} of its state is a {part.dtype} tensor of shape "
            f"{tuple(part.shape)} in this batch but a {before.dtype} of shape "
            f"{tuple(before.shape)} in the ones before; each part must keep its shape"
        )
    return part.detach()


def _value(result: Any) -> MetricValue:
    """Turn a metric's result into a float, or a CPU tensor when it is not a scalar."""
    if isinstance(result, torch.Tensor) and result.numel() != 1:
        return result.detach().cpu().clone()
    return float(result)


def finish(metrics: Mapping[str, Any], totals: dict[Any, torch.Tensor]) -> dict[str, MetricValue]:
    """Return each metric's value from the summed parts (already on the host)."""
    values: dict[str, MetricValue] = {}
    for name, metric in metrics.items():
        if isinstance(metric, Metric):  # by position: host and device sums arrive apart
            found = tuple(totals[key] for key in sorted(key for key in totals if key[0] == name))
            result = _named(name, partial(metric.compute, found)) if found else float("nan")
        else:
            result = _named(name, metric.compute)
        if isinstance(result, Mapping):  # a MetricCollection: one entry per member
            values.update({f"{name}/{key}": _value(value) for key, value in result.items()})
        else:
            values[name] = _value(result)
    return values
