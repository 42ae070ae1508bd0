"""The running, sample-weighted loss and metric sums of one pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fntrain import distributed
from fntrain import metrics as metric_lib
from fntrain.records import MetricValue
from fntrain.sums import Sums

# Metric parts are keyed (name, position) with a str name; these cannot collide with them.
_LOSS = (None, "loss")
_SAMPLES = (None, "samples")
_BATCHES = (None, "batches")


def _wide(loss: torch.Tensor) -> torch.Tensor:
    """Return the loss in float64 for summing, float32 where the device has no float64."""
    return loss.float() if loss.device.type == "mps" else loss.double()


class Tally:
    """Sample-weighted loss and summed metric states over one pass (private to one call).

    On the CPU the loss arrives as a float; on an accelerator as a tensor that stays on
    the device, so evaluating adds no host sync per batch.
    """

    def __init__(self, metrics: Mapping[str, Any], device: torch.device) -> None:
        metric_lib.start(metrics, device)
        self.metrics = metrics
        self.sums = Sums()
        self.samples = 0
        self.batches = 0

    def add(self, loss: float | torch.Tensor, samples: int, outputs: Any, targets: Any) -> None:
        """Add one batch: its mean loss, sample count, outputs and targets."""
        if not isinstance(loss, torch.Tensor):
            self.sums.add(_LOSS, loss * samples)
        elif loss.is_cpu:  # is_cpu: no device object; .item() costs less than a tensor add
            self.sums.add(_LOSS, loss.item() * samples)
        else:  # one kernel: total += samples * loss, on the device
            self.sums.add_scaled(_LOSS, loss.detach(), samples, _wide)
        self.samples += samples
        self.batches += 1
        if not self.metrics:
            return
        if torch.is_grad_enabled():  # train_epoch: metrics must build no graph
            with torch.no_grad():
                metric_lib.update(self.metrics, self.sums, outputs, targets)
        else:  # evaluate is already under no_grad or inference_mode
            metric_lib.update(self.metrics, self.sums, outputs, targets)

    def running_loss(self) -> float:
        """Mean loss per sample so far (NaN before any sample; syncs on an accelerator)."""
        total = self.sums.totals.get(_LOSS)
        return float(total) / self.samples if self.samples else float("nan")

    def finish(self) -> tuple[float, dict[str, MetricValue]]:
        """Return the mean loss and metric values, over all ranks when distributed.

        The sums come to the host once; under torch.distributed they travel, with the
        sample and batch counts, in a single all-reduce, so every rank gets the same.
        """
        totals = self.sums.host()
        if distributed.active():
            totals.setdefault(_LOSS, torch.tensor(0.0, dtype=torch.float64))
            totals[_SAMPLES] = torch.tensor(self.samples)
            totals[_BATCHES] = torch.tensor(self.batches)
            totals = distributed.all_reduce_totals(totals)
            self.samples = int(totals.pop(_SAMPLES))
            self.batches = int(totals.pop(_BATCHES))
        loss_sum = totals.pop(_LOSS, None)
        loss = float(loss_sum) / self.samples if self.samples else float("nan")
        return loss, metric_lib.finish(self.metrics, totals)
