"""What a batch is: splitting it, counting its samples, concatenating outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def describe(obj: object) -> str:
    """Describe a batch for an error message: its type and shape or length."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} Tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"a dict with keys {list(obj)}"
    if isinstance(obj, tuple | list):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def pair(batch: Any, index: int, who: str = "'loader' must yield") -> tuple[Any, Any]:
    """Split a training/evaluation batch into ``(inputs, targets)``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # a tuple: faster than a union
        return batch[0], batch[1]
    raise TypeError(f"{who} (inputs, targets) pairs, but batch {index} is {describe(batch)}")


def inputs_and_targets(batch: Any, index: int) -> tuple[Any, Any]:
    """Split a prediction batch: bare inputs, ``(inputs,)`` or ``(inputs, targets)``."""
    if isinstance(batch, torch.Tensor | dict):
        return batch, None
    if isinstance(batch, tuple | list) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(
        f"'loader' must yield inputs (a tensor or dict), (inputs,) or (inputs, targets), "
        f"but batch {index} is {describe(batch)}"
    )


def first_tensor(data: Any) -> torch.Tensor | None:
    """Return the first tensor found in nested tuples, lists and dicts."""
    if isinstance(data, torch.Tensor):
        return data
    items = data.values() if isinstance(data, dict) else data
    if isinstance(data, dict | tuple | list):
        for item in items:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def count(data: Any, index: int, what: str) -> int:
    """Return the number of samples in a batch: the length of its first tensor."""
    tensor = first_tensor(data)
    if tensor is None or tensor.dim() == 0:
        raise TypeError(
            f"cannot count the samples of batch {index}: its {what} are {describe(data)}, "
            f"expected a tensor (or tensors) with a batch dimension"
        )
    return tensor.shape[0]


def concat(parts: list[Any]) -> Any:
    """Concatenate per-batch structures (tensors, tuples, lists, dicts) along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() else torch.stack(parts)
    if isinstance(first, dict):
        return {key: concat([part[key] for part in parts]) for key in first}
    if isinstance(first, tuple | list):
        items = [concat([part[i] for part in parts]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    return parts


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], data: Any) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists, namedtuples and dicts."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {key: map_tensors(fn, value) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(map_tensors(fn, value) for value in data))
    if isinstance(data, tuple | list):
        return type(data)(map_tensors(fn, value) for value in data)
    return data


def take(data: Any, positions: torch.Tensor) -> Any:
    """Select ``positions`` along dim 0 of every tensor in a (nested) structure."""
    return map_tensors(lambda tensor: tensor.index_select(0, positions), data)
