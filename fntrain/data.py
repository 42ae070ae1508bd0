"""Batches: where they go, what they hold, how many samples they count, where a pass starts."""

from __future__ import annotations

import collections
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fntrain.restore import capture_rng, restore_rng

_FORWARD_HINT = "; for other batch shapes pass forward=lambda model, batch: (outputs, targets)"


def default_device() -> torch.device:
    """Return the best available device: CUDA, then Apple's MPS, then the CPU.

    Example:
        >>> import fntrain as ft
        >>> ft.default_device().type in {"cuda", "mps", "cpu"}
        True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def as_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as a ``torch.device``; a bare ``"cuda"`` gets the current index."""
    if not isinstance(device, torch.device | str):
        raise TypeError(
            f"'device' must be a torch.device or a str such as 'cpu' or 'cuda:0', "
            f"but got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"'device' must name a device, but got {device!r}: {error}") from None
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(resolved.type)
    if backend is not None and not backend.is_available():
        raise ValueError(
            f"'device' is {str(device)!r} but {resolved.type.upper()} is not available here "
            f"(torch {torch.__version__}); pass device=ft.default_device() to use the best "
            f"device this machine has"
        )
    if resolved.type == "cuda" and resolved.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def check_model_on(model: nn.Module, device: torch.device) -> None:
    """Raise if a parameter or buffer of ``model`` is not on ``device``."""
    for kind, tensors in (("parameters", model.parameters()), ("buffers", model.buffers())):
        for tensor in tensors:
            if (found := tensor.device) == device:  # the common case: one comparison
                continue
            same_index = found.index in (None, device.index) or device.index is None
            if found.type != device.type or not same_index:
                raise ValueError(
                    f"'device' is {device} but the model's {kind} are on {tensor.device}; "
                    f"move the model first with model.to({str(device)!r})"
                )


def to_device(data: Any, device: torch.device) -> Any:
    """Move the tensors in nested tuples, lists and mappings to ``device`` (CUDA: non-blocking)."""
    if not isinstance(data, torch.Tensor):  # a bare tensor, the common case, skips the walk
        return map_tensors(lambda t: to_device(t, device), data)
    return data if data.device == device else data.to(device, non_blocking=device.type == "cuda")


def describe(obj: object) -> str:
    """Describe a batch for an error message: its type and shape, keys or length."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} Tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {list(obj)}"
    if isinstance(obj, tuple | list):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def pair(batch: Any, index: int, who: str = "'loader' must yield") -> Sequence[Any]:
    """Split a training/evaluation batch into ``(inputs, targets)``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # a tuple: faster than a union
        return batch
    hint = _FORWARD_HINT if who.startswith("'loader'") else ""
    raise TypeError(f"{who} (inputs, targets) pairs, but batch {index} is {describe(batch)}{hint}")


def inputs_and_targets(batch: Any, index: int) -> tuple[Any, Any]:
    """Split a prediction batch: bare inputs, ``(inputs,)`` or ``(inputs, targets)``."""
    if isinstance(batch, torch.Tensor | Mapping):
        return batch, None
    if isinstance(batch, tuple | list) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(
        f"'loader' must yield inputs (a tensor or mapping), (inputs,) or (inputs, targets), "
        f"but batch {index} is {describe(batch)}{_FORWARD_HINT}"
    )


def batch_size(data: Any) -> int | None:
    """Return the length of the first tensor with a batch dimension in ``data``, if any."""
    if isinstance(data, torch.Tensor):
        return data.shape[0] if data.dim() else None
    if isinstance(data, Mapping):
        data = data.values()
    elif not isinstance(data, tuple | list):
        return None
    return next((found for found in map(batch_size, data) if found is not None), None)


def count(outputs: Any, targets: Any, index: int) -> int:
    """Return a batch's number of samples: from the targets, else from the outputs."""
    if (found := batch_size(targets)) is None and (found := batch_size(outputs)) is None:
        raise TypeError(
            f"cannot count the samples of batch {index}: its targets are {describe(targets)} "
            f"and its outputs {describe(outputs)}, and neither is a tensor with a batch "
            f"dimension; return targets (or outputs) with one from 'forward'"
        )
    return found


def concat(parts: list[Any]) -> Any:
    """Concatenate per-batch structures along dim 0; lists of plain values (names) join as one."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if odd := next((i for i, part in enumerate(parts) if part.shape[1:] != first.shape[1:]), 0):
            raise ValueError(
                f"predict cannot join outputs (or targets) of shape {tuple(first.shape)} in batch "
                f"0 but {tuple(parts[odd].shape)} in batch {odd}: pad them to one length in the "
                f"loader's collate_fn, or return padded ones from forward=lambda model, batch: ..."
            )
        return torch.cat(parts) if first.dim() else torch.stack(parts)
    if isinstance(first, Mapping):
        return _rebuild(first, {key: concat([part[key] for part in parts]) for key in first})
    if isinstance(first, tuple | list):
        if _plain(first):
            return [item for part in parts for item in part]  # ids, file names: one per sample
        items = [concat([part[i] for part in parts]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    return parts


def _rebuild(like: Mapping[Any, Any], items: dict[Any, Any]) -> Mapping[Any, Any]:
    """Return ``items`` in a copy of ``like`` (a BatchEncoding, a ModelOutput), else in a dict."""
    if type(like) is dict:
        return items
    try:
        rebuilt = copy.copy(like)
        for key, value in items.items():
            rebuilt[key] = value  # type: ignore[index]
    except Exception:  # a read-only or uncopyable mapping
        return items
    return rebuilt


def _plain(items: tuple[Any, ...] | list[Any]) -> bool:
    """Tell whether a sequence holds plain values (names, ids), one per sample."""
    return not any(isinstance(x, torch.Tensor | Mapping | tuple | list) for x in items)


def map_tensors(
    fn: Callable[[torch.Tensor], torch.Tensor], data: Any, names: Callable[..., Any] | None = None
) -> Any:
    """Apply ``fn`` to every tensor in nested containers (``names`` to lists of plain values)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return _rebuild(data, {k: map_tensors(fn, v, names) for k, v in data.items()})
    if names is not None and isinstance(data, list) and _plain(data):
        return names(data)
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(map_tensors(fn, value, names) for value in data))
    if isinstance(data, tuple | list):
        return type(data)(map_tensors(fn, value, names) for value in data)
    return data


class TensorLoader:
    """Iterate over batches of in-memory tensors, like ``DataLoader(TensorDataset(...))``.

    Faster for small models: 32 batches at a time are gathered with one indexing operation
    per tensor, each batch a view of that. With ``shuffle=True`` the permutation is drawn as
    ``DataLoader``'s ``RandomSampler`` draws it, so for the same seed or ``generator`` both
    yield the same batches. Put the tensors on the GPU once to train there without copies.

    Args:
        *tensors: tensors with the same length in dim 0 (e.g. inputs and targets).
        batch_size: samples per batch.
        shuffle: draw a new permutation every epoch.
        generator: the ``torch.Generator`` for the permutation; the global RNG if None.
        drop_last: drop the last batch if it is smaller than ``batch_size``.

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
    ) -> None:
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"'batch_size' must be an int >= 1, but got {batch_size!r}")
        if not isinstance(generator, torch.Generator | None):
            kind = type(generator).__name__
            raise TypeError(f"'generator' must be a torch.Generator or None, but got {kind}")
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.generator, self.drop_last, self.chunk_batches = generator, drop_last, 32

    def __len__(self) -> int:
        """Return the number of batches per epoch."""
        samples = self.tensors[0].shape[0]
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _order(self) -> torch.Tensor | None:
        """Return this epoch's permutation (None: in order), drawing the RNG as DataLoader does."""
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the base seed
        if not self.shuffle:
            return None
        samples = self.tensors[0].shape[0]
        if self.generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            return torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
        order = torch.randperm(samples, generator=self.generator)
        torch.randperm(samples, generator=self.generator)  # RandomSampler's, at exhaustion
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Return an iterator over tuples of batch tensors; the order is drawn now."""
        return self._batches(self._order(), 0)

    def _batches(
        self, order: torch.Tensor | None, first: int
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield batches from batch ``first`` on, sliced from runs of ``chunk_batches`` batches."""
        size = self.batch_size
        stop, step = len(self) * size, size * self.chunk_batches
        for start in range(first * size, stop, step):  # views in order, else one gather each
            rows = slice(start, min(start + step, stop))
            if order is None:
                chunk = tuple(t[rows] for t in self.tensors)
            else:
                chunk = tuple(
                    t.index_select(0, order[rows].to(t.device, non_blocking=True))
                    for t in self.tensors
                )
            yield from zip(*(t.split(size) for t in chunk), strict=True)  # views: a call a tensor


def _generators(loader: Any) -> list[torch.Generator]:
    """Return the ``torch.Generator``s that draw a loader's order: its own, its sampler's."""
    batches = getattr(loader, "batch_sampler", None)
    owners = (loader, getattr(loader, "sampler", None), getattr(batches, "sampler", None))
    found = (getattr(owner, "generator", None) for owner in owners)
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


def origin(loader: Any, accumulate: int) -> dict[str, Any]:
    """Return what redraws a pass's data order later: the RNG states at its start."""
    states = [generator.get_state() for generator in _generators(loader)]
    return {"rng": capture_rng(), "loaders": states, "accumulate": accumulate}


class _Skipping:
    """A sampler that drops its inner sampler's first ``skip`` items, drawn by ``begin()``."""

    def __init__(self, inner: Any, skip: int) -> None:
        self.inner, self.skip, self.items = inner, skip, iter(())
        self.begun = False

    def __iter__(self) -> _Skipping:
        return self

    def begin(self) -> None:
        """Draw the order (where the first batch would) and drop the skipped indices."""
        if not self.begun:
            self.begun, self.items = True, iter(self.inner)
            collections.deque(itertools.islice(self.items, self.skip), maxlen=0)

    def __next__(self) -> Any:
        self.begin()
        return next(self.items)


def _skipped(loader: Iterable[Any], skip: int) -> Iterator[Any]:
    """Return an iterator over ``loader`` past its first ``skip`` batches, loading none it can."""
    if isinstance(loader, TensorLoader):
        return loader._batches(loader._order(), skip)
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        name = "sampler" if loader.batch_sampler is None else "batch_sampler"
        inner, skipping = getattr(loader, name), _Skipping(getattr(loader, name), skip)
        object.__setattr__(loader, name, skipping)  # DataLoader forbids setattr
        try:
            started = iter(loader)  # draws its base seed, then (workers) prefetches
        finally:
            object.__setattr__(loader, name, inner)
        skipping.begin()
        started._index_sampler = inner  # persistent workers' next epochs: the whole sampler
        return started
    batches = iter(loader)  # any other iterable: its batches are drawn and dropped
    collections.deque(itertools.islice(batches, skip), maxlen=0)
    return batches


def resumed(loader: Any, source: Iterable[Any], position: dict[str, Any]) -> Iterator[Any]:
    """Return ``source``'s (``loader``, or it watched) batches after the saved one, exactly."""
    skip, start = position["batch_index"] + 1, position["start"]
    if callable(getattr(loader, "load_state_dict", None)):  # it keeps its own place
        batches = iter(source)
        if (at := getattr(batches, "_num_yielded", skip)) != skip:
            raise ValueError(
                f"'loader' is a {type(loader).__name__} that starts at batch {at}, but 'resume' "
                f"was saved after batch {skip - 1}: call loader.load_state_dict() with the "
                f"state saved with it (e.g. in extra) first"
            )
    else:
        generators = _generators(loader)
        if len(generators) != len(start["loaders"]):
            raise ValueError(
                f"'resume' drew its data order with {len(start['loaders'])} generator(s) of the "
                f"loader, but 'loader' has {len(generators)}: pass a loader built as before"
            )
        restore_rng(start["rng"])
        for generator, state in zip(generators, start["loaders"], strict=True):
            generator.set_state(state)
        batches = _skipped(source, skip)
    if position["now"] is not None:  # as the next batch found them when the file was saved
        restore_rng(position["now"])
    return batches
