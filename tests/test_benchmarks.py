"""The benchmark scripts run (tiny sizes; they report timings, tests never check them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs a benchmark script in a new process

ROOT = Path(__file__).resolve().parent.parent


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


def test_the_side_by_side_runner_runs_every_contender(tmp_path: Path) -> None:
    """benchmarks/run.py runs fntrain, the hand loops and the floor, and prints the table."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--model", "mlp", "--samples",
         "256", "--repeats", "1", "--peers", ""],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    names = {row["contender"] for row in rows}
    assert {"hand-written loop", "ft.train_epoch", "ft.train_epoch + TensorLoader",
            "hand-written eval loop", "ft.evaluate"} <= names  # fmt: skip
    assert all(row["median_s"] > 0 for row in rows)
    hand = [row for row in rows if row["contender"] == "hand-written loop"]
    assert hand[0]["ratio"] == 1.0
    assert "| model | phase | contender |" in out.stdout
