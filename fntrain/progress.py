"""Progress of one pass: a tqdm bar in a terminal or notebook, else a few plain lines."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from fntrain import distributed


class Progress(contextlib.AbstractContextManager["Progress"]):
    """One pass's progress on rank 0: a kept tqdm.auto bar (terminal, Jupyter), else lines."""

    def __init__(self, enabled: bool, loader: Any, desc: str) -> None:
        self.bar: Any = None
        self.total: int | None = None
        self.on, self.desc, self.shown = enabled and distributed.is_main(), desc, 0.0
        self.batches, self.samples, self.started = 0, 0, time.monotonic()
        if self.on:
            with contextlib.suppress(TypeError):  # an iterable without len()
                self.total = len(loader)
            import tqdm.auto  # its tqdm is tqdm.notebook's inside Jupyter

            jupyter = tqdm.auto.notebook_tqdm is not tqdm.auto.std_tqdm
            if jupyter or getattr(sys.stderr, "isatty", lambda: False)():  # stderr may be None
                self.bar = tqdm.auto.tqdm(total=self.total, desc=desc, unit="batch", leave=True)

    def _show(self, values: Mapping[str, Any], where: str) -> None:
        """Put ``values`` (floats; tensors left out) and samples/s in the bar or in a line."""
        self.shown = now = time.monotonic()
        numbers = {name: f"{v:.4f}" for name, v in values.items() if isinstance(v, float)}
        numbers["samples/s"] = f"{self.samples / max(now - self.started, 1e-9):.0f}"
        if self.bar is not None:
            self.bar.set_postfix(numbers, refresh=False)
        else:
            shown = "".join(f"  {name} {value}" for name, value in numbers.items())
            print(f"{self.desc} {where}{shown}", file=sys.stderr, flush=True)

    def tick(self, samples: int, running: Callable[[], Mapping[str, Any]] | None = None) -> None:
        """Count one batch; now and then show ``running()``, the loss and metrics so far."""
        if not self.on:
            return
        self.batches, self.samples = self.batches + 1, self.samples + samples
        count, total = self.batches, self.total
        if self.bar is not None:
            self.bar.update(1)
            due = time.monotonic() - self.shown >= 0.5  # twice a second
        elif total:  # each quarter; the last one is left to the summary
            due = count < total and count * 4 // total > (count - 1) * 4 // total
        else:  # after 1, 2, 4, 8... batches
            due = count & (count - 1) == 0
        if due:
            of = f"/{total}" if total else ""
            self._show(running() if running else {}, f"{count}{of} batches")

    def finish(self, totals: Mapping[str, Any]) -> None:
        """Leave the pass's final, global numbers: in the kept bar, or as a summary line."""
        if self.on:
            took, samples = time.monotonic() - self.started, totals["samples"]
            where = f"done in {took:.1f}s: {self.batches} batches, {samples} samples"
            self._show({"loss": totals.get("loss"), **totals.get("metrics", {})}, where)

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.close()
