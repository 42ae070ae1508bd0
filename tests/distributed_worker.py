"""Run by torchrun with 2 gloo ranks: DDP evaluate, train_epoch and checkpoint; save results.

python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.distributed_worker OUT
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import fntrain as ft
from tests.helpers import TokenModel, make_data, summed_tokens, token_batches


def small_model() -> nn.Module:
    """Return the model every rank and the single-process reference start from."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def plain(record: Any) -> dict[str, Any]:
    """Return a record's fields as plain data (metrics as a dict)."""
    fields = attrs.asdict(record, recurse=False)
    return {k: dict(v) if k == "metrics" else v for k, v in fields.items()}


def desync_cases() -> dict[str, Any]:
    """Cases that used to put the ranks out of step: each must raise, or agree, on every rank."""
    rank = dist.get_rank()
    data = make_data(32, 4, 3, 3)
    batches = [data[i : i + 4] for i in range(0, 32, 4)]
    model = nn.parallel.DistributedDataParallel(small_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    poisoned = [(x.clone(), y) for x, y in batches]
    if rank == 1:
        poisoned[2][0][0, 0] = float("nan")
    skipped = ft.train_epoch(model, poisoned, loss_fn, optimizer, "cpu", on_nonfinite="skip")
    uneven = batches[: 8 - rank]  # rank 0: 8 batches, rank 1: 7
    extra_metric = {"tm": MulticlassAccuracy(num_classes=3)} if rank == 0 else {}
    unjudgeable = [(x, y + 5 * rank) for x, y in batches]  # rank 1: classes 5-7 of 3: fails
    empty = [batches[0], (batches[1][0][:0], batches[1][1][:0]), batches[2]]  # on every rank
    acc = {"acc": ft.accuracy()}
    return {
        "eval_fails_on_one_rank": error_of(
            lambda: ft.evaluate(model, unjudgeable, loss_fn, "cpu", metrics=acc)
        ),
        "skip": (
            skipped.skipped_batches,
            skipped.steps,
            {k: v.clone() for k, v in model.module.state_dict().items()},
        ),
        "uneven_len": error_of(lambda: ft.train_epoch(model, uneven, loss_fn, optimizer, "cpu")),
        "uneven_iter": error_of(
            lambda: ft.train_epoch(model, iter(uneven), loss_fn, optimizer, "cpu")
        ),
        "empty_batch": error_of(lambda: ft.train_epoch(model, empty, loss_fn, optimizer, "cpu")),
        "torchmetrics_on_one_rank": error_of(
            lambda: ft.evaluate(model, batches, loss_fn, "cpu", metrics=extra_metric)
        ),
    }


def error_of(run: Callable[[], object]) -> str:
    """Return the message of the exception ``run`` raises ('' if none)."""
    try:
        run()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return ""


def rng_case(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Each rank's generator after a save, and after a load into scrambled generators."""
    torch.manual_seed(50 + dist.get_rank())
    ft.save_checkpoint(out / "rng.pt", model, optimizer, epoch=1)
    after_save = torch.rand(3)
    torch.manual_seed(12345)
    ft.load_checkpoint(out / "rng.pt", model, optimizer)
    return {"draws": (after_save, torch.rand(3))}


def node_local_case(out: Path, model: nn.Module) -> dict[str, Any]:
    """Save from each rank's own folder, where only rank 0 made the checkpoint folder."""
    here = Path.cwd()
    local = out / f"node{dist.get_rank()}"
    local.mkdir()
    if dist.get_rank() == 0:
        (local / "ckpt").mkdir()
    os.chdir(local)
    try:
        size = ft.save_checkpoint("ckpt/local.pt", model, epoch=0).size
        missing = error_of(lambda: ft.load_checkpoint("ckpt/local.pt", model))  # on rank 1
        (local / "stale").mkdir()  # rank 0: this save; rank 1: an older file of its own
        mine = local / "ckpt/local.pt" if dist.get_rank() == 0 else out / "rng.pt"
        shutil.copy(mine, "stale/local.pt")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        stale = error_of(lambda: ft.load_checkpoint("stale/local.pt", model))
        kept = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    finally:
        os.chdir(here)
    return {"local_size": size, "missing_on_one": missing, "stale_on_one": stale, "kept": kept}


class Named(torch.utils.data.Dataset):
    """Samples whose target is a file name: (value, "n{index}")."""

    def __len__(self) -> int:
        return 11

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return torch.full((4,), float(index)), f"n{index}"


def names_case(model: nn.Module) -> dict[str, Any]:
    """Predict with names as targets, gathered in data set order on every rank."""
    loader = DataLoader(Named(), batch_size=2, sampler=ft.ShardSampler(Named()))
    preds = ft.predict(nn.Identity(), loader, "cpu", gather="all")
    return {"named": (preds.outputs[:, 0].tolist(), preds.targets)}


def items_case() -> dict[str, Any]:
    """Train a DDP token model with a (sum, count) loss, ranks holding unequal token counts."""
    model = nn.parallel.DistributedDataParallel(TokenModel())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = token_batches(10 + dist.get_rank(), [3, 8, 5, 2] if dist.get_rank() else [6, 1, 7, 4])
    result = ft.train_epoch(model, batches, summed_tokens, optimizer, "cpu", accumulate=2)
    params = [p.detach().clone() for p in model.module.parameters()]
    return {"items_loss": result.loss, "items_params": params}


class Overstated(torch.utils.data.IterableDataset):
    """Batches whose len() promises one more than they yield."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches) + 1


def no_sync_case() -> dict[str, Any]:
    """accumulate=3 over 7 batches under DDP: count the gradient all-reduces, keep the weights."""
    batches = [make_data(8, 4, 3, 20 + 7 * dist.get_rank() + i)[:] for i in range(7)]
    counted = nn.parallel.DistributedDataParallel(small_model())
    calls: list[int] = []

    def counting(state, bucket):  # unannotated: DDP checks the annotation, a string fails
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)  # DDP's own: the gradients' mean over the ranks

    counted.register_comm_hook(None, counting)
    optimizer = torch.optim.SGD(counted.parameters(), lr=0.5)
    result = ft.train_epoch(counted, batches, nn.CrossEntropyLoss(), optimizer, "cpu", accumulate=3)
    hand = nn.parallel.DistributedDataParallel(small_model())  # nanoGPT's loop, same arithmetic
    hand_optimizer = torch.optim.SGD(hand.parameters(), lr=0.5)
    for first in range(0, 7, 3):
        window = batches[first : first + 3]
        hand_optimizer.zero_grad()
        for number, (x, y) in enumerate(window):
            hand.require_backward_grad_sync = number == len(window) - 1
            (nn.functional.cross_entropy(hand(x), y) * len(y)).backward()
        grads = [p.grad for p in hand.parameters()]
        torch._foreach_div_(grads, float(sum(len(y) for _, y in window)))
        hand_optimizer.step()
    same = all(map(torch.equal, counted.module.parameters(), hand.module.parameters()))
    short = nn.parallel.DistributedDataParallel(small_model())  # its len() says 4, it yields 3
    short_optimizer = torch.optim.SGD(short.parameters(), lr=0.5)
    loader = DataLoader(Overstated(batches[:3]), batch_size=None)
    ft.train_epoch(short, loader, nn.CrossEntropyLoss(), short_optimizer, "cpu", accumulate=2)
    return {
        "short_params": [p.detach().clone() for p in short.module.parameters()],
        "no_sync_calls": len(calls),
        "no_sync_steps": result.steps,
        "no_sync_same": same,
        "no_sync_flag_after": counted.require_backward_grad_sync,
    }


def main(out: Path) -> None:
    """Evaluate (exact and padded), train one epoch, checkpoint; write this rank's results."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    model = nn.parallel.DistributedDataParallel(small_model())
    loss_fn, metrics = nn.CrossEntropyLoss(), {"acc": ft.accuracy()}
    eval_data = make_data(51, 4, 3, 0)  # 51 = 2 * 25 + 1: DistributedSampler pads one sample
    f1 = MulticlassF1Score(num_classes=3, average="macro")  # syncs itself across ranks
    exact = ft.evaluate(
        model, DataLoader(eval_data, batch_size=7, sampler=ft.ShardSampler(eval_data)),
        loss_fn, "cpu", metrics={**metrics, "f1": f1},
    )  # fmt: skip
    padded_sampler = DistributedSampler(eval_data, shuffle=False)
    padded = ft.evaluate(
        model, DataLoader(eval_data, batch_size=7, sampler=padded_sampler), loss_fn, "cpu"
    )
    on_main = ft.predict(
        model, DataLoader(eval_data, batch_size=7, sampler=ft.ShardSampler(eval_data)), "cpu"
    )
    on_all = ft.predict(
        model, DataLoader(eval_data, batch_size=7, sampler=padded_sampler), "cpu", gather="all"
    )
    train_data = make_data(48, 4, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_sampler = DistributedSampler(train_data, shuffle=False)
    trained = ft.train_epoch(
        model, DataLoader(train_data, batch_size=8, sampler=train_sampler), loss_fn,
        optimizer, "cpu", metrics=metrics, progress=True,
    )  # fmt: skip
    saved = ft.save_checkpoint(out / "ddp.pt", model, optimizer, epoch=1)
    mismatched = {"acc": ft.accuracy()} if rank == 0 else {"top1": ft.top_k_accuracy(1)}
    try:
        ft.evaluate(model, [eval_data[:4]], loss_fn, "cpu", metrics=mismatched)
        mismatch_error = ""
    except RuntimeError as error:
        mismatch_error = str(error)
    results = {
        "exact": plain(exact),
        "padded": plain(padded),
        "trained": plain(trained),
        "saved_size": saved.size,
        "mismatch_error": mismatch_error,
        "predict_main": (on_main.outputs, on_main.targets, on_main.samples),
        "predict_all": (on_all.outputs, on_all.targets, on_all.samples),
        "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        **rng_case(out, model, optimizer),
        **node_local_case(out, model),
        **desync_cases(),
        **items_case(),
        **names_case(model),
        **no_sync_case(),
    }
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
