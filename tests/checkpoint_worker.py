"""Processes for the checkpoint tests: train straight / first part / resumed, or hammer saves.

python -m tests.checkpoint_worker straight OUT EPOCHS [--generator]
python -m tests.checkpoint_worker first CKPT EPOCHS [--generator]
python -m tests.checkpoint_worker resume CKPT OUT EPOCHS [--generator]
python -m tests.checkpoint_worker hammer TARGET MEGABYTES
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fntrain as ft
from tests.helpers import make_data, mlp


class NoisyDigits(Dataset):
    """A data set whose samples draw noise from Python's and NumPy's RNGs, as augmentations do."""

    def __init__(self) -> None:
        self.data = make_data(96, 5, 3, 0)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, target = self.data[index]
        noise = np.random.normal(size=inputs.shape).astype(np.float32) * 0.05
        return inputs + torch.from_numpy(noise) * random.random(), target


def build(use_generator: bool) -> tuple[nn.Module, torch.optim.Optimizer, object, DataLoader]:
    """Return model, optimizer, per-step scheduler and a shuffled loader, freshly made."""
    model = mlp(5, 3, seed=0, dropout=0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    generator = torch.Generator().manual_seed(7) if use_generator else None
    loader = DataLoader(NoisyDigits(), batch_size=10, shuffle=True, generator=generator)
    return model, optimizer, scheduler, loader


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
          loader: DataLoader, epochs: int) -> None:  # fmt: skip
    """Train ``epochs`` epochs, stepping the scheduler once per epoch."""
    for _ in range(epochs):
        ft.train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu")
        scheduler.step()


def final_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the final model and optimizer states for the test to compare."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)


def scramble() -> None:
    """Move every RNG away from where a fresh process starts, so resume must restore them."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def hammer(target: str, megabytes: int) -> None:
    """Save checkpoints over ``target`` forever; weights and extra carry the iteration."""
    model = nn.Linear(megabytes * 1024 * 256 // 64, 64, bias=False)
    for i in range(10**9):
        with torch.no_grad():
            model.weight.fill_(float(i))
        print(f"saving {i}", flush=True)
        ft.save_checkpoint(target, model, epoch=i, extra={"i": i})
        print(f"saved {i}", flush=True)


def main(argv: list[str]) -> None:
    """Dispatch on the first argument."""
    use_generator = "--generator" in argv
    args = [a for a in argv if a != "--generator"]
    if args[0] == "hammer":
        hammer(args[1], int(args[2]))
        return
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model, optimizer, scheduler, loader = build(use_generator)
    if args[0] == "straight":
        train(model, optimizer, scheduler, loader, int(args[2]))
        final_state(args[1], model, optimizer)
    elif args[0] == "first":
        train(model, optimizer, scheduler, loader, int(args[2]))
        extra = {"loader_rng": loader.generator.get_state()} if use_generator else {}
        ft.save_checkpoint(
            args[1], model, optimizer, scheduler=scheduler, epoch=int(args[2]), extra=extra
        )
    elif args[0] == "resume":
        scramble()
        ckpt = ft.load_checkpoint(args[1], model, optimizer, scheduler=scheduler)
        if use_generator:
            loader.generator.set_state(ckpt.extra["loader_rng"])
        train(model, optimizer, scheduler, loader, int(args[3]) - ckpt.epoch)
        final_state(args[2], model, optimizer)
    else:
        raise SystemExit(f"unknown mode {args[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
