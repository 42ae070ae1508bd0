"""The immutable records fntrain returns and the exceptions it raises."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import attrs
import torch

MetricValue = float | torch.Tensor
"""A metric's value: a float, or a CPU tensor for non-scalar metrics (a confusion matrix)."""


class ReadOnlyDict(dict[str, Any]):
    """A dict that refuses every change: readable, json-dumpable, picklable and copyable."""

    def __init__(self, mapping: Mapping[str, Any] | None = None) -> None:
        super().__init__(mapping or {})

    def _refuse(self, *_: object, **__: object) -> NoReturn:
        raise TypeError("this mapping is read-only; copy it with dict(...) to change it")

    __setitem__ = __delitem__ = __ior__ = update = setdefault = pop = popitem = clear = _refuse

    def __reduce__(self) -> tuple[type, tuple[dict[Any, Any]]]:
        return type(self), (dict(self),)


def _equal(a: Any, b: Any) -> bool:
    """Compare values that may hold tensors by value, item by item, NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        if not (both and a.dtype == b.dtype and a.shape == b.shape):
            return False
        a, b = a.cpu(), b.cpu()  # equal by torch.equal, or with NaN at the same places
        return torch.equal(a, b) or (not a.is_quantized and bool(a.isclose(b, 0, 0, True).all()))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[key], b[key]) for key in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


_SAME = attrs.cmp_using(eq=_equal)  # for fields that may hold tensors or NaN


@attrs.frozen
class TrainResult:
    """What one ``train_epoch`` did.

    Attributes:
        loss: mean loss over the samples trained on (over items when ``loss_fn`` counts them).
        metrics: metric name to value, over the same samples.
        batches: number of batches trained on (skipped batches not included).
        lr: learning rate of the first param group at the end of the epoch.
        skipped_batches: batches skipped for a non-finite loss (``on_nonfinite="skip"``).
        skipped_steps: optimizer steps a GradScaler skipped for inf/NaN gradients.
        grad_norm: the largest total gradient norm before clipping; None without clipping.
    """

    loss: float = attrs.field(eq=_SAME, hash=False)  # NaN equal to NaN
    metrics: Mapping[str, MetricValue] = attrs.field(eq=_SAME, hash=False, converter=ReadOnlyDict)
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
        index: the step's index within the epoch, from 0 (GradScaler-skipped steps not counted).
        batch_index: the loader index of the step's last batch, from 0.
        loss: the mean loss over the step's samples (or items), already on the host.
        samples: the number of samples in the step's batches.
        lr: the learning rate of the first param group that the step used.
        grad_norm: the total gradient norm before clipping (``clip_grad_norm`` only, else None).
        origin: the RNG states at the pass's start (not shown): ``save_checkpoint`` keeps them.
    """

    index: int
    batch_index: int
    loss: float = attrs.field(eq=_SAME, hash=False)  # NaN equal to NaN
    samples: int
    lr: float
    grad_norm: float | None = None
    origin: Any = attrs.field(default=None, repr=False, eq=False)


@attrs.frozen
class EvalResult:
    """What one ``evaluate`` measured.

    Attributes:
        loss: mean loss over all samples (over items when ``loss_fn`` counts them).
        metrics: metric name to value.
    """

    loss: float = attrs.field(eq=_SAME, hash=False)  # NaN equal to NaN
    metrics: Mapping[str, MetricValue] = attrs.field(eq=_SAME, hash=False, converter=ReadOnlyDict)
    samples: int
    batches: int
    seconds: float


@attrs.frozen
class Predictions:
    """Model outputs of ``predict``, in loader order, on the CPU.

    Attributes:
        outputs: the outputs concatenated along the batch dimension, in the model's structure.
        targets: the loader's targets concatenated likewise, or None when it gave none.
    """

    outputs: Any = attrs.field(eq=_SAME, hash=False)
    targets: Any = attrs.field(eq=_SAME, hash=False)
    samples: int


@attrs.frozen
class SavedCheckpoint:
    """What ``save_checkpoint`` wrote: the file (or folder), its size in bytes, epoch and step."""

    path: Path
    size: int
    epoch: int
    step: int


@attrs.frozen
class Checkpoint:
    """What ``load_checkpoint`` restored, besides the objects it restored in place.

    Attributes:
        epoch: the epoch stored (None for a bare state_dict).
        step: the step stored (None for a bare state_dict); saved with a ``Step``, its steps done.
        batch_index: saved with a ``Step``, the loader index of its last batch (``resume=ckpt``
            continues after it); None at an epoch boundary.
        metrics: the metrics stored, read-only.
        extra: the user's extra data stored, read-only at the top level.
        missing_keys: model keys the file did not hold, left as they were (``strict=False`` only).
        unexpected_keys: file keys the model does not have, ignored (``strict=False`` only).
        position: what ``resume=`` needs (not shown): the RNG states at the pass's start and now.
    """

    path: Path
    epoch: int | None
    step: int | None
    metrics: Mapping[str, Any] = attrs.field(eq=_SAME, hash=False, converter=ReadOnlyDict)
    extra: Mapping[str, Any] = attrs.field(eq=_SAME, hash=False, converter=ReadOnlyDict)
    missing_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    unexpected_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    batch_index: int | None = None
    position: Any = attrs.field(default=None, repr=False, eq=False)


class NonFiniteLossError(FloatingPointError):
    """A batch's loss (or gradient norm) was NaN or infinite; no step was taken with it.

    Attributes:
        batch_index: the index of the offending batch in the loader (0-based).
        loss: the value that was not finite.
        what: ``"loss"``, or ``"gradient norm"`` when clipping found non-finite gradients.
    """

    def __init__(self, batch_index: int, loss: float, what: str = "loss") -> None:
        self.batch_index, self.loss, self.what = batch_index, loss, what
        super().__init__(
            f"the {what} of batch {batch_index} is {loss}; the optimizer did not step and the "
            f"buffers were restored, so the model is as after the last finite batch. Pass "
            f"on_nonfinite='skip' to skip such batches instead"
        )

    def __reduce__(self) -> tuple[type, tuple[int, float, str]]:
        return type(self), (self.batch_index, self.loss, self.what)


def reword(error: BaseException, prefix: str = "", suffix: str = "") -> BaseException:
    """Put ``prefix`` and ``suffix`` around an exception's message; keep its type and traceback."""
    if len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{prefix}{error.args[0]}{suffix}",)
    elif hasattr(error, "add_note"):  # Python >= 3.11; messages of other shapes get a note
        error.add_note(f"{prefix}{suffix}".strip(" :;"))
    return error


def first_line(error: BaseException) -> str:
    """Return the first line of an error's message (its repr when it has none)."""
    return (str(error).strip().splitlines() or [repr(error)])[0]


class CheckpointError(Exception):
    """A file is not a loadable fntrain checkpoint, or does not fit what it is loaded into."""
