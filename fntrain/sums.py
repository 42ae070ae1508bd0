"""The running sums of one pass: loss over samples or items, counts, metric parts."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from fntrain import distributed
from fntrain import metrics as metric_lib
from fntrain.metrics import Part
from fntrain.records import MetricValue

_LOSS, _ITEMS = (None, "loss"), (None, "items")  # the loss's sum and what it is over
_SAMPLES, _BATCHES = (None, "samples"), (None, "batches")  # metric parts: (str, i)


class Tally:
    """One call's sums: numbers and 1-element CPU tensors on the host, others on their device."""

    def __init__(self, metrics: Mapping[str, Any] | None, device: torch.device) -> None:
        self.metrics = metric_lib.prepare(metrics, device)  # checked, torchmetrics reset
        self.totals: dict[Hashable, Any] = {}
        self.samples = self.batches = 0

    def stage(self, parts: dict[Hashable, Part]) -> dict[Hashable, Part]:
        """Return a batch's parts ready for add() (then it cannot fail); raise naming a misfit."""
        staged: dict[Hashable, Part] = {}
        for key, part in parts.items():
            if isinstance(part, torch.Tensor):
                part = part.item() if part.is_cpu and part.numel() == 1 else part.detach()
            had = self.totals.get(key)
            both = isinstance(had, torch.Tensor) and isinstance(part, torch.Tensor)
            if both and (part.shape, torch.result_type(had, part)) != (had.shape, had.dtype):
                raise ValueError(
                    f"metrics[{key[0]!r}]: part {key[1]} of its state is a {part.dtype} tensor "
                    f"of shape {tuple(part.shape)} in this batch but a {had.dtype} of shape "
                    f"{tuple(had.shape)} in the ones before; each part must keep its shape"
                )
            staged[key] = part
        return staged

    def _add(self, key: Hashable, part: Part) -> None:
        """Add ``part`` to the running sum under ``key``."""
        if (total := self.totals.get(key)) is None:
            self.totals[key] = part.clone() if isinstance(part, torch.Tensor) else part
        elif isinstance(total, torch.Tensor) and isinstance(part, torch.Tensor):
            total.add_(part)
        else:
            self.totals[key] = total + part

    def add(self, loss: Any, samples: int, parts: dict[Hashable, Part], items: Any = None) -> None:
        """Add a batch: its loss (float, device scalar) summed over ``items``, else its mean."""
        summed, items = items is not None, samples if items is None else items
        if not isinstance(loss, torch.Tensor) or loss.is_cpu:
            self._add(_LOSS, float(loss) if summed else float(loss) * samples)
        elif _LOSS in self.totals:  # one kernel: total += samples * loss, on the device
            self.totals[_LOSS].add_(loss.detach(), alpha=1 if summed else samples)
        else:  # float64 where the device has it (not MPS)
            wide = torch.float32 if loss.device.type == "mps" else torch.float64
            self.totals[_LOSS] = loss.detach().to(wide) * (1 if summed else samples)
        self._add(_ITEMS, items.detach() if isinstance(items, torch.Tensor) else items)
        self.samples += samples
        self.batches += 1
        for key, part in parts.items():
            self._add(key, part)

    def running(self) -> dict[str, MetricValue]:
        """Return the loss and fntrain metrics over this rank's samples so far (syncs; progress)."""
        if not self.samples:
            return {}
        totals = self._host()
        loss = float(totals.pop(_LOSS)) / float(totals.pop(_ITEMS))
        own = {name: m for name, m in self.metrics.items() if isinstance(m, metric_lib.Metric)}
        try:
            return {"loss": loss, **metric_lib.finish(own, totals)}
        except Exception:  # shown only: the pass's end reports a metric that fails
            return {"loss": loss}

    def _host(self) -> dict[Hashable, torch.Tensor]:
        """Return every sum as a CPU tensor: numbers directly, device sums one transfer a dtype."""
        out: dict[Hashable, torch.Tensor] = {}
        on_device: dict[torch.dtype, list[tuple[Hashable, torch.Tensor]]] = {}
        for key, total in self.totals.items():
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

    def finish(self) -> tuple[float, dict[str, MetricValue]]:
        """Return the mean loss and metric values; distributed, over all ranks in one all-reduce."""
        totals = self._host()
        if distributed.active():
            totals.setdefault(_LOSS, torch.tensor(0.0, dtype=torch.float64))
            totals.setdefault(_ITEMS, torch.tensor(0.0, dtype=torch.float64))
            totals[_SAMPLES] = torch.tensor(self.samples)
            totals[_BATCHES] = torch.tensor(self.batches)
            totals = distributed.all_reduce_totals(totals, self.metrics)
            self.samples, self.batches = int(totals.pop(_SAMPLES)), int(totals.pop(_BATCHES))
        loss, items = float(totals.pop(_LOSS, 0.0)), float(totals.pop(_ITEMS, 0.0))
        loss = loss / items if items else float("nan")
        return loss, metric_lib.finish(self.metrics, totals)
