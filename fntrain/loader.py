"""TensorLoader: whole batches gathered by index from in-memory tensors, no per-sample collate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class TensorLoader:
    """Iterate over batches of in-memory tensors, like ``DataLoader(TensorDataset(...))``.

    Batches are not assembled sample by sample, which is what makes ``DataLoader`` over a
    ``TensorDataset`` slow for small models: 32 batches at a time are gathered with one
    indexing operation per tensor, and each batch is a slice (a view) of that gather.
    With ``shuffle=True`` the permutation is drawn exactly as ``DataLoader``'s
    ``RandomSampler`` draws it, so for the same seed or ``generator`` both loaders yield
    the same batches and training is bit-identical. Tensors may live on a
    CUDA device (batches are gathered there), or on the CPU with ``pin_memory=True`` for
    asynchronous copies to the GPU.

    Args:
        *tensors: tensors with the same length in dim 0 (e.g. inputs and targets).
        batch_size: samples per batch.
        shuffle: draw a new permutation every epoch.
        generator: the ``torch.Generator`` for the permutation; the global RNG if None.
        drop_last: drop the last batch if it is smaller than ``batch_size``.
        pin_memory: yield CPU batches in pinned (page-locked) memory.

    Example:
        >>> import torch, fntrain as ft
        >>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
        >>> loader = ft.TensorLoader(x, y, batch_size=4)
        >>> len(loader), [batch[1].tolist() for batch in loader]
        (3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        _check_tensors(tensors)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"'batch_size' must be an int >= 1, but got {batch_size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"'generator' must be a torch.Generator or None, but got {type(generator).__name__}"
            )
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.chunk_batches = 32

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        samples = self.tensors[0].shape[0]
        if self.drop_last:
            return samples // self.batch_size
        return -(-samples // self.batch_size)

    def _order(self) -> torch.Tensor | None:
        """Return this epoch's permutation (None: in order), drawing RNG as DataLoader does.

        A DataLoader iterator first draws a worker base seed from its generator (or the
        global RNG); RandomSampler then draws its permutation and, at exhaustion, one more.
        Drawing the same numbers keeps seeded runs identical whichever loader is used.
        """
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        if not self.shuffle:
            return None
        samples = self.tensors[0].shape[0]
        if self.generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            return torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
        order = torch.randperm(samples, generator=self.generator)
        torch.randperm(samples, generator=self.generator)
        return order

    def _gather(self, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Return ``tensor[index]``, in pinned memory when asked for."""
        if not self.pin_memory or tensor.is_cuda:
            # non_blocking: a blocking host-to-device copy waits for the GPU to catch up
            return tensor.index_select(0, index.to(tensor.device, non_blocking=True))
        out = torch.empty((index.numel(), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
        return torch.index_select(tensor, 0, index, out=out)

    def _chunks(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield runs of consecutive samples: views in order, or gathered when shuffled.

        Gathering ``chunk_batches`` batches at once and slicing them costs less than one
        scattered gather per batch, and keeps only that many batches in extra memory.
        """
        stop = len(self) * self.batch_size
        step = self.batch_size * self.chunk_batches
        for start in range(0, stop, step):
            end = min(start + step, stop)
            if order is None:
                yield tuple(t[start:end] for t in self.tensors)
            else:
                yield tuple(self._gather(t, order[start:end]) for t in self.tensors)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield one tuple of batch tensors at a time."""
        size = self.batch_size
        for chunk in self._chunks(self._order()):
            if self.pin_memory and not chunk[0].is_pinned():
                chunk = tuple(t if t.is_cuda else t.pin_memory() for t in chunk)
            for start in range(0, chunk[0].shape[0], size):
                yield tuple(t[start : start + size] for t in chunk)

    def state_dict(self) -> dict[str, Any]:
        """Return the generator's state, for ``save_checkpoint(extra=...)``."""
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator's state saved by :meth:`state_dict`."""
        saved = state.get("generator") if isinstance(state, dict) else None
        if (saved is None) != (self.generator is None):
            raise ValueError(
                "'state' and this TensorLoader disagree on having a generator: the state "
                f"has {'none' if saved is None else 'one'}, the loader "
                f"{'none' if self.generator is None else 'one'}"
            )
        if self.generator is not None:
            self.generator.set_state(saved)


def _check_tensors(tensors: tuple[Any, ...]) -> None:
    """Raise unless ``tensors`` are one or more tensors of equal length in dim 0."""
    if not tensors:
        raise ValueError("TensorLoader needs at least one tensor, but got none")
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise TypeError(
                f"'tensors[{position}]' must be a tensor with a batch dimension, "
                f"but got {type(tensor).__name__}"
            )
    lengths = [t.shape[0] for t in tensors]
    if len(set(lengths)) != 1:
        raise ValueError(f"'tensors' must have the same length in dim 0, but have {lengths}")
