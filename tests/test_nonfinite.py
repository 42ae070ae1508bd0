"""The non-finite loss check that stays on the device (CUDA + fused optimizer).

The check itself is device-agnostic: fused optimizers honour ``found_inf`` on the CPU too,
so these tests force it on the CPU and compare it with the per-batch host check, which
is the contract. tests/test_cuda.py runs it where it is chosen by itself, on CUDA.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
from fntrain.nonfinite import DeviceCheck
from tests.helpers import loader, make_data, mlp

CPU = torch.device("cpu")
OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
}


@pytest.fixture
def on_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make train_epoch choose the device check on the CPU."""
    monkeypatch.setattr(DeviceCheck, "usable", staticmethod(lambda *args: True))


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, made infinite for a batch whose targets are all -1."""
    scale = torch.where(targets[0] < 0, math.inf, 1.0)
    return nn.functional.cross_entropy(outputs, targets.clamp(min=0)) * scale


def _run(
    kind: str, batches: list[Any], accumulate: int, seed: int, warm: bool = True
) -> tuple[Any, ...]:
    """Train one epoch from a fixed start; return the error (or result) and all state.

    With ``warm`` an epoch of one batch comes first, so the optimizer has state already.
    """
    model = mlp(4, 3, seed, dropout=0.0)
    opt = OPTIMIZERS[kind](model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
    if warm:
        first = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        ft.train_epoch(model, first, _loss, opt, CPU, scheduler=sched)
    try:
        outcome: Any = ft.train_epoch(
            model, batches, _loss, opt, CPU,
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


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    n_batches=st.integers(1, 6),
    data=st.data(),
    infinite=st.booleans(),
    accumulate=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    warm=st.booleans(),
)
def test_the_device_check_leaves_the_same_state_as_the_host_check(
    kind: str,
    n_batches: int,
    data: st.DataObject,
    infinite: bool,
    accumulate: int,
    seed: int,
    warm: bool,
) -> None:
    """A NaN at batch k: same error, same weights, buffers, optimizer state and schedule.

    The host check raises before batch k's backward pass; the device check runs the rest
    of the epoch with every step skipped in the fused kernel, then puts back BatchNorm
    statistics, hyperparameters, scheduler and any optimizer state the skipped steps made
    (fused SGD's first step allocates its momentum buffers even when it skips).
    """
    bad = data.draw(st.integers(0, n_batches - 1), label="bad batch")
    batches = list(loader(make_data(8 * n_batches, 4, 3, seed), 8))
    if infinite:  # an inf loss from finite inputs: the forward pass itself is clean
        batches[bad] = (batches[bad][0], torch.full_like(batches[bad][1], -1))
    else:  # NaN inputs poison BatchNorm's statistics too
        batches[bad] = (torch.full_like(batches[bad][0], float("nan")), batches[bad][1])
    host = _run(kind, batches, accumulate, seed, warm)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeviceCheck, "usable", staticmethod(lambda *args: True))
        device = _run(kind, batches, accumulate, seed, warm)
    assert isinstance(host[0], ft.NonFiniteLossError)
    assert isinstance(device[0], ft.NonFiniteLossError)
    assert device[0].batch_index == host[0].batch_index == bad
    assert math.isinf(device[0].loss) if infinite else math.isnan(device[0].loss)
    _assert_same_state(host, device)


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(sorted(OPTIMIZERS)),
    n_batches=st.integers(1, 6),
    accumulate=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_without_bad_batches_the_device_check_trains_bit_identically(
    kind: str, n_batches: int, accumulate: int, seed: int
) -> None:
    """Finite losses: the device check's training equals the host check's, bit for bit."""
    batches = list(loader(make_data(8 * n_batches, 4, 3, seed), 8))
    host = _run(kind, batches, accumulate, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeviceCheck, "usable", staticmethod(lambda *args: True))
        device = _run(kind, batches, accumulate, seed)
    assert host[0].loss == pytest.approx(device[0].loss, rel=1e-12)
    assert (host[0].samples, host[0].steps) == (device[0].samples, device[0].steps)
    _assert_same_state(host, device)


def test_a_later_error_after_a_bad_batch_still_leaves_the_last_good_state(
    on_device: None,
) -> None:
    """NaN at batch 1, then a malformed batch 3: its error escapes, the model is as after 0."""
    batches = list(loader(make_data(24, 4, 3, 0), 8))
    reference, model = mlp(4, 3, 0, dropout=0.0), mlp(4, 3, 0, dropout=0.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    ft.train_epoch(reference, batches[:1], nn.CrossEntropyLoss(), ref_opt, CPU)
    nan = (torch.full_like(batches[1][0], float("nan")), batches[1][1])
    broken = (batches[2][0],)
    with pytest.raises(TypeError, match="'loader'"):
        ft.train_epoch(
            model, [batches[0], nan, batches[2], broken], nn.CrossEntropyLoss(), opt, CPU
        )
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("optimizer", "device", "on_nonfinite", "scaler", "usable"),
    [
        ("fused", "cuda", "raise", None, True),
        ("fused", "cpu", "raise", None, False),  # on the CPU .item() costs no sync
        ("foreach", "cuda", "raise", None, False),  # cannot skip a step on the device
        ("fused", "cuda", "skip", None, False),  # skipping needs each batch's verdict
        ("fused", "cuda", "raise", "scaler", False),  # GradScaler sets found_inf itself
    ],
)
def test_the_device_check_is_chosen_only_where_it_can_skip_steps(
    optimizer: str, device: str, on_nonfinite: str, scaler: Any, usable: bool
) -> None:
    """CUDA, a fused optimizer, on_nonfinite='raise' and no GradScaler; else the host check."""
    params = [nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(params, lr=0.1, fused=optimizer == "fused")
    assert DeviceCheck.usable(opt, torch.device(device), on_nonfinite, scaler) is usable
