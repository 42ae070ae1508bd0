"""Checkpoints: complete, atomic under SIGKILL, code-free, checked before they change anything."""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import random
import signal
import stat
import subprocess
import sys
import time
import typing
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
import fntrain.checkpoint as checkpoint_module
from tests import strategies as s
from tests.helpers import assert_bit_identical, make_data, mlp, snapshot

ROOT = Path(__file__).resolve().parent.parent
TMP = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _worker(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run tests/checkpoint_worker.py in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "tests.checkpoint_worker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def _adam(params: typing.Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """Return an Adam optimizer over ``params``."""
    return torch.optim.Adam(params, lr=0.01)


def _sgd(params: typing.Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """Return an SGD-with-momentum optimizer over ``params``."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _trained(
    seed: int = 0, make_optimizer: Callable[..., torch.optim.Optimizer] = _adam
) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """Return a model, optimizer (Adam by default) and scheduler after a few real steps."""
    model = mlp(5, 3, seed)
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=50)
    data = make_data(32, 5, 3, seed)
    for _ in range(2):
        ft.train_epoch(model, [data[:16], data[16:]], nn.CrossEntropyLoss(), optimizer, "cpu")
        scheduler.step()
    return model, optimizer, scheduler


def _rng_states() -> tuple[object, object, torch.Tensor]:
    """Return the states of Python's, NumPy's and torch's global RNGs."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _freeze(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict, tuple[object, object, torch.Tensor]]:
    """Return copies of the model's tensors, the optimizer's state and every RNG state."""
    return snapshot(model), copy.deepcopy(optimizer.state_dict()), _rng_states()


def _assert_unchanged(
    frozen: tuple[dict, dict, tuple[object, object, torch.Tensor]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Assert model, optimizer and RNGs are bit-identical to what :func:`_freeze` saw."""
    before, optimizer_before, (python, numpy, torch_rng) = frozen
    assert_bit_identical(before, snapshot(model))
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    assert after["state"].keys() == optimizer_before["state"].keys()
    for index, state in optimizer_before["state"].items():
        assert state.keys() == after["state"][index].keys()
        for name, value in state.items():
            assert torch.equal(value, after["state"][index][name]), (index, name)
    numpy_now = np.random.get_state()
    assert random.getstate() == python and torch.equal(torch.get_rng_state(), torch_rng)
    assert numpy_now[0] == numpy[0] and np.array_equal(numpy_now[1], numpy[1])
    assert numpy_now[2:] == numpy[2:]


def _edit(path: Path, edit: Callable[[dict], object]) -> None:
    """Rewrite the checkpoint at ``path`` after ``edit`` changed its payload in place."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    if "digest" in payload:  # a forged file, consistent with itself
        payload["digest"] = checkpoint_module._digest(payload)
    torch.save(payload, path)


def _assert_intact(path: Path, old: bytes) -> None:
    """Assert ``path`` still holds ``old`` and its folder holds nothing else (no temp file)."""
    assert path.read_bytes() == old
    assert [p.name for p in path.parent.iterdir()] == [path.name]


plain_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**31), 2**31)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@TMP
@given(
    hidden=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    epoch=st.integers(0, 10**6),
    step=st.integers(0, 10**9),
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=6), st.floats(allow_nan=False), max_size=3
    ),
    extra=st.dictionaries(st.text(min_size=1, max_size=6), plain_data, max_size=3),
    seed=s.seeds,
)
def test_round_trip_restores_the_model_and_returns_what_was_saved(
    tmp_path: Path, hidden: list[int], epoch: int, step: int, metrics: dict, extra: dict, seed: int
) -> None:
    """Any model, epoch, step, metrics and plain extras come back exactly as saved."""
    sizes = [4, *hidden, 2]

    def build() -> nn.Module:
        layers = [nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
        return nn.Sequential(*layers, nn.BatchNorm1d(2))

    torch.manual_seed(seed)
    saved_model, fresh = build(), build()
    saved_model[-1].running_mean.normal_()
    path = tmp_path / "ckpt.pt"
    written = ft.save_checkpoint(
        path, saved_model, epoch=epoch, step=step, metrics=metrics, extra=extra
    )
    loaded = ft.load_checkpoint(path, fresh)
    assert (written.path, written.epoch, written.step) == (path, epoch, step)
    assert written.size == path.stat().st_size > 0
    assert (loaded.epoch, loaded.step) == (epoch, step)
    assert dict(loaded.metrics) == metrics and dict(loaded.extra) == extra
    assert_bit_identical(snapshot(saved_model, grads=False), snapshot(fresh, grads=False))


def test_optimizer_scheduler_and_scaler_states_are_restored(tmp_path: Path) -> None:
    """Optimizer, scheduler and GradScaler states come back equal to what was saved."""
    model, optimizer, scheduler = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    ft.save_checkpoint(
        tmp_path / "c.pt", model, optimizer, scheduler=scheduler, scaler=scaler, epoch=2
    )
    model2 = mlp(5, 3, 99)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.5)
    scheduler2 = torch.optim.lr_scheduler.OneCycleLR(optimizer2, max_lr=0.1, total_steps=50)
    scaler2 = torch.amp.GradScaler("cpu")
    ft.load_checkpoint(tmp_path / "c.pt", model2, optimizer2, scheduler=scheduler2, scaler=scaler2)
    assert_bit_identical(snapshot(model, grads=False), snapshot(model2, grads=False))
    saved, loaded = optimizer.state_dict(), optimizer2.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(value, loaded["state"][index][name])
    assert scheduler.state_dict() == scheduler2.state_dict()
    assert scaler.state_dict() == scaler2.state_dict()


def _draws() -> tuple[float, float, torch.Tensor]:
    """Draw one number from each of Python's, NumPy's and torch's RNGs."""
    return random.random(), float(np.random.random()), torch.rand(3)


def test_rng_states_are_restored(tmp_path: Path) -> None:
    """After loading, Python, NumPy and torch draw the numbers they drew after saving."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    expected = _draws()
    _draws()
    ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), restore_rng=True)
    again = _draws()
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_restore_rng_false_leaves_the_generators_alone(tmp_path: Path) -> None:
    """restore_rng=False loads the model but does not touch any RNG."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    model = nn.Linear(2, 2)
    torch.rand(5)
    state = torch.get_rng_state()
    ft.load_checkpoint(tmp_path / "c.pt", model, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "own-generator"])
def test_resume_in_a_new_process_is_bit_identical_to_an_uninterrupted_run(
    tmp_path: Path, generator: bool
) -> None:
    """Train 4 epochs straight, or 2 + save + (new process) load + 2: identical results.

    The run has dropout, BatchNorm, a shuffled DataLoader, augmentation noise from
    Python's and NumPy's RNGs, SGD with momentum and an LR scheduler. A DataLoader with
    its own generator stores that generator's state in ``extra``.
    """
    flag = ["--generator"] if generator else []
    straight, resumed, ckpt = tmp_path / "straight.pt", tmp_path / "resumed.pt", tmp_path / "c.pt"
    _worker("straight", str(straight), "4", *flag)
    _worker("first", str(ckpt), "2", *flag)
    _worker("resume", str(ckpt), str(resumed), "4", *flag)
    a = torch.load(straight, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name])


@pytest.mark.slow
def test_a_crash_at_any_moment_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process saving a 24 MB checkpoint in a loop, 10 times: the file always loads.

    After every kill the target is a complete checkpoint, the old one or the new one,
    and its weights agree with its own epoch, so no file is ever torn or mixed.
    """
    target = tmp_path / "hammered.pt"
    model = nn.Linear(24 * 1024 * 256 // 64, 64, bias=False)
    ft.save_checkpoint(target, model, epoch=0, extra={"i": -1})
    rng = random.Random(0)
    killed_mid_save = 0
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.checkpoint_worker", "hammer", str(target), "24"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("saving")
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        lines = proc.stdout.read().split()
        proc.wait()
        killed_mid_save += (bool(lines) and lines[-2] == "saving") or not lines
        loaded = ft.load_checkpoint(target, model)
        i = loaded.extra["i"]
        assert loaded.epoch == max(i, 0)
        assert torch.all(model.weight == float(i)) if i >= 0 else True
    assert killed_mid_save >= 1, "no kill landed during a save; the test proved nothing"
    ft.save_checkpoint(target, model, epoch=0)
    assert [p.name for p in tmp_path.iterdir()] == ["hammered.pt"]


class _Evil:
    """An object whose unpickling creates a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path: Path) -> None:
    """A checkpoint whose unpickling would run code raises CheckpointError; nothing runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict(), "payload": _Evil(marker)}, path)
    model = nn.Linear(2, 2)
    before = snapshot(model)
    with pytest.raises(ft.CheckpointError, match="refused to load"):
        ft.load_checkpoint(path, model)
    assert not marker.exists()
    assert_bit_identical(before, snapshot(model))


def test_a_bare_state_dict_from_torch_save_loads(tmp_path: Path) -> None:
    """The tutorials' torch.save(model.state_dict(), path) loads, with epoch and step None."""
    source, target = mlp(4, 2, 1), mlp(4, 2, 2)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    loaded = ft.load_checkpoint(tmp_path / "plain.pth", target)
    assert (loaded.epoch, loaded.step, dict(loaded.extra)) == (None, None, {})
    assert_bit_identical(snapshot(source, grads=False), snapshot(target, grads=False))


def _tutorial_run(path: Path, keys: tuple[str, str]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train 3 epochs by hand and save as the seed tutorials do, under ``keys`` (model, optim)."""
    torch.manual_seed(0)
    model = mlp(4, 2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    best_acc = 0.0
    for t in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        best_acc = max(best_acc, float((model(x).argmax(1) == y).float().mean()))
        checkpoint = {  # seed 003's "save checkpoint" dict, key for key
            "best_acc": best_acc,
            "epoch": t + 1,
            keys[0]: model.state_dict(),
            keys[1]: optimizer.state_dict(),
        }
        torch.save(checkpoint, path)
    return model, optimizer


_LOOP_KEYS = [("model", "optimizer"), ("state_dict", "optimizer"),
              ("model_state_dict", "optimizer_state_dict")]  # fmt: skip


@pytest.mark.parametrize("keys", _LOOP_KEYS)
def test_a_tutorial_checkpoint_dict_loads_model_optimizer_epoch_and_extras(
    tmp_path: Path, keys: tuple[str, str]
) -> None:
    """A hand-written loop's checkpoint dict loads: model, optimizer, epoch, extras.

    {"epoch", "model"/"state_dict"/"model_state_dict", "optimizer", "best_acc"} from torch.save
    loads with weights_only: model and optimizer restored, epoch read as written, other keys
    in extra; training on from it equals training on without the round trip.
    """
    source, source_opt = _tutorial_run(tmp_path / "checkpoint.pth.tar", keys)
    model = mlp(4, 2, 7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.warns(RuntimeWarning, match="holds no RNG state"):  # the loop saved none
        ckpt = ft.load_checkpoint(tmp_path / "checkpoint.pth.tar", model, optimizer)
    assert (ckpt.epoch, ckpt.step, dict(ckpt.metrics)) == (3, None, {})
    assert dict(ckpt.extra) == {"best_acc": torch.load(tmp_path / "checkpoint.pth.tar")["best_acc"]}
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for m, opt in ((source, source_opt), (model, optimizer)):
        torch.manual_seed(1)  # the same dropout masks
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert_bit_identical(snapshot(source), snapshot(model))
    flat = [{f"{i}:{k}": v for i, entry in o.state.items() for k, v in entry.items()}
            for o in (source_opt, optimizer)]  # fmt: skip
    assert_bit_identical(*flat)


@pytest.mark.parametrize("attached", ["StepLR", "OneCycleLR"])
def test_a_loop_checkpoint_saved_while_a_scheduler_ran_loads(tmp_path: Path, attached: str) -> None:
    """A loop's dict saved with a scheduler attached (initial_lr, max_lr in its groups) loads."""
    schedulers = {
        "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=10),
    }
    model = mlp(4, 2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = schedulers[attached](opt)
    nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    schedule.step()
    saved = {"epoch": 1, "model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save({**saved, "lr_scheduler": schedule.state_dict()}, tmp_path / "s.pth")
    fresh = mlp(4, 2, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_schedule = schedulers[attached](fresh_opt)
    with pytest.warns(RuntimeWarning, match="holds no RNG state"):
        ft.load_checkpoint(tmp_path / "s.pth", fresh, fresh_opt, scheduler=fresh_schedule)
    assert _same_state(fresh_opt, opt)
    assert fresh_schedule.state_dict() == schedule.state_dict()
    plain = mlp(4, 2, 3)
    ft.load_checkpoint(
        tmp_path / "s.pth", plain, torch.optim.SGD(plain.parameters()), restore_rng=False
    )


def test_loop_dicts_torch_loads_load_and_another_class_is_refused(tmp_path: Path) -> None:
    """Loop dicts that torch loads load; a state of another class is refused, both ways.

    An optimizer built from named_parameters (param_names in its groups), an option a newer
    torch added, a 'model' key naming the architecture beside 'state_dict': they load, with
    a warning that no RNG state was saved. A StepLR state into CosineAnnealingLR, like Adam's
    into SGD, is refused before anything changes.
    """
    torch.manual_seed(0)
    source = mlp(4, 2, 1)
    named = torch.optim.AdamW(source.named_parameters(), lr=1e-2)
    nn.functional.cross_entropy(source(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    named.step()
    state = named.state_dict()
    state["param_groups"][0]["future_option"] = True  # saved by a newer torch
    step = torch.optim.lr_scheduler.StepLR(named, step_size=2)
    saved = {"model": "mlp", "state_dict": source.state_dict(), "optimizer": state, "epoch": 4}
    torch.save({**saved, "scheduler": step.state_dict(), None: "odd key"}, tmp_path / "n.pth")
    model = mlp(4, 2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.warns(RuntimeWarning, match="holds no RNG state"):
        ckpt = ft.load_checkpoint(tmp_path / "n.pth", model, opt)
    assert ckpt.epoch == 4 and dict(ckpt.extra) == {"model": "mlp", None: "odd key"}
    assert_bit_identical(snapshot(source, grads=False), snapshot(model, grads=False))
    before, cosine = snapshot(model), torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    with pytest.raises(ft.CheckpointError, match="'scheduler' is CosineAnnealingLR, but the"):
        ft.load_checkpoint(tmp_path / "n.pth", mlp(4, 2, 3), scheduler=cosine)
    assert cosine.state_dict()["T_max"] == 5 and cosine.last_epoch == 0
    assert_bit_identical(before, snapshot(model))


def _same_state(one: torch.optim.Optimizer, other: torch.optim.Optimizer) -> bool:
    """Tell whether two optimizers hold equal groups and bit-identical state tensors."""
    a, b = one.state_dict(), other.state_dict()
    return a["param_groups"] == b["param_groups"] and all(
        torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i]
    )


def test_a_tutorial_checkpoint_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    """A loop's checkpoint dict that does not fit is a CheckpointError; nothing changes.

    An optimizer of another class, none when one is asked for, or a model key holding no
    state_dict: the model and the optimizer stay as they were.
    """
    _tutorial_run(tmp_path / "t.pth", ("model", "optimizer"))
    model = mlp(4, 2, 7)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model)
    foreign = "'optimizer' is SGD, but the file's optimizer state has 'amsgrad', 'betas'"
    with pytest.raises(ft.CheckpointError, match=foreign):
        ft.load_checkpoint(tmp_path / "t.pth", model, sgd)
    torch.save({"epoch": 1, "model": mlp(4, 2, 1).state_dict()}, tmp_path / "no_opt.pth")
    with pytest.raises(ft.CheckpointError, match="the file holds no optimizer state"):
        ft.load_checkpoint(tmp_path / "no_opt.pth", model, sgd)
    torch.save({"epoch": 1, "model": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ft.CheckpointError, match="neither an fntrain checkpoint"):
        ft.load_checkpoint(tmp_path / "odd.pth", model)
    assert_bit_identical(before, snapshot(model))
    assert sgd.state_dict()["state"] == {}


def test_compiled_models_save_as_and_load_into_plain_ones(tmp_path: Path) -> None:
    """A torch.compile'd model saves as the plain model and loads into either form."""
    source = mlp(4, 2, 1)
    ft.save_checkpoint(tmp_path / "c.pt", torch.compile(source), epoch=1)
    assert not any(k.startswith("_orig_mod") for k in torch.load(tmp_path / "c.pt")["model"])
    plain = mlp(4, 2, 2)
    ft.load_checkpoint(tmp_path / "c.pt", plain)
    assert_bit_identical(snapshot(source, grads=False), snapshot(plain, grads=False))
    compiled_target = mlp(4, 2, 3)
    ft.load_checkpoint(tmp_path / "c.pt", torch.compile(compiled_target))
    assert_bit_identical(snapshot(source, grads=False), snapshot(compiled_target, grads=False))
    torch.save(torch.compile(source).state_dict(), tmp_path / "prefixed.pth")
    prefixed_target = mlp(4, 2, 4)
    ft.load_checkpoint(tmp_path / "prefixed.pth", prefixed_target)
    assert_bit_identical(snapshot(source, grads=False), snapshot(prefixed_target, grads=False))


def test_ddp_models_save_as_and_load_into_plain_ones(tmp_path: Path) -> None:
    """A DistributedDataParallel model saves as the plain model and loads into either form."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        source = mlp(4, 2, 1)
        ft.save_checkpoint(tmp_path / "c.pt", nn.parallel.DistributedDataParallel(source), epoch=1)
        assert not any(k.startswith("module.") for k in torch.load(tmp_path / "c.pt")["model"])
        plain = mlp(4, 2, 2)
        ft.load_checkpoint(tmp_path / "c.pt", plain)
        assert_bit_identical(snapshot(source, grads=False), snapshot(plain, grads=False))
        wrapped = nn.parallel.DistributedDataParallel(mlp(4, 2, 3))
        ft.load_checkpoint(tmp_path / "c.pt", wrapped)
        assert_bit_identical(snapshot(source, grads=False), snapshot(wrapped.module, grads=False))
    finally:
        dist.destroy_process_group()


def _named(seed: int, first_in: int, last: str) -> nn.Module:
    """Return Sequential(a=Linear(first_in, 3), <last>=Linear(3, 2)), initialised from seed."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([("a", nn.Linear(first_in, 3)), (last, nn.Linear(3, 2))]))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, features: int) -> None:
    """Take one optimizer step on random data, so the optimizer has state."""
    optimizer.zero_grad()
    model(torch.randn(6, features)).square().mean().backward()
    optimizer.step()


def test_mismatches_are_all_reported_at_once_and_nothing_changes(tmp_path: Path) -> None:
    """Missing keys, unexpected keys and shape mismatches are listed together; nothing loads.

    Model, trained optimizer and every RNG are bit-identical after the refused load.
    """
    saved = _named(0, 4, "b")
    ft.save_checkpoint(tmp_path / "c.pt", saved, _sgd(saved.parameters()), epoch=1)
    model = _named(1, 8, "c")
    optimizer = _sgd(model.parameters())
    _step(model, optimizer, 8)
    frozen = _freeze(model, optimizer)
    with pytest.raises(ft.CheckpointError) as caught:
        ft.load_checkpoint(tmp_path / "c.pt", model, optimizer)
    message = str(caught.value)
    assert "missing in the file: 'c.weight', 'c.bias'" in message
    assert "unexpected in the file: 'b.weight', 'b.bias'" in message
    assert "key 'a.weight' has shape (3, 4) in the file but (3, 8) in the model" in message
    assert "nothing was loaded" in message
    _assert_unchanged(frozen, model, optimizer)


def test_unexpected_keys_are_named_and_strict_false_loads_the_rest(tmp_path: Path) -> None:
    """Extra keys in the file are named; strict=False loads the keys that match."""
    saved = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ft.save_checkpoint(tmp_path / "c.pt", saved, epoch=1)
    smaller = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ft.CheckpointError, match=r"unexpected in the file: '1\.weight', '1\.bias'"):
        ft.load_checkpoint(tmp_path / "c.pt", smaller)
    ft.load_checkpoint(tmp_path / "c.pt", smaller, strict=False)
    assert torch.equal(smaller[0].weight, saved[0].weight)


def test_an_optimizer_that_does_not_fit_is_refused_before_the_model_changes(tmp_path: Path) -> None:
    """An optimizer with other param groups is refused, and the model is left as it was."""
    model, optimizer, _ = _trained()
    ft.save_checkpoint(tmp_path / "c.pt", model, optimizer, epoch=2)
    fresh = mlp(5, 3, 7)
    only_head = torch.optim.Adam(list(fresh.parameters())[-2:], lr=0.1)
    before = snapshot(fresh)
    with pytest.raises(ft.CheckpointError, match="param groups of sizes"):
        ft.load_checkpoint(tmp_path / "c.pt", fresh, only_head)
    assert_bit_identical(before, snapshot(fresh))
    scheduler = torch.optim.lr_scheduler.StepLR(_adam(fresh.parameters()), step_size=1)
    with pytest.raises(ft.CheckpointError, match="'scheduler' was given but the file holds no"):
        ft.load_checkpoint(tmp_path / "c.pt", fresh, scheduler=scheduler)
    assert_bit_identical(before, snapshot(fresh))


def _valid_bytes(tmp_path: Path) -> bytes:
    """Return the bytes of a valid checkpoint."""
    ft.save_checkpoint(tmp_path / "valid.pt", mlp(4, 2, 0), epoch=1)
    return (tmp_path / "valid.pt").read_bytes()


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "text", "list", "foreign-dict"])
def test_broken_and_foreign_files_raise_checkpoint_error(tmp_path: Path, kind: str) -> None:
    """Empty, truncated, random, text and foreign files each raise a clear CheckpointError."""
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(_valid_bytes(tmp_path)[:2000])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    else:
        torch.save({"epoch": 3, "best_acc": 0.9}, path)
    model = mlp(4, 2, 0)
    before = snapshot(model)
    with pytest.raises(ft.CheckpointError, match=str(path.name)):
        ft.load_checkpoint(path, model)
    assert_bit_identical(before, snapshot(model))


def test_a_missing_path_or_a_folder_is_named(tmp_path: Path) -> None:
    """A missing file raises FileNotFoundError; a folder raises CheckpointError naming 'path'."""
    with pytest.raises(FileNotFoundError, match="'path'"):
        ft.load_checkpoint(tmp_path / "nope.pt", nn.Linear(2, 2))
    with pytest.raises(ft.CheckpointError, match=r"'path' .* is a folder"):
        ft.load_checkpoint(tmp_path, nn.Linear(2, 2))
    with pytest.raises(ft.CheckpointError, match=r"'path' .* is a folder"):
        ft.save_checkpoint(tmp_path, nn.Linear(2, 2), epoch=0)
    with pytest.raises(FileNotFoundError, match="folder of 'path' does not exist"):
        ft.save_checkpoint(tmp_path / "no" / "c.pt", nn.Linear(2, 2), epoch=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epoch": -1}, "'epoch' must be a non-negative int"),
        ({"epoch": "3"}, "'epoch' must be a non-negative int"),
        ({"epoch": 1, "step": 1.5}, "'step' must be a non-negative int"),
        (
            {"epoch": 1, "metrics": {"acc": np.float64(0.5)}},
            r"'metrics'\['acc'\] must hold only plain",
        ),
        ({"epoch": 1, "extra": {"fn": len}}, r"'extra'\['fn'\] must hold only plain"),
    ],
)
def test_bad_save_arguments_leave_the_old_file_intact(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    """Bad arguments are refused by name before writing; the old file and folder are as before."""
    path = tmp_path / "c.pt"
    ft.save_checkpoint(path, nn.Linear(2, 2), epoch=7)
    old = path.read_bytes()
    with pytest.raises((TypeError, ValueError), match=message):
        ft.save_checkpoint(path, nn.Linear(2, 2), **kwargs)
    _assert_intact(path, old)


def test_a_failing_write_removes_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If writing fails midway, the target keeps its old content and no temp file is left."""
    path = tmp_path / "c.pt"
    ft.save_checkpoint(path, nn.Linear(2, 2), epoch=7)
    old = path.read_bytes()

    def failing_save(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ft.save_checkpoint(path, nn.Linear(2, 2), epoch=8)
    _assert_intact(path, old)


def test_the_file_holds_format_versions_and_every_rng(tmp_path: Path) -> None:
    """The payload names its format and version, the torch that wrote it, and each RNG."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert payload["format"] == "fntrain.checkpoint" and payload["version"] == 1
    assert payload["torch_version"] == str(torch.__version__)
    assert {"python", "numpy", "torch"} <= set(payload["rng"])


@pytest.mark.parametrize(
    "map_location",
    ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda storage, location: storage, None],
    ids=["str", "device", "dict", "callable", "none"],
)
def test_map_location_is_passed_to_torch_load_with_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, map_location: object
) -> None:
    """map_location reaches torch.load unchanged, always together with weights_only=True."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0, metrics={"cm": torch.eye(2)})
    calls: list[dict] = []
    real_load = torch.load

    def recording_load(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "load", recording_load)
    loaded = ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), map_location=map_location)
    assert len(calls) == 1
    assert calls[0]["weights_only"] is True
    if not callable(map_location):  # a function is wrapped, to blame its own errors on it
        assert calls[0]["map_location"] is map_location
    assert torch.equal(loaded.metrics["cm"], torch.eye(2))


@pytest.mark.parametrize(
    ("map_location", "error"),
    [("gpu", ValueError), ("cuda:x", ValueError), (3, TypeError), ({"cuda:0": "gpu"}, ValueError)],
)
def test_an_invalid_map_location_is_named_before_anything_is_read(
    tmp_path: Path, map_location: object, error: type[Exception]
) -> None:
    """A map_location torch.load cannot use raises an error naming 'map_location'."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    model = nn.Linear(2, 2)
    before = snapshot(model)
    with pytest.raises(error, match="'map_location'"):
        ft.load_checkpoint(tmp_path / "c.pt", model, map_location=map_location)
    assert_bit_identical(before, snapshot(model))


def test_an_optimizer_of_another_class_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    """SGD-with-momentum state is refused by class name for an Adam; nothing changes."""
    model, optimizer, _ = _trained(make_optimizer=_sgd)
    ft.save_checkpoint(tmp_path / "c.pt", model, optimizer, epoch=2)
    fresh, adam, _ = _trained(seed=5)
    frozen = _freeze(fresh, adam)
    with pytest.raises(ft.CheckpointError, match="'optimizer' is Adam but the file holds SGD"):
        ft.load_checkpoint(tmp_path / "c.pt", fresh, adam)
    _assert_unchanged(frozen, fresh, adam)


def test_an_empty_scaler_state_is_refused_for_an_enabled_scaler(tmp_path: Path) -> None:
    """A disabled GradScaler's empty state is refused for an enabled one; nothing changes."""
    model, optimizer, _ = _trained()
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    ft.save_checkpoint(tmp_path / "c.pt", model, optimizer, scaler=disabled, epoch=2)
    fresh, fresh_optimizer, _ = _trained(seed=5)
    enabled = torch.amp.GradScaler("cpu", init_scale=8.0)
    frozen = _freeze(fresh, fresh_optimizer)
    with pytest.raises(ft.CheckpointError, match=r"'scaler' is enabled but the file's .* empty"):
        ft.load_checkpoint(tmp_path / "c.pt", fresh, fresh_optimizer, scaler=enabled)
    _assert_unchanged(frozen, fresh, fresh_optimizer)
    assert enabled.get_scale() == 8.0
    ft.load_checkpoint(tmp_path / "c.pt", fresh, fresh_optimizer, scaler=disabled)


@pytest.mark.parametrize(
    ("part", "value", "named"),
    [
        ("python", (3, (1, 2), None), "Python"),
        ("torch", torch.zeros(3), "torch"),
        ("numpy", ("MT19937", torch.zeros(3, dtype=torch.int64), 0, 0, 0.0), "NumPy"),
        ("numpy", ("MT19937",), "NumPy"),
        ("cuda", ["junk"], "CUDA"),
        ("cuda", [torch.zeros(16)], "CUDA"),
    ],
)
def test_a_malformed_rng_state_is_refused_before_anything_changes(
    tmp_path: Path, part: str, value: object, named: str
) -> None:
    """An RNG state that would fail to restore midway is refused; model and RNGs are as before."""
    model, optimizer, _ = _trained()
    ft.save_checkpoint(tmp_path / "c.pt", model, optimizer, epoch=2)
    _edit(tmp_path / "c.pt", lambda payload: payload["rng"].__setitem__(part, value))
    fresh, fresh_optimizer, _ = _trained(seed=5)
    frozen = _freeze(fresh, fresh_optimizer)
    with pytest.raises(ft.CheckpointError, match=f"the {named} RNG state"):
        ft.load_checkpoint(tmp_path / "c.pt", fresh, fresh_optimizer)
    _assert_unchanged(frozen, fresh, fresh_optimizer)


def _child_named_module(seed: int) -> nn.Module:
    """Return a model whose only child is named ``module``, as a DDP wrapper's is."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(module=nn.Linear(2, 2)))


def test_a_model_whose_child_is_named_module_loads_its_own_checkpoint(tmp_path: Path) -> None:
    """Keys that match the model are kept; a prefix is stripped only where that fits better."""
    source = _child_named_module(0)
    ft.save_checkpoint(tmp_path / "c.pt", source, epoch=0)
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    wrapped = {f"module.{key}": value for key, value in source.state_dict().items()}
    torch.save(wrapped, tmp_path / "ddp.pth")
    for name in ("c.pt", "bare.pth", "ddp.pth"):
        target = _child_named_module(1)
        ft.load_checkpoint(tmp_path / name, target)
        assert_bit_identical(snapshot(source, grads=False), snapshot(target, grads=False))


class _Warmup:
    """A warmup schedule for LambdaLR, written as a callable object."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps)


class _Delayed:
    """A schedule object holding another schedule object, which weights_only cannot load."""

    def __init__(self) -> None:
        self.inner = _Warmup(3)

    def __call__(self, epoch: int) -> float:
        return self.inner(max(epoch - 1, 0))


def test_a_state_that_would_not_load_is_refused_at_save(tmp_path: Path) -> None:
    """A scheduler state weights_only=True cannot load is refused by location; no file changes."""
    path, model = tmp_path / "c.pt", nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(3))
    ft.save_checkpoint(path, model, optimizer, scheduler=warmup, epoch=0)
    old = path.read_bytes()
    delayed = torch.optim.lr_scheduler.LambdaLR(optimizer, _Delayed())
    where = r"'scheduler' state\['lr_lambdas'\]\[0\]\['inner'\]"
    with pytest.raises(TypeError, match=rf"{where} .* is a tests\.test_checkpoint\._Warmup"):
        ft.save_checkpoint(path, model, optimizer, scheduler=delayed, epoch=1)
    _assert_intact(path, old)
    fresh_optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    again = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, _Warmup(9))
    ft.load_checkpoint(path, model, scheduler=again)
    assert again.lr_lambdas[0].steps == 3


class _Counted(nn.Module):
    """A linear layer that keeps a plain-data counter as its extra state."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.calls = calls

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]


def test_modules_with_extra_state_round_trip(tmp_path: Path) -> None:
    """A module's plain extra state loads back, from save_checkpoint and from torch.save."""
    torch.manual_seed(0)
    source = nn.Sequential(_Counted(5), nn.ReLU())
    ft.save_checkpoint(tmp_path / "c.pt", source, epoch=0)
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    for name in ("c.pt", "bare.pth"):
        target = nn.Sequential(_Counted(0), nn.ReLU())
        ft.load_checkpoint(tmp_path / name, target)
        assert target[0].calls == 5
        weights = snapshot(source[0].linear, grads=False)
        assert_bit_identical(weights, snapshot(target[0].linear, grads=False))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path: Path, umask: int) -> None:
    """A new checkpoint's permissions are those open(path, "w") gives under the same umask."""
    old = os.umask(umask)
    try:
        ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
        with open(tmp_path / "reference", "w"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == expected


def test_saving_over_a_file_keeps_its_mode(tmp_path: Path) -> None:
    """Saving over an existing checkpoint keeps the permissions that file had."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    os.chmod(tmp_path / "c.pt", 0o640)
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=1)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o640


def test_cuda_rng_states_that_cannot_be_restored_warn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with CUDA RNG states loaded where CUDA is missing warns: not bit-exact."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    cuda = [torch.zeros(16, dtype=torch.uint8)]
    _edit(tmp_path / "c.pt", lambda payload: payload["rng"].__setitem__("cuda", cuda))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA RNG .* not be bit-exact"):
        ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), restore_rng=True)


def test_a_numpy_rng_state_without_numpy_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with a NumPy RNG state loaded where NumPy is missing warns: not bit-exact."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.warns(RuntimeWarning, match="NumPy RNG .* not be bit-exact"):
        ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), restore_rng=True)


def test_strict_false_returns_the_keys_it_skipped(tmp_path: Path) -> None:
    """strict=False names the missing and unexpected keys it skipped; a full load names none."""
    ft.save_checkpoint(tmp_path / "c.pt", _named(0, 4, "b"), epoch=1)
    loaded = ft.load_checkpoint(tmp_path / "c.pt", _named(1, 4, "c"), strict=False)
    assert loaded.missing_keys == ("c.weight", "c.bias")
    assert loaded.unexpected_keys == ("b.weight", "b.bias")
    full = ft.load_checkpoint(tmp_path / "c.pt", _named(1, 4, "b"))
    assert (full.missing_keys, full.unexpected_keys) == ((), ())


@pytest.mark.parametrize("function", ["save", "load"])
@pytest.mark.parametrize("path", [3, b"c.pt", None])
def test_a_path_of_the_wrong_type_is_named(function: str, path: object) -> None:
    """A path that is not a str or os.PathLike raises TypeError naming 'path'."""
    with pytest.raises(TypeError, match=r"'path' must be a str or os\.PathLike"):
        if function == "save":
            ft.save_checkpoint(path, nn.Linear(2, 2), epoch=0)  # type: ignore[arg-type]
        else:
            ft.load_checkpoint(path, nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "optimizer", "named"),
    [("net", None, "'model'"), (nn.Linear(2, 2), "sgd", "'optimizer'")],
)
def test_load_names_a_model_or_optimizer_of_the_wrong_type(
    tmp_path: Path, model: object, optimizer: object, named: str
) -> None:
    """load_checkpoint names a model or optimizer argument of the wrong type."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    with pytest.raises(TypeError, match=named):
        ft.load_checkpoint(tmp_path / "c.pt", model, optimizer)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "model_entry", ["absent", [1, 2], {"weight": "text"}, {1: torch.zeros(1)}], ids=repr
)
def test_a_forged_payload_without_a_model_state_is_refused(
    tmp_path: Path, model_entry: object
) -> None:
    """An fntrain payload whose 'model' is missing or not a state_dict raises CheckpointError."""
    payload = {"format": "fntrain.checkpoint", "version": 1, "epoch": 1, "step": 0}
    if model_entry != "absent":
        payload["model"] = model_entry
    torch.save(payload, tmp_path / "forged.pt")
    with pytest.raises(ft.CheckpointError, match="'model'"):
        ft.load_checkpoint(tmp_path / "forged.pt", nn.Linear(2, 2))


def test_a_save_removes_old_orphaned_temporary_files_of_its_target_only(tmp_path: Path) -> None:
    """Old temp files of this target go; other files and a save in progress stay."""
    hour_ago = time.time() - 3600
    orphan = tmp_path / ".c.pt.0123456789abcdef.tmp"
    others = [".other.pt.x.tmp", ".c.pt.x.0123456789abcdef.tmp", ".c.pt.notes", "c.pt.tmp"]
    for name in [orphan.name, *others]:
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    in_progress = tmp_path / ".c.pt.fedcba9876543210.tmp"
    in_progress.write_bytes(b"x")
    os.utime(in_progress, (time.time() + 60, time.time() + 60))
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"c.pt", in_progress.name, *others}


def test_an_old_temporary_file_a_live_save_holds_is_kept(tmp_path: Path) -> None:
    """A temp file another save still holds locked stays, however old it looks."""
    fcntl = pytest.importorskip("fcntl")
    held = tmp_path / ".c.pt.0123456789abcdef.tmp"
    with open(held, "wb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        os.utime(held, (time.time() - 3600, time.time() - 3600))
        ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
        assert held.exists()


def test_checkpoint_options_are_keyword_only_and_annotated() -> None:
    """path, model, optimizer are positional; every other option is keyword-only; all annotated."""
    for function in (ft.save_checkpoint, ft.load_checkpoint):
        params = list(inspect.signature(function).parameters.values())
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional == ["path", "model", "optimizer"], function.__name__
        assert all(p.kind is p.KEYWORD_ONLY for p in params[3:]), function.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in params)
        hints = typing.get_type_hints(function)
        assert set(hints) == {p.name for p in params} | {"return"}


# --- every promise holds at the edges --------------------------------------------------------


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_meta_and_sparse_tensors_are_refused_at_save(tmp_path: Path, kind: str) -> None:
    """A meta or sparse tensor would not load back; save names it and writes nothing."""
    model = nn.Linear(2, 2)
    bad = torch.empty(2, device="meta") if kind == "meta" else torch.eye(2).to_sparse()
    with pytest.raises(TypeError, match=rf"'extra'\['t'\] is a {kind} tensor"):
        ft.save_checkpoint(tmp_path / "c.pt", model, epoch=0, extra={"t": bad})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_a_file_with_meta_or_sparse_tensors_changes_nothing(tmp_path: Path, kind: str) -> None:
    """A bare state dict whose last tensor is meta or sparse: CheckpointError, model unchanged."""
    state = mlp(4, 2, 1).state_dict()
    last = list(state)[-1]
    state[last] = torch.empty_like(state[last], device="meta") if kind == "meta" else (
        state[last].to_sparse()
    )  # fmt: skip
    torch.save(state, tmp_path / "odd.pt")
    model = mlp(4, 2, 2)
    before = snapshot(model)
    with pytest.raises(ft.CheckpointError, match=rf"{last!r} is a {kind} tensor"):
        ft.load_checkpoint(tmp_path / "odd.pt", model)
    assert_bit_identical(before, snapshot(model))


class _Picky(nn.Module):
    """A layer whose extra state refuses some values (custom loading code can fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.mode = "ok"

    def get_extra_state(self) -> str:
        return self.mode

    def set_extra_state(self, state: str) -> None:
        if state != "ok":
            raise ValueError(f"cannot take mode {state!r}")
        self.mode = state


def test_a_failure_inside_load_state_dict_puts_every_key_back(tmp_path: Path) -> None:
    """An error raised after earlier keys were copied leaves the model as it was."""
    source = nn.Sequential(nn.Linear(2, 2), _Picky())
    source[1].mode = "broken"
    ft.save_checkpoint(tmp_path / "c.pt", source, epoch=0)
    model = nn.Sequential(nn.Linear(2, 2), _Picky())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ft.CheckpointError, match=r"nothing was loaded.*cannot take mode"):
        ft.load_checkpoint(tmp_path / "c.pt", model)
    assert all(map(torch.equal, before, model.parameters())) and model[1].mode == "ok"


def _flip_one_byte(path: Path, position: int) -> None:
    """Invert every bit of the byte at ``position`` of the file."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_a_flipped_byte_anywhere_is_detected_or_harmless(tmp_path: Path, fraction: float) -> None:
    """Corruption raises CheckpointError, or the byte was unused and the load is bit-identical."""
    source, optimizer, scheduler = _trained(1)
    path = tmp_path / "c.pt"
    ft.save_checkpoint(path, source, optimizer, scheduler=scheduler, epoch=3, extra={"n": 7})
    _flip_one_byte(path, int(fraction * path.stat().st_size))
    model, opt, _ = _trained(2)
    frozen = _freeze(model, opt)
    try:
        loaded = ft.load_checkpoint(path, model, opt, restore_rng=False)
    except ft.CheckpointError:
        _assert_unchanged(frozen, model, opt)
        return
    assert (loaded.epoch, dict(loaded.extra)) == (3, {"n": 7})
    assert_bit_identical(snapshot(source, grads=False), snapshot(model, grads=False))
    for a, b in zip(optimizer.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_flipped_byte_inside_the_weights_says_the_file_is_corrupt(tmp_path: Path) -> None:
    """One byte in the middle of a weight tensor: a CheckpointError that says 'corrupt'."""
    model = nn.Linear(64, 64)
    path = tmp_path / "c.pt"
    ft.save_checkpoint(path, model, epoch=0)
    data = path.read_bytes()
    weights = model.weight.detach().numpy().tobytes()
    _flip_one_byte(path, data.index(weights) + len(weights) // 2)
    with pytest.raises(ft.CheckpointError, match="corrupt"):
        ft.load_checkpoint(path, nn.Linear(64, 64))


def test_a_full_disk_is_named_and_the_old_file_is_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that runs out of space raises OSError(ENOSPC) saying the old file is intact."""
    import errno
    import io

    path = tmp_path / "c.pt"
    ft.save_checkpoint(path, nn.Linear(2, 2), epoch=0)
    old = path.read_bytes()
    real_fdopen = os.fdopen

    class Full(io.RawIOBase):
        def __init__(self, handle: typing.BinaryIO) -> None:
            self.handle, self.written = handle, 0

        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 512:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def fileno(self) -> int:
            return self.handle.fileno()

        def close(self) -> None:
            self.handle.close()
            super().close()

    monkeypatch.setattr(checkpoint_module.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match=r"no space left.*'c.pt' is intact") as caught:
        ft.save_checkpoint(path, nn.Linear(64, 64), epoch=1)
    assert caught.value.errno == errno.ENOSPC
    _assert_intact(path, old)


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="needs root to mount")
def test_a_really_full_disk_is_named(tmp_path: Path) -> None:
    """On a real 200 KB tmpfs, torch's 'unexpected pos' becomes the same clear OSError."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)]).returncode:
        pytest.skip("mount failed")
    try:
        ft.save_checkpoint(small / "c.pt", nn.Linear(2, 2), epoch=0)
        with pytest.raises(OSError, match=r"no space left.*'c.pt' is intact"):
            ft.save_checkpoint(small / "c.pt", nn.Linear(300, 300), epoch=1)
        assert [p.name for p in small.iterdir()] == ["c.pt"]
        assert ft.load_checkpoint(small / "c.pt", nn.Linear(2, 2)).epoch == 0
    finally:
        subprocess.run(["umount", str(small)], check=False)


class _Net(nn.Module):
    """A model class as a tutorial defines it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


@pytest.mark.parametrize("whole", [lambda: nn.Sequential(nn.Linear(2, 2)), _Net])
def test_a_whole_pickled_model_is_named_with_the_way_out(tmp_path: Path, whole: object) -> None:
    """torch.save(model) files: the class is named, how to convert is said, no ANSI codes."""
    model = whole()  # type: ignore[operator]
    torch.save(model, tmp_path / "model.pth")
    with pytest.raises(ft.CheckpointError) as caught:
        ft.load_checkpoint(tmp_path / "model.pth", nn.Linear(2, 2))
    message = str(caught.value)
    assert type(model).__qualname__ in message and "torch.save(model)" in message
    assert "weights_only=False).state_dict()" in message and "\x1b" not in message


def test_restore_rng_by_default_only_when_resuming(tmp_path: Path) -> None:
    """Loading best.pt mid-run keeps the RNGs; resuming with an optimizer restores them."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ft.save_checkpoint(tmp_path / "c.pt", model, optimizer, epoch=0)
    saved = torch.get_rng_state()
    torch.rand(3)
    running = torch.get_rng_state()
    ft.load_checkpoint(tmp_path / "c.pt", model)  # the best weights, in the middle of a run
    assert torch.equal(torch.get_rng_state(), running)
    ft.load_checkpoint(tmp_path / "c.pt", model, optimizer)  # resuming the run
    assert torch.equal(torch.get_rng_state(), saved)


def test_a_cyclic_extra_is_named_at_save(tmp_path: Path) -> None:
    """A list that contains itself is refused with where the cycle is, not a RecursionError."""
    loop: list[object] = [1]
    loop.append({"again": loop})
    with pytest.raises(TypeError, match=r"'extra'\['history'\]\[1\]\['again'\] contains itself"):
        ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0, extra={"history": loop})
    assert list(tmp_path.iterdir()) == []


def test_a_map_location_function_that_raises_is_blamed_not_the_file(tmp_path: Path) -> None:
    """An error from the user's map_location names map_location; the file is not called broken."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)

    def broken(storage: object, location: str) -> object:
        raise KeyError("no such device table entry")

    with pytest.raises(KeyError, match="'map_location' raised") as caught:
        ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), map_location=broken)
    assert "not a loadable checkpoint" not in str(caught.value)


def test_strided_conjugate_and_negative_bit_tensors_save_and_load_back(tmp_path: Path) -> None:
    """Tensors torch.save takes (a strided view, a column view buffer, conj, neg bit) round-trip."""
    model = nn.Linear(2, 3)
    model.register_buffer("column", torch.arange(6.0).reshape(3, 2)[:, 1])
    extra = {
        "strided": torch.arange(9.0)[::3],
        "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(),
        "neg": torch._neg_view(torch.tensor([1.0, 2.0])),
        "expanded": torch.ones(1).expand(4),
    }
    torch.save({"model": model.state_dict(), "extra": extra}, tmp_path / "plain.pt")
    ft.save_checkpoint(tmp_path / "c.pt", model, epoch=0, extra=extra)
    fresh = nn.Linear(2, 3)
    fresh.register_buffer("column", torch.zeros(3))
    loaded = ft.load_checkpoint(tmp_path / "c.pt", fresh)
    assert_bit_identical(snapshot(model, grads=False), snapshot(fresh, grads=False))
    assert loaded.extra.keys() == extra.keys()
    assert all(torch.equal(loaded.extra[key], value) for key, value in extra.items())


def test_single_bit_flips_in_the_format_marker_are_detected_or_harmless(tmp_path: Path) -> None:
    """Any one bit of the "format" key or value flipped: a CheckpointError naming the file,
    or a load equal to the original, never a foreign loop dict loaded without its checksum."""
    source, path, flipped = nn.Linear(3, 2), tmp_path / "c.pt", tmp_path / "flipped.pt"
    ft.save_checkpoint(path, source, _adam(source.parameters()), epoch=3, step=5,
                       metrics={"a": 0.5}, extra={"n": 7})  # fmt: skip
    data = path.read_bytes()
    value = data.index(b"fntrain.checkpoint")
    start, end = data.index(b"format") - 5, value + len(b"fntrain.checkpoint")  # with opcodes
    assert start < value < end < start + 60  # the key and its value, in data.pkl
    for position, bit in itertools.product(range(start, end), range(8)):
        corrupt = bytearray(data)
        corrupt[position] ^= 1 << bit
        flipped.write_bytes(bytes(corrupt))
        model = nn.Linear(3, 2)
        try:
            loaded = ft.load_checkpoint(flipped, model, _adam(model.parameters()))
        except ft.CheckpointError as error:
            assert str(flipped) in str(error), (position, bit, error)
            continue
        stored = (loaded.epoch, loaded.step, dict(loaded.metrics), dict(loaded.extra))
        assert stored == (3, 5, {"a": 0.5}, {"n": 7}), (position, bit)
        assert_bit_identical(snapshot(source, grads=False), snapshot(model, grads=False))


class _Stubborn(nn.Module):
    """A layer whose extra state refuses every value, also its own on the way back."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def get_extra_state(self) -> int:
        return 0

    def set_extra_state(self, state: int) -> None:
        raise ValueError(f"refuses the state {state!r}")


def test_an_undo_that_fails_does_not_stop_the_others_and_is_named(tmp_path: Path) -> None:
    """If putting the model back fails, the optimizer, scheduler and RNG are put back anyway."""

    def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, object]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(2, 2), _Stubborn())
        optimizer = _adam(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(seed + 1):
            model[1].linear(model[0](torch.randn(4, 2))).sum().backward()
            optimizer.step()
            scheduler.step()
        return model, optimizer, scheduler

    source, optimizer, scheduler = trained(0)
    ft.save_checkpoint(tmp_path / "c.pt", source, optimizer, scheduler=scheduler, epoch=1)
    model, opt, sched = trained(2)
    optimizer_before, scheduler_before = copy.deepcopy(opt), copy.deepcopy(sched.state_dict())
    torch.manual_seed(123)
    rng_before = _rng_states()
    with pytest.raises(ft.CheckpointError) as caught:
        ft.load_checkpoint(tmp_path / "c.pt", model, opt, scheduler=sched, restore_rng=True)
    message = str(caught.value)
    assert str(tmp_path / "c.pt") in message and "refuses the state" in message
    assert "could not put back 'model'" in message and "nothing was loaded" not in message
    assert _same_state(opt, optimizer_before) and sched.state_dict() == scheduler_before
    python, numpy, torch_rng = rng_before
    assert random.getstate() == python and torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], numpy[1])


def test_a_file_name_of_255_bytes_saves_and_its_orphans_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A legal 255-byte name saves and loads; its temp name fits, and old ones are removed."""
    target = tmp_path / ("é" * 126 + ".pt")  # 255 bytes in UTF-8, the usual limit
    assert len(os.fsencode(target.name)) == 255
    torch.save({}, target)  # a name the file system takes
    temps: list[str] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (temps.append(Path(a).name), replace(a, b)))
    ft.save_checkpoint(target, nn.Linear(2, 2), epoch=4)
    assert ft.load_checkpoint(target, nn.Linear(2, 2)).epoch == 4
    assert len(os.fsencode(temps[0])) <= 255 and temps[0].startswith(".éé")
    orphan = tmp_path / temps[0]  # what a save killed before its rename leaves
    orphan.write_bytes(b"x")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    ft.save_checkpoint(target, nn.Linear(2, 2), epoch=5)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
