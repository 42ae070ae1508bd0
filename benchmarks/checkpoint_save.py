"""Time save_checkpoint and load_checkpoint against torch.save/torch.load, in one process.

    python benchmarks/checkpoint_save.py [--megabytes 100] [--repeats 7]

Prints one JSON line per contender and Markdown tables of medians and ratios to the plain
``torch.save(model.state_dict(), path)`` and ``model.load_state_dict(torch.load(path))`` of
the tutorials. ``torch.save + fsync`` shows how much of the save's difference is the
durability (fsync); ``ft.load_checkpoint without digest`` loads the same file with its
checksum removed, so the ratio between the two fntrain loads is the cost of detecting
corruption.
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


def loaders(model: nn.Module, folder: Path) -> dict[str, Callable[[], None]]:
    """Return name -> a function that loads once (files written by the save contenders)."""
    payload = torch.load(folder / "ft.pt", weights_only=True)
    del payload["digest"]
    torch.save(payload, folder / "ft_nodigest.pt")

    def plain() -> None:
        model.load_state_dict(torch.load(folder / "plain.pt", weights_only=True))

    return {
        "model.load_state_dict(torch.load(...))": plain,
        "ft.load_checkpoint without digest": lambda: ft.load_checkpoint(
            folder / "ft_nodigest.pt", model
        ),
        "ft.load_checkpoint(model)": lambda: ft.load_checkpoint(folder / "ft.pt", model),
    }


def interleaved(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Time each run ``repeats`` times, alternating the order round after round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats):
        order = list(runs.items()) if round_ % 2 == 0 else list(runs.items())[::-1]
        for name, run in order:  # alternate, so no contender always follows a big write
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def table(title: str, times: dict[str, list[float]], sizes: dict[str, int]) -> None:
    """Print JSON lines and a Markdown table of medians and ratios to the first contender."""
    base = statistics.median(next(iter(times.values())))
    print(f"| {title} | median s | ratio | file MB |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        mb = sizes.get(name, 0) / 2**20
        row = {"contender": name, "median_s": median, "ratio": median / base, "mb": mb}
        print(json.dumps(row), flush=True)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {mb:.0f} |")


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
        times = interleaved(runs, args.repeats)
        sizes = {name: 0 for name in runs}
        for name, path in zip(runs, ["plain", "fsync", "tutorial", "ft", "ft_full"], strict=True):
            sizes[name] = (Path(tmp) / f"{path}.pt").stat().st_size
        loads = interleaved(loaders(model, Path(tmp)), args.repeats)
        files = ["plain.pt", "ft_nodigest.pt", "ft.pt"]
        read = {name: (Path(tmp) / f).stat().st_size for name, f in zip(loads, files, strict=True)}
    table(f"save ({args.megabytes} MB model)", times, sizes)
    table(f"load ({args.megabytes} MB model)", loads, read)


if __name__ == "__main__":
    main()
