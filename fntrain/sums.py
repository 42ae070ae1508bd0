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
Parts = Mapping[Any, Part]  # keyed (metric name, position)


class Sums(NamedTuple):
    """A pass's sums so far: host numbers, or tensors on their device (evaluate on a GPU)."""

    loss: Any = 0.0  # the losses summed over ``items``: a float, or a float64 device tensor
    items: Any = 0  # what the loss averages over: samples, or the items loss_fn counted
    samples: int = 0
    batches: int = 0
    parts: Parts = MappingProxyType({})  # metric parts by (name, position)


def add_loss(total: Any, loss: torch.Tensor, scale: float) -> Any:
    """Return ``total + loss * scale``: on the host, or on ``loss``'s device without a sync."""
    if loss.is_cpu:
        return total + loss.item() * scale
    if isinstance(total, torch.Tensor):  # evaluate on a device: one kernel, no sync
        return torch.add(total, loss.detach(), alpha=scale)
    wide = torch.float32 if loss.device.type == "mps" else torch.float64  # MPS has no float64
    return loss.detach().to(wide) * scale + total


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
