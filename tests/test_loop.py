"""train_epoch, evaluate and predict: modes, purity, exactness, weighting; one property per test."""

from __future__ import annotations

import io
import math
import time
import weakref
from collections import OrderedDict, UserDict

import attrs
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fntrain as ft
from tests import strategies as s
from tests.helpers import (
    assert_bit_identical,
    hand_train_epoch,
    loader,
    make_data,
    mlp,
    snapshot,
)

CPU = torch.device("cpu")
FAST = settings(max_examples=15, deadline=None)


def _trained_model(seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    """Return an MLP after one training step (so .grad is set) and its data."""
    data = make_data(40, 5, 3, seed)
    model = mlp(5, 3, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ft.train_epoch(model, [data[:8]], nn.CrossEntropyLoss(), opt, CPU)
    return model, data


@FAST
@given(
    seed=s.seeds,
    samples=s.sample_counts,
    batch_size=st.integers(2, 16),
    adam=st.booleans(),
)
def test_train_epoch_is_bit_identical_to_the_hand_written_loop(
    seed: int, samples: int, batch_size: int, adam: bool
) -> None:
    """One train_epoch equals the tutorial loop bit for bit (BatchNorm, dropout, shuffle)."""
    assume(samples % batch_size != 1)  # BatchNorm cannot train on a batch of one
    data = make_data(samples, 5, 3, seed)
    results = []
    for run in ("hand", "fntrain"):
        model = mlp(5, 3, seed)
        optim = torch.optim.Adam if adam else torch.optim.SGD
        opt = optim(model.parameters(), lr=0.05, weight_decay=1e-3)
        torch.manual_seed(seed + 1)  # dropout draws from the global generator
        batches = loader(data, batch_size, seed=seed)
        if run == "hand":
            loss = hand_train_epoch(model, batches, nn.CrossEntropyLoss(), opt, CPU)
        else:
            loss = ft.train_epoch(model, batches, nn.CrossEntropyLoss(), opt, CPU).loss
        results.append((snapshot(model), opt.state_dict(), loss))
    (hand, hand_opt, hand_loss), (mine, mine_opt, mine_loss) = results
    assert_bit_identical(hand, mine)
    assert hand_loss == pytest.approx(mine_loss, rel=1e-12)
    for key, value in hand_opt["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, mine_opt["state"][key][name])


@FAST
@given(seed=s.seeds, samples=s.sample_counts, sizes=st.lists(s.batch_sizes, min_size=2, max_size=3))
def test_evaluate_loss_and_metrics_do_not_depend_on_batch_size(
    seed: int, samples: int, sizes: list[int]
) -> None:
    """evaluate's loss and accuracy are sample-weighted: any batch size gives the same."""
    data = make_data(samples, 4, 3, seed)
    model = mlp(4, 3, seed)
    metrics = {"acc": ft.accuracy(), "top2": ft.top_k_accuracy(2)}
    results = [
        ft.evaluate(model, loader(data, size), nn.CrossEntropyLoss(), CPU, metrics=metrics)
        for size in sizes
    ]
    model.eval()
    with torch.no_grad():
        outputs = model(data.tensors[0])
    whole = nn.functional.cross_entropy(outputs, data.tensors[1]).item()
    correct = (outputs.argmax(1) == data.tensors[1]).sum().item()
    for result in results:
        assert result.samples == samples
        assert result.loss == pytest.approx(whole, rel=1e-5, abs=1e-6)
        assert result.metrics["acc"] == correct / samples
        assert result.metrics["top2"] == results[0].metrics["top2"]


def test_train_loss_is_weighted_by_samples_not_batches() -> None:
    """With an uneven last batch, the epoch loss is the per-sample mean, not the batch mean."""
    inputs = torch.tensor([[0.0]] * 4 + [[10.0]])
    data = TensorDataset(inputs, torch.zeros(5, 1))
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = ft.train_epoch(model, loader(data, 4), nn.MSELoss(), opt, CPU)
    assert result.loss == pytest.approx(100.0 / 5)  # the batch mean would be (0 + 100) / 2
    assert (result.samples, result.batches, result.steps) == (5, 2, 2)


@FAST
@given(seed=s.seeds, batch_size=st.integers(2, 9))
def test_per_sample_losses_give_the_same_training_as_the_mean(seed: int, batch_size: int) -> None:
    """A loss_fn with reduction='none' trains and reports exactly like reduction='mean'."""
    assume(30 % batch_size != 1)
    data = make_data(30, 4, 3, seed)
    results = []
    for reduction in ("mean", "none"):
        model = mlp(4, 3, seed, dropout=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        result = ft.train_epoch(model, loader(data, batch_size), loss_fn, opt, CPU)
        results.append((result.loss, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("inference_mode", [False, True])
def test_evaluate_changes_nothing_in_the_model(inference_mode: bool) -> None:
    """evaluate leaves parameters, BatchNorm buffers and .grad bit-identical."""
    model, data = _trained_model()
    before = snapshot(model)
    ft.evaluate(
        model,
        loader(data, 7),
        nn.CrossEntropyLoss(),
        CPU,
        metrics={"acc": ft.accuracy()},
        inference_mode=inference_mode,
    )
    assert_bit_identical(before, snapshot(model))


def test_predict_changes_nothing_in_the_model() -> None:
    """predict leaves parameters, BatchNorm buffers and .grad bit-identical."""
    model, data = _trained_model()
    before = snapshot(model)
    ft.predict(model, loader(data, 7), CPU)
    assert_bit_identical(before, snapshot(model))


def test_evaluate_and_predict_build_no_graph() -> None:
    """evaluate and predict run without autograd: outputs carry no graph."""
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_grad_enabled())
            return x

    model = nn.Sequential(nn.Linear(3, 2), Probe())
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    ft.evaluate(model, data, nn.CrossEntropyLoss(), CPU)
    preds = ft.predict(model, data, CPU)
    assert seen == [False, False]
    assert not preds.outputs.requires_grad
    assert preds.outputs.grad_fn is None


class _ModeProbe(nn.Module):
    """Records ``self.training`` at every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.linear(x)


def _probe_model() -> tuple[nn.Sequential, _ModeProbe, nn.BatchNorm1d]:
    """Return a model in train mode whose BatchNorm the user froze in eval mode."""
    probe = _ModeProbe()
    frozen = nn.BatchNorm1d(3).eval()
    return nn.Sequential(frozen, probe), probe, frozen


_BATCHES = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]


def _run(name: str, model: nn.Module, loss_fn: object = nn.functional.cross_entropy) -> None:
    """Call one of the three loop functions on ``model`` over _BATCHES."""
    if name == "train_epoch":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ft.train_epoch(model, _BATCHES, loss_fn, opt, CPU)
    elif name == "evaluate":
        ft.evaluate(model, _BATCHES, loss_fn, CPU)
    else:
        ft.predict(model, _BATCHES, CPU)


@pytest.mark.parametrize(
    ("name", "mode_inside"), [("train_epoch", True), ("evaluate", False), ("predict", False)]
)
def test_mode_is_set_inside_and_every_flag_restored_after(name: str, mode_inside: bool) -> None:
    """train_epoch runs in train mode, evaluate/predict in eval; each flag is restored."""
    model, probe, frozen = _probe_model()
    model.train()
    frozen.eval()
    _run(name, model)
    assert probe.seen == [mode_inside]
    assert model.training and probe.training
    assert not frozen.training


@pytest.mark.parametrize("name", ["train_epoch", "evaluate"])
def test_modes_are_restored_when_an_exception_escapes(name: str) -> None:
    """An exception from inside the loop leaves every module in its own previous mode."""
    model, probe, frozen = _probe_model()
    model.eval()
    probe.train()

    def broken_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(name, model, broken_loss)
    assert not model.training and probe.training and not frozen.training


def test_records_are_immutable() -> None:
    """Records are frozen, their metric mappings read-only, their numbers Python floats."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = {"acc": ft.accuracy()}
    train = ft.train_epoch(model, _BATCHES, nn.CrossEntropyLoss(), opt, CPU, metrics=metrics)
    ev = ft.evaluate(model, _BATCHES, nn.CrossEntropyLoss(), CPU, metrics=metrics)
    preds = ft.predict(model, _BATCHES, CPU)
    for record in (train, ev, preds):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            record.samples = 0  # type: ignore[misc]
    for record in (train, ev):
        assert type(record.loss) is float and type(record.metrics["acc"]) is float
        with pytest.raises(TypeError):
            record.metrics["acc"] = 1.0  # type: ignore[index]
    assert type(train.lr) is float


@FAST
@given(seed=s.seeds, samples=s.sample_counts, batch_size=s.batch_sizes)
def test_predict_equals_the_model_on_all_inputs_in_order(
    seed: int, samples: int, batch_size: int
) -> None:
    """predict returns model(all inputs) in eval mode, in loader order, with the targets."""
    data = make_data(samples, 4, 3, seed)
    model = mlp(4, 3, seed)
    preds = ft.predict(model, loader(data, batch_size), CPU)
    model.eval()
    with torch.no_grad():
        expected = model(data.tensors[0])
    torch.testing.assert_close(preds.outputs, expected)
    assert torch.equal(preds.targets, data.tensors[1])
    assert preds.samples == samples


def test_predict_takes_bare_inputs_and_returns_no_targets() -> None:
    """A loader of bare input tensors gives Predictions with targets None."""
    model = nn.Linear(3, 2)
    inputs = torch.randn(10, 3)
    preds = ft.predict(model, DataLoader(inputs, batch_size=4), CPU)
    assert preds.targets is None
    torch.testing.assert_close(preds.outputs, model(inputs).detach())


class _DictModel(nn.Module):
    """Takes a dict of tensors, returns a (logits, features) tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(1, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.a(batch["x"]) + self.b(batch["extra"])
        return hidden, hidden.relu()


def test_dict_inputs_and_tuple_outputs_are_supported() -> None:
    """Dict inputs reach the model as a dict; tuple outputs are concatenated per element."""
    x, extra = torch.randn(6, 3), torch.randn(6, 1)
    batches = [{"x": x[:4], "extra": extra[:4]}, {"x": x[4:], "extra": extra[4:]}]
    model = _DictModel()
    preds = ft.predict(model, batches, CPU)
    expected = model({"x": x, "extra": extra})
    assert isinstance(preds.outputs, tuple) and len(preds.outputs) == 2
    torch.testing.assert_close(preds.outputs[0], expected[0].detach())
    ev = ft.evaluate(
        model,
        [(batch, torch.zeros(len(batch["x"]), dtype=torch.long)) for batch in batches],
        lambda out, y: nn.functional.cross_entropy(out[0], y),
        CPU,
    )
    assert ev.samples == 6


def test_torchmetrics_objects_work_and_are_reset_per_call() -> None:
    """torchmetrics objects give the same value as on all data, and never leak across calls."""
    torchmetrics = pytest.importorskip("torchmetrics")
    data = make_data(50, 4, 3, 1)
    model = mlp(4, 3, 1)
    metrics = {
        "f1": torchmetrics.classification.MulticlassF1Score(num_classes=3, average="macro"),
        "cm": torchmetrics.classification.MulticlassConfusionMatrix(num_classes=3),
        "acc": ft.accuracy(),
    }
    first = ft.evaluate(model, loader(data, 8), nn.CrossEntropyLoss(), CPU, metrics=metrics)
    second = ft.evaluate(model, loader(data, 8), nn.CrossEntropyLoss(), CPU, metrics=metrics)
    model.eval()
    with torch.no_grad():
        outputs = model(data.tensors[0])
    whole_f1 = torchmetrics.functional.classification.multiclass_f1_score(
        outputs, data.tensors[1], num_classes=3, average="macro"
    )
    assert first.metrics["f1"] == pytest.approx(whole_f1.item())
    assert isinstance(first.metrics["cm"], torch.Tensor)
    assert first.metrics["cm"].sum().item() == 50
    assert torch.equal(first.metrics["cm"], second.metrics["cm"])
    assert first.metrics["f1"] == second.metrics["f1"]


def test_train_epoch_computes_metric_states_without_autograd() -> None:
    """train_epoch feeds metrics under no_grad: a differentiable metric keeps no graph alive."""
    seen: list[bool] = []

    def state(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return outputs.sum(), outputs.numel()

    metric = ft.Metric(state=state, compute=lambda total: float(total[0] / total[1]))
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ft.train_epoch(model, _BATCHES * 3, nn.CrossEntropyLoss(), opt, CPU, metrics={"m": metric})
    assert seen == [False, False, False]


def test_nonfinite_loss_raises_before_the_step_naming_the_batch() -> None:
    """A NaN loss raises NonFiniteLossError with its batch index; no step is taken for it."""
    data = make_data(24, 4, 3, 0)
    good = list(loader(data, 8))
    bad = (torch.full_like(good[2][0], float("nan")), good[2][1])
    reference, model = mlp(4, 3, 0, dropout=0.0), mlp(4, 3, 0, dropout=0.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hand_train_epoch(reference, good[:2], nn.CrossEntropyLoss(), ref_opt, CPU)
    with pytest.raises(ft.NonFiniteLossError, match="batch 2") as caught:
        ft.train_epoch(model, [*good[:2], bad, good[0]], nn.CrossEntropyLoss(), opt, CPU)
    assert caught.value.batch_index == 2 and math.isnan(caught.value.loss)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_nonfinite_batches_can_be_skipped() -> None:
    """on_nonfinite='skip' skips non-finite batches, counts them, and trains on the rest."""
    data = make_data(24, 4, 3, 0)
    good = list(loader(data, 8))
    bad = (torch.full_like(good[0][0], float("inf")), good[0][1])
    reference, model = mlp(4, 3, 0, dropout=0.0), mlp(4, 3, 0, dropout=0.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_loss = hand_train_epoch(reference, good, nn.CrossEntropyLoss(), ref_opt, CPU)
    result = ft.train_epoch(
        model, [good[0], bad, good[1], good[2]], nn.CrossEntropyLoss(), opt, CPU,
        on_nonfinite="skip",
    )  # fmt: skip
    assert (result.skipped_batches, result.batches, result.steps, result.samples) == (1, 3, 3, 24)
    assert result.loss == pytest.approx(ref_loss)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_skipped_batchs_graph_is_freed_before_the_next_forward() -> None:
    """A batch skipped as non-finite, never back-propagated, holds no graph into the next one."""
    data = make_data(16, 4, 3, 0)
    good = list(loader(data, 8))
    bad = (torch.full_like(good[0][0], float("inf")), good[0][1])
    model = mlp(4, 3, 0, dropout=0.0)
    losses: list[weakref.ref[torch.Tensor]] = []
    alive_at_forward: list[bool] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(outputs, targets)
        losses.append(weakref.ref(loss))
        return loss

    def before_forward(*_: object) -> None:
        alive_at_forward.append(any(ref() is not None and not ref().isfinite() for ref in losses))

    model.register_forward_pre_hook(before_forward)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = ft.train_epoch(model, [bad, good[1]], loss_fn, opt, CPU, on_nonfinite="skip")
    assert result.skipped_batches == 1
    assert alive_at_forward == [False, False]


@pytest.mark.parametrize("name", ["train_epoch", "evaluate", "predict"])
def test_an_empty_loader_is_an_error_naming_loader(name: str) -> None:
    """A loader that yields no batches raises ValueError naming 'loader'."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'loader' yielded no batches"):
        if name == "train_epoch":
            ft.train_epoch(model, [], nn.CrossEntropyLoss(), opt, CPU)
        elif name == "evaluate":
            ft.evaluate(model, [], nn.CrossEntropyLoss(), CPU)
        else:
            ft.predict(model, [], CPU)


@pytest.mark.parametrize("name", ["train_epoch", "evaluate", "predict"])
def test_a_model_on_another_device_is_an_error_naming_device(name: str) -> None:
    """A model whose parameters are not on 'device' is refused before anything runs."""
    model = nn.Linear(3, 2).to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'device' is cpu but the model's parameters are on meta"):
        if name == "train_epoch":
            ft.train_epoch(model, _BATCHES, nn.CrossEntropyLoss(), opt, "cpu")
        elif name == "evaluate":
            ft.evaluate(model, _BATCHES, nn.CrossEntropyLoss(), "cpu")
        else:
            ft.predict(model, _BATCHES, "cpu")


@pytest.mark.parametrize(
    "batch",
    [torch.randn(4, 3), (torch.randn(4, 3),), (torch.randn(4, 3), torch.zeros(4), torch.ones(4))],
)
def test_a_batch_that_is_not_a_pair_is_an_error_naming_loader(batch: object) -> None:
    """train_epoch and evaluate need (inputs, targets); anything else names the batch."""
    model = nn.Linear(3, 2)
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"'loader' must yield \(inputs, targets\) pairs.*batch 0"):
        ft.train_epoch(model, [batch], nn.CrossEntropyLoss(), opt, CPU)
    with pytest.raises(TypeError, match="batch 0"):
        ft.evaluate(model, [batch], nn.CrossEntropyLoss(), CPU)
    assert_bit_identical(before, snapshot(model))


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (lambda out, y: (out - 1).pow(2), r"shape \(4,\).*shape \(4, 2\)"),
        (lambda out, y: 1.0, "must return a floating-point tensor"),
    ],
)
def test_a_loss_that_is_not_scalar_or_per_sample_is_an_error(loss_fn: object, message: str) -> None:
    """loss_fn must return a scalar or a (batch,) vector; the error says what it returned."""
    model = nn.Linear(3, 2)
    before = snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises((TypeError, ValueError), match=f"'loss_fn'.*{message}"):
        ft.train_epoch(model, _BATCHES, loss_fn, opt, CPU)
    assert_bit_identical(before, snapshot(model))


def test_bad_arguments_name_the_argument() -> None:
    """Wrong types and values are refused up front with the argument's name."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss()
    cases = [
        (lambda: ft.train_epoch("net", _BATCHES, loss, opt, CPU), "'model'"),
        (lambda: ft.train_epoch(model, 3, loss, opt, CPU), "'loader'"),
        (lambda: ft.train_epoch(model, _BATCHES, "ce", opt, CPU), "'loss_fn'"),
        (lambda: ft.train_epoch(model, _BATCHES, loss, model, CPU), "'optimizer'"),
        (lambda: ft.train_epoch(model, _BATCHES, loss, opt, 0.5), "'device'"),
        (lambda: ft.train_epoch(model, _BATCHES, loss, opt, "gpu"), "'device'"),
        (lambda: ft.train_epoch(model, _BATCHES, loss, opt, CPU, on_nonfinite="x"), "on_nonfinite"),
        (lambda: ft.evaluate(model, _BATCHES, loss, CPU, metrics=[ft.accuracy()]), "'metrics'"),
        (lambda: ft.evaluate(model, _BATCHES, loss, CPU, metrics={"a": len}), r"metrics\['a'\]"),
    ]
    before = snapshot(model)
    for call, name in cases:
        with pytest.raises((TypeError, ValueError), match=name):
            call()
    assert_bit_identical(before, snapshot(model))


class _Terminal(io.StringIO):
    """A captured stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class _Unsized:
    """Eight batches of 4, the first ones 0.3 s apart, and no len()."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(8)]

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            time.sleep(0.3 if index < 3 else 0)
            yield batch


class _Slow(_Unsized):
    """The same eight batches, with a len()."""

    def __len__(self) -> int:
        return 8


def _epoch(loader: object, **options: object) -> ft.TrainResult:
    """Train a fresh model one epoch over ``loader`` with accuracy, on the CPU."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"metrics": {"acc": ft.accuracy()}, **options}
    return ft.train_epoch(model, loader, nn.CrossEntropyLoss(), opt, CPU, **options)


def test_progress_in_a_log_file_is_a_line_per_quarter_and_a_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not a terminal (nohup, CI): a plain line per quarter, then a summary line.

    The lines show the running loss and accuracy, the summary the record's own numbers;
    without progress nothing is printed, and the record is the same either way.
    """
    quiet = _epoch(_Slow())
    assert capsys.readouterr().err == ""
    shown = _epoch(_Slow(), progress=True)
    assert attrs.evolve(shown, seconds=0) == attrs.evolve(quiet, seconds=0)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["train", "2/8"], ["train", "4/8"],
                                                        ["train", "6/8"]]  # fmt: skip
    assert all("loss " in line and "acc " in line and "samples/s" in line for line in lines[:3])
    summary = lines[3].split("  ")
    assert summary[0].startswith("train done in ") and summary[0].endswith(
        ": 8 batches, 32 samples"
    )
    assert summary[1:3] == [f"loss {shown.loss:.4f}", f"acc {shown.metrics['acc']:.4f}"]
    assert len(lines) == 4


def test_progress_without_a_len_prints_at_1_2_4_8_batches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A loader without len() gets a line at 1, 2, 4, 8... batches, then the summary."""
    _epoch(_Unsized(), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["train", "1"], ["train", "2"],
                                                        ["train", "4"], ["train", "8"]]  # fmt: skip
    assert lines[4].split(": ")[1].startswith("8 batches, 32 samples") and len(lines) == 5


def test_a_metric_that_fails_mid_pass_does_not_stop_the_progress_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A metric whose compute raises on partial sums is left out of a line, not fatal."""

    def picky(total: tuple[torch.Tensor, ...]) -> float:
        if total[1] < 20:
            raise RuntimeError("too few samples yet")
        return float(total[0] / total[1])

    hits = ft.Metric(state=lambda out, y: ((out.argmax(1) == y).sum(), len(y)), compute=picky)
    tr = _epoch(_Slow(), progress=True, metrics={"hits": hits})
    lines = capsys.readouterr().err.splitlines()
    assert "loss " in lines[0] and "hits" not in lines[0]  # 8 samples: not yet
    assert f"hits {tr.metrics['hits']:.4f}" in lines[-1]


@pytest.mark.parametrize("stream", ["write-only", "None"])
def test_progress_with_an_odd_stderr_prints_lines_or_nothing(
    monkeypatch: pytest.MonkeyPatch, stream: str
) -> None:
    """A stderr without isatty (a logging redirector) gets plain lines; None (pythonw) none."""

    class WriteOnly:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    sink = WriteOnly() if stream == "write-only" else None
    monkeypatch.setattr("sys.stderr", sink)
    tr = _epoch(_Slow(), progress=True)
    if sink is not None:
        assert f"loss {tr.loss:.4f}" in sink.text.splitlines()[-1]


def test_progress_on_a_terminal_keeps_the_bar_with_running_and_final_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal: a tqdm bar with running numbers, kept at the end with the final ones.

    The postfix shows the running loss and accuracy while it runs; the bar stays on screen
    with the record's loss and accuracy.
    """
    screen = _Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    tr = _epoch(_Slow(), progress=True)
    drawn = screen.getvalue()
    frames = drawn.split("\r")
    running = [frame for frame in frames if "/8 [" in frame and "acc=" in frame]
    assert any("8/8" not in frame for frame in running)  # a running value, mid-pass
    final = frames[-1]
    assert final.startswith("train: 100%") and "8/8" in final and final.endswith("\n")
    assert f"loss={tr.loss:.4f}" in final and f"acc={tr.metrics['acc']:.4f}" in final
    assert drawn.count("\n") == 1  # kept (leave=True), one line per pass


def test_progress_in_a_notebook_uses_the_notebook_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """In Jupyter the notebook bar is used, kept, with evaluate's final loss and accuracy.

    tqdm.autonotebook picks tqdm.notebook there: a bar, not plain lines, though stderr is
    no terminal.
    """
    import tqdm.auto

    made = []

    class NotebookBar:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs, self.postfix, self.closed = kwargs, {}, False
            made.append(self)

        def update(self, n: int) -> None:
            pass

        def set_postfix(self, values: dict[str, str], refresh: bool) -> None:
            self.postfix = values

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "notebook_tqdm", NotebookBar)  # as tqdm.auto sets it there
    monkeypatch.setattr(tqdm.auto, "tqdm", NotebookBar)
    model = nn.Linear(3, 2)
    ev = ft.evaluate(model, _Slow(), nn.CrossEntropyLoss(), CPU, metrics={"acc": ft.accuracy()},
                     progress=True)  # fmt: skip
    (bar,) = made
    assert bar.kwargs["leave"] is True and bar.kwargs["total"] == 8 and bar.closed
    assert (
        bar.postfix["loss"] == f"{ev.loss:.4f}" and bar.postfix["acc"] == f"{ev.metrics['acc']:.4f}"
    )


def _bad_loss_at(bad_index: int) -> object:
    """Return a loss_fn that returns a wrongly shaped loss for batch ``bad_index``."""
    calls = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) - 1 == bad_index:
            return nn.functional.cross_entropy(outputs, targets, reduction="none")[:, None]
        return nn.functional.cross_entropy(outputs, targets)

    return loss_fn


def test_an_error_in_a_later_batch_leaves_the_model_as_after_the_previous_batch() -> None:
    """An error at batch i leaves weights, BatchNorm buffers and optimizer as after batch i-1."""
    data = make_data(24, 4, 3, 0)
    batches = list(loader(data, 8))
    reference, model = mlp(4, 3, 0, dropout=0.0), mlp(4, 3, 0, dropout=0.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hand_train_epoch(reference, batches[:1], nn.CrossEntropyLoss(), ref_opt, CPU)
    with pytest.raises(ValueError, match=r"'loss_fn' must return a scalar.*batch 1"):
        ft.train_epoch(model, batches, _bad_loss_at(1), opt, CPU)
    assert_bit_identical(snapshot(reference, grads=False), snapshot(model, grads=False))
    for a, b in zip(ref_opt.state.values(), opt.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_tensor_metrics_of_evaluate_are_ordinary_tensors_under_inference_mode() -> None:
    """With inference_mode=True, a tensor-valued metric comes back as an ordinary tensor."""
    from torchmetrics.classification import MulticlassConfusionMatrix

    metrics = {"cm": MulticlassConfusionMatrix(num_classes=2), "sums": ft.Metric(
        state=lambda out, y: (out.sum(0),), compute=lambda total: total[0])}  # fmt: skip
    ev = ft.evaluate(nn.Linear(3, 2), _BATCHES, nn.CrossEntropyLoss(), CPU, metrics=metrics,
                     inference_mode=True, progress=True)  # fmt: skip
    for value in ev.metrics.values():
        assert not value.is_inference()
        value.add_(1)  # usable outside inference mode


def test_evaluate_with_inference_mode_runs_under_inference_mode() -> None:
    """inference_mode=True runs the model under torch.inference_mode(), not just no_grad."""
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_inference_mode_enabled())
            return x

    model = nn.Sequential(nn.Linear(3, 2), Probe())
    ft.evaluate(model, _BATCHES, nn.CrossEntropyLoss(), CPU)
    ft.evaluate(model, _BATCHES, nn.CrossEntropyLoss(), CPU, inference_mode=True)
    assert seen == [False, True]


def test_predict_restores_modes_when_the_model_raises() -> None:
    """predict leaves every module in its own previous mode when the forward pass raises."""

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    frozen = nn.BatchNorm1d(3).eval()
    model = nn.Sequential(frozen, Broken()).train()
    frozen.eval()
    with pytest.raises(RuntimeError, match="boom"):
        ft.predict(model, [torch.randn(4, 3)], CPU)
    assert model.training and model[1].training and not frozen.training


def test_a_nan_among_per_sample_losses_is_non_finite() -> None:
    """With reduction='none', one NaN sample makes the batch non-finite and is caught."""
    inputs = torch.randn(4, 3)
    inputs[2] = float("nan")
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ft.NonFiniteLossError, match="batch 0"):
        ft.train_epoch(model, [(inputs, torch.zeros(4, dtype=torch.long))], loss_fn, opt, CPU)


def test_empty_batches_are_skipped_without_a_step() -> None:
    """A batch with zero samples is skipped: no step, no loss, not counted."""
    empty = (torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = ft.train_epoch(model, [empty, *_BATCHES, empty], nn.CrossEntropyLoss(), opt, CPU)
    ev = ft.evaluate(model, [*_BATCHES, empty], nn.CrossEntropyLoss(), CPU)
    assert (train.batches, train.steps, train.samples) == (1, 1, 4)
    assert (ev.batches, ev.samples) == (1, 4) and math.isfinite(ev.loss)


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (lambda out, y: torch.tensor(3), "'loss_fn' must return a floating-point tensor"),
        (lambda out, y: nn.functional.cross_entropy(out, y).detach(), "does not require grad"),
    ],
)
def test_a_loss_without_gradient_is_named(loss_fn: object, message: str) -> None:
    """An integer or detached loss is refused by name instead of failing inside backward."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises((TypeError, ValueError), match=message):
        ft.train_epoch(model, _BATCHES, loss_fn, opt, CPU)


@pytest.mark.parametrize("name", ["train_epoch", "evaluate"])
def test_no_batch_output_outlives_the_pass(name: str) -> None:
    """Nothing accumulates across batches: every batch's outputs are freed, graph included."""
    import gc
    import weakref

    alive: list[weakref.ref] = []
    model = mlp(4, 3, 0)
    model.register_forward_hook(lambda module, args, out: alive.append(weakref.ref(out)))
    data = make_data(64, 4, 3, 0)
    metrics = {"acc": ft.accuracy(), "top2": ft.top_k_accuracy(2)}
    if name == "train_epoch":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ft.train_epoch(model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU, metrics=metrics)
    else:
        ft.evaluate(model, loader(data, 8), nn.CrossEntropyLoss(), CPU, metrics=metrics)
    gc.collect()
    assert len(alive) == 8
    assert [ref() for ref in alive] == [None] * 8


# --- forward=: any batch and call shape ------------------------------------------------------


class _Encoding(UserDict):
    """A batch shaped like HuggingFace's BatchEncoding: a UserDict, not a dict."""


class _Output(OrderedDict):
    """A model output shaped like HuggingFace's ModelOutput: a dict with attribute access."""

    def __getattr__(self, name: str) -> torch.Tensor:
        return self[name]


class _KeywordClassifier(nn.Module):
    """A HuggingFace-shaped classifier: keyword inputs, a dict output with logits and loss."""

    def __init__(self, vocab: int = 20, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> _Output:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.head(pooled)
        out = _Output(logits=logits)
        if labels is not None:
            out = _Output(loss=nn.functional.cross_entropy(logits, labels), logits=logits)
        return out


def _encodings(batches: int, seed: int) -> list[_Encoding]:
    """Return token batches shaped like a tokenizer's output, with labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        size = int(torch.randint(1, 7, (), generator=gen))
        ids = torch.randint(0, 20, (size, 5), generator=gen)
        mask = (torch.rand(size, 5, generator=gen) > 0.2).long()
        labels = torch.randint(0, 3, (size,), generator=gen)
        out.append(_Encoding(input_ids=ids, attention_mask=mask, labels=labels))
    return out


@FAST
@given(seed=s.seeds, own_loss=st.booleans())
def test_a_keyword_model_trains_bit_identically_to_its_hand_written_loop(
    seed: int, own_loss: bool
) -> None:
    """forward= runs a HuggingFace-shaped model on dict-like batches, with its own loss or not."""
    batches = _encodings(4, seed)
    torch.manual_seed(seed)
    model, reference = _KeywordClassifier(), _KeywordClassifier()
    reference.load_state_dict(model.state_dict())
    opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference))
    if own_loss:
        forward = lambda m, b: (m(**b), b["labels"])  # noqa: E731
        loss_fn = lambda out, labels: out.loss  # noqa: E731
    else:
        forward = lambda m, b: (  # noqa: E731
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
            b["labels"],
        )
        loss_fn = nn.CrossEntropyLoss()
    result = ft.train_epoch(model, batches, loss_fn, opt, CPU, forward=forward)
    total = 0.0
    for batch in batches:
        ref_opt.zero_grad()
        out = reference(batch["input_ids"], batch["attention_mask"], batch["labels"])
        out.loss.backward()
        ref_opt.step()
        total += out.loss.item() * len(batch["labels"])
    assert_bit_identical(snapshot(reference), snapshot(model))
    assert result.samples == sum(len(b["labels"]) for b in batches)
    assert result.loss == pytest.approx(total / result.samples, rel=1e-6)


def test_dict_like_batches_and_outputs_are_moved_and_keep_their_type() -> None:
    """A UserDict batch reaches forward as the same type; predict concatenates dict outputs."""
    seen: list[type] = []

    def forward(model: nn.Module, batch: _Encoding) -> tuple[_Output, None]:
        seen.append(type(batch))
        return model(batch["input_ids"], batch["attention_mask"]), None

    batches = _encodings(3, 0)
    preds = ft.predict(_KeywordClassifier(), batches, CPU, forward=forward)
    assert seen == [_Encoding] * 3 and preds.targets is None
    assert isinstance(preds.outputs, _Output)
    assert preds.outputs.logits.shape == (sum(len(b["labels"]) for b in batches), 3)
    assert preds.samples == preds.outputs.logits.shape[0]


def test_samples_are_counted_from_the_outputs_when_targets_hold_no_tensor() -> None:
    """With targets None, the outputs' batch dimension counts (a scalar loss in them is skipped)."""
    batches = _encodings(3, 1)
    forward = lambda m, b: (m(**b), None)  # noqa: E731
    loss_fn = lambda out, _: out.loss  # noqa: E731
    result = ft.evaluate(_KeywordClassifier(), batches, loss_fn, CPU, forward=forward)
    assert result.samples == sum(len(b["labels"]) for b in batches)


def test_a_batch_whose_samples_cannot_be_counted_says_how_to_fix_it() -> None:
    """Neither targets nor outputs with a batch dimension: the error names 'forward'."""
    model = nn.Linear(3, 1)
    forward = lambda m, b: (m(b).sum(), "labels")  # noqa: E731
    loss_fn = lambda out, _: out  # noqa: E731
    with pytest.raises(TypeError, match=r"cannot count the samples of batch 0.*'forward'"):
        ft.evaluate(model, [torch.randn(4, 3)], loss_fn, CPU, forward=forward)


def test_a_dict_batch_without_forward_points_to_forward() -> None:
    """The default batch shape is (inputs, targets); a dict batch is refused with the way out."""
    model = _KeywordClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"batch 0 is a _Encoding with keys .* pass forward="):
        ft.train_epoch(model, _encodings(1, 0), nn.CrossEntropyLoss(), opt, CPU)


def test_forward_that_does_not_return_a_pair_is_named() -> None:
    """forward must return (outputs, targets); anything else names it and the batch."""
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"'forward' must return \(inputs, targets\) pairs"):
        ft.evaluate(
            model, [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))],
            nn.CrossEntropyLoss(), CPU, forward=lambda m, b: m(b[0]),
        )  # fmt: skip


def test_lengths_that_are_not_tensors_stay_on_the_host_for_a_packed_gru() -> None:
    """Non-tensor parts of a batch (lengths as a list) reach forward as they are."""
    torch.manual_seed(0)
    gru, head = nn.GRU(4, 6, batch_first=True), nn.Linear(6, 2)
    model = nn.ModuleDict({"gru": gru, "head": head})

    def forward(m: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        padded, lengths, labels = batch
        assert isinstance(lengths, list)
        packed = nn.utils.rnn.pack_padded_sequence(
            padded, lengths, batch_first=True, enforce_sorted=False
        )
        _, hidden = m["gru"](packed)
        return m["head"](hidden[-1]), labels

    batches = [(torch.randn(3, 5, 4), [5, 2, 3], torch.tensor([0, 1, 1]))]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = ft.train_epoch(model, batches, nn.CrossEntropyLoss(), opt, CPU, forward=forward)
    assert result.samples == 3 and result.steps == 1


# --- on_step=: every optimizer step, as a frozen record ---------------------------------------


@FAST
@given(
    seed=s.seeds,
    samples=s.sample_counts,
    batch_size=s.batch_sizes,
    accumulate=st.integers(1, 3),
    clip=st.booleans(),
)
def test_on_step_gets_each_steps_loss_samples_lr_and_norm(
    seed: int, samples: int, batch_size: int, accumulate: int, clip: bool
) -> None:
    """One Step per optimizer step; its losses, weighted by samples, add up to the epoch's."""
    data = make_data(samples, 4, 3, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # batches of 1 train too
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    steps: list[ft.Step] = []
    result = ft.train_epoch(
        model, loader(data, batch_size), nn.CrossEntropyLoss(), opt, CPU,
        on_step=steps.append, accumulate=accumulate, scheduler=sched,
        clip_grad_norm=1.0 if clip else None,
    )  # fmt: skip
    batches = math.ceil(samples / batch_size)
    assert [step.index for step in steps] == list(range(result.steps))
    assert result.steps == math.ceil(batches / accumulate)
    assert [step.batch_index for step in steps][-1] == batches - 1
    assert sum(step.samples for step in steps) == samples
    weighted = sum(step.loss * step.samples for step in steps) / samples
    assert weighted == pytest.approx(result.loss, rel=1e-9)
    assert [step.lr for step in steps] == pytest.approx([0.05 / (i + 1) for i in range(len(steps))])
    norms = [step.grad_norm for step in steps]
    assert all(n is not None and n >= 0 for n in norms) if clip else norms == [None] * len(steps)
    if clip:
        assert result.grad_norm == max(norms)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        steps[0].loss = 0.0  # type: ignore[misc]


class _Stop(Exception):
    """Raised by an on_step function to end the epoch early."""


def test_an_exception_from_on_step_stops_with_that_step_applied_and_modes_restored() -> None:
    """Stopping after step k leaves the model as the hand-written loop leaves it after k batches."""
    data = make_data(48, 4, 3, 0)
    batches = list(loader(data, 8))
    model, reference = mlp(4, 3, 0, dropout=0.0), mlp(4, 3, 0, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    reference.train()
    for inputs, targets in batches[:3]:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(inputs), targets).backward()
        ref_opt.step()

    def stop_after_three(step: ft.Step) -> None:
        if step.index == 2:
            raise _Stop

    model.train()
    model[1].eval()  # the user's own flags come back after the epoch
    with pytest.raises(_Stop):
        ft.train_epoch(model, batches, nn.CrossEntropyLoss(), opt, CPU, on_step=stop_after_three)
    assert_bit_identical(snapshot(reference, grads=False), snapshot(model, grads=False))
    assert model.training and model[0].training and not model[1].training


def test_an_ema_updated_on_every_step_equals_the_hand_written_one() -> None:
    """on_step=lambda step: ema.update_parameters(model) is the tutorials' EMA, step for step."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    data = make_data(40, 4, 3, 1)
    model, reference = mlp(4, 3, 1, dropout=0.0), mlp(4, 3, 1, dropout=0.0)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ref_ema = AveragedModel(reference, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ft.train_epoch(
        model, loader(data, 8), nn.CrossEntropyLoss(), opt, CPU,
        on_step=lambda step: ema.update_parameters(model),
    )  # fmt: skip
    reference.train()
    for inputs, targets in loader(data, 8):
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(inputs), targets).backward()
        ref_opt.step()
        ref_ema.update_parameters(reference)
    assert_bit_identical(snapshot(ref_ema, grads=False), snapshot(ema, grads=False))


def test_a_bounded_loader_trains_exactly_that_many_steps() -> None:
    """itertools.islice(loader, n) is step-based training: n steps, then the record."""
    import itertools

    data = make_data(80, 4, 3, 2)
    model = mlp(4, 3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bounded = itertools.islice(loader(data, 8), 3)
    result = ft.train_epoch(model, bounded, nn.CrossEntropyLoss(), opt, CPU)
    assert (result.steps, result.batches, result.samples) == (3, 3, 24)


def _mixup(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The README's mixup recipe: mix a batch with a shuffled copy, targets as soft one-hots."""
    inputs, targets = batch
    lam = float(torch.distributions.Beta(0.3, 0.3).sample())
    order = torch.randperm(len(inputs))
    soft = nn.functional.one_hot(targets, 3).float()
    return model(inputs.lerp(inputs[order], 1 - lam)), soft.lerp(soft[order], 1 - lam)


def test_mixup_in_forward_trains_with_cross_entropy_and_accuracy() -> None:
    """Mixup as forward=: CrossEntropyLoss takes the soft targets, accuracy their argmax."""
    data = make_data(64, 4, 3, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    results = [
        ft.train_epoch(
            model, loader(data, 16, seed=epoch), nn.CrossEntropyLoss(), opt, "cpu",
            metrics={"acc": ft.accuracy()}, forward=_mixup,
        )
        for epoch in range(15)
    ]  # fmt: skip
    assert results[-1].loss < results[0].loss
    assert 0.0 <= results[-1].metrics["acc"] <= 1.0
    ev = ft.evaluate(
        model, loader(data, 16), nn.CrossEntropyLoss(), "cpu", metrics={"acc": ft.accuracy()}
    )
    assert ev.metrics["acc"] > 0.6


# --- a batch is atomic: it applies completely or not at all ---------------------------------

_FAILURES = (
    "metric",
    "torchmetric_then_backward",
    "backward",
    "pre_hook",
    "post_hook",
    "scheduler",
)
_AFTER_THE_STEP = {"post_hook", "scheduler"}


class _Boom(RuntimeError):
    """The planted failure."""


class _FailingBackward(torch.autograd.Function):
    """Identity forward; raises in backward when told to."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, fail: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.fail = fail  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.fail:  # type: ignore[attr-defined]
            raise _Boom("backward")
        return grad, None


def _armed(where: str, at: int, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Return train_epoch keyword arguments that raise _Boom at batch ``at`` in ``where``."""
    calls = {"n": -1}

    def tick() -> bool:
        calls["n"] += 1
        return calls["n"] == at

    kwargs: dict = {"loss_fn": nn.functional.cross_entropy}
    if where == "metric":

        def state(out: torch.Tensor, y: torch.Tensor) -> tuple[int]:
            if tick():
                raise _Boom("metric")
            return (1,)

        kwargs["metrics"] = {"m": ft.Metric(state, lambda t: float(t[0]))}
    elif where in ("torchmetric_then_backward", "backward"):
        import torchmetrics

        if where == "torchmetric_then_backward":
            kwargs["metrics"] = {"acc": torchmetrics.classification.MulticlassAccuracy(3)}
        kwargs["loss_fn"] = lambda out, y: nn.functional.cross_entropy(
            _FailingBackward.apply(out, tick()), y
        )
    elif where == "pre_hook":
        opt.register_step_pre_hook(lambda *_: (_ for _ in ()).throw(_Boom()) if tick() else None)
    elif where == "post_hook":
        opt.register_step_post_hook(lambda *_: (_ for _ in ()).throw(_Boom()) if tick() else None)
    else:

        class Scheduler(torch.optim.lr_scheduler.LambdaLR):
            def step(self, epoch: int | None = None) -> None:
                super().step(epoch)
                if tick():
                    raise _Boom("scheduler")

        calls["n"] = -2  # LambdaLR steps once when it is built
        kwargs["scheduler"] = Scheduler(opt, lambda i: 1.0)
    return kwargs


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Return every parameter, buffer and momentum buffer as clones."""
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()]
    return [t.detach().clone() for t in model.state_dict().values()] + momentum


@settings(max_examples=30, deadline=None)
@given(where=st.sampled_from(_FAILURES), at=st.integers(0, 3), seed=s.seeds)
def test_a_batch_applies_completely_or_not_at_all(where: str, at: int, seed: int) -> None:
    """A failure at batch k leaves the state of k batches (after the step) or k-1 (before)."""
    batches = list(loader(make_data(32, 4, 3, seed), 8))
    model = mlp(4, 3, seed, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = _armed(where, at, model, opt)
    with pytest.raises(_Boom):
        ft.train_epoch(model, batches, optimizer=opt, device=CPU, **kwargs)
    applied = at + 1 if where in _AFTER_THE_STEP else at
    reference = mlp(4, 3, seed, dropout=0.0)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    if applied:
        hand_train_epoch(reference, batches[:applied], nn.CrossEntropyLoss(), ref_opt, CPU)
    mine, ref = _state(model, opt), _state(reference, ref_opt)
    assert len(mine) == len(ref) and all(map(torch.equal, mine, ref))
    if where == "torchmetric_then_backward":  # its update for batch k was taken back
        metric = kwargs["metrics"]["acc"]
        assert int(metric.tp.sum() + metric.fn.sum()) == 8 * at


def test_a_failure_after_the_step_says_the_batch_was_applied() -> None:
    """An error after optimizer.step() (a post hook) tells the user that batch counted."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_post_hook(lambda *_: (_ for _ in ()).throw(_Boom("hook")))
    with pytest.raises(_Boom) as caught:
        ft.train_epoch(model, _BATCHES, nn.CrossEntropyLoss(), opt, CPU)
    assert "after optimizer.step() of batch 0" in str(caught.value) + "".join(
        getattr(caught.value, "__notes__", [])
    )


class _StepSetOnTheInstance:
    """A scheduler whose step is a plain function on the instance (no self to drop)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.step = lambda loss: None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m, o: {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(o)},
         r"'scheduler'.*ReduceLROnPlateau.*step\(\) needs 'metrics'"),
        (lambda m, o: {"scheduler": _StepSetOnTheInstance(o)},
         r"'scheduler'.*_StepSetOnTheInstance.*step\(\) needs 'loss'"),
        (lambda m, o: {"optimizer": torch.optim.LBFGS(m.parameters())},
         r"'optimizer'.*LBFGS.*closure"),
        (lambda m, o: {"optimizer": torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)},
         r"'optimizer'.*none of the model's parameters"),
    ],
)  # fmt: skip
def test_what_cannot_work_per_batch_is_refused_before_the_first_batch(
    make: object, message: str
) -> None:
    """A scheduler needing a metric, an optimizer needing a closure or another model's params."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"optimizer": opt, **make(model, opt)}  # type: ignore[operator]
    seen = []
    batches = (seen.append(b) or b for b in _BATCHES)
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match=message):
        ft.train_epoch(model, batches, nn.CrossEntropyLoss(), device=CPU, **kwargs)
    assert seen == [] and not kwargs["optimizer"].state
    assert_bit_identical(before, snapshot(model))


def test_an_optimizer_over_some_foreign_parameters_warns() -> None:
    """Only some optimizer parameters outside the model: a warning names how many."""
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    opt = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.warns(UserWarning, match="2 of the 4 parameters of 'optimizer'"):
        ft.train_epoch(model, _BATCHES, nn.CrossEntropyLoss(), opt, CPU)


# --- no silent wrong numbers ----------------------------------------------------------------


@FAST
@given(inputs=st.integers(2, 9), targets=st.integers(2, 9))
def test_inputs_and_targets_of_different_lengths_are_refused(inputs: int, targets: int) -> None:
    """A batch whose model outputs and targets disagree on the batch length names both."""
    assume(inputs != targets)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(inputs, 3), torch.randn(targets, 1))
    before = snapshot(model)
    for run in (
        lambda: ft.train_epoch(model, [batch], nn.MSELoss(), opt, CPU),
        lambda: ft.evaluate(model, [batch], nn.MSELoss(), CPU),
    ):
        with pytest.raises(ValueError, match=f"{inputs} samples.*{targets}.*batch 0"):
            run()
    assert_bit_identical(before, snapshot(model))


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_finite_loss_with_non_finite_gradients_never_reaches_the_weights(
    on_nonfinite: str,
) -> None:
    """With clipping the norm is known: inf/NaN gradients raise or skip the step, as for loss."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = {"on": False}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if poison["on"]:  # the loss stays finite, its gradient becomes NaN
            out.register_hook(lambda grad: grad * float("nan"))
        poison["on"] = not poison["on"]
        return nn.functional.cross_entropy(out, y)

    before = snapshot(model, grads=False)
    batches = _BATCHES[:1] * 2  # the second batch is poisoned
    if on_nonfinite == "raise":
        with pytest.raises(ft.NonFiniteLossError, match="gradient norm of batch 1 is nan"):
            ft.train_epoch(model, batches, loss_fn, opt, CPU, clip_grad_norm=1.0)
    else:
        result = ft.train_epoch(
            model, batches, loss_fn, opt, CPU, clip_grad_norm=1.0, on_nonfinite="skip"
        )
        assert (result.steps, result.skipped_steps) == (1, 1)
    after = snapshot(model, grads=False)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert not all(torch.equal(before[k], after[k]) for k in before)  # batch 0 did step


def test_a_loss_fn_that_calls_backward_itself_is_refused() -> None:
    """Calling backward() inside loss_fn would double the gradients: refused, no step taken."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out, y)
        loss.backward(retain_graph=True)
        return loss

    before = snapshot(model, grads=False)
    with pytest.raises(ValueError, match=r"'loss_fn' called backward\(\) itself.*batch 0"):
        ft.train_epoch(model, _BATCHES, loss_fn, opt, CPU)
    assert_bit_identical(before, snapshot(model, grads=False))


# --- messages that name the cause -----------------------------------------------------------


@pytest.mark.parametrize("name", ["train_epoch", "evaluate", "predict"])
def test_float64_inputs_into_a_float32_model_are_explained(name: str) -> None:
    """numpy-born float64 inputs: the error says which dtypes differ and how to convert."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))]
    runs = {
        "train_epoch": lambda: ft.train_epoch(model, batches, nn.CrossEntropyLoss(), opt, CPU),
        "evaluate": lambda: ft.evaluate(model, batches, nn.CrossEntropyLoss(), CPU),
        "predict": lambda: ft.predict(model, batches, CPU),
    }
    with pytest.raises(RuntimeError, match=r"batch 0.*float64.*torch.float32.*\.float\(\)"):
        runs[name]()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_cuda_is_not_available() -> None:
    """device='cuda' on a machine without CUDA says so, instead of advising model.to('cuda')."""
    model = nn.Linear(3, 2)
    message = r"'device' is 'cuda'.*CUDA is not available.*default_device"
    with pytest.raises(ValueError, match=message):
        ft.evaluate(model, _BATCHES, nn.CrossEntropyLoss(), "cuda")


@pytest.mark.parametrize("where", ["state", "compute"])
def test_a_failing_metric_is_named_in_the_message(where: str) -> None:
    """An error raised by a metric's state or compute names the metric in its message."""

    def fail(*_: object) -> tuple[int]:
        raise ValueError("bad shape")

    ok = (lambda out, y: (1,), lambda t: 1.0)
    metric = ft.Metric(fail, ok[1]) if where == "state" else ft.Metric(ok[0], fail)
    with pytest.raises(ValueError, match=r"metrics\['f1'\].*bad shape"):
        ft.evaluate(nn.Linear(3, 2), _BATCHES, nn.CrossEntropyLoss(), CPU, metrics={"f1": metric})


# --- issue 21: predict with ids as targets; quantization observers --------------------------


class _Named(torch.utils.data.Dataset):
    """Inputs with their file names, as an image folder data set gives them."""

    def __init__(self, samples: int) -> None:
        self.x = torch.randn(samples, 3, generator=torch.Generator().manual_seed(samples))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.x[i], f"img{i:03d}.png"


@FAST
@given(samples=st.integers(1, 30), batch_size=st.integers(1, 8), as_lists=st.booleans())
def test_predict_keeps_file_names_with_the_outputs_in_loader_order(
    samples: int, batch_size: int, as_lists: bool
) -> None:
    """Names per batch (default_collate's tuples, or lists) come back as one list in order."""
    dataset, model = _Named(samples), nn.Linear(3, 2)
    batches = DataLoader(dataset, batch_size=batch_size)
    if as_lists:
        batches = [(x, list(names)) for x, names in batches]
    preds = ft.predict(model, batches, CPU)
    assert preds.targets == [f"img{i:03d}.png" for i in range(samples)]
    with torch.no_grad():
        assert torch.equal(preds.outputs, model(dataset.x))


def test_predict_on_outputs_of_other_lengths_suggests_padding_or_forward() -> None:
    """Variable-length outputs across batches get an error naming predict, not torch.cat's."""
    batches = [torch.zeros(4, 7), torch.zeros(4, 9)]
    with pytest.raises(ValueError, match=r"predict.*\(4, 9\) in batch 1.*pad.*forward="):
        ft.predict(nn.Identity(), batches, CPU)


def _quantization_model(qat: bool = True, observed: bool = True) -> nn.Module:
    """Return a small model prepared for quantization-aware training (or for calibration)."""
    import warnings

    from torch.ao import quantization

    model = nn.Sequential(
        quantization.QuantStub(), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3),
        quantization.DeQuantStub(),
    )  # fmt: skip
    qconfig = quantization.get_default_qat_qconfig if qat else quantization.get_default_qconfig
    model.qconfig = qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        (quantization.prepare_qat if qat else quantization.prepare)(model.train(qat), inplace=True)
    with torch.no_grad():
        if observed:  # as after some training or calibration
            model(torch.randn(16, 5))
    return model


def _observing(model: nn.Module) -> list[bool]:
    """Return whether each fake-quant module of ``model`` observes."""
    return [bool(m.observer_enabled[0]) for m in model.modules() if hasattr(m, "observer_enabled")]


@pytest.mark.parametrize("qat", [True, False])
def test_evaluate_and_predict_change_no_observer_of_a_quantization_model(qat: bool) -> None:
    """Fake-quant (prepare_qat) and calibration (prepare) observers are left bit-identical."""
    model = _quantization_model(qat)
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(3)]
    before = snapshot(model)
    ft.evaluate(model, batches, nn.CrossEntropyLoss(), CPU, metrics={"acc": ft.accuracy()})
    ft.predict(model, batches, CPU)
    assert_bit_identical(before, snapshot(model))


def test_predict_on_a_qat_model_uses_its_quantization_as_it_is() -> None:
    """The fake-quant scales do not move between batches: the same input, the same output."""
    import copy

    model, x = _quantization_model(), torch.randn(8, 5)
    frozen = copy.deepcopy(model).eval().apply(torch.ao.quantization.disable_observer)
    outputs = ft.predict(model, [x * 10, x], CPU).outputs  # the first would widen the ranges
    with torch.no_grad():
        assert torch.equal(outputs[8:], frozen(x))


def test_observers_the_user_disabled_stay_disabled_and_an_error_re_enables_the_rest() -> None:
    """Exactly the observers that observed before observe again, also after an exception."""
    model = _quantization_model()
    model[1].weight_fake_quant.disable_observer()
    flags = _observing(model)
    assert flags.count(False) == 1
    ft.predict(model, [torch.randn(4, 5)], CPU)
    assert _observing(model) == flags

    def fail(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        ft.evaluate(model, [(torch.randn(4, 5), torch.zeros(4).long())], fail, CPU)
    assert _observing(model) == flags


def test_a_fresh_per_channel_observer_gets_its_empty_statistics_back() -> None:
    """An observer that resizes its buffers on its first batch is put back to its first shape."""
    import warnings

    from torch.ao import quantization

    model = nn.Sequential(quantization.QuantStub(), nn.Linear(5, 3), quantization.DeQuantStub())
    per_channel = quantization.PerChannelMinMaxObserver.with_args(ch_axis=1)
    weight = quantization.default_weight_observer
    model.qconfig = quantization.QConfig(activation=per_channel, weight=weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        quantization.prepare(model.eval(), inplace=True)
    before = snapshot(model)
    ft.evaluate(model, [(torch.randn(4, 5), torch.zeros(4).long())], nn.CrossEntropyLoss(), CPU)
    assert_bit_identical(before, snapshot(model))
    assert model[0].activation_post_process.min_val.shape == (0,)


@pytest.mark.parametrize(
    "observed",
    [True, False],
)  # fmt: skip
def test_train_epoch_on_a_qat_model_equals_the_hand_written_loop(observed: bool) -> None:
    """A prepare_qat model trains as the tutorial loop trains it, also fresh: a per-channel
    fake-quant resizes its buffers on its first batch, and the batch guard follows."""
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(3)]
    results = []
    for run in ("hand", "fntrain"):
        torch.manual_seed(0)
        model = _quantization_model(observed=observed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train = hand_train_epoch if run == "hand" else ft.train_epoch
        train(model, batches, nn.CrossEntropyLoss(), opt, CPU)
        results.append(snapshot(model))
    assert_bit_identical(*results)


# Edges, third pass (issue 21): every exception, every parameter, every buffer.


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_ctrl_c_after_the_weights_changed_keeps_that_batchs_buffers(kind: type) -> None:
    """A KeyboardInterrupt (SystemExit, GeneratorExit) from an optimizer post-hook leaves the
    batch applied whole: its BatchNorm statistics stay with its stepped weights."""
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_post_hook(lambda *_: (_ for _ in ()).throw(kind()))
    hand = _bn_model()
    hand.train()
    hand_opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    nn.CrossEntropyLoss()(hand(_BATCHES[0][0]), _BATCHES[0][1]).backward()
    hand_opt.step()
    with pytest.raises(kind):
        ft.train_epoch(model, _BATCHES, nn.CrossEntropyLoss(), opt, CPU)
    assert_bit_identical(snapshot(hand, grads=False), snapshot(model, grads=False))


def test_a_step_that_did_not_touch_the_first_parameter_is_still_judged_applied() -> None:
    """Whether the step applied is told from every parameter: a multi-head model whose later
    batch leaves the first head alone, failing after its step, keeps its buffers and says so."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.norm = nn.Linear(3, 2), nn.Linear(3, 2), nn.BatchNorm1d(3)

        def forward(self, x: tuple[torch.Tensor, int]) -> torch.Tensor:
            return (self.a if x[1] == 0 else self.b)(self.norm(x[0]))

    torch.manual_seed(0)
    model = Heads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD: only grads change weights
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1) if len(calls) < 1 else 1 / 0)
    batches = [((torch.randn(4, 3), head), torch.randint(0, 2, (4,))) for head in (0, 1)]
    with pytest.raises(ZeroDivisionError) as caught:
        ft.train_epoch(model, batches, nn.CrossEntropyLoss(), opt, CPU)
    assert "stays applied" in str(caught.value)
    assert int(model.norm.num_batches_tracked) == 2


def test_non_persistent_buffers_are_put_back_when_a_batch_fails() -> None:
    """A buffer registered with persistent=False (not in state_dict) is restored too."""

    class Counting(nn.Linear):
        def __init__(self) -> None:
            super().__init__(3, 2)
            self.register_buffer("seen", torch.zeros(()), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen += 1
            return super().forward(x)

    model = Counting()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = [_BATCHES[0], (torch.full((4, 3), float("nan")), _BATCHES[0][1])]
    with pytest.raises(ft.NonFiniteLossError):
        ft.train_epoch(model, bad, nn.CrossEntropyLoss(), opt, CPU)
    assert float(model.seen) == 1


def test_an_empty_batch_through_forward_leaves_the_buffers_as_they_were() -> None:
    """With forward=, an empty batch's model call is undone: BatchNorm's num_batches_tracked
    and (momentum=None) running statistics stay as they were."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = (torch.randn(4, 3), torch.zeros(0, dtype=torch.long))  # the model runs on the inputs
    forward = lambda m, b: (m(b[0]), b[1])  # noqa: E731
    before = snapshot(model, grads=False)
    with pytest.raises(ValueError, match="no batches"):
        ft.train_epoch(model, [empty, empty], nn.CrossEntropyLoss(), opt, CPU, forward=forward)
    assert_bit_identical(before, snapshot(model, grads=False))


@pytest.mark.parametrize("keep_eval", [False, True])
def test_keep_eval_leaves_frozen_batchnorm_frozen(keep_eval: bool) -> None:
    """A BatchNorm put in eval before train_epoch trains frozen with keep_eval=True: its
    running statistics stay bit-identical while the weights learn; without it, train_epoch
    calls model.train() and they move. Either way every flag is as before afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    model[1].eval()
    stats = [b.clone() for b in model[1].buffers()]
    weight = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ft.train_epoch(model, _BATCHES * 3, nn.CrossEntropyLoss(), opt, CPU, keep_eval=keep_eval)
    frozen = all(map(torch.equal, stats, model[1].buffers()))
    assert frozen is keep_eval and not torch.equal(weight, model[0].weight)
    assert [m.training for m in model] == [True, False, True]


def test_evaluate_and_predict_run_under_the_autocast_they_are_given() -> None:
    """autocast=torch.bfloat16 runs evaluate's and predict's forward under autocast, as
    train_epoch's does: the outputs are bfloat16 and the loss is autocast's; another dtype
    is refused by name."""
    torch.manual_seed(0)
    model, (x, y) = nn.Linear(3, 2), _BATCHES[0]
    preds = ft.predict(model, [x], CPU, autocast=torch.bfloat16)
    assert preds.outputs.dtype == torch.bfloat16
    assert ft.predict(model, [x], CPU).outputs.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = nn.functional.cross_entropy(model(x), y).item()
    ev = ft.evaluate(model, [(x, y)], nn.CrossEntropyLoss(), CPU, autocast=torch.bfloat16)
    assert ev.loss == expected
    with pytest.raises(ValueError, match="'autocast' must be None"):
        ft.evaluate(model, [(x, y)], nn.CrossEntropyLoss(), CPU, autocast=torch.float32)


class _Tokens(nn.Module):
    """A model called as model(input_ids), as transformers' models are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids).view(input_ids.size(0), -1)


@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_dict_batches_without_forward_get_the_hint_train_epoch_gives(name: str) -> None:
    """A dict batch (a tokenizer's output) without forward= fails with the hint to pass
    forward=lambda model, batch: (model(**batch), ...), not deep inside the model."""
    batch = {"input_ids": torch.randint(0, 10, (4, 3)), "labels": torch.randint(0, 6, (4,))}
    if name == "evaluate":
        run = lambda: ft.evaluate(_Tokens(), [batch], nn.CrossEntropyLoss(), CPU)  # noqa: E731
    else:
        run = lambda: ft.predict(_Tokens(), [batch], CPU)  # noqa: E731
    with pytest.raises((TypeError, AttributeError), match=r"forward=lambda model, batch"):
        run()


def test_step_lr_is_the_one_the_step_used_when_the_optimizer_changes_it() -> None:
    """Step.lr is the learning rate optimizer.step() used, also for an optimizer that sets
    its own next rate inside step() (no scheduler: the plain SGD path)."""

    class Halving(torch.optim.SGD):
        def step(self, closure: object = None) -> None:
            super().step()
            self.param_groups[0]["lr"] /= 2

    model = nn.Linear(3, 2)
    seen: list[float] = []
    opt = Halving(model.parameters(), lr=0.4)
    ft.train_epoch(model, _BATCHES * 3, nn.CrossEntropyLoss(), opt, CPU,
                   on_step=lambda step: seen.append(step.lr))  # fmt: skip
    assert seen == [0.4, 0.2, 0.1]
