"""Run by torchrun with 2 gloo ranks: FSDP2 training, clipping and sharded checkpoints.

python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.fsdp_worker OUT

Each case returns what the tests compare; all go into OUT/rank{r}.pt. The process group's
timeout is short, so a hang fails the run fast.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

import fntrain as ft
from tests.distributed_worker import error_of
from tests.helpers import make_data

EPOCHS = 3


def dropout_model() -> nn.Module:
    """Return the model every case starts from: dropout, so the RNG matters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` with FSDP2: each Linear, then the root."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the model's whole (unsharded) state on every rank."""
    return {
        k: getattr(v, "full_tensor", lambda v=v: v)().clone() for k, v in model.state_dict().items()
    }


def build() -> tuple[nn.Module, torch.optim.Optimizer, Any, DataLoader]:
    """Return a sharded model, AdamW, a per-step scheduler and a shuffled sharded loader."""
    model = shard(dropout_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    data = make_data(64, 4, 3, 1)
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, seed=3))
    return model, optimizer, scheduler, loader


def train(
    model: nn.Module, optimizer: Any, scheduler: Any, loader: DataLoader, epochs: range
) -> None:
    """Train the given epochs, as a user's script does (set_epoch first)."""
    for epoch in epochs:
        loader.sampler.set_epoch(epoch)
        ft.train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu", scheduler=scheduler)


def resume_case(out: Path) -> dict[str, Any]:
    """Uninterrupted run against: 1 epoch, sharded save, fresh model and RNGs, load, the rest."""
    own_seed = 100 + dist.get_rank()  # each rank draws its own dropout masks
    model, optimizer, scheduler, loader = build()
    torch.manual_seed(own_seed)
    train(model, optimizer, scheduler, loader, range(EPOCHS))
    straight = full(model)
    model, optimizer, scheduler, loader = build()
    torch.manual_seed(own_seed)
    train(model, optimizer, scheduler, loader, range(1))
    saved = ft.save_checkpoint(out / "sharded.ckpt", model, optimizer, scheduler=scheduler, epoch=1)
    after_save = torch.rand(3)  # what this rank's generator draws next
    first_epoch = full(model)
    model, optimizer, scheduler, loader = build()
    torch.manual_seed(12345)  # as in a fresh process
    ckpt = ft.load_checkpoint(out / "sharded.ckpt", model, optimizer, scheduler=scheduler)
    after_load = torch.rand(3)
    model, optimizer, scheduler, loader = build()
    torch.manual_seed(12345)
    ft.load_checkpoint(out / "sharded.ckpt", model, optimizer, scheduler=scheduler)
    train(model, optimizer, scheduler, loader, range(ckpt.epoch, EPOCHS))
    return {
        "straight": straight,
        "resumed": full(model),
        "first_epoch": first_epoch,
        "saved_size": saved.size,
        "draws": (after_save, after_load),
        "sharded": isinstance(next(model.parameters()), torch.distributed.tensor.DTensor),
    }


def clip_case() -> dict[str, Any]:
    """One epoch with clipping: each rank holds half of every batch (the rank's rows)."""
    model = shard(dropout_model())
    model[2].p = 0.0  # no dropout: comparable with one process
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = make_data(48, 4, 3, 2)
    rows = [
        (x[dist.get_rank() :: 2], y[dist.get_rank() :: 2])
        for x, y in DataLoader(data, batch_size=16)
    ]
    result = ft.train_epoch(
        model, rows, nn.CrossEntropyLoss(), optimizer, "cpu", clip_grad_norm=0.05
    )
    val = make_data(51, 4, 3, 4)  # 26 and 25 samples: 4 batches of 7 on each rank
    loader = DataLoader(val, batch_size=7, sampler=ft.ShardSampler(val))
    ev = ft.evaluate(model, loader, nn.CrossEntropyLoss(), "cpu", metrics={"acc": ft.accuracy()})
    return {"clipped": full(model), "grad_norm": result.grad_norm, "eval": ev}


def file_into_sharded_case(out: Path) -> dict[str, Any]:
    """A single file saved from a plain model loads into a sharded one; the optimizer is refused."""
    plain = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    ft.save_checkpoint(out / "plain.pt", plain, epoch=4)
    model = shard(dropout_model())
    ckpt = ft.load_checkpoint(out / "plain.pt", model)
    refused = error_of(lambda: ft.load_checkpoint(
        out / "plain.pt", model, torch.optim.SGD(model.parameters(), lr=0.1)))  # fmt: skip
    equal = all(torch.equal(full(model)[k], v) for k, v in plain.state_dict().items())
    return {"file_loads": equal and ckpt.epoch == 4, "file_optimizer_refused": refused}


def misuse_case(out: Path) -> dict[str, Any]:
    """A path per rank for one sharded save; rank 0 alone converting the folder mid-run."""
    model = shard(dropout_model())
    own_path = out / f"rank{dist.get_rank()}.ckpt"
    refused = error_of(lambda: ft.save_checkpoint(own_path, model, epoch=1))
    left = sorted(entry.name for entry in out.iterdir() if ".ckpt" in entry.name)
    alone: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:  # the others go on: no collective may wait for them
        plain = dropout_model()
        ft.load_checkpoint(out / "sharded.ckpt", plain)
        alone = plain.state_dict()
    dist.barrier()
    ft.save_checkpoint(out / "other.ckpt", model, epoch=7)  # each rank loads another folder
    before = full(model)
    mixed = error_of(lambda: ft.load_checkpoint(out / ("sharded.ckpt", "other.ckpt")[
        dist.get_rank()], model))  # fmt: skip
    unchanged = all(torch.equal(v, full(model)[k]) for k, v in before.items())
    return {
        "own_path_refused": refused, "left_after_refusal": left, "alone": alone,
        "mixed_load_refused": mixed, "mixed_load_unchanged": unchanged,
    }  # fmt: skip


def bn_model() -> nn.Module:
    """Linear layers sharded, BatchNorm not (its weight and bias stay plain tensors)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    fully_shard(model[0])
    fully_shard(model[2])
    return model


def buffers_case(out: Path) -> dict[str, Any]:
    """BatchNorm under FSDP2: each rank's running statistics are its own; both come back."""
    model = bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_data(32, 4, 3, 10 + dist.get_rank())  # each rank its own data
    ft.train_epoch(model, DataLoader(data, batch_size=8), nn.CrossEntropyLoss(), optimizer, "cpu")
    ft.save_checkpoint(out / "bn.ckpt", model, optimizer, epoch=0)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    fresh = bn_model()
    ft.load_checkpoint(out / "bn.ckpt", fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    return {"bn_saved": saved, "bn_loaded": {k: fresh.state_dict()[k].clone() for k in saved}}


def main(out: Path) -> None:
    """Run every case on this rank; save the results."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    results = {
        **resume_case(out),
        **clip_case(),
        **file_into_sharded_case(out),
        **misuse_case(out),
        **buffers_case(out),
    }
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
