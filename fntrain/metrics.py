"""Metrics as summable state: built-ins, and torchmetrics objects as they are.

A :class:`Metric` is two pure functions. ``state(outputs, targets)`` maps one batch to a
tuple of parts (tensors or numbers) that add up across batches and across processes;
``compute(totals)`` maps the summed parts, as CPU tensors, to the metric's value.
Accuracy's state is ``(correct, total)``. Parts on a GPU stay there during the epoch and
reach the host once, at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import attrs
import torch

from fntrain.records import MetricValue, reword

Part = torch.Tensor | int | float


@attrs.frozen
class Metric:
    """A metric whose per-batch states add up.

    Attributes:
        state: ``(outputs, targets) -> tuple of parts`` for one batch; a part is a tensor
            (of any fixed shape) or a number, and each part is summed over batches.
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

    state: Callable[[Any, Any], tuple[Part, ...]]
    compute: Callable[[tuple[torch.Tensor, ...]], MetricValue]


def _class_targets(outputs: torch.Tensor, targets: torch.Tensor, name: str) -> torch.Tensor:
    """Return class-index targets; soft (probability) targets become their argmax."""
    if (  # the common case first: (N, C) scores and (N,) class indices
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.dim() == 2
        and targets.dim() == 1
        and targets.shape[0] == outputs.shape[0]
    ):
        return targets
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"{name} needs the outputs as a tensor of class scores and the targets as a "
            f"tensor, but got {type(outputs).__name__} and {type(targets).__name__}; for a "
            f"model with several outputs, write an ft.Metric whose state picks the logits"
        )
    if outputs.dim() < 2:
        raise ValueError(
            f"{name} expects outputs of shape (N, C, ...) with class scores in dim 1, "
            f"but got outputs of shape {tuple(outputs.shape)}"
        )
    if targets.shape == outputs.shape and targets.is_floating_point():
        return targets.argmax(dim=1)
    if targets.shape != outputs.shape[:1] + outputs.shape[2:]:
        raise ValueError(
            f"{name} expects targets of shape {tuple(outputs.shape[:1] + outputs.shape[2:])} "
            f"(class indices) or {tuple(outputs.shape)} (class probabilities) for outputs of "
            f"shape {tuple(outputs.shape)}, but got targets of shape {tuple(targets.shape)}"
        )
    return targets


def _hits_state(hits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return ``(number of hits, number of predictions)``."""
    return hits.sum(), hits.numel()


def _ratio(total: tuple[torch.Tensor, ...]) -> float:
    """Return ``total[0] / total[1]``, NaN when there was nothing to count."""
    return float(total[0]) / float(total[1]) if total[1] else float("nan")


def _accuracy_state(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Return ``(correct, total)`` for one batch."""
    classes = _class_targets(outputs, targets, "accuracy()")
    return _hits_state(outputs.argmax(dim=1) == classes)


def accuracy() -> Metric:
    """Return the fraction of samples whose highest-scoring class is the target.

    Targets may be class indices, or class probabilities (mixup, label smoothing), in
    which case their most probable class counts. Class scores are in dim 1, as for
    ``CrossEntropyLoss``.

    Example:
        >>> import torch, fntrain as ft
        >>> acc = ft.accuracy()
        >>> acc.state(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        (tensor(1), 2)
    """
    return Metric(state=_accuracy_state, compute=_ratio)


def top_k_accuracy(k: int) -> Metric:
    """Return the fraction of samples whose target is among the ``k`` highest scores.

    Example:
        >>> import torch, fntrain as ft
        >>> top2 = ft.top_k_accuracy(2)
        >>> top2.state(torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([1]))
        (tensor(1), 1)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"'k' must be a positive int, but got {k!r}")

    def state(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        classes = _class_targets(outputs, targets, f"top_k_accuracy({k})")
        if outputs.shape[1] < k:
            raise ValueError(
                f"top_k_accuracy({k}): 'k' is {k} but the outputs have only "
                f"{outputs.shape[1]} classes"
            )
        top = outputs.topk(k, dim=1).indices
        return _hits_state((top == classes.unsqueeze(1)).any(dim=1))

    return Metric(state=state, compute=_ratio)


def prepare(metrics: Mapping[str, Any] | None, device: torch.device) -> dict[str, Any]:
    """Check each metric; reset torchmetrics objects and move them to ``device``."""
    if not isinstance(metrics, Mapping | None):
        raise TypeError(
            f"'metrics' must be a mapping of name to metric, but got {type(metrics).__name__}"
        )
    for name, metric in (metrics or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"'metrics' keys must be str, but got {name!r}")
        stateful = all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset"))
        if not (isinstance(metric, Metric) or stateful):
            raise TypeError(
                f"metrics[{name!r}] must be an fntrain.Metric (e.g. ft.accuracy()) or a "
                f"torchmetrics Metric, but got {type(metric).__name__}"
            )
        if stateful and not isinstance(metric, Metric):
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
            if isinstance(live, torch.Tensor) and live.shape == value.shape:
                live.copy_(value)
            elif isinstance(live, list):
                live[:] = value
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


def parts(
    metrics: Mapping[str, Any],
    outputs: Any,
    targets: Any,
    undo: list[Callable[[], object]] | None = None,
) -> dict[Hashable, Part]:
    """Return one batch's metric parts keyed ``(name, position)``; torchmetrics update themselves.

    Runs without autograd, so no metric builds a graph, even in ``train_epoch``. An error
    names the metric. With ``undo``, a function that takes back each torchmetrics update
    is added to it (``train_epoch`` runs them if the batch fails before its step).
    """
    if torch.is_grad_enabled() and metrics:  # train_epoch; evaluate is under no_grad already
        with torch.no_grad():
            return parts(metrics, outputs, targets, undo)
    found: dict[Hashable, Part] = {}
    for name, metric in metrics.items():
        if not isinstance(metric, Metric):
            if undo is not None:
                undo.append(_snapshot(metric))
            _named(name, lambda metric=metric: metric.update(outputs, targets))
            continue
        state = _named(name, lambda metric=metric: metric.state(outputs, targets))
        for position, part in enumerate(state if isinstance(state, tuple) else (state,)):
            found[name, position] = part
    return found


def _value(result: Any) -> MetricValue:
    """Turn a metric's result into a float, or a CPU tensor when it is not a scalar."""
    if isinstance(result, torch.Tensor):
        return float(result) if result.numel() == 1 else result.detach().cpu().clone()
    return float(result)


def _flatten(name: str, result: Any) -> dict[str, MetricValue]:
    """Turn a metric's result into entries; a dict (MetricCollection) gives name/key."""
    if isinstance(result, Mapping):
        return {f"{name}/{key}": _value(value) for key, value in result.items()}
    return {name: _value(result)}


def finish(
    metrics: Mapping[str, Any], totals: Mapping[Any, torch.Tensor]
) -> dict[str, MetricValue]:
    """Return each metric's value from the summed parts (already on the host)."""
    values: dict[str, MetricValue] = {}
    for name, metric in metrics.items():
        if isinstance(metric, Metric):
            # by position: host-summed numbers and device-summed tensors arrive apart
            positions = sorted(position for owner, position in totals if owner == name)
            parts = tuple(totals[name, position] for position in positions)
            compute = metric.compute if parts else lambda _: float("nan")
            result = _named(name, lambda compute=compute, parts=parts: compute(parts))
        else:
            result = _named(name, metric.compute)
        values.update(_flatten(name, result))
    return values
