"""Random number generator states as plain data (loadable with ``weights_only=True``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

_NOT_EXACT = "so resuming will not be bit-exact"


def capture() -> dict[str, Any]:
    """Return the states of Python's, NumPy's (if installed), torch's CPU and CUDA RNGs."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (
            str(kind),
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _describe(value: Any) -> str:
    """Name what ``value`` is, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__qualname__}"


def _cpu_bytes(value: Any) -> torch.Tensor:
    """Return ``value`` on the CPU; raise TypeError unless it is a 1-D uint8 tensor."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise TypeError(f"expected a 1-D uint8 tensor, but it is {_describe(value)}")
    return value.cpu()


def _numpy_parts(value: Any) -> tuple[str, torch.Tensor, int, int, float]:
    """Return the five parts of a saved NumPy state; raise TypeError if it has another form."""
    types = (str, torch.Tensor, int, int, float)
    if not isinstance(value, tuple | list) or len(value) != len(types):
        raise TypeError(f"expected a tuple of 5 parts, but it is {_describe(value)}")
    if not all(isinstance(part, kind) for part, kind in zip(value, types, strict=True)):
        got = ", ".join(type(part).__qualname__ for part in value)
        raise TypeError(f"expected (str, Tensor, int, int, float), but got ({got})")
    kind, keys, pos, has_gauss, cached = value
    return kind, keys.cpu(), pos, has_gauss, cached


def _set_numpy(generator: Any, value: Any) -> None:
    """Set a NumPy ``RandomState`` (or the ``numpy.random`` module) to a saved state."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = _numpy_parts(value)
    generator.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _check_numpy(value: Any) -> None:
    """Raise unless ``value`` sets a throwaway NumPy generator (only its form without NumPy)."""
    try:
        import numpy as np
    except ImportError:
        _numpy_parts(value)
    else:
        _set_numpy(np.random.RandomState(), value)


def _check_cuda(value: Any) -> None:
    """Raise unless ``value`` is a list of CUDA generator states (set on throwaways if we can)."""
    if not isinstance(value, list | tuple):
        raise TypeError(f"expected a list of uint8 tensors, but it is {_describe(value)}")
    for state in value:
        cpu_state = _cpu_bytes(state)
        if torch.cuda.is_available():
            torch.Generator(device="cuda").set_state(cpu_state)


def _trial(part: str, attempt: Callable[[], object]) -> None:
    """Raise ValueError naming ``part`` if ``attempt`` (on throwaway generators) fails."""
    try:
        attempt()
    except Exception as error:  # any failure means the saved state cannot be restored
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(f"the {part} RNG state in the file cannot be restored: {reason}") from None


def check(state: Any) -> None:
    """Raise ValueError unless every part of ``state`` restores as :func:`capture` wrote it.

    Each part is set on a throwaway generator, so a state that passes cannot fail midway
    in :func:`restore`, and checking changes no global RNG.
    """
    if not isinstance(state, dict):
        raise ValueError(f"the RNG state in the file must be a dict, but it is {_describe(state)}")
    _trial("Python", lambda: random.Random().setstate(state.get("python")))
    _trial("torch", lambda: torch.Generator().set_state(_cpu_bytes(state.get("torch"))))
    if "numpy" in state:
        _trial("NumPy", lambda: _check_numpy(state["numpy"]))
    if "cuda" in state:
        _trial("CUDA", lambda: _check_cuda(state["cuda"]))


def _restore_numpy(value: Any) -> list[str]:
    """Restore NumPy's global RNG; return why not where NumPy is missing."""
    try:
        import numpy as np
    except ImportError:
        return [f"the checkpoint holds a NumPy RNG state but NumPy is not installed; {_NOT_EXACT}"]
    _set_numpy(np.random, value)
    return []


def _restore_cuda(states: list[torch.Tensor]) -> list[str]:
    """Restore every CUDA device's RNG; return why not where CUDA or devices are missing."""
    if not torch.cuda.is_available():
        return [
            f"the checkpoint holds the CUDA RNG states of {len(states)} device(s) but CUDA is "
            f"not available here; they were not restored, {_NOT_EXACT}"
        ]
    if len(states) != torch.cuda.device_count():
        return [
            f"the checkpoint holds the CUDA RNG states of {len(states)} device(s) but "
            f"{torch.cuda.device_count()} are visible; they were not restored, {_NOT_EXACT}"
        ]
    torch.cuda.set_rng_state_all([state.cpu() for state in states])
    return []


def restore(state: dict[str, Any]) -> list[str]:
    """Restore the RNG states :func:`check` accepted; return each part that could not be.

    The returned messages say which generator was left as it was here (NumPy not
    installed, CUDA not available) and that resuming will therefore not be bit-exact.
    """
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    skipped = _restore_numpy(state["numpy"]) if "numpy" in state else []
    if state.get("cuda"):
        skipped += _restore_cuda(state["cuda"])
    return skipped
