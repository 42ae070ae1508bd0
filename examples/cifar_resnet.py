"""ResNet-18 on CIFAR-10: the tutorial's augmentations, decay groups, cosine LR, mixed precision.

    python examples/cifar_resnet.py --data ~/datasets   # CIFAR-10 already downloaded there
    python examples/cifar_resnet.py --fake              # torchvision FakeData, offline
    python examples/cifar_resnet.py --quick             # FakeData, one short epoch

torchvision's resnet18 gets a 3x3 stem without max-pooling, the usual change for 32x32
images. AdamW decays only weight matrices and kernels (ft.param_groups), a cosine schedule
is stepped after every optimizer step (scheduler=), and forward passes run in float16 with
a GradScaler on GPUs, or in bfloat16 on CPUs with ``--bf16`` (autocast=, scaler=).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, FakeData
from torchvision.models import resnet18

import fntrain as ft

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def datasets(data: Path | None, fake_size: int) -> tuple[Dataset, Dataset]:
    """Return (train, test) sets with the tutorial's augmentation on the training side."""
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.6, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])  # fmt: skip
    test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    if data is not None:
        return (CIFAR10(str(data), train=True, transform=train_tf),
                CIFAR10(str(data), train=False, transform=test_tf))  # fmt: skip
    # FakeData draws image i from the seed i + random_offset: disjoint seeds, disjoint sets
    shape = (3, 32, 32)
    return (FakeData(fake_size, shape, 10, transform=train_tf, random_offset=0),
            FakeData(fake_size // 4, shape, 10, transform=test_tf,
                     random_offset=fake_size))  # fmt: skip


def cifar_resnet18() -> nn.Module:
    """Return resnet18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pooling."""
    model = resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def main() -> None:
    """Train and evaluate, keeping the best checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder holding cifar-10-batches-py")
    parser.add_argument("--fake", action="store_true", help="use FakeData (offline)")
    parser.add_argument("--quick", action="store_true", help="FakeData, 1 epoch, 64 images")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on a CPU")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/cifar"))
    args = parser.parse_args()
    if args.data is None and not (args.fake or args.quick):
        parser.error("point --data at CIFAR-10, or pass --fake or --quick")
    epochs, batch, size = (1, 16, 64) if args.quick else (args.epochs, args.batch_size, 5000)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    device = ft.default_device()
    train_set, test_set = datasets(None if args.quick else args.data, size)
    workers = 0 if args.quick else 2
    train_loader = DataLoader(train_set, batch, shuffle=True, num_workers=workers,
                              pin_memory=device.type == "cuda")  # fmt: skip
    test_loader = DataLoader(test_set, 256, num_workers=workers)
    model = cifar_resnet18().to(device)
    optimizer = torch.optim.AdamW(ft.param_groups(model, weight_decay=5e-2), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train_loader))
    if device.type == "cuda":
        amp = {"autocast": torch.float16, "scaler": torch.amp.GradScaler("cuda")}
    else:  # bfloat16 pays off on CPUs with bf16 units (AMX, AVX512-BF16) and slows others
        amp = {"autocast": torch.bfloat16} if args.bf16 else {}
    loss_fn, metrics = nn.CrossEntropyLoss(label_smoothing=0.1), {"acc": ft.accuracy()}

    best = float("-inf")
    for epoch in range(epochs):
        tr = ft.train_epoch(
            model, train_loader, loss_fn, optimizer, device, metrics=metrics,
            scheduler=schedule, clip_grad_norm=5.0, progress=True, **amp,
        )  # fmt: skip
        ev = ft.evaluate(model, test_loader, loss_fn, device, metrics=metrics)
        print(f"epoch {epoch + 1:2d}  train loss {tr.loss:.4f}  test loss {ev.loss:.4f} "
              f"acc {ev.metrics['acc']:.4f}  lr {tr.lr:.2e}  ({tr.seconds:.0f}s)")  # fmt: skip
        if ev.metrics["acc"] > best:
            best = ev.metrics["acc"]
            ft.save_checkpoint(args.out / "best.pt", model, optimizer, scheduler=schedule,
                               epoch=epoch, metrics=ev.metrics)  # fmt: skip
    print(f"best test accuracy {best:.4f}; checkpoint in {args.out / 'best.pt'}")


if __name__ == "__main__":
    main()
