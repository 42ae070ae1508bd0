"""What a pass puts back: module flags, the buffers a failed batch changed, the RNG states."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fntrain.records import first_line

NOT_EXACT = "so resuming will not be bit-exact"


@contextmanager
def mode(model: nn.Module, training: bool, keep_eval: bool = False) -> Iterator[None]:
    """Set ``model``'s train/eval mode (or keep every flag); restore each submodule's own after."""
    before = [(module, module.training) for module in model.modules()]
    if not keep_eval:
        model.train(training)
    try:
        yield
    finally:
        for module, flag in before:
            if module.training != flag:  # Module.__setattr__ is slow: only what changed
                module.training = flag


class BatchGuard:
    """Saves the buffers a batch may change; puts them back, and runs ``undo``, if it fails."""

    def __init__(self, model: nn.Module) -> None:
        training = (m for m in model.modules() if m.training)  # eval-mode BatchNorm keeps its
        owned = (b for m in training for b in m._buffers.values() if b is not None)  # .buffers()
        self.live = list({id(b): b for b in owned}.values())  # a shared buffer once
        self.copy = [buffer.detach().clone() for buffer in self.live]
        self.undo: list[Callable[[], object]] = []  # what puts torchmetrics states back

    def save(self) -> None:
        """Copy the buffers before a batch changes them."""
        if self.undo:
            self.undo.clear()
        try:
            if self.live:
                torch._foreach_copy_(self.copy, self.live)
        except RuntimeError:  # a buffer was resized (a per-channel QAT observer's first batch)
            self.copy = [buffer.detach().clone() for buffer in self.live]

    def restore(self) -> None:
        """Put the buffers back and undo what was registered since ``save()``."""
        for live, copy in zip(self.live, self.copy, strict=True):
            if live.shape != copy.shape:  # resized since save(): a QAT observer's first batch
                live.resize_(copy.shape)
        if self.live:
            torch._foreach_copy_(self.live, self.copy)
        while self.undo:
            self.undo.pop()()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Set eval mode; torch.ao observers (they observe in eval mode too) stop; all put back."""
    observers = [m for m in model.modules() if hasattr(type(m), "calculate_qparams")]  # torchao's
    saved = [(b, b.clone()) for m in observers for b in m.buffers(recurse=False)]
    try:
        for module in observers:  # fake-quant (prepare_qat) stops; bare (prepare) gets buffers back
            getattr(module, "disable_observer", lambda: None)()
        with mode(model, False):
            yield
    finally:
        for live, copy in saved:  # a per-channel observer's first batch resizes its buffers
            live.resize_(copy.shape).copy_(copy)


def capture_rng() -> dict[str, Any]:
    """Return the states of Python's, NumPy's (if installed), torch's CPU and CUDA RNGs."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        words = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        state["numpy"] = (str(kind), words, int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _bytes(value: Any) -> torch.Tensor:
    """Return ``value`` on the CPU; raise TypeError unless it is a 1-D uint8 tensor."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise TypeError(f"expected a 1-D uint8 tensor, but it is a {type(value).__qualname__}")
    return value.cpu()


def _set_numpy(value: Any) -> list[str] | None:
    """Set NumPy's global RNG from its five saved parts (or say it is not installed)."""
    parts = list(value) if isinstance(value, tuple | list) else []
    if len(parts) != 5 or not all(map(isinstance, parts, (str, torch.Tensor, int, int, float))):
        raise TypeError(f"expected (str, Tensor, int, int, float), but got {value!r:.80}")
    try:
        import numpy as np
    except ImportError:
        return [f"the checkpoint holds a NumPy RNG state but NumPy is not installed; {NOT_EXACT}"]
    np.random.set_state((parts[0], parts[1].cpu().numpy().astype(np.uint32), *parts[2:]))
    return None


def _set_cuda(states: Any) -> list[str] | None:
    """Set every CUDA device's RNG; say why not where CUDA or devices are missing."""
    if not isinstance(states, list | tuple):
        raise TypeError(f"expected a list of uint8 tensors, but it is a {type(states).__name__}")
    states = [_bytes(state) for state in states]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else "no CUDA device"
    if len(states) != visible:  # always so without CUDA
        return [
            f"the checkpoint holds the CUDA RNG states of {len(states)} device(s) but "
            f"{visible} are visible here; they were not restored, {NOT_EXACT}"
        ]
    torch.cuda.set_rng_state_all(states)
    return None


def restore_rng(state: Any) -> list[str]:
    """Restore what :func:`capture_rng` saved; return why parts were skipped (bad ones raise)."""
    if not isinstance(state, dict):
        raise ValueError(f"the RNG state in the file must be a dict, not {type(state).__name__}")
    setters: dict[str, Callable[[Any], list[str] | None]] = {
        "Python": random.setstate, "torch": lambda value: torch.set_rng_state(_bytes(value)),
        "NumPy": _set_numpy, "CUDA": _set_cuda,
    }  # fmt: skip
    notes: list[str] = []
    for name, restore in setters.items():
        if name in ("Python", "torch") or name.lower() in state:  # NumPy, CUDA only if saved
            try:
                notes += restore(state.get(name.lower())) or []
            except Exception as error:  # any failure means the saved state cannot be restored
                problem = f"the {name} RNG state in the file cannot be restored"
                raise ValueError(f"{problem}: {first_line(error)}") from None
    return notes
