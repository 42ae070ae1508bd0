"""Checkpoints: complete, atomic under SIGKILL, code-free, checked before they change anything."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
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


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, object]:
    """Return a model, Adam optimizer and scheduler after a few real steps."""
    model = mlp(5, 3, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=50)
    data = make_data(32, 5, 3, seed)
    for _ in range(2):
        ft.train_epoch(model, [data[:16], data[16:]], nn.CrossEntropyLoss(), optimizer, "cpu")
        scheduler.step()
    return model, optimizer, scheduler


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
    ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2))
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


def test_mismatches_are_all_reported_at_once_and_nothing_changes(tmp_path: Path) -> None:
    """Missing keys, unexpected keys and shape mismatches are listed together; nothing loads."""
    saved = nn.Sequential(nn.Linear(4, 10), nn.Linear(10, 3))
    ft.save_checkpoint(tmp_path / "c.pt", saved, epoch=1)
    model = nn.Sequential(nn.Linear(8, 10), nn.Linear(10, 3), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, rng_before = snapshot(model), torch.get_rng_state()
    with pytest.raises(ft.CheckpointError) as caught:
        ft.load_checkpoint(tmp_path / "c.pt", model)
    message = str(caught.value)
    assert "missing in the file: '2.weight', '2.bias'" in message
    assert "key '0.weight' has shape (10, 4) in the file but (10, 8) in the model" in message
    assert "nothing was loaded" in message
    assert_bit_identical(before, snapshot(model))
    assert torch.equal(rng_before, torch.get_rng_state())
    assert optimizer.state_dict()["state"] == {}


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
    with pytest.raises(ft.CheckpointError, match="'scheduler' was given but the file holds no"):
        ft.load_checkpoint(tmp_path / "c.pt", fresh, scheduler=object())
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
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


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
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_the_file_holds_format_versions_and_every_rng(tmp_path: Path) -> None:
    """The payload names its format and version, the torch that wrote it, and each RNG."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert payload["format"] == "fntrain.checkpoint" and payload["version"] == 1
    assert payload["torch_version"] == str(torch.__version__)
    assert {"python", "numpy", "torch"} <= set(payload["rng"])


def test_map_location_puts_loaded_metrics_where_asked(tmp_path: Path) -> None:
    """Tensors in the file are loaded to map_location; the model keeps its own device."""
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), epoch=0, metrics={"cm": torch.eye(2)})
    loaded = ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(2, 2), map_location="cpu")
    assert loaded.metrics["cm"].device.type == "cpu"
    assert os.path.samefile(loaded.path, tmp_path / "c.pt")
