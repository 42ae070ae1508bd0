"""Running sums of per-batch parts: on the host when that is free, on the device otherwise."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

Part = torch.Tensor | int | float


def _exact(number: int | float) -> torch.Tensor:
    """Return a host sum as a tensor without losing precision (int64 or float64)."""
    dtype = torch.float64 if isinstance(number, float) else torch.int64
    return torch.tensor(number, dtype=dtype)


class Sums:
    """Adds up named parts batch after batch (private to one pass).

    A Python number, or a one-element CPU tensor (whose ``.item()`` costs less than a
    tensor add), is summed on the host. Any other tensor is summed where it lives, so
    values on a GPU stay there until :meth:`host` brings everything over in one transfer
    per dtype.
    """

    def __init__(self) -> None:
        self.totals: dict[Hashable, Any] = {}

    def add(self, key: Hashable, part: Part) -> None:
        """Add ``part`` to the running sum under ``key``."""
        if isinstance(part, torch.Tensor):
            part = part.item() if part.is_cpu and part.numel() == 1 else part.detach()
        total = self.totals.get(key)
        if total is None:
            self.totals[key] = part.clone() if isinstance(part, torch.Tensor) else part
        elif isinstance(total, torch.Tensor) and isinstance(part, torch.Tensor):
            total.add_(part)
        else:
            self.totals[key] = total + part

    def add_scaled(
        self,
        key: Hashable,
        part: torch.Tensor,
        weight: int,
        widen: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Add ``weight * part`` to a device sum kept in ``widen``'s dtype, in one kernel."""
        total = self.totals.get(key)
        if total is None:
            self.totals[key] = widen(part) * weight
        else:
            total.add_(part, alpha=weight)

    def host(self) -> dict[Hashable, torch.Tensor]:
        """Return every sum as a CPU tensor: numbers directly, device sums in one transfer."""
        out = {k: _exact(t) for k, t in self.totals.items() if not isinstance(t, torch.Tensor)}
        on_device: dict[torch.dtype, list[tuple[Hashable, torch.Tensor]]] = {}
        for key, total in self.totals.items():
            if isinstance(total, torch.Tensor):
                on_device.setdefault(total.dtype, []).append((key, total))
        for group in on_device.values():
            flat = torch.cat([total.reshape(-1) for _, total in group]).cpu()
            pieces = flat.split([total.numel() for _, total in group])
            for (key, total), piece in zip(group, pieces, strict=True):
                out[key] = piece.reshape(total.shape)
        return out
