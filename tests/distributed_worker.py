"""Run by torchrun with 2 gloo ranks: DDP evaluate, train_epoch and checkpoint; save results.

python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.distributed_worker OUT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassF1Score

import fntrain as ft
from tests.helpers import make_data


def small_model() -> nn.Module:
    """Return the model every rank and the single-process reference start from."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def plain(record: Any) -> dict[str, Any]:
    """Return a record's fields as plain data (metrics as a dict)."""
    fields = attrs.asdict(record, recurse=False)
    return {k: dict(v) if k == "metrics" else v for k, v in fields.items()}


def main(out: Path) -> None:
    """Evaluate (exact and padded), train one epoch, checkpoint; write this rank's results."""
    dist.init_process_group("gloo")
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
    }
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
