"""Time save_checkpoint against torch.save of the same state, interleaved in one process.

    python benchmarks/checkpoint_save.py [--megabytes 100] [--repeats 7]

Prints one JSON line per contender and a Markdown table of medians and ratios to the plain
``torch.save(model.state_dict(), path)`` of the tutorials. ``torch.save + fsync`` shows how
much of the difference is the durability (fsync) rather than fntrain's bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fntrain as ft


def contenders(
    model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path
) -> dict[str, Callable[[], None]]:
    """Return name -> a function that saves once."""

    def plain() -> None:
        torch.save(model.state_dict(), folder / "plain.pt")

    def plain_fsync() -> None:
        with open(folder / "fsync.pt", "wb") as f:
            torch.save(model.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())

    def tutorial_dict() -> None:
        payload = {"epoch": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(payload, folder / "tutorial.pt")

    def fntrain_model() -> None:
        ft.save_checkpoint(folder / "ft.pt", model, epoch=1)

    def fntrain_full() -> None:
        ft.save_checkpoint(folder / "ft_full.pt", model, optimizer, epoch=1)

    return {
        "torch.save(state_dict)": plain,
        "torch.save + fsync": plain_fsync,
        "torch.save(tutorial dict with optimizer)": tutorial_dict,
        "ft.save_checkpoint(model)": fntrain_model,
        "ft.save_checkpoint(model, optimizer)": fntrain_full,
    }


def main() -> None:
    """Run the contenders interleaved and print medians and ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    side = int((args.megabytes * 2**20 / 4) ** 0.5)
    model = nn.Linear(side, side, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, side)).sum().backward()
    optimizer.step()  # momentum buffers: the optimizer state is as large as the model
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        runs = contenders(model, optimizer, Path(tmp))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.repeats):
            order = list(runs.items()) if round_ % 2 == 0 else list(runs.items())[::-1]
            for name, run in order:  # alternate, so no contender always follows a big write
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        sizes = {name: 0 for name in runs}
        for name, path in zip(runs, ["plain", "fsync", "tutorial", "ft", "ft_full"], strict=True):
            sizes[name] = (Path(tmp) / f"{path}.pt").stat().st_size
    base = statistics.median(times["torch.save(state_dict)"])
    print(f"| contender ({args.megabytes} MB model) | median s | ratio to torch.save | file MB |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        row = {
            "contender": name,
            "median_s": median,
            "ratio": median / base,
            "mb": sizes[name] / 2**20,
        }
        print(json.dumps(row), flush=True)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {sizes[name] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
