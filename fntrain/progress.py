"""Progress of one pass: a tqdm bar in a terminal or notebook, else a few plain lines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from fntrain import distributed

Running = Callable[[], Mapping[str, Any]]
EVERY = 60.0  # seconds between plain lines when the loader has no len()


def _numbers(values: Mapping[str, Any]) -> dict[str, str]:
    """Return the float values of ``values`` formatted for display (tensors left out)."""
    return {name: f"{value:.4f}" for name, value in values.items() if isinstance(value, float)}


class Progress(AbstractContextManager["Progress"]):
    """One pass's progress (private, per call), shown only if ``enabled`` and only on rank 0.

    In a terminal or a notebook: a ``tqdm.auto`` bar with the running loss and metrics, kept
    at the end with the pass's final numbers. Elsewhere (a log file, nohup, CI): a plain line
    to stderr at each quarter of the pass (every minute without ``len(loader)``), then one
    summary line.
    """

    def __init__(self, enabled: bool, loader: Any, desc: str) -> None:
        self.bar: Any = None
        self.lines = False
        self.desc, self.batches, self.samples = desc, 0, 0
        self.started = self.shown = time.monotonic()
        try:
            self.total: int | None = len(loader)
        except TypeError:  # an iterable without len()
            self.total = None
        if not enabled or not distributed.is_main():
            return
        from tqdm.autonotebook import tqdm as auto  # tqdm.notebook's inside Jupyter
        from tqdm.std import tqdm as plain

        if auto is plain and not sys.stderr.isatty():
            self.lines = True
        else:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit="batch", leave=True)

    def _rate(self, now: float) -> str:
        """Return the samples per second so far."""
        return f"{self.samples / max(now - self.started, 1e-9):.0f}"

    def _say(self, text: str) -> None:
        """Write one plain line to stderr at once."""
        print(text, file=sys.stderr, flush=True)

    def tick(self, samples: int = 0, running: Running | None = None) -> None:
        """Count one batch; show ``running()`` (loss, metrics so far) twice a second at most."""
        if self.bar is None and not self.lines:
            return
        self.batches += 1
        self.samples += samples
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            if now - self.shown >= 0.5:
                self.shown = now
                shown = {**_numbers(running() if running else {}), "samples/s": self._rate(now)}
                self.bar.set_postfix(shown, refresh=False)
            return
        if self.total:  # a line when a quarter is crossed, the last left to finish()
            due = (
                self.batches < self.total
                and self.batches * 4 // self.total > (self.batches - 1) * 4 // self.total
            )
        else:
            due = now - self.shown >= EVERY
        if due:
            self.shown = now
            numbers = " ".join(
                f"{k} {v}" for k, v in _numbers(running() if running else {}).items()
            )
            of = f"/{self.total}" if self.total else ""
            self._say(
                f"{self.desc} {self.batches}{of} batches  {numbers}  {self._rate(now)} samples/s"
            )

    def finish(self, totals: Mapping[str, Any]) -> None:
        """Leave the pass's final (global) numbers: in the kept bar, or as a summary line."""
        now = time.monotonic()
        numbers = _numbers({"loss": totals.get("loss"), **totals.get("metrics", {})})
        if self.bar is not None:
            self.bar.set_postfix({**numbers, "samples/s": self._rate(now)}, refresh=False)
        elif self.lines:
            shown = "".join(f"  {name} {value}" for name, value in numbers.items())
            took, samples = f"{now - self.started:.1f}s", totals["samples"]
            self._say(f"{self.desc} done: {self.batches} batches, {samples} samples, {took}{shown}")

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.close()
