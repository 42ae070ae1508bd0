"""What a host sync per batch costs on CUDA: fntrain's two non-finite checks beside hand loops.

    python benchmarks/cuda_sync.py --repeats 7

``train_epoch`` reads each loss with ``.item()`` before the step (one sync per batch);
with ``on_nonfinite="defer"`` and a fused optimizer the check stays on the GPU (no sync
per batch, a few more kernels). Which is faster depends on whether the GPU or the host's
kernel launches set the pace, so three workloads are timed: a tiny MLP (launch-bound), a
wide MLP and a resnet18 on 32x32 images (torchvision). Data sits on the GPU (a shuffled
TensorLoader), so only the loop differs. Contenders run interleaved; medians, ratios to
the tutorial loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fntrain as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import hand_train  # the tutorial loop the other benchmark times

GPU = torch.device("cuda")


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def wide() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.BatchNorm1d(4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.BatchNorm1d(4096), nn.ReLU(), nn.Linear(4096, 10),
    )  # fmt: skip


def resnet() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


WORKLOADS = {  # model, sample shape, samples, batch size
    "tiny MLP, batch 64": (tiny, (32,), 8192, 64),
    "wide MLP, batch 256": (wide, (1024,), 8192, 256),
    "resnet18 32x32, batch 128": (resnet, (3, 32, 32), 2048, 128),
}


def contenders(name: str) -> dict[str, Callable[[], None]]:
    make, shape, samples, batch = WORKLOADS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *shape, generator=gen).cuda()
    y = torch.randint(0, 10, (samples,), generator=gen).cuda()

    def setup(fused: bool) -> tuple[nn.Module, Any, Any]:
        torch.manual_seed(0)
        model = make().cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused or None)
        return model, opt, ft.TensorLoader(x, y, batch_size=batch, shuffle=True)

    def fntrain(fused: bool, check: str) -> Callable[[], None]:
        model, opt, loader = setup(fused)
        loss = nn.CrossEntropyLoss()
        return lambda: ft.train_epoch(model, loader, loss, opt, GPU, on_nonfinite=check)

    return {
        "hand, foreach SGD, .item() per batch": hand_train(*setup(False), GPU),
        "hand, fused SGD, .item() per batch": hand_train(*setup(True), GPU),
        "hand, fused SGD, loss summed on the GPU": hand_train(
            *setup(True), GPU, sum_on_device=True
        ),
        "ft.train_epoch, foreach SGD": fntrain(False, "raise"),
        "ft.train_epoch, fused SGD": fntrain(True, "raise"),
        'ft.train_epoch, fused SGD, on_nonfinite="defer"': fntrain(True, "defer"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    lines = [
        f"Measured on {torch.cuda.get_device_name()}, torch {torch.__version__}.",
        "",
        "| workload | contender | median ms/epoch | ratio to the tutorial loop |",
        "|---|---|---|---|",
    ]
    for name in WORKLOADS:
        runs = contenders(name)
        for epoch in runs.values():
            epoch()
        times: dict[str, list[float]] = {label: [] for label in runs}
        for round_ in range(args.repeats):
            for label in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
                torch.cuda.synchronize()
                start = time.perf_counter()
                runs[label]()
                torch.cuda.synchronize()
                times[label].append(time.perf_counter() - start)
        base = statistics.median(times[next(iter(runs))])
        for label, seconds in times.items():
            median = statistics.median(seconds)
            lines.append(f"| {name} | {label} | {median * 1e3:.1f} | {median / base:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
