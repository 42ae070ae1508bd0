"""train_epoch's training options: accumulation, mixed precision, clipping, schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import fntrain as ft
from tests import strategies as s
from tests.helpers import hand_train_epoch, loader, make_data, snapshot

CPU = torch.device("cpu")
FAST = settings(max_examples=15, deadline=None)


def _linear_model(seed: int) -> nn.Module:
    """Return a model without batch-dependent layers, so batch size cannot matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _params(model: nn.Module) -> list[torch.Tensor]:
    """Return detached copies of the parameters."""
    return [p.detach().clone() for p in model.parameters()]


@FAST
@given(
    seed=s.seeds,
    batch=st.integers(1, 8),
    k=st.integers(2, 5),
    extra=st.integers(0, 7),
    per_sample=st.booleans(),
)
def test_accumulating_k_batches_equals_one_batch_k_times_larger(
    seed: int, batch: int, k: int, extra: int, per_sample: bool
) -> None:
    """accumulate=k with batch b steps like batch k*b, also with an uneven last batch."""
    assume(extra < batch * k)
    data = make_data(batch * k * 3 + extra, 4, 3, seed)
    loss_fn = nn.CrossEntropyLoss(reduction="none" if per_sample else "mean")
    results = []
    for size, accumulate in ((batch, k), (batch * k, 1)):
        model = _linear_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        result = ft.train_epoch(model, loader(data, size), loss_fn, opt, CPU, accumulate=accumulate)
        results.append((result, _params(model)))
    (small, small_params), (large, large_params) = results
    assert small.steps == large.steps == 3 + (extra > 0)
    assert small.loss == pytest.approx(large.loss, rel=1e-5)
    for a, b in zip(small_params, large_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_partial_window_at_the_end_is_stepped() -> None:
    """With 5 batches and accumulate=2 there are 3 steps; the last covers one batch."""
    data = make_data(50, 4, 3, 0)
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = ft.train_epoch(model, loader(data, 10), nn.CrossEntropyLoss(), opt, CPU, accumulate=2)
    assert (result.batches, result.steps) == (5, 3)


def test_accumulate_1_is_still_the_hand_written_loop() -> None:
    """accumulate=1 (the default) stays bit-identical to the tutorial loop."""
    data = make_data(40, 4, 3, 0)
    runs = []
    for hand in (True, False):
        model = _linear_model(0)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        if hand:
            hand_train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU)
        else:
            ft.train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, accumulate=1)
        runs.append(_params(model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bfloat16_autocast_runs_forward_and_loss_in_bfloat16_on_the_cpu() -> None:
    """autocast=torch.bfloat16 runs the layers in bf16 and keeps fp32 weights, on the CPU."""
    seen: list[torch.dtype] = []
    model = _linear_model(0)
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_data(32, 4, 3, 0)
    before = _params(model)
    result = ft.train_epoch(
        model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, autocast=torch.bfloat16
    )
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(result.loss) and result.steps == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


def test_scaler_skipped_steps_are_counted_not_raised() -> None:
    """Steps a GradScaler skips for inf gradients are counted, leave weights, and do not raise."""
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))  # every step overflows
    before = _params(model)
    data = make_data(32, 4, 3, 0)
    result = ft.train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, scaler=scaler)
    assert (result.steps, result.skipped_steps, result.batches) == (0, 4, 4)
    assert math.isfinite(result.loss)
    for a, b in zip(before, _params(model), strict=True):
        assert torch.equal(a, b)


def test_an_overflow_skips_only_its_own_step() -> None:
    """A scale that overflows once is backed off; the later steps are taken."""
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38, backoff_factor=1e-30)
    data = make_data(32, 4, 3, 0)

    def big_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 100 * nn.functional.cross_entropy(outputs, targets)  # 3e38 * ~100 overflows

    result = ft.train_epoch(model, loader(data, 8), big_loss, opt, CPU, scaler=scaler)
    assert (result.steps, result.skipped_steps) == (3, 1)


def test_scaler_steps_equal_plain_steps_when_nothing_overflows() -> None:
    """With a scale that does not overflow, scaled steps equal unscaled ones."""
    data = make_data(32, 4, 3, 0)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = _linear_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ft.train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, scaler=scaler)
        runs.append(_params(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b)


@FAST
@given(seed=s.seeds, max_norm=st.floats(0.01, 5.0), accumulate=st.sampled_from([1, 2, 4]))
def test_clipping_equals_clip_grad_norm_before_each_step(
    seed: int, max_norm: float, accumulate: int
) -> None:
    """clip_grad_norm clips like torch's clip_grad_norm_ and reports the largest raw norm."""
    data = make_data(24, 4, 3, seed)
    model, reference = _linear_model(seed), _linear_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    result = ft.train_epoch(
        model,
        loader(data, 8 // accumulate),
        nn.CrossEntropyLoss(),
        opt,
        CPU,
        clip_grad_norm=max_norm,
        accumulate=accumulate,
    )
    norms = []
    for inputs, targets in loader(data, 8):
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(inputs), targets).backward()
        norms.append(float(nn.utils.clip_grad_norm_(reference.parameters(), max_norm)))
        ref_opt.step()
    assert result.grad_norm == pytest.approx(max(norms), rel=1e-4)
    for a, b in zip(_params(model), _params(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_clipping_is_bit_identical_to_clipping_model_parameters_by_hand() -> None:
    """Clipping equals the tutorials' clip_grad_norm_(model.parameters()) bit for bit.

    Also when the optimizer holds the parameters in another order (ft.param_groups puts
    the decayed weights first): the norm is summed in the model's order.
    """
    from tests.helpers import mlp

    for seed in range(4):  # the two orders round differently for most seeds
        data = make_data(80, 4, 3, seed)
        models = [mlp(4, 3, seed), mlp(4, 3, seed)]
        opts = [torch.optim.AdamW(ft.param_groups(m, weight_decay=0.1), lr=0.05) for m in models]
        torch.manual_seed(1)
        for inputs, targets in loader(data, 8):
            opts[0].zero_grad()
            nn.functional.cross_entropy(models[0](inputs), targets).backward()
            nn.utils.clip_grad_norm_(models[0].parameters(), 0.05)
            opts[0].step()
        torch.manual_seed(1)
        loss = nn.CrossEntropyLoss()
        tr = ft.train_epoch(models[1], loader(data, 8), loss, opts[1], CPU, clip_grad_norm=0.05)
        assert tr.grad_norm > 0.05  # it clipped
        assert all(torch.equal(a, b) for a, b in zip(*map(_params, models), strict=True)), seed


def test_grad_norm_is_none_without_clipping() -> None:
    """Without clip_grad_norm, no norm is computed and grad_norm is None."""
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = ft.train_epoch(model, [make_data(8, 4, 3, 0)[:]], nn.CrossEntropyLoss(), opt, CPU)
    assert result.grad_norm is None


@pytest.mark.parametrize("accumulate", [1, 3])
def test_the_scheduler_steps_after_every_optimizer_step(accumulate: int) -> None:
    """A per-step scheduler is stepped once per optimizer step; lr reports its last value."""
    data = make_data(60, 4, 3, 0)
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=20)
    result = ft.train_epoch(
        model,
        loader(data, 6),
        nn.CrossEntropyLoss(),
        opt,
        CPU,
        scheduler=sched,
        accumulate=accumulate,
    )
    assert sched.last_epoch == result.steps == math.ceil(10 / accumulate)
    assert result.lr == opt.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_warmup_scheduler_matches_a_hand_written_loop() -> None:
    """LinearLR warmup stepped per batch gives the tutorial loop's weights exactly."""
    data = make_data(40, 4, 3, 0)
    runs = []
    for hand in (True, False):
        model = _linear_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
        if hand:
            for inputs, targets in loader(data, 8):
                opt.zero_grad()
                nn.functional.cross_entropy(model(inputs), targets).backward()
                opt.step()
                sched.step()
        else:
            ft.train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, scheduler=sched)
        runs.append(_params(model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_a_scheduler_built_for_epochs_gets_a_warning_once() -> None:
    """A schedule that would run out within the first epoch (T_max=epochs) warns, once.

    CosineAnnealingLR (climbs back after T_max), a decaying LinearLR and PolynomialLR
    (stuck at their end value) over 3 steps, with 4 optimizer steps an epoch (10 batches,
    accumulate=3, the last window partial): fntrain steps them per optimizer step, so it
    says so in the first epoch. A warmup holds its end value (no warning), and so does a
    horizon of a whole run in steps, or a duck-typed scheduler without last_epoch.
    """
    import warnings

    lr = torch.optim.lr_scheduler
    data = make_data(40, 4, 3, 0)
    loss = nn.CrossEntropyLoss()
    warns = {
        "cosine": lambda o: lr.CosineAnnealingLR(o, T_max=3),
        "decay": lambda o: lr.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=3),
        "polynomial": lambda o: lr.PolynomialLR(o, total_iters=3),
    }
    quiet = {
        "warmup": lambda o: lr.LinearLR(o, start_factor=0.1, total_iters=3),
        "whole run": lambda o: lr.CosineAnnealingLR(o, T_max=10 * 4),
        "duck": lambda o: type("Duck", (), {"T_max": 3, "step": lambda self: None})(),
    }
    for name, build in {**warns, **quiet}.items():
        model = _linear_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = build(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # the second epoch: the schedule already ran past
                ft.train_epoch(model, loader(data, 4), loss, opt, CPU, scheduler=schedule,
                               accumulate=3)  # fmt: skip
        told = [str(w.message) for w in caught if "horizon" in str(w.message)]
        assert len(told) == (name in warns), name
        assert all("horizon of 3 steps, shorter than one epoch (4" in text for text in told)


def test_forward_sees_every_batch_on_the_device_and_its_outputs_are_trained_on() -> None:
    """forward(model, batch) gets each whole batch and its (outputs, targets) are trained on."""
    calls: list[int] = []

    def double(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        calls.append(len(inputs))
        return model(inputs * 2), targets

    data = make_data(20, 4, 3, 0)
    model, reference = _linear_model(0), _linear_model(0)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    ft.train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, forward=double)
    doubled = TensorDataset(data.tensors[0] * 2, data.tensors[1])
    hand_train_epoch(reference, loader(doubled, 8), nn.CrossEntropyLoss(), ref_opt, CPU)
    assert calls == [8, 8, 4]
    for a, b in zip(_params(model), _params(reference), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accumulate": 0}, "'accumulate' must be an int >= 1"),
        ({"accumulate": 2.0}, "'accumulate' must be an int >= 1"),
        ({"autocast": torch.float64}, "'autocast' must be None, torch.bfloat16 or torch.float16"),
        ({"autocast": "bf16"}, "'autocast' must be None"),
        ({"clip_grad_norm": 0.0}, "'clip_grad_norm' must be a positive number"),
        ({"clip_grad_norm": -1}, "'clip_grad_norm' must be a positive number"),
        ({"clip_grad_norm": "1"}, "'clip_grad_norm' must be a positive number"),
        ({"scaler": object()}, "'scaler' must be a torch.amp.GradScaler"),
        ({"scheduler": object()}, "'scheduler' must be an LR scheduler"),
        ({"forward": 3}, "'forward' must be callable"),
        ({"on_step": "log"}, "'on_step' must be callable"),
        ({"on_nonfinite": "defer"}, "'on_nonfinite' must be 'raise' or 'skip'"),
    ],
)
def test_bad_options_name_the_argument_and_change_nothing(kwargs: dict, message: str) -> None:
    """Each bad option is refused before the first batch, by name; the model is unchanged."""
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match=message):
        ft.train_epoch(model, [make_data(8, 4, 3, 0)[:]], nn.CrossEntropyLoss(), opt, CPU, **kwargs)
    after = snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if before[k] is not None) and all(
        after[k] is None for k in after if k.startswith("grad:")
    )


def test_a_scheduler_of_another_optimizer_is_refused() -> None:
    """A scheduler built on a different optimizer is a mistake worth naming."""
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(ValueError, match="'scheduler' schedules another optimizer"):
        ft.train_epoch(
            model, [make_data(8, 4, 3, 0)[:]], nn.CrossEntropyLoss(), opt, CPU, scheduler=sched
        )


def test_float16_autocast_on_cuda_without_a_scaler_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """autocast=float16 on CUDA without a GradScaler is refused, naming 'scaler'."""
    from fntrain.stepping import StepOptions

    options = StepOptions(autocast=torch.float16)
    with pytest.raises(ValueError, match="'scaler' is None"):
        options.check(
            torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), torch.device("cuda", 0)
        )
    options.check(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_with_a_scaler_trains_on_cuda() -> None:
    """On CUDA, float16 autocast with a GradScaler trains and keeps fp32 weights."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = _linear_model(0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    result = ft.train_epoch(
        model,
        loader(make_data(64, 4, 3, 0), 16),
        nn.CrossEntropyLoss(),
        opt,
        device,
        autocast=torch.float16,
        scaler=scaler,
        clip_grad_norm=1.0,
    )
    assert math.isfinite(result.loss) and result.steps + result.skipped_steps == 4
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
@FAST
@given(
    seed=s.seeds,
    max_norm=st.floats(0.01, 5.0),
    scale=st.sampled_from([2.0**4, 2.0**10, 2.0**16]),
)
def test_clipping_with_a_scaler_clips_the_unscaled_gradients(
    seed: int, max_norm: float, scale: float
) -> None:
    """With a GradScaler, clip_grad_norm clips and reports the unscaled gradient norm."""
    data = make_data(24, 4, 3, seed)
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=scale)):
        model = _linear_model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        result = ft.train_epoch(
            model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU,
            scaler=scaler, clip_grad_norm=max_norm,
        )  # fmt: skip
        runs.append((result.grad_norm, _params(model)))
    (plain_norm, plain), (scaled_norm, scaled) = runs
    assert scaled_norm == pytest.approx(plain_norm, rel=1e-4)
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_step_the_scaler_skips_does_not_step_the_scheduler() -> None:
    """The scheduler advances once per step taken; a step skipped for inf grads is not one."""
    model = _linear_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38, backoff_factor=1e-30)

    def big_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 100 * nn.functional.cross_entropy(outputs, targets)  # overflows once

    batches = loader(make_data(32, 4, 3, 0), 8)
    result = ft.train_epoch(model, batches, big_loss, opt, CPU, scaler=scaler, scheduler=sched)
    assert (result.steps, result.skipped_steps) == (3, 1)
    assert sched.last_epoch == result.steps
    assert result.lr == pytest.approx(0.1 * 0.5**3)
