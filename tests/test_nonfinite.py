"""on_nonfinite="defer": the non-finite check on the device, with a fused optimizer.

The check is device-agnostic (fused optimizers honour ``found_inf`` on the CPU too), so
these tests run it on the CPU and compare it with the per-batch host check, which is the
contract. tests/test_cuda.py runs it on CUDA, where it saves the host sync per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
from fntrain.nonfinite import DeferredCheck
from tests.helpers import loader, make_data, mlp

CPU = torch.device("cpu")
OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
}


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, made infinite for a batch whose targets are all -1."""
    scale = torch.where(targets[0] < 0, math.inf, 1.0)
    return nn.functional.cross_entropy(outputs, targets.clamp(min=0)) * scale


def _run(
    kind: str,
    batches: list[Any],
    on_nonfinite: str,
    accumulate: int = 1,
    seed: int = 0,
    warm: bool = True,
    model: nn.Module | None = None,
) -> tuple[Any, ...]:
    """Train one epoch from a fixed start; return the error (or result) and all state.

    With ``warm`` an epoch of one batch comes first, so the optimizer has state already.
    """
    model = model if model is not None else mlp(4, 3, seed, dropout=0.0)
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
    torch.manual_seed(seed + 1)
    if warm:
        first = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        ft.train_epoch(model, first, _loss, opt, CPU, scheduler=sched)
    try:
        outcome: Any = ft.train_epoch(
            model, batches, _loss, opt, CPU, on_nonfinite=on_nonfinite,
            accumulate=accumulate, scheduler=sched, clip_grad_norm=5.0,
        )  # fmt: skip
    except ft.NonFiniteLossError as error:
        outcome = error
    return outcome, model, opt, sched


def _assert_same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    """Assert two runs left bit-identical models, optimizers and schedulers."""
    for x, y in zip(a[1].state_dict().values(), b[1].state_dict().values(), strict=True):
        assert torch.equal(x, y)
    first, second = a[2].state_dict(), b[2].state_dict()
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys()
    for key, state in first["state"].items():
        assert state.keys() == second["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, second["state"][key][name]), (key, name)
    assert a[3].state_dict() == b[3].state_dict()


def _poison(batches: list[Any], bad: int, infinite: bool) -> None:
    """Make batch ``bad`` give an inf loss (clean forward) or NaN inputs (NaN statistics)."""
    inputs, targets = batches[bad]
    if infinite:
        batches[bad] = (inputs, torch.full_like(targets, -1))
    else:
        batches[bad] = (torch.full_like(inputs, float("nan")), targets)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    n_batches=st.integers(1, 6),
    data=st.data(),
    infinite=st.booleans(),
    accumulate=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    warm=st.booleans(),
)
def test_deferring_leaves_the_same_state_as_the_per_batch_check(
    kind: str,
    n_batches: int,
    data: st.DataObject,
    infinite: bool,
    accumulate: int,
    seed: int,
    warm: bool,
) -> None:
    """A NaN or inf loss at batch k: same error, weights, buffers, optimizer and schedule.

    The host check raises before batch k's backward pass; the deferred check runs on with
    every step skipped in the fused kernel until the flag reaches the host, then puts back
    BatchNorm statistics, hyperparameters, scheduler and any optimizer state the skipped
    steps made (fused SGD's first step allocates momentum buffers even when it skips).
    """
    bad = data.draw(st.integers(0, n_batches - 1), label="bad batch")
    batches = list(loader(make_data(8 * n_batches, 4, 3, seed), 8))
    _poison(batches, bad, infinite)
    host = _run(kind, batches, "raise", accumulate, seed, warm)
    deferred = _run(kind, batches, "defer", accumulate, seed, warm)
    assert isinstance(host[0], ft.NonFiniteLossError)
    assert isinstance(deferred[0], ft.NonFiniteLossError)
    assert deferred[0].batch_index == host[0].batch_index == bad
    assert math.isinf(deferred[0].loss) if infinite else math.isnan(deferred[0].loss)
    assert "found on the device" in str(deferred[0])
    _assert_same_state(host, deferred)
    assert all(p.grad is None for p in deferred[1].parameters())  # left zeroed


@settings(max_examples=25, deadline=None)
@given(
    n_batches=st.integers(2, 8),
    data=st.data(),
    accumulate=st.integers(1, 3),
    lag=st.integers(1, 4),
)
def test_flags_that_reach_the_host_late_still_restore_the_last_good_state(
    n_batches: int, data: st.DataObject, accumulate: int, lag: int
) -> None:
    """As on a GPU running behind: flags arrive ``lag`` steps late; the state is the same.

    Steps whose flag arrived finite drop their notes; the first skipped step's must stay.
    """
    bad = data.draw(st.integers(0, n_batches - 1), label="bad batch")
    batches = list(loader(make_data(8 * n_batches, 4, 3, 5), 8))
    _poison(batches, bad, infinite=False)
    host = _run("sgd-momentum", batches, "raise", accumulate, warm=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeferredCheck, "_arrived", lambda self: len(self.flags) > lag)
        deferred = _run("sgd-momentum", batches, "defer", accumulate, warm=False)
    assert isinstance(deferred[0], ft.NonFiniteLossError) and deferred[0].batch_index == bad
    _assert_same_state(host, deferred)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    n_batches=st.integers(1, 6),
    accumulate=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_without_bad_batches_deferring_trains_bit_identically(
    kind: str, n_batches: int, accumulate: int, seed: int
) -> None:
    """Finite losses: the deferred check's training equals the host check's, bit for bit."""
    batches = list(loader(make_data(8 * n_batches, 4, 3, seed), 8))
    host = _run(kind, batches, "raise", accumulate, seed)
    deferred = _run(kind, batches, "defer", accumulate, seed)
    assert host[0].loss == pytest.approx(deferred[0].loss, rel=1e-12)
    assert (host[0].samples, host[0].steps) == (deferred[0].samples, deferred[0].steps)
    _assert_same_state(host, deferred)


class _OddBuffers(nn.Module):
    """Buffers of several dtypes and odd sizes that every forward pass changes."""

    def __init__(self, sizes: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(sizes[0], dtype=torch.bool))
        self.register_buffer("halves", torch.zeros(sizes[1], dtype=torch.float16))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.logical_not_()
            self.halves.add_(x.mean().to(torch.float16))
            self.count.add_(1)
        return x


@pytest.mark.parametrize("sizes", [(3, 5), (1, 2), (7, 1)])
def test_deferring_restores_buffers_of_any_dtype_and_size(sizes: tuple[int, int]) -> None:
    """Byte-packed buffer copies come back whatever their dtype, size and offset."""
    batches = list(loader(make_data(32, 4, 3, 1), 8))
    _poison(batches, 2, infinite=False)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(_OddBuffers(sizes), mlp(4, 3, 0, dropout=0.0))

    host = _run("adam", batches, "raise", model=model())
    deferred = _run("adam", batches, "defer", model=model())
    assert isinstance(deferred[0], ft.NonFiniteLossError) and deferred[0].batch_index == 2
    _assert_same_state(host, deferred)


@pytest.mark.parametrize(("accumulate", "taken_batches"), [(1, 3), (2, 4)])
def test_deferring_stops_the_epoch_once_the_flag_reaches_the_host(
    accumulate: int, taken_batches: int
) -> None:
    """On the CPU the flag is read after each step: the epoch stops at the window's end."""
    batches = list(loader(make_data(80, 4, 3, 2), 8))
    _poison(batches, 2, infinite=True)
    taken: list[int] = []

    def counting() -> Iterator[Any]:
        for index, batch in enumerate(batches):
            taken.append(index)
            yield batch

    model = mlp(4, 3, 0, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    with pytest.raises(ft.NonFiniteLossError, match="batch 2"):
        ft.train_epoch(
            model, counting(), _loss, opt, CPU, on_nonfinite="defer", accumulate=accumulate
        )
    assert taken == list(range(taken_batches))  # not all 10


def test_a_later_error_after_a_bad_batch_is_noted_and_the_model_put_back() -> None:
    """NaN at batch 1, then a malformed batch 2 in the same window: that error escapes,
    with a note naming batch 1, and the model is as after batch 0."""
    batches = list(loader(make_data(24, 4, 3, 0), 8))
    nan = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    host = _run("sgd-momentum", [batches[0], nan], "raise", accumulate=3)
    model = mlp(4, 3, 0, dropout=0.0)
    with pytest.raises(TypeError, match="'loader'") as caught:
        _run("sgd-momentum", [batches[0], nan, (batches[2][0],)], "defer", 3, model=model)
    if hasattr(caught.value, "add_note"):  # Python >= 3.11
        assert any("batch 1 had a non-finite loss" in n for n in caught.value.__notes__)
    for a, b in zip(host[1].state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make_optimizer", "scaler", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), None, "fused=True, but got SGD with fused=None"),
        (lambda p: torch.optim.Adam(p, foreach=True), None, "but got Adam with fused="),
        (lambda p: torch.optim.RMSprop(p), None, "but got RMSprop"),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
            torch.amp.GradScaler("cpu"),
            "GradScaler sets the same skip flag",
        ),
    ],
)
def test_deferring_needs_a_fused_optimizer_and_no_scaler(
    make_optimizer: Any, scaler: Any, message: str
) -> None:
    """'defer' is refused, naming 'on_nonfinite', where no step could be skipped on the device."""
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'on_nonfinite' is 'defer'") as caught:
        ft.train_epoch(
            model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], _loss,
            make_optimizer(model.parameters()), CPU, on_nonfinite="defer", scaler=scaler,
        )  # fmt: skip
    assert message in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
