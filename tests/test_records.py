"""The records: frozen, yet picklable, copyable, comparable and hashable like plain values."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fntrain as ft

_NUMBERS = st.floats(allow_nan=False, width=32)
_METRICS = st.dictionaries(st.text(min_size=1, max_size=5), _NUMBERS, max_size=4)


def _records(metrics: dict[str, float], loss: float, samples: int) -> list[object]:
    """Return one record of each kind built from the same values."""
    matrix = torch.arange(4.0).reshape(2, 2)
    return [
        ft.TrainResult(loss, {**metrics, "cm": matrix}, samples, 2, 3, 0.5, 0.1, grad_norm=1.5),
        ft.EvalResult(loss, metrics, samples, 2, 0.5),
        ft.Predictions(torch.full((samples, 2), loss), {"y": torch.arange(samples)}, samples),
        ft.Step(0, 1, loss, samples, 0.1, None),
        ft.SavedCheckpoint(Path("last.pt"), 10, 1, 2),
        ft.Checkpoint(Path("last.pt"), 1, 2, metrics, {"nested": [1, {"a": matrix}]}, ("w",), ()),
    ]


@settings(max_examples=25, deadline=None)
@given(metrics=_METRICS, loss=_NUMBERS, samples=st.integers(1, 6))
def test_records_survive_pickle_copy_and_deepcopy_and_compare_equal(
    metrics: dict[str, float], loss: float, samples: int
) -> None:
    """Every record round-trips through pickle, copy and deepcopy into an equal record."""
    for record in _records(metrics, loss, samples):
        for clone in (
            pickle.loads(pickle.dumps(record)),
            copy.copy(record),
            copy.deepcopy(record),
        ):
            assert type(clone) is type(record)
            assert clone == record
            assert not clone != record  # noqa: SIM202 (__ne__ too)
            assert hash(clone) == hash(record)


@settings(max_examples=25, deadline=None)
@given(metrics=_METRICS, loss=_NUMBERS, samples=st.integers(1, 6))
def test_records_with_different_tensors_are_unequal(
    metrics: dict[str, float], loss: float, samples: int
) -> None:
    """Equality compares tensor values (torch.equal), not identities, and never raises."""
    a = ft.Predictions(torch.zeros(samples, 2), None, samples)
    b = ft.Predictions(torch.zeros(samples, 2), None, samples)
    c = ft.Predictions(torch.ones(samples, 2), None, samples)
    d = ft.Predictions(torch.zeros(samples, 3), None, samples)
    assert a == b and a != c and a != d and hash(a) == hash(b)
    first = ft.EvalResult(loss, {**metrics, "cm": torch.eye(2)}, samples, 1, 0.1)
    second = ft.EvalResult(loss, {**metrics, "cm": torch.zeros(2, 2)}, samples, 1, 0.1)
    assert first != second


def test_record_mappings_are_read_only_dicts_that_json_and_pickle() -> None:
    """metrics and extra are dicts for reading (json.dumps works) that refuse every change."""
    result = ft.EvalResult(0.5, {"acc": 0.75}, 4, 1, 0.1)
    assert isinstance(result.metrics, dict)
    assert json.loads(json.dumps(result.metrics)) == {"acc": 0.75}
    changes = [
        lambda m: m.__setitem__("acc", 1.0),
        lambda m: m.__delitem__("acc"),
        lambda m: m.update(acc=1.0),
        lambda m: m.setdefault("new", 1.0),
        lambda m: m.pop("acc"),
        lambda m: m.popitem(),
        lambda m: m.clear(),
        lambda m: m.__ior__({"acc": 1.0}),
    ]
    for change in changes:
        with pytest.raises(TypeError, match="read-only"):
            change(result.metrics)
    assert result.metrics == {"acc": 0.75}
    assert (result.metrics | {"new": 1.0}) == {"acc": 0.75, "new": 1.0}  # a new plain dict


def test_a_history_of_results_can_be_saved_and_sent_to_another_process(tmp_path: Path) -> None:
    """A list of TrainResults pickles to a file and loads back equal (multiprocessing, joblib)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    history = [
        ft.train_epoch(model, batches, torch.nn.functional.cross_entropy, opt, "cpu",
                       metrics={"acc": ft.accuracy()})
        for _ in range(3)
    ]  # fmt: skip
    (tmp_path / "history.pkl").write_bytes(pickle.dumps(history))
    assert pickle.loads((tmp_path / "history.pkl").read_bytes()) == history


_WITH_NAN = st.floats(width=32) | st.just(float("nan"))


@settings(max_examples=25, deadline=None)
@given(
    metrics=st.dictionaries(st.text(min_size=1, max_size=5), _WITH_NAN, min_size=1, max_size=4),
    samples=st.integers(1, 6),
)
def test_records_with_nan_equal_themselves_their_pickle_and_copies(
    metrics: dict[str, float], samples: int
) -> None:
    """A NaN loss, metric or output compares equal to NaN: a record equals its round trips."""
    nan = float("nan")
    outputs = torch.tensor([[nan, 1.0]] * samples)
    records = [*_records(metrics, nan, samples), ft.Predictions(outputs, [nan], samples)]
    for record in records:
        for clone in (record, pickle.loads(pickle.dumps(record)), copy.copy(record),
                      copy.deepcopy(record)):  # fmt: skip
            assert clone == record and not clone != record  # noqa: SIM202 (__ne__ too)
            assert hash(clone) == hash(record)
    moved = ft.Predictions(outputs.flip(1), None, samples)
    assert ft.Predictions(outputs, None, samples) != moved  # NaN at other places: unequal
    assert ft.EvalResult(nan, {}, 1, 1, 0.1) != ft.EvalResult(0.5, {}, 1, 1, 0.1)
