"""Train the digits CNN with DistributedDataParallel: the same fntrain calls, global metrics.

    torchrun --standalone --nproc_per_node=2 examples/ddp.py           # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=2 examples/ddp.py --quick   # seconds
    python examples/ddp.py --quick                                     # one process, no torchrun

Each rank trains on its DistributedSampler shard; evaluate returns the loss and accuracy
over all ranks (an unpadded ft.ShardSampler makes them exact), rank 0 writes the
checkpoint, and every rank resumes from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import fntrain as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_splits, small_cnn


def start() -> torch.device:
    """Join the process group torchrun describes, or make a one-process group.

    Each rank takes its own GPU (NCCL) when the machine has one per local rank; with fewer
    GPUs than ranks every rank trains on the CPU over gloo, so all ranks agree.
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= ranks_here
    if "RANK" in os.environ:  # a crashed or stuck rank stops the others after 5 minutes
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def main() -> None:
    """Train, evaluate and checkpoint on every rank; resume a fresh model from the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for smoke tests")
    parser.add_argument("--out", default="ddp_last.pt", help="checkpoint file")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    device = start()
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    train_set, val_set, _ = digits_splits(seed=0)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    train_loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    val_loader = DataLoader(val_set, batch_size=256, sampler=ft.ShardSampler(val_set))
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(small_cnn().to(device))
    optimizer = torch.optim.AdamW(ft.param_groups(model, weight_decay=1e-2), lr=3e-3)
    loss_fn, metrics = nn.CrossEntropyLoss(), {"acc": ft.accuracy()}

    say(f"{world} ranks on {device}; {len(train_set)} training digits, {len(val_set)} for val")
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # a new shuffle every epoch
        tr = ft.train_epoch(model, train_loader, loss_fn, optimizer, device, metrics=metrics)
        ev = ft.evaluate(model, val_loader, loss_fn, device, metrics=metrics)
        say(f"epoch {epoch + 1}  train loss {tr.loss:.4f}  val loss {ev.loss:.4f} "
            f"acc {ev.metrics['acc']:.4f} over {ev.samples} digits")  # fmt: skip
        ft.save_checkpoint(args.out, model, optimizer, epoch=epoch, metrics=ev.metrics)

    fresh = nn.parallel.DistributedDataParallel(small_cnn().to(device))
    ckpt = ft.load_checkpoint(args.out, fresh, map_location=device)
    again = ft.evaluate(fresh, val_loader, loss_fn, device, metrics=metrics)
    say(f"resumed from epoch {ckpt.epoch + 1}: val acc {again.metrics['acc']:.4f} "
        f"(saved {ckpt.metrics['acc']:.4f})")  # fmt: skip
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
