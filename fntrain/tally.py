"""The running, sample-weighted loss and metric states of one pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fntrain import metrics as metric_lib
from fntrain.records import MetricValue


class Tally:
    """Sample-weighted loss and summed metric states over one pass (private to one call)."""

    def __init__(self, metrics: Mapping[str, Any], device: torch.device) -> None:
        self.metrics = metrics
        self.states = metric_lib.start(metrics, device)
        self.loss_sum = 0.0
        self.samples = 0
        self.batches = 0

    def add(self, loss: float, samples: int, outputs: Any, targets: Any) -> None:
        """Add one batch: its mean loss, sample count, outputs and targets."""
        self.loss_sum += loss * samples
        self.samples += samples
        self.batches += 1
        if self.metrics:
            with torch.no_grad():
                self.states = metric_lib.update(self.metrics, self.states, outputs, targets)

    @property
    def loss(self) -> float:
        """Mean loss per sample so far (NaN before any sample)."""
        return self.loss_sum / self.samples if self.samples else float("nan")

    def finish(self) -> dict[str, MetricValue]:
        """Return the metric values, bringing their states to the host once."""
        return metric_lib.finish(self.metrics, self.states)
