"""The benchmark scripts run (tiny sizes; they report timings, tests never check them)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.slow  # each test runs a benchmark script in a new process

ROOT = Path(__file__).resolve().parent.parent


def _runner() -> ModuleType:
    """Import benchmarks/run.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


def _body(function: object) -> str:
    """The source of a function after its docstring."""
    return inspect.getsource(function).split('"""')[2]


def test_checkpoint_save_benchmark_runs_and_reports_every_contender(tmp_path: Path) -> None:
    """benchmarks/checkpoint_save.py prints a JSON line per contender and a table."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoint_save.py"), "--megabytes", "1",
         "--repeats", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {row["contender"] for row in rows} >= {
        "torch.save(state_dict)",
        "ft.save_checkpoint(model)",
        "model.load_state_dict(torch.load(...))",
        "ft.load_checkpoint(model)",
    }
    assert all(row["median_s"] > 0 and row["mb"] > 0 for row in rows)
    assert "| save (1 MB model)" in out.stdout and "| load (1 MB model)" in out.stdout


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict], str]:
    """Run benchmarks/run.py on every model at a tiny size; its stdout, rows and page."""
    cwd = tmp_path_factory.mktemp("run")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--model", "all", "--samples",
         "64", "--batch-size", "32", "--repeats", "1", "--peers", "", "--markdown", "page.md"],
        cwd=cwd, capture_output=True, text=True, timeout=240, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's fntrain
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out.stdout, rows, (cwd / "page.md").read_text(encoding="utf-8")


def test_the_side_by_side_runner_runs_every_contender(side_by_side: tuple) -> None:
    """fntrain, the hand loops, their exact copies and the floor, for every model."""
    _, rows, _ = side_by_side
    assert {row["model"] for row in rows} == {"mlp", "cnn", "transformer"}
    for model in ("mlp", "cnn", "transformer"):
        names = {row["contender"] for row in rows if row["model"] == model}
        assert {"floor (pre-batched, no loader)", "hand-written loop", "ft.train_epoch",
                "ft.train_epoch + TensorLoader", "hand-written eval loop", "ft.evaluate",
                "ft.evaluate + TensorLoader", "hand-written predict loop", "ft.predict",
                "hand-written loop (exact copy)", "hand-written eval loop (exact copy)",
                "hand-written predict loop (exact copy)"} <= names, model  # fmt: skip
    assert all(row["min_s"] > 0 and row["median_s"] >= row["min_s"] for row in rows)
    assert all(row["batches"] == 2 and row["runs"] == 1 for row in rows)


def test_every_row_carries_its_phases_noise_and_the_overhead_per_batch(
    side_by_side: tuple,
) -> None:
    """The copy's ratio is every row's noise; the hand loop's overhead is 0; floor for train."""
    _, rows, _ = side_by_side
    for model in ("mlp", "cnn", "transformer"):
        for phase in ("train", "eval", "predict"):
            in_phase = [r for r in rows if r["model"] == model and r["phase"] == phase]
            hand = next(r for r in in_phase if r["contender"].startswith("hand-written"))
            assert hand["ratio"] == 1.0 and hand["overhead_us"] == 0.0
            copy = [r for r in in_phase if r["contender"].endswith("(exact copy)")]
            assert len(copy) == 1
            assert all(r["noise"] == copy[0]["ratio"] for r in in_phase)
            assert all(r["noise_us"] == copy[0]["overhead_us"] for r in in_phase)
            if phase == "train":
                floor = next(r for r in in_phase if r["contender"].startswith("floor"))
                assert floor["floor_ratio"] == 1.0 and floor["floor_overhead_us"] == 0.0
                assert all(r["floor_overhead_us"] is not None for r in in_phase)
            else:
                assert all(r["floor_ratio"] is None for r in in_phase)


def test_the_table_and_the_page_show_the_new_columns_and_the_method(side_by_side: tuple) -> None:
    """The table, the headline per model and the stamped page with its timing method."""
    stdout, _, page = side_by_side
    header = (
        "| model | phase | contender | s/epoch min (median) | vs hand-written "
        "| noise (hand copy) | vs floor | peak MB |"
    )
    for text in (stdout, page):
        assert header in text and "| transformer | train | ft.train_epoch |" in text
        assert "with 1 thread," in text and "time.thread_time" in text
        for model in ("mlp", "cnn", "transformer"):
            assert f"- {model}: ft.train_epoch **" in text
        assert "ft.train_epoch + TensorLoader **" in text and "the floor" in text
    assert page.startswith("# Performance (generated)") and "Generated " in page
    assert "Command: `python benchmarks/run.py --model all" in page and "--peers ''" in page


def test_the_hand_loops_copies_are_exact_copies() -> None:
    """The noise figure is only that if the copy runs the very same code as the original."""
    run = _runner()
    for name in ("hand_train", "hand_eval", "hand_predict"):
        original, copy = getattr(run, name), getattr(run, f"{name}_copy")
        assert original is not copy and original.__code__ is not copy.__code__
        assert _body(original) == _body(copy), name


def test_the_report_gives_ratios_noise_and_microseconds_per_batch() -> None:
    """Ratios of the fastest epochs; the per-batch difference to the hand loop and floor."""
    run = _runner()
    seconds = {  # contender -> (phase, seconds of its epochs)
        run.FLOOR: ("train", [0.5, 0.6]),
        run.HAND["train"]: ("train", [1.0, 1.2]),
        "ft.train_epoch": ("train", [1.1, 1.1]),
        run.HAND_COPY["train"]: ("train", [1.01, 1.3]),
        run.HAND["eval"]: ("eval", [0.4, 0.5]),
        run.HAND_COPY["eval"]: ("eval", [0.396, 0.5]),
        run.HAND["predict"]: ("predict", [0.2, 0.3]),
        run.HAND_COPY["predict"]: ("predict", [0.2, 0.3]),
    }
    runs = {name: (phase, lambda: None) for name, (phase, _) in seconds.items()}
    results = {name: (times, 0) for name, (_, times) in seconds.items()}
    rows = run.report("m", runs, results, 100)
    by_name = {row["contender"]: row for row in rows}
    ft = by_name["ft.train_epoch"]
    assert ft["ratio"] == pytest.approx(1.1) and ft["overhead_us"] == pytest.approx(1000)
    assert ft["noise"] == pytest.approx(1.01) and ft["noise_us"] == pytest.approx(100)
    assert ft["floor_ratio"] == pytest.approx(2.2)
    assert ft["floor_overhead_us"] == pytest.approx(6000)
    assert ft["ratio_median"] == pytest.approx(1.0) and ft["median_s"] == pytest.approx(1.1)
    copy = by_name[run.HAND_COPY["eval"]]
    assert copy["noise"] == copy["ratio"] == pytest.approx(0.99)
    assert copy["overhead_us"] == pytest.approx(-40) and copy["floor_ratio"] is None
    text = run.table(rows, torch.device("cpu"), "a clock")
    assert "timed by a clock; the fastest epoch of the rounds (m 2)" in text
    assert (
        "| m | train | ft.train_epoch | 1.1000 (1.1000) | 1.100x (+1000.0 µs) "
        "| 1.010x (+100.0 µs) | 2.200x (+6000.0 µs) | 0.0 |"
    ) in text
    assert "| m | eval | hand-written eval loop | 0.4000 (0.4500) | 1.000x (+0.0 µs) " in text
    assert "ft.train_epoch **1.100x** the hand-written loop" in run.headline(rows)


def test_the_clock_is_the_threads_cpu_time_only_for_one_thread_on_the_cpu() -> None:
    """time.thread_time would miss the work of other threads and of the GPU."""
    run = _runner()
    assert run.pick_clock(torch.device("cpu"), 1).now is time.thread_time
    assert run.pick_clock(torch.device("cpu"), 2).now is time.perf_counter
    assert run.pick_clock(torch.device("cuda"), 1).now is time.perf_counter
    assert "synchronize" in run.pick_clock(torch.device("cuda"), 1).method
