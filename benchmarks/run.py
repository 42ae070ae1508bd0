"""fntrain beside the hand-written loop and the peers, interleaved in one process.

    pip install -e ".[bench]"
    python benchmarks/run.py                      # tiny MLP, small CNN, tiny transformer
    python benchmarks/run.py --model mlp --peers ""
    python benchmarks/run.py --markdown docs/performance.md   # the generated, stamped page

Every contender trains (or evaluates, or predicts with) the same model on the same data;
the contenders take turns, round after round, every other round in reverse order, so that
drift of the machine hits all alike. An exact copy of each hand-written tutorial loop runs
as one more contender: its ratio to the loop is the noise figure of the run.

Method: on the CPU, one intra-op thread (``--threads``, default 1) and the CPU time of that
thread (``time.thread_time``), which holds every kernel, the backward and the DataLoader
(no workers) but not the time other processes take; on CUDA, wall time after
``torch.cuda.synchronize()``. The objects that exist after the warm-up are frozen out of
the garbage collector (``gc.freeze``). The statistic is the fastest epoch over the rounds,
the median beside it.

Reported per contender: seconds per epoch, the ratio to the hand-written loop of the same
phase and the difference per batch in microseconds, ((contender - hand) seconds / batches
per epoch x 1e6), the noise figure beside them, for training the same against the floor
(pre-batched tensors, no loader), and the peak memory (CUDA: peak allocated; CPU: peak
growth of the resident set, sampled every millisecond in an untimed epoch). Peers that are
not installed are left out. Prints JSON lines, then a Markdown table and a headline per
model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fntrain as ft

Epoch = Callable[[], None]


def tiny_mlp() -> nn.Module:
    """Return the overhead-bound model: MLP 32-64-10 with BatchNorm and dropout."""
    return nn.Sequential(
        nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10)
    )


def small_cnn() -> nn.Module:
    """Return the compute-bound model: a small CNN for 3x32x32 images."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 8 * 8, 10),
    )  # fmt: skip


class TinyTransformer(nn.Module):
    """Token ids (batch, 32) -> 10 classes: an embedding, 2 encoder layers, mean pooling."""

    def __init__(self, vocab: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the logits of a batch of token ids."""
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


@dataclass(frozen=True)
class Spec:
    """A benchmark model: how to make it and its inputs, and its default data and rounds."""

    make: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]  # (samples, generator) -> inputs
    samples: int
    repeats: int


MODELS = {  # samples: the CNN's and the transformer's epochs take about as long
    "mlp": Spec(tiny_mlp, lambda n, gen: torch.randn(n, 32, generator=gen), 8192, 31),
    "cnn": Spec(small_cnn, lambda n, gen: torch.randn(n, 3, 32, 32, generator=gen), 1024, 11),
    "transformer": Spec(
        TinyTransformer, lambda n, gen: torch.randint(0, 1000, (n, 32), generator=gen), 1600, 11
    ),
}


class PeakMemory(AbstractContextManager["PeakMemory"]):
    """Peak memory of a block: CUDA peak allocated, or sampled RSS growth on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self, base: int) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss() - base)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif os.path.exists("/proc/self/statm"):
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),))
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


def hand_train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loader: Any,
    dev: torch.device,
    sum_on_device: bool = False,
) -> Epoch:
    """The tutorials' training loop, with the per-sample loss average done right.

    ``sum_on_device``: keep the loss sum on the device and read it once at the end (the
    hand-written loop at its fastest on a GPU) instead of ``loss.item()`` per batch.
    """
    criterion = nn.CrossEntropyLoss()

    def epoch() -> None:
        model.train()
        total: Any = torch.zeros((), device=dev) if sum_on_device else 0.0
        count = 0
        for data, label in loader:
            data, label = data.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
            opt.zero_grad()
            loss = criterion(model(data), label)
            loss.backward()
            opt.step()
            total += (loss.detach() if sum_on_device else loss.item()) * data.size(0)
            count += data.size(0)
        float(total) / count

    return epoch


def hand_train_copy(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loader: Any,
    dev: torch.device,
    sum_on_device: bool = False,
) -> Epoch:
    """An exact copy of ``hand_train``: its ratio to it is the noise figure of the run.

    Defined apart (own code objects, own interpreter caches) so nothing can favour either;
    tests/test_benchmarks.py checks that the bodies stay the same.
    """
    criterion = nn.CrossEntropyLoss()

    def epoch() -> None:
        model.train()
        total: Any = torch.zeros((), device=dev) if sum_on_device else 0.0
        count = 0
        for data, label in loader:
            data, label = data.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
            opt.zero_grad()
            loss = criterion(model(data), label)
            loss.backward()
            opt.step()
            total += (loss.detach() if sum_on_device else loss.item()) * data.size(0)
            count += data.size(0)
        float(total) / count

    return epoch


def floor_train(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any], dev: torch.device
) -> Epoch:
    """The same steps on pre-batched device tensors: no loader, no bookkeeping."""
    criterion = nn.CrossEntropyLoss()
    on_device = [(x.to(dev), y.to(dev)) for x, y in batches]

    def epoch() -> None:
        model.train()
        for data, label in on_device:
            opt.zero_grad()
            criterion(model(data), label).backward()
            opt.step()

    return epoch


def hand_predict(model: nn.Module, loader: Any, dev: torch.device) -> Epoch:
    """The tutorials' inference loop: outputs moved to the CPU batch by batch, then joined."""

    def epoch() -> None:
        model.eval()
        outputs = []
        with torch.no_grad():
            for data, _ in loader:
                outputs.append(model(data.to(dev, non_blocking=True)).cpu())
        torch.cat(outputs)

    return epoch


def hand_predict_copy(model: nn.Module, loader: Any, dev: torch.device) -> Epoch:
    """An exact copy of ``hand_predict``, for the noise figure of the predict phase."""

    def epoch() -> None:
        model.eval()
        outputs = []
        with torch.no_grad():
            for data, _ in loader:
                outputs.append(model(data.to(dev, non_blocking=True)).cpu())
        torch.cat(outputs)

    return epoch


def hand_eval(model: nn.Module, loader: Any, dev: torch.device) -> Epoch:
    """The tutorials' validation loop: loss and accuracy, sample-weighted."""
    criterion = nn.CrossEntropyLoss()

    def epoch() -> None:
        model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for data, label in loader:
                data, label = data.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
                output = model(data)
                total += criterion(output, label).item() * data.size(0)
                correct += (output.argmax(1) == label).sum().item()
                count += data.size(0)

    return epoch


def hand_eval_copy(model: nn.Module, loader: Any, dev: torch.device) -> Epoch:
    """An exact copy of ``hand_eval``, for the noise figure of the eval phase."""
    criterion = nn.CrossEntropyLoss()

    def epoch() -> None:
        model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for data, label in loader:
                data, label = data.to(dev, non_blocking=True), label.to(dev, non_blocking=True)
                output = model(data)
                total += criterion(output, label).item() * data.size(0)
                correct += (output.argmax(1) == label).sum().item()
                count += data.size(0)

    return epoch


def lightning_contenders(model: nn.Module, loader: Any, dev: torch.device) -> dict[str, Epoch]:
    """Lightning's Trainer.fit and Trainer.validate, timed from epoch start to end."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, index: int) -> None:
            out = self.net(batch[0])
            self.log("val_loss", nn.functional.cross_entropy(out, batch[1]), on_epoch=True)
            self.log("val_acc", (out.argmax(1) == batch[1]).float().mean(), on_epoch=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()

    def trainer() -> L.Trainer:
        return L.Trainer(
            max_epochs=1, accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip

    return {
        "lightning Trainer.fit": lambda: trainer().fit(module, loader),
        "lightning Trainer.validate": lambda: trainer().validate(module, loader, verbose=False),
    }


def ignite_contenders(model: nn.Module, loader: Any, dev: torch.device) -> dict[str, Epoch]:
    """Ignite's create_supervised_trainer and create_supervised_evaluator."""
    from ignite.engine import create_supervised_evaluator, create_supervised_trainer
    from ignite.metrics import Accuracy, Loss

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = create_supervised_trainer(model, opt, nn.CrossEntropyLoss(), device=dev)
    metrics = {"acc": Accuracy(device=dev), "loss": Loss(nn.CrossEntropyLoss(), device=dev)}
    evaluator = create_supervised_evaluator(model, metrics=metrics, device=dev)
    return {
        "ignite trainer": lambda: trainer.run(loader, max_epochs=1),
        "ignite evaluator": lambda: evaluator.run(loader),
    }


def torchtnt_contenders(model: nn.Module, loader: Any, dev: torch.device) -> dict[str, Epoch]:
    """torchtnt's train and evaluate with the AutoUnit and a plain EvalUnit."""
    from torchtnt.framework.auto_unit import AutoUnit
    from torchtnt.framework.evaluate import evaluate
    from torchtnt.framework.train import train
    from torchtnt.framework.unit import EvalUnit

    class Unit(AutoUnit[Any]):
        def compute_loss(self, state: Any, data: Any) -> tuple[torch.Tensor, Any]:
            out = self.module(data[0])
            return nn.functional.cross_entropy(out, data[1]), out

        def configure_optimizers_and_lr_scheduler(self, module: nn.Module) -> tuple[Any, None]:
            return torch.optim.SGD(module.parameters(), lr=0.01), None

    class Eval(EvalUnit[Any]):
        def eval_step(self, state: Any, data: Any) -> None:
            with torch.no_grad():
                out = model(data[0].to(dev))
                self.loss = nn.functional.cross_entropy(out, data[1].to(dev)).item()
                self.correct = (out.argmax(1) == data[1].to(dev)).sum().item()

    unit = Unit(module=model, device=dev)
    return {
        "torchtnt train": lambda: train(
            unit, loader, max_epochs=unit.train_progress.num_epochs_completed + 1
        ),
        "torchtnt evaluate": lambda: evaluate(Eval(), loader),
    }


PEERS = {
    "lightning": lightning_contenders,
    "ignite": ignite_contenders,
    "torchtnt": torchtnt_contenders,
}


def _ft_train(
    model: nn.Module, opt: torch.optim.Optimizer, loader: Any, dev: torch.device
) -> Epoch:
    """fntrain's train_epoch, with its default per-batch non-finite check."""
    loss = nn.CrossEntropyLoss()
    return lambda: ft.train_epoch(model, loader, loss, opt, dev)


def _ft_eval(model: nn.Module, loader: Any, dev: torch.device) -> Epoch:
    """fntrain's evaluate with accuracy."""
    loss, metrics = nn.CrossEntropyLoss(), {"acc": ft.accuracy()}
    return lambda: ft.evaluate(model, loader, loss, dev, metrics=metrics)


def _ft_predict(model: nn.Module, loader: Any, dev: torch.device) -> Epoch:
    """fntrain's predict."""
    return lambda: ft.predict(model, loader, dev)


FLOOR = "floor (pre-batched, no loader)"
HAND = {
    "train": "hand-written loop",
    "eval": "hand-written eval loop",
    "predict": "hand-written predict loop",
}
HAND_COPY = {phase: f"{name} (exact copy)" for phase, name in HAND.items()}


def _phase(label: str) -> str:
    """Tell a peer contender's phase from its label."""
    return "eval" if "valid" in label or "eval" in label else "train"


def contenders(
    name: str, samples: int, batch: int, dev: torch.device, peers: list[str]
) -> dict[str, tuple[str, Epoch]]:
    """Return contender name -> (phase, one epoch) for one model, each with its own copy."""
    spec = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    x = spec.inputs(samples, gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    pin = dev.type == "cuda"

    def fresh(fused: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = spec.make().to(dev)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, fused=fused or None)

    def dataloader() -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, pin_memory=pin)

    tensors = ft.TensorLoader(x.to(dev), y.to(dev), batch_size=batch, shuffle=True)  # no copies
    evaluated = fresh()[0]
    runs: dict[str, tuple[str, Epoch]] = {
        FLOOR: ("train", floor_train(*fresh(), list(dataloader()), dev)),
        HAND["train"]: ("train", hand_train(*fresh(), dataloader(), dev)),
        "ft.train_epoch": ("train", _ft_train(*fresh(), dataloader(), dev)),
        "ft.train_epoch + TensorLoader": ("train", _ft_train(*fresh(), tensors, dev)),
        HAND["eval"]: ("eval", hand_eval(evaluated, dataloader(), dev)),
        "ft.evaluate": ("eval", _ft_eval(evaluated, dataloader(), dev)),
        "ft.evaluate + TensorLoader": ("eval", _ft_eval(evaluated, tensors, dev)),
        HAND["predict"]: ("predict", hand_predict(evaluated, dataloader(), dev)),
        "ft.predict": ("predict", _ft_predict(evaluated, dataloader(), dev)),
        # last in their phase: farther from the hand loop in the turn order than fntrain
        HAND_COPY["train"]: ("train", hand_train_copy(*fresh(), dataloader(), dev)),
        HAND_COPY["eval"]: ("eval", hand_eval_copy(evaluated, dataloader(), dev)),
        HAND_COPY["predict"]: ("predict", hand_predict_copy(evaluated, dataloader(), dev)),
    }
    if dev.type == "cuda":  # fused SGD: what the per-batch loss sync costs once kernels are fast
        runs["hand-written loop, fused SGD"] = (
            "train", hand_train(*fresh(True), dataloader(), dev),
        )  # fmt: skip
        runs["hand-written loop, fused SGD, loss summed on the GPU"] = (
            "train", hand_train(*fresh(True), dataloader(), dev, sum_on_device=True),
        )  # fmt: skip
        runs["ft.train_epoch, fused SGD"] = (
            "train", _ft_train(*fresh(True), dataloader(), dev),
        )  # fmt: skip
    for peer in peers:
        if importlib.util.find_spec(peer) is not None:
            for label, epoch in PEERS[peer](fresh()[0], dataloader(), dev).items():
                runs[label] = (_phase(label), epoch)
    return runs


@dataclass(frozen=True)
class Clock:
    """How an epoch is timed: the clock to read and a sentence that says which it is."""

    now: Callable[[], float]
    method: str


def pick_clock(dev: torch.device, threads: int) -> Clock:
    """Thread CPU time for a one-thread CPU run, wall time otherwise.

    With one intra-op thread every kernel, the autograd backward and the DataLoader (no
    workers) run in the calling thread, so its CPU time is the whole epoch, and time the
    other processes of a shared machine take from it is not counted.
    """
    if dev.type == "cpu" and threads == 1:
        return Clock(
            time.thread_time,
            "the CPU time of the one thread (time.thread_time, torch.set_num_threads(1))",
        )
    if dev.type == "cuda":
        return Clock(
            time.perf_counter, "wall time (time.perf_counter after torch.cuda.synchronize())"
        )
    return Clock(time.perf_counter, f"wall time (time.perf_counter, {threads} threads)")


def measure(
    runs: dict[str, tuple[str, Epoch]], repeats: int, dev: torch.device, clock: Clock
) -> dict[str, tuple[list[float], int]]:
    """Time every contender in ``repeats`` interleaved rounds; return (seconds, peak bytes).

    Each runs once to warm up. Then what exists is frozen out of the garbage collector
    (``gc.freeze``): the collection before each epoch, and any in it, no longer walks
    torch's hundreds of thousands of objects (0.4 s a time here). Each runs once more,
    untimed, for its peak memory (the sampling thread would disturb the timings); then
    the rounds, in turns, every other one in reverse order.
    """
    for _, epoch in runs.values():
        epoch()
    gc.collect()
    gc.freeze()
    try:
        peaks: dict[str, int] = {}
        for name, (_, epoch) in runs.items():
            gc.collect()
            with PeakMemory(dev) as memory:
                epoch()
            peaks[name] = memory.peak
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(repeats):
            for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
                gc.collect()
                start = clock.now()
                runs[name][1]()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(clock.now() - start)
    finally:
        gc.unfreeze()
    return {name: (times[name], peaks[name]) for name in runs}


def _per_batch_us(seconds: float, batches: int) -> float:
    """Return seconds per epoch as microseconds per batch."""
    return seconds / batches * 1e6


def report(
    model: str,
    runs: dict[str, tuple[str, Epoch]],
    results: dict[str, tuple[list[float], int]],
    batches: int,
) -> list[dict[str, Any]]:
    """Print one JSON line per contender; return the rows.

    ``ratio``: the fastest epoch over the hand-written loop's fastest of the same phase;
    ``overhead_us``: the difference per batch, in microseconds. ``noise`` and ``noise_us``:
    the same for the loop's exact copy in the same run, the spread to expect of a ratio that
    means 'the same'. ``ratio_median`` and ``noise_median``: the ratios of the medians.
    Training rows also carry ``floor_ratio`` and ``floor_overhead_us``, against the floor.
    """
    rows = []
    floor = min(results[FLOOR][0])
    for phase, base in HAND.items():
        hand, hand_median = min(results[base][0]), statistics.median(results[base][0])
        copy = results[HAND_COPY[phase]][0]
        for name, (times, peak) in results.items():
            if runs[name][0] != phase:
                continue
            best, median = min(times), statistics.median(times)
            row = {
                "model": model,
                "phase": phase,
                "contender": name,
                "min_s": best,
                "median_s": median,
                "ratio": best / hand,
                "overhead_us": _per_batch_us(best - hand, batches),
                "noise": min(copy) / hand,
                "noise_us": _per_batch_us(min(copy) - hand, batches),
                "ratio_median": median / hand_median,
                "noise_median": statistics.median(copy) / hand_median,
                "floor_ratio": best / floor if phase == "train" else None,
                "floor_overhead_us": _per_batch_us(best - floor, batches)
                if phase == "train"
                else None,
                "peak_mb": peak / 2**20,
                "batches": batches,
                "runs": len(times),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _cell(ratio: float | None, us: float | None) -> str:
    """Return a ratio and its microseconds per batch as one table cell."""
    return "—" if ratio is None or us is None else f"{ratio:.3f}x ({us:+.1f} µs)"


def table(rows: list[dict[str, Any]], dev: torch.device, method: str) -> str:
    """Return the rows as a Markdown table with the machine and the clock it ran on."""
    threads = torch.get_num_threads()
    rounds = ", ".join(f"{m} {n}" for m, n in dict.fromkeys((r["model"], r["runs"]) for r in rows))
    lines = [
        f"Measured on {platform.machine()} with {threads} thread{'s' * (threads != 1)}, "
        f"device {dev}, torch {torch.__version__}; timed by {method}; the fastest epoch of "
        f"the rounds ({rounds}), the median beside it. In brackets: the difference per batch.",
        "",
        "| model | phase | contender | s/epoch min (median) | vs hand-written "
        "| noise (hand copy) | vs floor | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['phase']} | {r['contender']} | "
            f"{r['min_s']:.4f} ({r['median_s']:.4f}) | {_cell(r['ratio'], r['overhead_us'])} | "
            f"{_cell(r['noise'], r['noise_us'])} | "
            f"{_cell(r['floor_ratio'], r['floor_overhead_us'])} | {r['peak_mb']:.1f} |"
        )
    return "\n".join(lines)


HEADLINE = {  # contender -> what its headline ratio is against
    "ft.train_epoch": "hand",
    "ft.evaluate": "hand",
    "ft.predict": "hand",
    "ft.train_epoch + TensorLoader": "floor",
}


def headline(rows: list[dict[str, Any]]) -> str:
    """Return a line per model: fntrain's ratios, each beside the noise figure of its phase."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        parts = []
        for r in rows:
            against = HEADLINE.get(r["contender"]) if r["model"] == model else None
            if against == "hand":
                parts.append(
                    f"{r['contender']} **{r['ratio']:.3f}x** the hand-written loop "
                    f"({r['overhead_us']:+.1f} µs/batch; noise {r['noise']:.3f}x)"
                )
            elif against == "floor":
                parts.append(
                    f"{r['contender']} **{r['floor_ratio']:.3f}x** the floor "
                    f"({r['floor_overhead_us']:+.1f} µs/batch)"
                )
        lines.append(f"- {model}: " + "; ".join(parts))
    return "\n".join(lines)


def stamp(dev: torch.device) -> str:
    """Return when, from which commit, with which torch and on which machine this ran."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    ).stdout.strip() or "unknown"  # fmt: skip
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    return (
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC from "
        f"commit `{commit}` with torch {torch.__version__}, Python {platform.python_version()}, "
        f"on {platform.machine()} ({name or 'unknown processor'}, {os.cpu_count()} cores), "
        f"device {dev}."
    )


def page(rows: list[dict[str, Any]], dev: torch.device, command: str, method: str) -> str:
    """Return docs/performance.md: stamp, command, how to read it, headline lines, table."""
    return "\n".join([
        "# Performance (generated)",
        "",
        "<!-- Generated by benchmarks/run.py --markdown; do not edit by hand. -->",
        "",
        stamp(dev),
        "",
        f"Command: `{command}`",
        "",
        "Contenders take turns round after round in one process, every other round in "
        f"reverse order, after a warm-up. Each epoch is timed by {method}, with the objects "
        "of the warm-up frozen out of the garbage collector; a contender's time is its "
        "fastest epoch (the median beside it), its ratio that over the fastest epoch of the "
        "hand-written loop of the same phase. The noise figure is the ratio of an exact copy "
        "of the hand-written loop in the same run: a ratio no farther from 1.00x than it "
        "reads as 'the same'. In brackets: the difference in microseconds per batch, "
        "(contender - hand-written) seconds per epoch / batches per epoch x 1e6. 'vs floor': "
        "the same against the floor, the training steps on pre-batched tensors without a "
        "loader, which ft.train_epoch + TensorLoader comes closest to.",
        "",
        headline(rows),
        "",
        table(rows, dev, method),
        "",
    ])  # fmt: skip


def main() -> None:
    """Parse the options, run the rounds, print JSON lines and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument(
        "--repeats", type=int, default=None,
        help="timed rounds (default: 31 for the MLP, whose epochs are short, 11 for the others)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=None, help="override the data size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--peers", default="lightning,ignite,torchtnt")
    parser.add_argument("--device", default=str(ft.default_device()))
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: 1 on the CPU, timed by thread CPU time; "
        "torch's own number on CUDA)",
    )  # fmt: skip
    parser.add_argument("--markdown", type=Path, help="also write the stamped page here")
    args = parser.parse_args()
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    dev = torch.device(args.device)
    if args.threads or dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    clock = pick_clock(dev, torch.get_num_threads())
    peers = [p for p in args.peers.split(",") if p]
    rows = []
    for name in MODELS if args.model == "all" else [args.model]:
        samples, repeats = (
            args.samples or MODELS[name].samples,
            args.repeats or MODELS[name].repeats,
        )
        runs = contenders(name, samples, args.batch_size, dev, peers)
        batches = math.ceil(samples / args.batch_size)
        rows += report(name, runs, measure(runs, repeats, dev, clock), batches)
    print(table(rows, dev, clock.method), headline(rows), sep="\n\n")
    if args.markdown:
        command = shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
        args.markdown.write_text(page(rows, dev, command, clock.method), encoding="utf-8")


if __name__ == "__main__":
    main()
