"""Stop a run, resume it in a new process, and check the weights equal an uninterrupted run.

    python examples/resume.py            # 6 epochs: straight, and 3 + resume 3
    python examples/resume.py --quick    # 2 epochs: 1 + resume 1

The script starts itself twice more as child processes (``--part first`` and
``--part rest``), the way a job that was killed and restarted would run, then compares.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import fntrain as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_splits, small_cnn


def build() -> tuple[nn.Module, torch.optim.Optimizer, object, DataLoader]:
    """Return model, optimizer, scheduler and a shuffled loader, made the same way each time."""
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.AdamW(ft.param_groups(model, weight_decay=1e-2), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
    train_set, _, _ = digits_splits(seed=0)
    return model, optimizer, scheduler, DataLoader(train_set, batch_size=64, shuffle=True)


def train(epochs: range, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: object, loader: DataLoader, checkpoint: Path) -> None:  # fmt: skip
    """Train the given epochs, saving a resumable checkpoint after each."""
    for epoch in epochs:
        tr = ft.train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu")
        scheduler.step()
        ft.save_checkpoint(checkpoint, model, optimizer, scheduler=scheduler, epoch=epoch)
        print(f"  epoch {epoch + 1}: loss {tr.loss:.4f}, lr {tr.lr:.2e}")


def part(which: str, epochs: int, folder: Path) -> None:
    """Run one part in this process: 'straight', 'first' (half) or 'rest' (resume)."""
    model, optimizer, scheduler, loader = build()
    half = epochs // 2
    if which == "straight":
        train(range(epochs), model, optimizer, scheduler, loader, folder / "straight.pt")
    elif which == "first":
        train(range(half), model, optimizer, scheduler, loader, folder / "resumed.pt")
    else:
        ckpt = ft.load_checkpoint(folder / "resumed.pt", model, optimizer, scheduler=scheduler)
        print(f"  resumed after epoch {ckpt.epoch + 1}")
        train(range(ckpt.epoch + 1, epochs), model, optimizer, scheduler, loader,
              folder / "resumed.pt")  # fmt: skip


def main() -> None:
    """Run the three parts as separate processes and compare the final weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for smoke tests")
    parser.add_argument("--part", choices=["straight", "first", "rest"])
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    if args.part:
        part(args.part, epochs, args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("straight", "first", "rest"):
            print(f"process '{which}':", flush=True)
            command = [sys.executable, __file__, "--part", which, "--folder", tmp,
                       "--epochs", str(epochs)]  # fmt: skip
            subprocess.run(command, check=True)
        straight, resumed = (
            model_state(Path(tmp) / name) for name in ("straight.pt", "resumed.pt")
        )
    same = all(torch.equal(straight[k], resumed[k]) for k in straight)
    print(f"resumed run equals the uninterrupted run bit for bit: {same}")
    if not same:
        raise SystemExit(1)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """Return the model state stored in a checkpoint file."""
    return torch.load(path, weights_only=True)["model"]


if __name__ == "__main__":
    main()
