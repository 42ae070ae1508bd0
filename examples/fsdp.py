"""Train the digits CNN sharded with FSDP2: the same fntrain calls, sharded checkpoints.

    torchrun --standalone --nproc_per_node=2 examples/fsdp.py           # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=4 examples/fsdp.py           # 4 GPUs (NCCL)
    torchrun --standalone --nproc_per_node=2 examples/fsdp.py --quick   # seconds

Each layer's parameters are split across the ranks (``fully_shard``). ``save_checkpoint``
writes a folder in which every rank stores its own shards (nothing is gathered on one
rank); every rank resumes from it; at the end the folder is loaded into a plain model
and rank 0 writes it as one file for inference on a single machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

import fntrain as ft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp import start
from digits import digits_splits, small_cnn


def sharded_cnn(device: torch.device) -> nn.Module:
    """Return the digits CNN on ``device``, each layer with weights sharded over the ranks."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = small_cnn().to(device)
    for layer in model:
        if isinstance(layer, nn.Conv2d | nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def main() -> None:
    """Train and checkpoint sharded; resume on every rank; convert to one file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 epochs, for smoke tests")
    parser.add_argument("--out", default="fsdp_last", help="checkpoint folder")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs
    device = start()
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    train_set, val_set, _ = digits_splits(seed=0)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0)
    train_loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    val_loader = DataLoader(val_set, batch_size=256, sampler=ft.ShardSampler(val_set))
    model = sharded_cnn(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    loss_fn, metrics = nn.CrossEntropyLoss(), {"acc": ft.accuracy()}

    say(f"{world} ranks on {device}, FSDP2; {len(train_set)} training digits")
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        tr = ft.train_epoch(model, train_loader, loss_fn, optimizer, device,
                            metrics=metrics, clip_grad_norm=1.0)  # fmt: skip
        ev = ft.evaluate(model, val_loader, loss_fn, device, metrics=metrics)
        say(f"epoch {epoch + 1}  train loss {tr.loss:.4f}  grad norm {tr.grad_norm:.2f}  "
            f"val loss {ev.loss:.4f} acc {ev.metrics['acc']:.4f}")  # fmt: skip
        saved = ft.save_checkpoint(args.out, model, optimizer, epoch=epoch, metrics=ev.metrics)
    say(f"sharded checkpoint: {saved.path}/ ({saved.size} bytes in {world} shard files)")

    fresh = sharded_cnn(device)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=3e-3, weight_decay=1e-2)
    ckpt = ft.load_checkpoint(args.out, fresh, fresh_optimizer)
    again = ft.evaluate(fresh, val_loader, loss_fn, device, metrics=metrics)
    say(f"resumed from epoch {ckpt.epoch + 1}: val acc {again.metrics['acc']:.4f} "
        f"(saved {ckpt.metrics['acc']:.4f})")  # fmt: skip
    plain = small_cnn()  # the shards load into a plain model on every rank; rank 0 writes
    ft.load_checkpoint(args.out, plain)
    single = ft.save_checkpoint(f"{args.out}.pt", plain, epoch=ckpt.epoch)
    say(f"one file for inference: {single.path} ({single.size} bytes)")
    dist.barrier()  # every rank ends together: none tears the group down while one works on
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
