"""Small models, data and the hand-written reference loop the tests compare against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(samples: int, features: int, classes: int, seed: int) -> TensorDataset:
    """Return a classification data set with a learnable signal."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=gen)
    weights = torch.randn(features, classes, generator=gen)
    targets = (inputs @ weights).argmax(dim=1)
    return TensorDataset(inputs, targets)


def loader(data: TensorDataset, batch_size: int, seed: int | None = None) -> DataLoader:
    """Return a DataLoader; shuffled with a seeded generator when ``seed`` is given."""
    if seed is None:
        return DataLoader(data, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)


def mlp(features: int, classes: int, seed: int, dropout: float = 0.25) -> nn.Module:
    """Return a small MLP with BatchNorm and dropout, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(features, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(16, classes),
    )


def token_batches(seed: int, lengths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return padded token batches: ids (batch, length) and targets, padding as -100."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for length in lengths:
        ids = torch.randint(1, 20, (3, length), generator=gen)
        targets = torch.randint(0, 5, (3, length), generator=gen)
        keep = torch.rand(3, length, generator=gen) < 0.7  # uneven real lengths
        batches.append((ids * keep, targets.masked_fill(~keep, -100)))
    return batches


class TokenModel(nn.Module):
    """A tiny per-token classifier (a language model's shape), initialised from seed 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def summed_tokens(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The loss summed over non-padding tokens, and their count."""
    flat = nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return flat, (targets != -100).sum()


def pad_cat(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Return token batches joined into one, padded to the longest."""
    length = max(ids.shape[1] for ids, _ in batches)
    pad = lambda t, v: nn.functional.pad(t, (0, length - t.shape[1]), value=v)  # noqa: E731
    return torch.cat([pad(i, 0) for i, _ in batches]), torch.cat([pad(t, -100) for _, t in batches])


def hand_train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> float:
    """Train one epoch the way the tutorials do; return the sample-weighted mean loss."""
    model.train()
    total, count = 0.0, 0
    for data, label in batches:
        data, label = data.to(device), label.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, label)
        loss.backward()
        optimizer.step()
        total += loss.item() * data.size(0)
        count += data.size(0)
    return total / count


def snapshot(model: nn.Module, grads: bool = True) -> dict[str, torch.Tensor | None]:
    """Return clones of every parameter and buffer of ``model``, and its gradients."""
    state = {f"state:{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters() if grads else ():
        state[f"grad:{name}"] = None if param.grad is None else param.grad.clone()
    return state


def assert_bit_identical(
    before: dict[str, torch.Tensor | None], after: dict[str, torch.Tensor | None]
) -> None:
    """Assert two snapshots hold the same keys and bit-identical tensors."""
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if value is None or other is None:
            assert value is other, key
        else:
            assert torch.equal(value, other), key


def torchrun(
    args: list[str], cwd: Path, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run a script or ``-m module`` with ``args`` on 2 gloo ranks under torchrun; fail with
    its output (and a crashed rank's Python stack, from faulthandler) unless it succeeds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += options
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.update(
        PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [*command, "-m", "tests.helpers", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    stacks = re.sub(r"Extension modules: .*?\(total: \d+\)", "", done.stderr, flags=re.S)
    assert done.returncode == 0, f"{done.stdout[-1500:]}\n{stacks[-6000:]}"  # modules: noise
    return done


def run_two_ranks(worker: str, out: Path) -> list[dict[str, Any]]:
    """Run ``python -m worker out`` on 2 gloo ranks under torchrun; load each rank's results."""
    torchrun(["-m", worker, str(out)], Path(__file__).resolve().parent.parent)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


if __name__ == "__main__":  # what torchrun() starts on each rank: the script, then a hard exit
    import runpy

    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as python script.py
        runpy.run_path(sys.argv[0], run_name="__main__")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the work is done: gloo's threads can abort interpreter finalization (SIGABRT)
