"""The immutable records fntrain returns and the exceptions it raises."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import torch

MetricValue = float | torch.Tensor
"""A metric's value: a float, or a CPU tensor for non-scalar metrics (a confusion matrix)."""


def _read_only(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Return a read-only copy of ``mapping`` (an empty one for None)."""
    return MappingProxyType(dict(mapping or {}))


@attrs.frozen
class TrainResult:
    """What one ``train_epoch`` did.

    Attributes:
        loss: mean loss over the samples that were trained on (sample-weighted).
        metrics: metric name to value, over the same samples.
        samples: number of samples trained on.
        batches: number of batches trained on (skipped batches not included).
        steps: number of optimizer steps taken.
        seconds: wall-clock time of the epoch.
        lr: learning rate of the first param group at the end of the epoch.
        skipped_batches: batches skipped for a non-finite loss (``on_nonfinite="skip"``).
        skipped_steps: optimizer steps a GradScaler skipped for inf/NaN gradients.
        grad_norm: the largest total gradient norm before clipping over the epoch's steps
            (only with ``clip_grad_norm``; None otherwise).
    """

    loss: float
    metrics: Mapping[str, MetricValue] = attrs.field(converter=_read_only)
    samples: int
    batches: int
    steps: int
    seconds: float
    lr: float
    skipped_batches: int = 0
    skipped_steps: int = 0
    grad_norm: float | None = None


@attrs.frozen
class Step:
    """One optimizer step of ``train_epoch``, as given to its ``on_step`` function.

    Attributes:
        index: the step's index within the epoch, from 0 (steps a GradScaler skipped
            are not counted).
        batch_index: the loader index of the step's last batch, from 0.
        loss: the sample-weighted mean loss over the step's batches (several with
            ``accumulate``), already on the host.
        samples: the number of samples in the step's batches.
        lr: the learning rate of the first param group that the step used.
        grad_norm: the total gradient norm before clipping (only with
            ``clip_grad_norm``; None otherwise).
    """

    index: int
    batch_index: int
    loss: float
    samples: int
    lr: float
    grad_norm: float | None = None


@attrs.frozen
class EvalResult:
    """What one ``evaluate`` measured.

    Attributes:
        loss: mean loss over all samples (sample-weighted).
        metrics: metric name to value.
        samples: number of samples evaluated.
        batches: number of batches evaluated.
        seconds: wall-clock time of the pass.
    """

    loss: float
    metrics: Mapping[str, MetricValue] = attrs.field(converter=_read_only)
    samples: int
    batches: int
    seconds: float


@attrs.frozen
class Predictions:
    """Model outputs of ``predict``, in loader order, on the CPU.

    Attributes:
        outputs: the model's outputs concatenated along the batch dimension (a tensor, or
            the same tuple/dict structure the model returns).
        targets: the loader's targets concatenated likewise, or None when it gave none.
        samples: number of samples predicted.
    """

    outputs: Any
    targets: Any
    samples: int


@attrs.frozen
class SavedCheckpoint:
    """What ``save_checkpoint`` wrote.

    Attributes:
        path: the file written.
        size: its size in bytes.
        epoch: the epoch stored in it.
        step: the step stored in it.
    """

    path: Path
    size: int
    epoch: int
    step: int


@attrs.frozen
class Checkpoint:
    """What ``load_checkpoint`` restored, besides the objects it restored in place.

    Attributes:
        path: the file read.
        epoch: the epoch stored (None for a bare state_dict).
        step: the step stored (None for a bare state_dict).
        metrics: the metrics stored, read-only.
        extra: the user's extra data stored, read-only at the top level.
        missing_keys: model keys the file did not hold, left as they were (only with
            ``strict=False``; empty otherwise).
        unexpected_keys: keys in the file the model does not have, ignored (only with
            ``strict=False``; empty otherwise).
    """

    path: Path
    epoch: int | None
    step: int | None
    metrics: Mapping[str, Any] = attrs.field(converter=_read_only)
    extra: Mapping[str, Any] = attrs.field(converter=_read_only)
    missing_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    unexpected_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)


class NonFiniteLossError(FloatingPointError):
    """A batch's loss (or gradient norm) was NaN or infinite; no step was taken with it.

    Raised before that batch's ``optimizer.step()``, with the model's buffers put back,
    so the model is as after the last finite batch.

    Attributes:
        batch_index: the index of the offending batch in the loader (0-based).
        loss: the value that was not finite.
    """

    def __init__(self, batch_index: int, loss: float) -> None:
        self.batch_index = batch_index
        self.loss = loss
        super().__init__(
            f"the loss of batch {batch_index} is {loss}; the optimizer did not step and the "
            f"buffers were restored, so the model is as after the last finite batch. Pass "
            f"on_nonfinite='skip' to skip such batches instead"
        )

    def __reduce__(self) -> tuple[type, tuple[int, float]]:
        return type(self), (self.batch_index, self.loss)


class CheckpointError(Exception):
    """A file is not a loadable fntrain checkpoint, or does not fit what it is loaded into."""
