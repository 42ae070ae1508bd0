"""torch.distributed glue: one all-reduce per pass, rank-0 duties, rank checks, a sampler."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sized
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from fntrain.data import concat, map_tensors

T = TypeVar("T")
_UNEVEN = "every rank must get the same number of batches; shard the data evenly"


def active() -> bool:
    """Tell whether a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Tell whether this process is rank 0 (or the only process)."""
    return not active() or dist.get_rank() == 0


def world() -> tuple[int, int]:
    """Return this process's rank and the world size: ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def on_main(write: Callable[[], int]) -> int:
    """Run ``write`` on rank 0 only; return the size it wrote, or raise its error, on every rank."""
    return everywhere(lambda: write() if is_main() else 0)[0]


def everywhere(check: Callable[[], T]) -> list[T]:
    """Return every rank's ``check()``; if it raises on any rank, raise that error on every rank."""
    with told():  # a rank that raises tells the others here
        mine = check()
    seen = all_gather(mine)
    if raised := [value for value in seen if isinstance(value, Exception)]:
        raise raised[0]
    return seen


@contextlib.contextmanager
def told() -> Iterator[None]:
    """On an error inside, tell the other ranks (they raise at their next all_gather)."""
    try:
        yield
    except Exception as error:
        if active():
            all_gather(error)
        raise


def all_gather(value: T) -> list[T]:
    """Return every rank's ``value`` in rank order (``[value]`` without a process group)."""
    if not active():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def agree(flag: bool) -> tuple[bool, bool]:
    """Return whether ``flag`` is true on any rank and whether on every rank (needs a group)."""
    both = torch.tensor([float(flag), -float(flag)], device=_collective_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    most, least = both.tolist()  # one host transfer
    return most > 0, -least > 0


def all_reduce_sum(value: float) -> float:
    """Return ``value`` summed over all ranks, in float64."""
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return float(total.item())


def in_step(loader: Iterable[Any]) -> Iterable[Any]:
    """Return ``loader``, checked to give every rank as many batches (``len()``, else per batch)."""
    if not active():
        return loader
    mine: int | None = None
    with contextlib.suppress(TypeError):  # no len(), or one that raises (an IterableDataset's)
        mine = len(loader) if isinstance(loader, Sized) else None
    if None in (counts := all_gather(mine)):
        return _watched(loader)
    if len(set(counts)) > 1:
        raise ValueError(
            f"'loader' gives the ranks different numbers of batches ({counts}, by rank), so "
            f"their collectives (gradient all-reduces, FSDP2's all-gathers) would fall out of "
            f"step; give every rank the same count: for training DistributedSampler(data) "
            f"pads, for evaluation pick a batch_size that gives every shard as many batches"
        )
    return loader


def _watched(loader: Iterable[Any]) -> Iterator[Any]:
    """Yield ``loader``'s batches while every rank still has one; raise if one runs out first."""
    index = 0
    for batch in loader:
        if not agree(True)[1]:
            raise ValueError(f"'loader' ran out on another rank before batch {index} ({_UNEVEN})")
        yield batch
        index += 1
    if agree(False)[0]:
        raise ValueError(f"'loader' ran out on this rank after {index} batches ({_UNEVEN})")


def _collective_device() -> torch.device:
    """Return the device the default process group reduces on (CUDA for NCCL)."""
    return torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")  # the current GPU


def all_reduce_totals(
    totals: dict[Hashable, torch.Tensor], names: Iterable[str] = ()
) -> dict[Hashable, torch.Tensor]:
    """Sum every total over all ranks in one float64 all-reduce; ranks whose parts differ raise."""
    layout = [(key, tuple(total.shape)) for key, total in totals.items()], sorted(names)
    layouts = all_gather(zlib.crc32(repr(layout).encode()))
    if failed := [error for error in layouts if isinstance(error, Exception)]:
        raise RuntimeError(f"another rank failed in this pass: {failed[0]!r}")
    if len(set(layouts)) > 1:
        raise RuntimeError(
            "the ranks computed different metric or loss parts: every rank must pass the "
            "same 'metrics', and every rank's loader must yield at least one batch"
        )
    parts = [total.reshape(-1).to(torch.float64) for total in totals.values()]
    flat = torch.cat(parts).to(_collective_device())
    dist.all_reduce(flat)
    pieces = flat.cpu().split([part.numel() for part in parts])
    return {
        key: piece.reshape(totals[key].shape).to(totals[key].dtype)
        for key, piece in zip(totals, pieces, strict=True)
    }


def sampler_indices(loader: object) -> list[int]:
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


def gather_in_order(
    outputs: Any, targets: Any, indices: list[int], samples: int, where: str
) -> tuple[Any, Any, int]:
    """Return all ranks' outputs, targets, samples in order (``where="main"``: rank 0's)."""
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
    if not (parts := [part for part in received if part[2]]):
        raise ValueError("'loader' yielded no batches on any rank")
    ordered, positions = torch.sort(torch.tensor([i for p in parts for i in p[2]]), stable=True)
    counts = ordered.unique_consecutive(return_counts=True)[1]  # DistributedSampler pads
    keep = positions[counts.cumsum(0) - counts]  # data set order, each index once
    order = keep.tolist()  # names (lists of plain values) follow the outputs
    pick = lambda names: [names[i] for i in order]  # noqa: E731
    outputs, targets = map_tensors(lambda t: t[keep], concat([p[:2] for p in parts]), pick)
    return outputs, None if parts[0][1] is None else targets, int(keep.numel())


class ShardSampler(Sampler[int]):
    """Give each rank every ``world_size``-th index, without padding, for exact evaluation.

    Unlike ``DistributedSampler``, it repeats no sample to even the shards, so a global
    ``evaluate`` equals one process's; for evaluation and prediction, not training.

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
        here, size = world()
        self.size, self.rank = len(data_source), here if rank is None else rank
        self.num_replicas = size if num_replicas is None else num_replicas
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"'rank' must be in [0, {self.num_replicas}), but got {self.rank!r}")

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's indices in data set order."""
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        """Return the number of indices for this rank."""
        return len(range(self.rank, self.size, self.num_replicas))
