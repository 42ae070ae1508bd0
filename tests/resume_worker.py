"""Train by steps with a checkpoint every few steps; die once at a step; resume from the file.

python -m tests.resume_worker OUT CKPT [KILL_AT]            one process
torchrun --max-restarts=1 ... -m tests.resume_worker OUT CKPT [KILL_AT]   DDP on gloo ranks

With KILL_AT, the process (under torchrun: rank 1) exits hard after that many steps in its
first life (TORCHELASTIC_RESTART_COUNT 0); started again, it resumes from CKPT. Each rank
writes its final weights and optimizer state to OUT/rank{r}.pt.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import fntrain as ft
from tests.checkpoint_worker import NoisyDigits
from tests.helpers import make_data, mlp

TOTAL, EVERY = 23, 5  # optimizer steps; a checkpoint every EVERY


def init_group() -> None:
    """Join the gloo group of this life of the job, in a store namespace of its own.

    torchrun keeps its store across restarts, and a restarted rank can read the address the
    dead life's rank 0 left there (Gloo connectFullMesh: connection refused; pytorch#167288).
    """
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    timeout = datetime.timedelta(seconds=60)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, size, is_master=serves, timeout=timeout)
    life = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"life{life}", store), rank=rank,
                            world_size=size, timeout=timeout)  # fmt: skip


def main(out: Path, path: Path, kill_at: int | None) -> None:
    """Train TOTAL steps over epochs of a shuffled loader, saving every EVERY steps."""
    if "WORLD_SIZE" in os.environ:
        init_group()
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    random.seed(0)
    np.random.seed(0)
    model = mlp(5, 3, seed=0, dropout=0.3)
    if size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=TOTAL)
    data = NoisyDigits()  # augmentation noise from NumPy and Python, in the main process
    sampler = DistributedSampler(data, shuffle=True, seed=3) if size > 1 else None
    train = DataLoader(data, batch_size=8, shuffle=sampler is None, sampler=sampler)
    val = DataLoader(make_data(30, 5, 3, 1), batch_size=10, sampler=ft.ShardSampler(range(30)))
    loss_fn = nn.CrossEntropyLoss()
    first_life = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    done, epoch, resume = 0, 0, None
    if path.exists():  # started again: continue where the last checkpoint was saved
        resume = ft.load_checkpoint(path, model, opt, scheduler=sched)
        done, epoch = resume.extra["done"], resume.epoch
    while done < TOTAL:
        if sampler is not None:
            sampler.set_epoch(epoch)

        def on_step(step: ft.Step, epoch: int = epoch) -> None:
            nonlocal done
            done += 1
            if done == kill_at and first_life and rank == size - 1:
                os._exit(1)  # the process dies, without cleanup
            if done % EVERY == 0:  # evaluate, then save last: the file holds the RNG as is
                ev = ft.evaluate(model, val, loss_fn, "cpu")
                ft.save_checkpoint(path, model, opt, scheduler=sched, epoch=epoch, step=step,
                                   metrics={"val": ev.loss}, extra={"done": done})  # fmt: skip

        ft.train_epoch(model, train, loss_fn, opt, "cpu", scheduler=sched, on_step=on_step,
                       max_steps=TOTAL - done, resume=resume)  # fmt: skip
        epoch, resume = epoch + 1, None
    plain = model.module if size > 1 else model
    lives = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) + 1
    state = {"model": plain.state_dict(), "optimizer": opt.state_dict(), "done": done}
    state["lives"] = lives
    torch.save(state, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
