"""Resume anywhere: a checkpoint saved from on_step continues its pass bit for bit; by steps."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import fntrain as ft
from tests.helpers import TokenModel, make_data, mlp, pad_cat, summed_tokens, token_batches

CPU = torch.device("cpu")
KINDS = ("global", "generator", "tensor", "tensor_generator", "list", "stateful", "sampler")


class Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


class Counted(Dataset):
    """A data set that counts how many samples were loaded from it."""

    def __init__(self, data: TensorDataset) -> None:
        self.data, self.loaded = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        self.loaded += 1
        return self.data[index]


def make_loader(kind: str, data: TensorDataset, batch: int) -> Iterable[Any]:
    """Return a shuffled loader of ``kind``, built the same way in every run."""
    seeded = torch.Generator().manual_seed(7)
    if kind == "global":
        return DataLoader(data, batch_size=batch, shuffle=True)
    if kind == "generator":
        return DataLoader(data, batch_size=batch, shuffle=True, generator=seeded)
    if kind == "sampler":  # a sampler with its own generator, not the loader's
        sampler = torch.utils.data.RandomSampler(data, generator=seeded)
        return DataLoader(data, batch_size=batch, sampler=sampler)
    if kind == "tensor":
        return ft.TensorLoader(*data.tensors, batch_size=batch, shuffle=True)
    if kind == "tensor_generator":
        return ft.TensorLoader(*data.tensors, batch_size=batch, shuffle=True, generator=seeded)
    if kind == "stateful":
        return StatefulDataLoader(data, batch_size=batch, shuffle=True)
    if kind == "workers":
        return DataLoader(data, batch_size=batch, shuffle=True, num_workers=2)
    return [data[i : i + batch] for i in range(0, len(data), batch)]  # "list": in order


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = mlp(4, 3, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    return model, opt, sched


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.state_dict().values())
    for entry in opt.state_dict()["state"].values():
        tensors += [v for v in entry.values() if isinstance(v, torch.Tensor)]
    return tensors


def run(
    kind: str,
    epochs: int,
    path: Path,
    kill: tuple[int, int] | None = None,
    accumulate: int = 1,
    resume_run: bool = False,
) -> tuple[list[torch.Tensor], list[ft.TrainResult]]:
    """Train ``epochs``; with ``kill=(epoch, step)``, save at that step and die; resume from it."""
    torch.manual_seed(123)
    data = make_data(61, 4, 3, seed=1)
    model, opt, sched = _setup(0)
    loader = make_loader(kind, data, 8)
    start, resume = 0, None
    if resume_run:  # a new process: other weights first, then the file
        model, opt, sched = _setup(99)
        torch.manual_seed(555)  # the RNG the file replaces
        resume = ft.load_checkpoint(path, model, opt, scheduler=sched)
        start = resume.epoch
        if kind == "stateful":
            loader.load_state_dict(resume.extra["loader"])
    results = []
    for epoch in range(start, epochs):

        def on_step(step: ft.Step, epoch: int = epoch) -> None:
            if kill is not None and not resume_run and (epoch, step.index) == kill:
                extra = {"loader": loader.state_dict()} if kind == "stateful" else {}
                ft.save_checkpoint(
                    path, model, opt, scheduler=sched, epoch=epoch, step=step, extra=extra
                )
                raise Killed

        results.append(
            ft.train_epoch(
                model, loader, nn.CrossEntropyLoss(), opt, CPU,
                on_step=on_step, accumulate=accumulate, resume=resume,
            )
        )  # fmt: skip
        sched.step()
        resume = None
    return _state(model, opt), results


@pytest.mark.slow
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(KINDS),
    epoch=st.integers(0, 1),
    step=st.integers(0, 7),
    accumulate=st.sampled_from([1, 2]),
)
def test_a_run_killed_at_any_step_resumes_bit_for_bit(
    tmp_path: Path, kind: str, epoch: int, step: int, accumulate: int
) -> None:
    """Killed after any step's save, a resumed run ends torch.equal to the uninterrupted one.

    For every kind of loader: DataLoader(shuffle=True) on the global RNG, with its own
    generator, with a sampler's generator, TensorLoader with and without a generator, a list,
    torchdata's StatefulDataLoader; with dropout, BatchNorm, AdamW, a scheduler, accumulation.
    """
    step = step // accumulate  # 8 batches: 8 / accumulate steps per epoch
    path = tmp_path / f"{kind}.pt"
    whole, _ = run(kind, 3, path, accumulate=accumulate)
    with pytest.raises(Killed):
        run(kind, 3, path, kill=(epoch, step), accumulate=accumulate)
    resumed, results = run(kind, 3, path, accumulate=accumulate, resume_run=True)
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)
    assert results[0].steps == -(-8 // accumulate) - step - 1  # what this call ran


@pytest.mark.slow
def test_a_dataloader_with_workers_resumes_bit_for_bit(tmp_path: Path) -> None:
    """num_workers=2: the order is drawn in the main process, so a resume is exact too."""
    whole, _ = run("workers", 3, tmp_path / "w.pt", accumulate=2)
    with pytest.raises(Killed):
        run("workers", 3, tmp_path / "w.pt", kill=(1, 1), accumulate=2)
    resumed, _ = run("workers", 3, tmp_path / "w.pt", accumulate=2, resume_run=True)
    for a, b in zip(whole, resumed, strict=True):
        assert torch.equal(a, b)


def test_a_resumed_pass_counts_what_it_ran_and_continues_the_step_index(tmp_path: Path) -> None:
    """The resumed call's Steps continue the pass's index and batch index; its record counts
    only its own batches, steps and samples."""
    data = make_data(40, 4, 3, seed=0)
    model, opt, _ = _setup(0)
    path, seen = tmp_path / "c.pt", []

    def save_at_2(step: ft.Step) -> None:
        if step.index == 2:
            ft.save_checkpoint(path, model, opt, epoch=0, step=step)

    ft.train_epoch(model, make_loader("list", data, 8), nn.CrossEntropyLoss(), opt, CPU,
                   on_step=save_at_2)  # fmt: skip
    ckpt = ft.load_checkpoint(path, model, opt)
    assert (ckpt.epoch, ckpt.step, ckpt.batch_index) == (0, 3, 2)
    result = ft.train_epoch(
        model, make_loader("list", data, 8), nn.CrossEntropyLoss(), opt, CPU,
        on_step=lambda s: seen.append((s.index, s.batch_index)), resume=ckpt,
    )  # fmt: skip
    assert seen == [(3, 3), (4, 4)]
    assert (result.batches, result.steps, result.samples) == (2, 2, 16)


def test_skipped_batches_are_not_loaded_from_a_dataloader(tmp_path: Path) -> None:
    """Resuming at batch k of a DataLoader loads only the batches after k, workers or not."""
    data = Counted(make_data(80, 4, 3, seed=0))
    model, opt, _ = _setup(0)
    path = tmp_path / "c.pt"

    def save_at_6(step: ft.Step) -> None:
        if step.index == 6:
            ft.save_checkpoint(path, model, opt, epoch=0, step=step)

    ft.train_epoch(model, DataLoader(data, batch_size=8, shuffle=True), nn.CrossEntropyLoss(),
                   opt, CPU, on_step=save_at_6)  # fmt: skip
    data.loaded = 0
    ckpt = ft.load_checkpoint(path, model, opt)
    shuffled = DataLoader(data, batch_size=8, shuffle=True)
    result = ft.train_epoch(model, shuffled, nn.CrossEntropyLoss(), opt, CPU, resume=ckpt)
    assert (result.batches, data.loaded) == (3, 24)
    assert len(shuffled) == 10  # the loader is left as it was


def test_other_iterables_are_drawn_and_dropped_up_to_the_saved_batch(tmp_path: Path) -> None:
    """A generator or an IterableDataset is replayed: the batches before the save are drawn
    (loaded) and dropped, and the pass continues after the saved one."""
    data = make_data(48, 4, 3, seed=0)
    drawn: list[int] = []

    def stream() -> Iterable[Any]:
        for i in range(6):
            drawn.append(i)
            yield data[i * 8 : i * 8 + 8]

    model, opt, _ = _setup(0)
    path = tmp_path / "c.pt"

    def save_at_1(step: ft.Step) -> None:
        if step.index == 1:
            ft.save_checkpoint(path, model, opt, epoch=0, step=step)

    ft.train_epoch(model, stream(), nn.CrossEntropyLoss(), opt, CPU, on_step=save_at_1)
    drawn.clear()
    ckpt = ft.load_checkpoint(path, model, opt)
    result = ft.train_epoch(model, stream(), nn.CrossEntropyLoss(), opt, CPU, resume=ckpt)
    assert (drawn, result.batches) == ([0, 1, 2, 3, 4, 5], 4)


def test_a_checkpoint_from_an_epoch_boundary_runs_a_full_pass(tmp_path: Path) -> None:
    """resume= with a checkpoint saved with an int step is a whole pass, as without it."""
    data = make_data(40, 4, 3, seed=0)
    model, opt, _ = _setup(0)
    ft.save_checkpoint(tmp_path / "e.pt", model, opt, epoch=0, step=5)
    ckpt = ft.load_checkpoint(tmp_path / "e.pt", model, opt)
    assert ckpt.batch_index is None
    result = ft.train_epoch(model, make_loader("list", data, 8), nn.CrossEntropyLoss(), opt, CPU,
                            resume=ckpt)  # fmt: skip
    assert result.batches == 5


def test_a_checkpoint_after_the_last_step_resumes_to_an_empty_pass(tmp_path: Path) -> None:
    """Saved at the pass's last step, the resumed pass has nothing left: zero batches, no error."""
    data = make_data(16, 4, 3, seed=0)
    model, opt, _ = _setup(0)
    path = tmp_path / "c.pt"
    on_step = lambda step: ft.save_checkpoint(path, model, opt, epoch=0, step=step)  # noqa: E731
    ft.train_epoch(model, make_loader("tensor", data, 8), nn.CrossEntropyLoss(), opt, CPU,
                   on_step=on_step)  # fmt: skip
    ckpt = ft.load_checkpoint(path, model, opt)
    result = ft.train_epoch(model, make_loader("tensor", data, 8), nn.CrossEntropyLoss(), opt,
                            CPU, resume=ckpt)  # fmt: skip
    assert (result.batches, result.steps, result.samples) == (0, 0, 0)


def test_resume_refuses_what_cannot_continue_exactly(tmp_path: Path) -> None:
    """A non-Checkpoint, another accumulate, another loader's generators, a StatefulDataLoader
    not restored, a hand-made Step: each raises naming the argument."""
    data = make_data(40, 4, 3, seed=0)
    model, opt, _ = _setup(0)
    path = tmp_path / "c.pt"
    loaders = {kind: make_loader(kind, data, 8) for kind in ("stateful", "tensor")}

    def save_at_1(step: ft.Step) -> None:
        if step.index == 1:
            ft.save_checkpoint(path, model, opt, epoch=0, step=step)

    loss = nn.CrossEntropyLoss()
    train = lambda loader, **kw: ft.train_epoch(model, loader, loss, opt, CPU, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="'resume' must be a Checkpoint"):
        train(loaders["tensor"], resume=str(path))
    train(loaders["stateful"], on_step=save_at_1)
    ckpt = ft.load_checkpoint(path, model, opt)
    with pytest.raises(ValueError, match="'accumulate' is 2 but 'resume' was saved with accumul"):
        train(loaders["stateful"], resume=ckpt, accumulate=2)
    with pytest.raises(ValueError, match="starts at batch 0, but 'resume' was saved after batch"):
        train(make_loader("stateful", data, 8), resume=ckpt)
    train(make_loader("tensor_generator", data, 8), on_step=save_at_1)
    ckpt = ft.load_checkpoint(path, model, opt)
    with pytest.raises(ValueError, match=r"1 generator.* but 'loader' has 0"):
        train(loaders["tensor"], resume=ckpt)
    with pytest.raises(ValueError, match=r"'step' is an ft\.Step without the origin"):
        ft.save_checkpoint(path, model, opt, epoch=0, step=ft.Step(0, 0, 1.0, 8, 0.1))


def test_max_steps_ends_the_pass_after_that_many_optimizer_steps() -> None:
    """max_steps counts optimizer steps, not batches: with accumulate=4, 3 steps are 12 batches;
    over an endless iterator it is the whole run."""
    data = make_data(40, 4, 3, seed=0)
    model, opt, _ = _setup(0)
    loss = nn.CrossEntropyLoss()
    endless = itertools.cycle([data[i : i + 8] for i in range(0, 40, 8)])
    result = ft.train_epoch(model, endless, loss, opt, CPU, accumulate=4, max_steps=3)
    assert (result.steps, result.batches) == (3, 12)
    assert next(endless)[1].equal(data[16:24][1])  # nothing more was drawn
    short = ft.train_epoch(model, make_loader("list", data, 8), loss, opt, CPU, max_steps=99)
    assert short.steps == 5
    with pytest.raises(ValueError, match="'max_steps' must be None or an int >= 1, but got 0"):
        ft.train_epoch(model, endless, loss, opt, CPU, max_steps=0)


def test_evaluate_inside_on_step_leaves_the_training_pass_intact() -> None:
    """Evaluating a model from on_step (eval mode, no_grad) changes nothing in the pass: the
    weights end torch.equal to a pass without it."""
    data = make_data(64, 4, 3, seed=0)
    val = [data[i : i + 16] for i in range(0, 64, 16)]  # a list draws no random numbers
    runs = []
    for evaluating in (False, True):
        torch.manual_seed(0)
        model, opt, _ = _setup(0)
        seen: list[float] = []

        def check(step: ft.Step, model: nn.Module = model, seen: list[float] = seen) -> None:
            seen.append(ft.evaluate(model, val, nn.CrossEntropyLoss(), CPU).loss)

        ft.train_epoch(model, make_loader("tensor", data, 8), nn.CrossEntropyLoss(), opt, CPU,
                       on_step=check if evaluating else None)  # fmt: skip
        runs.append(_state(model, opt))
        assert len(seen) == (8 if evaluating else 0)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 1000),
    lengths=st.lists(st.integers(1, 9), min_size=4, max_size=4),
    k=st.sampled_from([2, 4]),
)
def test_accumulation_averages_over_items_like_one_batch_k_times_larger(
    seed: int, lengths: list[int], k: int
) -> None:
    """With loss_fn returning (sum, count), accumulate=k steps like one padded batch of the k
    batches' tokens: the gradient of the mean over all items, not the mean of batch means; the
    epoch loss is the per-item mean."""
    batches = token_batches(seed, lengths)
    small, big = TokenModel(), TokenModel()
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (small, big)]
    a = ft.train_epoch(small, batches, summed_tokens, opts[0], CPU, accumulate=k)
    joined = [pad_cat(batches[i : i + k]) for i in range(0, 4, k)]
    b = ft.train_epoch(big, joined, summed_tokens, opts[1], CPU)
    for p, q in zip(small.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    model = TokenModel()
    tokens = sum(int((t != -100).sum()) for _, t in batches)
    summed = sum(float(summed_tokens(model(i), t)[0]) for i, t in batches)
    ev = ft.evaluate(model, batches, summed_tokens, CPU)
    assert ev.loss == pytest.approx(summed / tokens, rel=1e-6)


def test_a_per_item_loss_without_accumulation_is_the_hand_written_step() -> None:
    """accumulate=1 with (sum, count) back-propagates sum / count, bit-identical by hand."""
    batches = token_batches(0, [5, 7, 3])
    ours, hand = TokenModel(), TokenModel()
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (ours, hand)]
    ft.train_epoch(ours, batches, summed_tokens, opts[0], CPU)
    for ids, targets in batches:
        opts[1].zero_grad()
        total, count = summed_tokens(hand(ids), targets)
        (total / count).backward()
        opts[1].step()
    for p, q in zip(ours.parameters(), hand.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_bad_sum_and_count_is_refused_naming_loss_fn() -> None:
    """(sum, count) must be a floating scalar and a number or one-element tensor."""
    batches = token_batches(0, [5])
    model = TokenModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad: Callable[..., Any] = lambda out, y: (out.sum(), "3")  # noqa: E731
    with pytest.raises(TypeError, match=r"'loss_fn' returned \(sum, count\) for batch 0"):
        ft.train_epoch(model, batches, bad, opt, CPU)


def test_an_iterable_dataset_loader_resumes_by_replaying(tmp_path: Path) -> None:
    """A DataLoader over an IterableDataset cannot skip by index: it is replayed exactly."""

    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            data = make_data(40, 4, 3, seed=0)
            return iter(data[i] for i in range(40))

    path = tmp_path / "c.pt"
    finals = []
    for resumed in (False, True):
        model, opt, _ = _setup(0)
        loader = DataLoader(Stream(), batch_size=8)

        def save(
            step: ft.Step, model: nn.Module = model, opt: Any = opt, again: bool = resumed
        ) -> None:
            if step.index == 2 and not again:
                ft.save_checkpoint(path, model, opt, epoch=0, step=step)

        ckpt = ft.load_checkpoint(path, model, opt) if resumed else None
        result = ft.train_epoch(model, loader, nn.CrossEntropyLoss(), opt, CPU, on_step=save,
                                resume=ckpt)  # fmt: skip
        finals.append((_state(model, opt), result.batches))
    assert finals[1][1] == 2
    for a, b in zip(finals[0][0], finals[1][0], strict=True):
        assert torch.equal(a, b)


def _final(out: Path, rank: int = 0) -> dict[str, Any]:
    return torch.load(out / f"rank{rank}.pt", weights_only=False)


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["done"] == b["done"] == 23
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, entry in a["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


@pytest.mark.slow
def test_a_process_killed_mid_epoch_resumes_in_a_fresh_process_bit_for_bit(
    tmp_path: Path,
) -> None:
    """Train by steps, a checkpoint every 5 (after evaluating), the process dies hard at step
    13 (mid-epoch, 3 steps after the file), a new process resumes from the file: its weights
    and optimizer state end torch.equal to the run that never died (main-process augmentation
    noise from NumPy and Python, dropout, BatchNorm, OneCycleLR)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    command = [sys.executable, "-m", "tests.resume_worker"]
    run = lambda *args: subprocess.run(  # noqa: E731
        [*command, *map(str, args)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert run(tmp_path / "whole", tmp_path / "whole.pt").returncode == 0
    died = run(tmp_path / "killed", tmp_path / "killed.pt", 13)
    assert died.returncode == 1 and not (tmp_path / "killed" / "rank0.pt").exists(), died.stderr
    assert ft.load_checkpoint(tmp_path / "killed.pt", mlp(5, 3, 0)).extra["done"] == 10
    again = run(tmp_path / "killed", tmp_path / "killed.pt")
    assert again.returncode == 0, again.stderr
    _assert_same(_final(tmp_path / "whole"), _final(tmp_path / "killed"))


@pytest.mark.slow
def test_an_elastic_restart_resumes_from_the_mid_epoch_checkpoint(tmp_path: Path) -> None:
    """torchrun --max-restarts=1 on 2 gloo DDP ranks: rank 1 dies at step 13, torchrun starts
    both again, they resume from the step-10 file and end with the uninterrupted run's weights.
    The same file loaded in one process warns that the RNG streams differ and continues after
    its batch."""
    from tests.helpers import torchrun

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "whole").mkdir()
    (tmp_path / "elastic").mkdir()
    torchrun(["-m", "tests.resume_worker", str(tmp_path / "whole"), str(tmp_path / "w.pt")], root)
    args = ["-m", "tests.resume_worker", str(tmp_path / "elastic"), str(tmp_path / "e.pt"), "13"]
    torchrun(args, root, ("--max-restarts=1", "--monitor-interval=0.2"))
    assert [_final(tmp_path / "elastic", rank)["lives"] for rank in (0, 1)] == [2, 2]
    for rank in (0, 1):
        _assert_same(_final(tmp_path / "whole", rank), _final(tmp_path / "elastic", rank))
    model = mlp(5, 3, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    with pytest.warns(RuntimeWarning, match="2 process"):
        ckpt = ft.load_checkpoint(tmp_path / "w.pt", model, opt)
    data = make_data(90, 5, 3, 0)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    result = ft.train_epoch(model, loader, nn.CrossEntropyLoss(), opt, CPU, resume=ckpt)
    assert result.batches == len(loader) - ckpt.batch_index - 1
