"""torch.distributed glue: one all-reduce per pass, rank-0 duties, rank checks, a sampler."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sized
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from fntrain.data import concat, take


def active() -> bool:
    """Tell whether a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Tell whether this process is rank 0 (or the only process)."""
    return not active() or dist.get_rank() == 0


T = TypeVar("T")


def world() -> tuple[int, int]:
    """Return this process's rank and the world size: ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def on_main(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; return its result, or raise its error, on every rank.

    The other ranks never touch what rank 0 worked on (a file on rank 0's own disk).
    """
    if not active():
        return work()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, work())
        except Exception as error:  # every rank raises it
            box[0] = (False, error)
    dist.broadcast_object_list(box, src=0)
    done, value = box[0]
    if not done:
        raise value
    return value


def all_gather(value: T) -> list[T]:
    """Return every rank's ``value`` in rank order (``[value]`` without a process group)."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _agree(flag: bool) -> tuple[bool, bool]:
    """Return whether ``flag`` is true on any rank and whether it is on every rank."""
    both = torch.tensor([float(flag), -float(flag)], device=_collective_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(both[0] > 0), bool(-both[1] > 0)


def any_rank(flag: bool) -> bool:
    """Return whether ``flag`` is true on any rank (``flag`` without a process group)."""
    return _agree(flag)[0] if active() else flag


def in_step(loader: Iterable[Any]) -> Iterable[Any]:
    """Return ``loader``, checked to give every rank the same number of batches.

    Lengths that ``len()`` tells are compared before the first batch, in one collective.
    A loader without a length is watched instead: one tiny all-reduce per batch, so a
    rank that runs out early raises on every rank rather than leaving the others
    waiting in their gradient all-reduce.
    """
    if not active():
        return loader
    try:
        mine: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        mine = None
    counts = all_gather(mine)
    if None in counts:
        return _watched(loader)
    if len(set(counts)) > 1:
        raise ValueError(
            f"'loader' gives the ranks different numbers of batches ({counts}, by rank), so "
            f"their gradient all-reduces would fall out of step; give every rank the same "
            f"count, e.g. DistributedSampler(data) (it pads) with the same batch_size"
        )
    return loader


def _watched(loader: Iterable[Any]) -> Iterator[Any]:
    """Yield ``loader``'s batches while every rank still has one; raise if one runs out first."""
    index = 0
    for batch in loader:
        if not _agree(True)[1]:
            raise ValueError(f"'loader' ran out on another rank before batch {index} ({_UNEVEN})")
        yield batch
        index += 1
    if _agree(False)[0]:
        raise ValueError(f"'loader' ran out on this rank after {index} batches ({_UNEVEN})")


_UNEVEN = "every rank must get the same number of batches; shard the data evenly"


def _collective_device() -> torch.device:
    """Return the device the default process group reduces on (CUDA for NCCL)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_totals(
    totals: dict[Hashable, torch.Tensor], names: Iterable[str] = ()
) -> dict[Hashable, torch.Tensor]:
    """Sum every total over all ranks in one all-reduce; return CPU tensors, dtypes kept.

    All totals travel as float64 in one flat tensor (exact for counts below 2**53). First
    the ranks compare a checksum of their parts, shapes and metric ``names`` (torchmetrics
    objects sync themselves next), so a mismatch is an error on every rank, not a hang.
    """
    layout = [(key, tuple(total.shape)) for key, total in totals.items()], sorted(names)
    if len(set(all_gather(zlib.crc32(repr(layout).encode())))) > 1:
        raise RuntimeError(
            "the ranks computed different metric or loss parts: every rank must pass the "
            "same 'metrics', and every rank's loader must yield at least one batch"
        )
    keys = list(totals)
    parts = [totals[key].reshape(-1).to(torch.float64) for key in keys]
    flat = torch.cat(parts).to(_collective_device())
    dist.all_reduce(flat)
    pieces = flat.cpu().split([part.numel() for part in parts])
    return {
        key: piece.reshape(totals[key].shape).to(totals[key].dtype)
        for key, piece in zip(keys, pieces, strict=True)
    }


def sampler_indices(loader: Any) -> list[int]:
    """Return the data set indices a loader's ShardSampler/DistributedSampler gives this rank."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, ShardSampler | DistributedSampler):
        raise ValueError(
            "under torch.distributed, predict gathers outputs in data set order, so 'loader' "
            "must be a DataLoader whose sampler is an ft.ShardSampler or a "
            f"DistributedSampler, but its sampler is a {type(sampler).__name__}; pass "
            "gather='none' to keep each rank's own outputs"
        )
    return list(sampler)


def _unique_order(indices: list[int]) -> torch.Tensor:
    """Return positions that put ``indices`` in ascending order, first occurrences only."""
    ordered, positions = torch.sort(torch.tensor(indices, dtype=torch.long), stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return positions[first]


def gather_in_order(
    outputs: Any, targets: Any, indices: list[int], samples: int, where: str
) -> tuple[Any, Any, int]:
    """Collect every rank's outputs and targets in data set order, without the padding.

    Returns ``(outputs, targets, samples)``; with ``where="main"`` ranks other than 0 get
    ``(None, None, samples)`` with their own sample count.
    """
    if samples != len(indices):
        raise ValueError(
            f"the loader yielded {samples} samples but its sampler gave {len(indices)} "
            f"indices (drop_last=True?); predict needs one output per index"
        )
    mine = (outputs, targets, indices)
    received: list[Any] = [None] * dist.get_world_size()
    if where == "all":
        dist.all_gather_object(received, mine)
    else:
        dist.gather_object(mine, received if dist.get_rank() == 0 else None, dst=0)
        if dist.get_rank() != 0:
            return None, None, samples
    parts = [part for part in received if part[2]]
    if not parts:
        raise ValueError("'loader' yielded no batches on any rank")
    keep = _unique_order([index for part in parts for index in part[2]])
    gathered_targets = None if parts[0][1] is None else take(concat([p[1] for p in parts]), keep)
    return take(concat([p[0] for p in parts]), keep), gathered_targets, int(keep.numel())


class ShardSampler(Sampler[int]):
    """Give each rank every ``world_size``-th index, without padding, for exact evaluation.

    ``DistributedSampler`` pads the last shard by repeating samples so that every rank gets
    the same number, which counts those samples twice in a global evaluation. This sampler
    does not pad: rank ``r`` gets indices ``r, r + world_size, ...``, so the global loss and
    metrics of ``evaluate`` equal those of one process over the whole data set. Use it for
    evaluation and prediction only: in training, DDP needs equal batch counts per rank.

    Args:
        data_source: the data set (anything with ``len()``).
        num_replicas: the number of ranks; the process group's world size by default.
        rank: this rank; the process group's rank by default.

    Example:
        >>> import fntrain as ft
        >>> list(ft.ShardSampler(range(5), num_replicas=2, rank=1))
        [1, 3]
    """

    def __init__(
        self, data_source: Sized, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        self.size = len(data_source)
        world = dist.get_world_size() if active() else 1
        self.num_replicas = num_replicas if num_replicas is not None else world
        self.rank = rank if rank is not None else (dist.get_rank() if active() else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"'rank' must be in [0, {self.num_replicas}), but got {self.rank!r}")

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's indices in data set order."""
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        """Return the number of indices for this rank."""
        return max(0, math.ceil((self.size - self.rank) / self.num_replicas))
