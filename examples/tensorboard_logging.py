"""Log every epoch's records to TensorBoard and to a CSV file.

    pip install -e ".[examples]"
    python examples/tensorboard_logging.py            # 10 epochs on the digits
    python examples/tensorboard_logging.py --quick    # 2 epochs, for the test suite
    tensorboard --logdir runs/tensorboard             # then open http://localhost:6006

fntrain returns records and logs nothing itself, so logging is a few lines of your own:
``records_to_scalars`` turns a TrainResult or EvalResult into name -> number, and the
loop hands that to ``SummaryWriter.add_scalar`` and to ``csv.DictWriter``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import fntrain as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_splits, small_cnn


def records_to_scalars(prefix: str, record: ft.TrainResult | ft.EvalResult) -> dict[str, float]:
    """Return ``{prefix/loss: ..., prefix/<metric>: ..., ...}`` for one record."""
    scalars = {f"{prefix}/loss": record.loss, f"{prefix}/seconds": record.seconds}
    scalars.update({f"{prefix}/{name}": float(v) for name, v in record.metrics.items()})
    if isinstance(record, ft.TrainResult):
        scalars[f"{prefix}/lr"] = record.lr
        if record.grad_norm is not None:
            scalars[f"{prefix}/grad_norm"] = record.grad_norm
    return scalars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for smoke tests")
    parser.add_argument("--out", type=Path, default=Path("runs/tensorboard"))
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    torch.manual_seed(0)
    device = ft.default_device()
    train_set, val_set, _ = digits_splits(seed=0)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    model = small_cnn().to(device)
    optimizer = torch.optim.AdamW(ft.param_groups(model, weight_decay=1e-2), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * len(train_loader)
    )
    loss_fn, metrics = nn.CrossEntropyLoss(), {"acc": ft.accuracy()}

    args.out.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(args.out) as writer, open(args.out / "metrics.csv", "w", newline="") as f:
        table: csv.DictWriter | None = None
        for epoch in range(1, epochs + 1):
            tr = ft.train_epoch(
                model, train_loader, loss_fn, optimizer, device,
                metrics=metrics, scheduler=scheduler, clip_grad_norm=5.0,
            )  # fmt: skip
            ev = ft.evaluate(model, val_loader, loss_fn, device, metrics=metrics)
            row = {**records_to_scalars("train", tr), **records_to_scalars("val", ev)}
            for name, value in row.items():
                writer.add_scalar(name, value, global_step=epoch)
            if table is None:
                table = csv.DictWriter(f, fieldnames=["epoch", *row])
                table.writeheader()
            table.writerow({"epoch": epoch, **row})
            print(f"epoch {epoch}: train loss {tr.loss:.4f}, val acc {ev.metrics['acc']:.4f}")
    print(f"wrote {args.out / 'metrics.csv'} and TensorBoard events to {args.out}")
    print(f"view them with: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
