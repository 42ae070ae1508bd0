"""Train a small CNN on scikit-learn's bundled handwritten digits (real data, no download).

    python examples/digits.py            # full run: about 20 epochs, >= 97% test accuracy
    python examples/digits.py --quick    # a few seconds, for the test suite

The 1,797 8x8 digit images ship inside scikit-learn. They are split 70/15/15 into train,
validation and test sets; the model with the best validation accuracy is checked on the
test set at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import fntrain as ft


def digits_splits(seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Return the digits as (train, validation, test) sets of 1x8x8 images in [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    whole = TensorDataset(images, labels)
    sizes = [len(whole) - 2 * int(0.15 * len(whole)), *[int(0.15 * len(whole))] * 2]
    train, val, test = random_split(whole, sizes, generator=torch.Generator().manual_seed(seed))
    return tuple(TensorDataset(*whole[part.indices]) for part in (train, val, test))


def small_cnn(classes: int = 10) -> nn.Module:
    """Return a two-block CNN with BatchNorm and dropout for 8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64 * 4 * 4, classes),
    )


def plot_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> bool:
    """Save train/val loss and accuracy per epoch as a PNG, the best epoch marked.

    Returns False, having written nothing, when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("matplotlib is not installed: no learning curve")
        return False
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(8, 3))
    for axis, name in zip(axes, ("loss", "acc"), strict=True):
        for split in ("train", "val"):
            axis.plot(epochs, [row[f"{split}_{name}"] for row in history], label=split)
        axis.axvline(
            best_epoch, color="grey", linestyle="--", label=f"best.pt (epoch {best_epoch})"
        )
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("loss" if name == "loss" else "accuracy")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def report(model: nn.Module, loader: DataLoader, device: torch.device) -> None:
    """Print precision, recall and F1 per class, from torchmetrics objects."""
    from torchmetrics.classification import (
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    per_class = {
        "precision": MulticlassPrecision(num_classes=10, average=None),
        "recall": MulticlassRecall(num_classes=10, average=None),
        "f1": MulticlassF1Score(num_classes=10, average=None),
    }
    values = ft.evaluate(model, loader, nn.CrossEntropyLoss(), device, metrics=per_class).metrics
    print("digit  precision  recall     f1")
    for digit in range(10):
        print(f"{digit:5d}  {values['precision'][digit]:9.3f}  {values['recall'][digit]:6.3f}"
              f"  {values['f1'][digit]:5.3f}")  # fmt: skip


def main() -> None:
    """Train, keep the best model by validation accuracy, report test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for smoke tests")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output folder")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    device = ft.default_device()
    train_set, val_set, test_set = digits_splits(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=gen)
    val_loader = DataLoader(val_set, batch_size=256)
    test_loader = DataLoader(test_set, batch_size=256)

    model = small_cnn().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    metrics = {"acc": ft.accuracy()}

    print(f"device {device}: {len(train_set)} train, {len(val_set)} val, {len(test_set)} test")
    best_acc, best_epoch, history = float("-inf"), 0, []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        tr = ft.train_epoch(model, train_loader, loss_fn, optimizer, device, metrics=metrics)
        ev = ft.evaluate(model, val_loader, loss_fn, device, metrics=metrics)
        print(
            f"epoch {epoch:2d}  train loss {tr.loss:.4f} acc {tr.metrics['acc']:.4f}  "
            f"val loss {ev.loss:.4f} acc {ev.metrics['acc']:.4f}  ({tr.seconds:.1f}s)"
        )
        history.append({"epoch": epoch, "train_loss": tr.loss, "val_loss": ev.loss,
                        "train_acc": tr.metrics["acc"], "val_acc": ev.metrics["acc"]})  # fmt: skip
        if ev.metrics["acc"] > best_acc:
            best_acc, best_epoch = ev.metrics["acc"], epoch
            ft.save_checkpoint(args.out / "best.pt", model, epoch=epoch, metrics=ev.metrics)

    curve = args.out / "learning_curve.png"
    plotted = plot_curves(history, best_epoch, curve)
    ft.load_checkpoint(args.out / "best.pt", model, map_location=device)
    report(model, test_loader, device)
    test = ft.evaluate(model, test_loader, loss_fn, device, metrics=metrics)
    print(
        f"test accuracy {test.metrics['acc']:.4f} on {test.samples} held-out digits "
        f"(best val acc {best_acc:.4f}; {time.perf_counter() - start:.1f}s in all)"
    )
    if plotted:
        print(f"learning curve: {curve.resolve()}")
    print(f"best model (epoch {best_epoch}): {(args.out / 'best.pt').resolve()}")


if __name__ == "__main__":
    main()
