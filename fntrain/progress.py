"""An optional tqdm progress bar, imported only when asked for."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from fntrain import distributed


class Progress(AbstractContextManager["Progress"]):
    """A per-pass progress bar that does nothing unless ``enabled`` (private, per call)."""

    def __init__(self, enabled: bool, loader: Any, desc: str) -> None:
        self.bar: Any = None
        self.shown, self.samples, self.started = 0.0, 0, time.monotonic()
        if enabled and distributed.is_main():  # one bar, on rank 0
            from tqdm import tqdm

            total = len(loader) if hasattr(loader, "__len__") else None
            self.bar = tqdm(total=total, desc=desc, unit="batch", disable=None, leave=False)

    def tick(self, samples: int = 0, running_loss: Callable[[], float] | None = None) -> None:
        """Advance one batch; at most twice a second, show ``running_loss()`` and samples/s."""
        if self.bar is None:
            return
        self.bar.update(1)
        self.samples += samples
        now = time.monotonic()
        if running_loss is not None and now - self.shown >= 0.5:
            self.shown = now
            rate = self.samples / max(now - self.started, 1e-9)
            loss = f"{running_loss():.4f}"
            self.bar.set_postfix(loss=loss, samples_per_s=f"{rate:.0f}", refresh=False)

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.close()
