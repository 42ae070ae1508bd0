"""What resuming at batch k of an epoch costs: skipped by index (DataLoader, TensorLoader) or
drawn and dropped (any other iterable). Prints the time to the first batch after the skip.

python benchmarks/resume_skip.py [--batches 4000]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fntrain as ft


class Stop(Exception):
    """Ends a pass from on_step."""


class Decoded(Dataset):
    """Samples that cost a little to load, as a decoded image does."""

    def __len__(self) -> int:
        return 64 * 4000

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, 16, 16), index % 10


def first_batch_after(make: Callable[[], Iterable[Any]], k: int, path: Path) -> float:
    """Return the seconds from train_epoch(resume=...) at batch k to its first batch."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def save_and_stop(step: ft.Step) -> None:
        if step.batch_index == k:
            ft.save_checkpoint(path, model, opt, epoch=0, step=step)
            raise Stop

    loader = make()
    one = [next(iter(make()))] * (k + 1) if not isinstance(loader, DataLoader) else loader
    with contextlib.suppress(Stop):  # a checkpoint at batch k (k + 1 batches make one)
        ft.train_epoch(model, one, nn.CrossEntropyLoss(), opt, "cpu", on_step=save_and_stop)
    ckpt = ft.load_checkpoint(path, model, opt)
    started, seen = time.perf_counter(), []

    def stop(step: ft.Step) -> None:
        seen.append(time.perf_counter() - started)
        raise Stop

    with contextlib.suppress(Stop):
        ft.train_epoch(model, loader, nn.CrossEntropyLoss(), opt, "cpu", on_step=stop,
                       resume=ckpt)  # fmt: skip
    return seen[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=4000)
    args = parser.parse_args()
    path = Path("resume_skip.pt")
    data = Decoded()
    print("k        DataLoader (skipped)   generator (drawn and dropped)")
    for k in (0, args.batches // 10, args.batches // 2, args.batches - 2):
        skipped = first_batch_after(lambda: DataLoader(data, batch_size=64, shuffle=True), k, path)
        replayed = first_batch_after(lambda: iter(DataLoader(data, batch_size=64)), k, path)
        print(f"{k:<8} {skipped * 1e3:8.1f} ms            {replayed * 1e3:8.1f} ms")
    path.unlink()


if __name__ == "__main__":
    main()
