"""The running sums of one pass, as values: loss over samples or items, counts, metric parts."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from fntrain import distributed
from fntrain import metrics as metric_lib
from fntrain.metrics import Part
from fntrain.records import MetricValue

_LOSS, _ITEMS = (None, "loss"), (None, "items")  # metric parts are keyed (name, position)
_SAMPLES, _BATCHES = (None, "samples"), (None, "batches")
_tuple = tuple.__new__  # builds a NamedTuple in C: a per-batch value costs no Python call
Parts = Mapping[Any, Part]  # keyed (metric name, position)


class Sums(NamedTuple):
    """A pass's sums so far: host numbers, or tensors on their device (evaluate on a GPU)."""

    loss: Any = 0.0  # the losses summed over ``items``: a float, or a float64 device tensor
    items: Any = 0  # what the loss averages over: samples, or the items loss_fn counted
    samples: int = 0
    batches: int = 0
    parts: Parts = MappingProxyType({})  # metric parts by (name, position)


def stage(parts: Parts, sums: Sums) -> dict[Any, Part]:
    """Return a batch's parts ready to add (then adding cannot fail); raise naming a misfit."""
    staged: dict[Any, Part] = {}
    for key, part in parts.items():
        if isinstance(part, torch.Tensor):
            if part.is_cpu and part.numel() == 1:
                part = part.item()
            elif isinstance(had := sums.parts.get(key), torch.Tensor) and (
                (part.shape, torch.result_type(had, part)) != (had.shape, had.dtype)
            ):
                raise ValueError(
                    f"metrics[{key[0]!r}]: part {key[1]} of its state is a {part.dtype} tensor "
                    f"of shape {tuple(part.shape)} in this batch but a {had.dtype} of shape "
                    f"{tuple(had.shape)} in the ones before; each part must keep its shape"
                )
            else:
                part = part.detach()
        staged[key] = part
    return staged


def added(sums: Sums, loss: Any, scale: float, items: Any, samples: int, parts: Parts) -> Sums:
    """Return ``sums`` with a batch added: ``loss * scale`` (its sum over ``items``), its parts."""
    if not parts and type(loss) is float and not isinstance(items, torch.Tensor):  # train_epoch
        batch = (sums.loss + loss * scale, sums.items + items, sums.samples + samples)
        return _tuple(Sums, (*batch, sums.batches + 1, sums.parts))
    if not isinstance(loss, torch.Tensor):
        loss = sums.loss + loss * scale
    elif loss.is_cpu:
        loss = sums.loss + float(loss) * scale
    elif isinstance(sums.loss, torch.Tensor):  # evaluate on a device: one kernel, no sync
        loss = torch.add(sums.loss, loss.detach(), alpha=scale)
    else:  # float64 where the device has it (not MPS)
        wide = torch.float32 if loss.device.type == "mps" else torch.float64
        loss = loss.detach().to(wide) * scale + sums.loss
    if isinstance(items, torch.Tensor):
        items = items.detach()
    if parts and parts.keys() == sums.parts.keys():  # every batch after the first
        parts = {key: total + parts[key] for key, total in sums.parts.items()}
    elif parts:  # a first tensor part is cloned: the batch's may be a view
        before, totals = sums.parts, dict(sums.parts)
        for key, part in parts.items():
            had = before.get(key)
            if had is not None:
                totals[key] = had + part
            else:
                totals[key] = part.clone() if isinstance(part, torch.Tensor) else part
        parts = totals
    else:
        parts = sums.parts
    return Sums(loss, sums.items + items, sums.samples + samples, sums.batches + 1, parts)


def _host(sums: Sums) -> dict[Hashable, torch.Tensor]:
    """Return every sum as a CPU tensor: numbers directly, device sums one transfer a dtype."""
    out: dict[Hashable, torch.Tensor] = {}
    on_device: dict[torch.dtype, list[tuple[Hashable, torch.Tensor]]] = {}
    for key, total in {_LOSS: sums.loss, _ITEMS: sums.items, **sums.parts}.items():
        if isinstance(total, torch.Tensor):
            on_device.setdefault(total.dtype, []).append((key, total))
        else:  # host sums, without losing precision
            wide = torch.float64 if isinstance(total, float) else torch.int64
            out[key] = torch.tensor(total, dtype=wide)
    for group in on_device.values():
        flat = torch.cat([total.reshape(-1) for _, total in group]).cpu()
        pieces = flat.split([total.numel() for _, total in group])
        for (key, total), piece in zip(group, pieces, strict=True):
            out[key] = piece.reshape(total.shape)
    return out


def running(sums: Sums, metrics: Mapping[str, Any]) -> dict[str, MetricValue]:
    """Return the loss and fntrain metrics over this rank's samples so far (syncs; progress)."""
    if not sums.samples:
        return {}
    totals = _host(sums)
    loss = float(totals.pop(_LOSS)) / float(totals.pop(_ITEMS))
    own = {name: m for name, m in metrics.items() if isinstance(m, metric_lib.Metric)}
    try:
        return {"loss": loss, **metric_lib.finish(own, totals)}
    except Exception:  # shown only: the pass's end reports a metric that fails
        return {"loss": loss}


def finish(sums: Sums, metrics: Mapping[str, Any]) -> tuple[float, dict[str, MetricValue], Sums]:
    """Return the mean loss, the metric values and the (global) counts: over all ranks at once."""
    totals = _host(sums)
    if distributed.active():  # one all-reduce
        totals[_SAMPLES], totals[_BATCHES] = torch.tensor(sums.samples), torch.tensor(sums.batches)
        totals = distributed.all_reduce_totals(totals, metrics)
        counts = int(totals.pop(_SAMPLES)), int(totals.pop(_BATCHES))
        sums = sums._replace(samples=counts[0], batches=counts[1])
    loss, items = float(totals.pop(_LOSS)), float(totals.pop(_ITEMS))
    return loss / items if items else float("nan"), metric_lib.finish(metrics, totals), sums
