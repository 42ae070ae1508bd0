"""Random number generator states as plain data (loadable with ``weights_only=True``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

NOT_EXACT = "so resuming will not be bit-exact"


def capture() -> dict[str, Any]:
    """Return the states of Python's, NumPy's (if installed), torch's CPU and CUDA RNGs."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        keys = torch.from_numpy(keys.astype(np.int64))
        state["numpy"] = (str(kind), keys, int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _bytes(value: Any) -> torch.Tensor:
    """Return ``value`` on the CPU; raise TypeError unless it is a 1-D uint8 tensor."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise TypeError(f"expected a 1-D uint8 tensor, but it is a {type(value).__qualname__}")
    return value.cpu()


def _set_numpy(value: Any) -> list[str]:
    """Set NumPy's global RNG from its five saved parts (or say it is not installed)."""
    types = (str, torch.Tensor, int, int, float)
    if not isinstance(value, tuple | list) or len(value) != len(types):
        raise TypeError(f"expected a tuple of 5 parts, but it is a {type(value).__qualname__}")
    if not all(isinstance(part, kind) for part, kind in zip(value, types, strict=True)):
        raise TypeError(f"expected (str, Tensor, int, int, float), but got {value!r:.80}")
    try:
        import numpy as np
    except ImportError:
        return [f"the checkpoint holds a NumPy RNG state but NumPy is not installed; {NOT_EXACT}"]
    kind, keys, pos, has_gauss, cached = value
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    return []


def _set_cuda(states: Any) -> list[str]:
    """Set every CUDA device's RNG; say why not where CUDA or devices are missing."""
    if not isinstance(states, list | tuple):
        raise TypeError(f"expected a list of uint8 tensors, but it is a {type(states).__name__}")
    states = [_bytes(state) for state in states]
    if not torch.cuda.is_available() or len(states) != torch.cuda.device_count():
        visible = torch.cuda.device_count() if torch.cuda.is_available() else "no CUDA device"
        return [
            f"the checkpoint holds the CUDA RNG states of {len(states)} device(s) but "
            f"{visible} are visible here; they were not restored, {NOT_EXACT}"
        ]
    torch.cuda.set_rng_state_all(states)
    return []


def _part(name: str, attempt: Callable[[], list[str] | None]) -> list[str]:
    """Run ``attempt``; raise ValueError naming the ``name`` RNG state if it fails."""
    try:
        return attempt() or []
    except Exception as error:  # any failure means the saved state cannot be restored
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(f"the {name} RNG state in the file cannot be restored: {reason}") from None


def restore(state: Any) -> list[str]:
    """Restore the states :func:`capture` wrote; return each part that could not be, and why.

    A malformed part raises ValueError naming it, after the parts before it were set: the
    caller puts back what it captured before. The returned messages say which generator
    was left as it was here (NumPy not installed, CUDA not available).
    """
    if not isinstance(state, dict):
        raise ValueError(f"the RNG state in the file must be a dict, not {type(state).__name__}")
    _part("Python", lambda: random.setstate(state.get("python")))
    _part("torch", lambda: torch.set_rng_state(_bytes(state.get("torch"))))
    notes = _part("NumPy", lambda: _set_numpy(state["numpy"])) if "numpy" in state else []
    return notes + (_part("CUDA", lambda: _set_cuda(state["cuda"])) if "cuda" in state else [])
