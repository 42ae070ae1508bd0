"""Random number generator states as plain data (loadable with ``weights_only=True``)."""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch


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


def check(state: Any) -> None:
    """Raise ValueError unless ``state`` looks like what :func:`capture` returns."""
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor):
        raise ValueError("the RNG state is missing or is not what save_checkpoint writes")
    if not isinstance(state.get("python"), tuple):
        raise ValueError("the Python RNG state is missing or malformed")


def restore(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture` (CUDA only where present)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    saved_cuda = state.get("cuda")
    if saved_cuda and torch.cuda.is_available():
        if len(saved_cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in saved_cuda])
        else:
            warnings.warn(
                f"the checkpoint holds RNG states for {len(saved_cuda)} CUDA devices but "
                f"{torch.cuda.device_count()} are visible; CUDA RNG states were not restored",
                stacklevel=3,
            )
