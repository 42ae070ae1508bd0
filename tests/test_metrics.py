"""Built-in metrics: equal to torchmetrics, summable across batches, strict about shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
from tests import strategies as s
from tests.helpers import loader, make_data

torchmetrics = pytest.importorskip("torchmetrics")
FAST = settings(max_examples=25, deadline=None)


def _value(metric: ft.Metric, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Compute a metric on one batch, as fntrain does at the end of an epoch."""
    return metric.compute(tuple(torch.as_tensor(p) for p in metric.state(outputs, targets)))


def _same_state(a: tuple, b: tuple) -> bool:
    """Tell whether two metric states are equal part by part."""
    return len(a) == len(b) and all(
        torch.equal(torch.as_tensor(p), torch.as_tensor(q)) for p, q in zip(a, b, strict=True)
    )


def _scores(samples: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return random class scores and class-index targets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, classes, generator=gen), torch.randint(
        0, classes, (samples,), generator=gen
    )


@FAST
@given(samples=s.sample_counts, classes=s.class_counts, seed=s.seeds)
def test_accuracy_equals_torchmetrics(samples: int, classes: int, seed: int) -> None:
    """ft.accuracy() equals torchmetrics' micro-averaged MulticlassAccuracy."""
    outputs, targets = _scores(samples, classes, seed)
    metric = ft.accuracy()
    expected = torchmetrics.functional.classification.multiclass_accuracy(
        outputs, targets, num_classes=classes, average="micro"
    )
    assert _value(metric, outputs, targets) == pytest.approx(expected.item())


@FAST
@given(samples=s.sample_counts, classes=st.integers(3, 8), k=st.integers(1, 3), seed=s.seeds)
def test_top_k_accuracy_equals_torchmetrics(samples: int, classes: int, k: int, seed: int) -> None:
    """ft.top_k_accuracy(k) equals torchmetrics' MulticlassAccuracy(top_k=k, average='micro')."""
    outputs, targets = _scores(samples, classes, seed)
    metric = ft.top_k_accuracy(k)
    expected = torchmetrics.functional.classification.multiclass_accuracy(
        outputs, targets, num_classes=classes, average="micro", top_k=k
    )
    assert _value(metric, outputs, targets) == pytest.approx(expected.item())


@FAST
@given(samples=s.sample_counts, classes=s.class_counts, seed=s.seeds, data=st.data())
def test_states_add_up_across_any_split(
    samples: int, classes: int, seed: int, data: st.DataObject
) -> None:
    """The sum of per-batch states equals the state of the whole: batches (and ranks) add."""
    outputs, targets = _scores(samples, classes, seed)
    cut = data.draw(st.integers(1, samples - 1))
    for metric in (ft.accuracy(), ft.top_k_accuracy(min(2, classes))):
        first, second = (
            metric.state(outputs[:cut], targets[:cut]),
            metric.state(outputs[cut:], targets[cut:]),
        )
        summed = tuple(a + b for a, b in zip(first, second, strict=True))
        assert _same_state(summed, metric.state(outputs, targets))


@FAST
@given(samples=s.sample_counts, classes=s.class_counts, seed=s.seeds)
def test_accuracy_reads_probability_targets_by_their_most_likely_class(
    samples: int, classes: int, seed: int
) -> None:
    """Soft targets (one-hot, smoothed or mixed) count by their argmax class."""
    outputs, targets = _scores(samples, classes, seed)
    soft = nn.functional.one_hot(targets, classes).float() * 0.8 + 0.2 / classes
    metric = ft.accuracy()
    assert _same_state(metric.state(outputs, soft), metric.state(outputs, targets))


def test_accuracy_counts_every_position_of_dense_outputs() -> None:
    """For (N, C, H, W) outputs and (N, H, W) targets, every pixel is a prediction."""
    outputs = torch.zeros(2, 3, 4, 4)
    outputs[:, 1] = 1.0
    targets = torch.ones(2, 4, 4, dtype=torch.long)
    targets[0, 0, 0] = 2
    metric = ft.accuracy()
    assert _value(metric, outputs, targets) == pytest.approx(31 / 32)


def test_top_1_accuracy_is_accuracy() -> None:
    """top_k_accuracy(1) gives the same state as accuracy()."""
    outputs, targets = _scores(50, 5, 3)
    assert _same_state(
        ft.top_k_accuracy(1).state(outputs, targets), ft.accuracy().state(outputs, targets)
    )


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_top_k_rejects_a_k_that_is_not_a_positive_int(k: object) -> None:
    """top_k_accuracy names 'k' when it is not a positive int."""
    with pytest.raises(ValueError, match="'k' must be a positive int"):
        ft.top_k_accuracy(k)  # type: ignore[arg-type]


def test_top_k_larger_than_the_classes_is_an_error() -> None:
    """top_k_accuracy(5) on 3 classes says so instead of failing inside topk."""
    with pytest.raises(ValueError, match="'k' is 5 but the outputs have only 3 classes"):
        ft.top_k_accuracy(5).state(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize(
    ("outputs", "targets", "message"),
    [
        (torch.randn(4), torch.zeros(5, dtype=torch.long), r"targets of shape \(4,\)"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), r"targets of shape \(4,\)"),
    ],
)
def test_accuracy_names_mismatched_shapes(
    outputs: torch.Tensor, targets: torch.Tensor, message: str
) -> None:
    """accuracy() says which shapes it expected and which it got."""
    with pytest.raises(ValueError, match=message):
        ft.accuracy().state(outputs, targets)


def test_a_custom_metric_is_summed_over_samples_by_evaluate() -> None:
    """A user's Metric record works in evaluate and is summed over uneven batches."""
    mae = ft.Metric(
        state=lambda out, y: ((out - y).abs().sum(), y.numel()),
        compute=lambda total: float(total[0] / total[1]),
    )
    inputs = torch.arange(7.0).unsqueeze(1)
    batches = [(inputs[:4], torch.zeros(4, 1)), (inputs[4:], torch.zeros(3, 1))]
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    result = ft.evaluate(model, batches, nn.L1Loss(), "cpu", metrics={"mae": mae})
    assert result.metrics["mae"] == pytest.approx(3.0)
    assert result.loss == pytest.approx(3.0)


def test_built_in_metrics_name_the_problem_with_non_tensor_outputs() -> None:
    """accuracy() on a model that returns a dict says it needs a tensor of class scores."""
    with pytest.raises(TypeError, match=r"accuracy\(\) needs the outputs as a tensor"):
        ft.accuracy().state({"logits": torch.randn(2, 3)}, torch.zeros(2, dtype=torch.long))


def test_a_metric_collection_gives_one_value_per_member() -> None:
    """A torchmetrics MetricCollection is flattened into name/member entries."""
    collection = torchmetrics.MetricCollection(
        {
            "acc": torchmetrics.classification.MulticlassAccuracy(num_classes=3),
            "f1": torchmetrics.classification.MulticlassF1Score(num_classes=3),
        }
    )
    model = nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    result = ft.evaluate(model, batches, nn.CrossEntropyLoss(), "cpu", metrics={"cls": collection})
    assert set(result.metrics) == {"cls/acc", "cls/f1"}
    assert all(isinstance(v, float) for v in result.metrics.values())


def test_large_counts_come_to_the_host_exactly() -> None:
    """Integer sums beyond 2**24 beside float32 sums reach the host exactly, host or device."""
    from fntrain import metrics as metric_lib
    from fntrain import sums

    state = ft.Metric(
        state=lambda out, y: (
            torch.tensor(2**24 + 1),
            torch.tensor([2**24 + 1, 1]),
            torch.tensor([0.25, 0.5]),
        ),
        compute=lambda total: 0.0,
    )
    parts = metric_lib.added({}, {"m": state}, None, None)
    parts = metric_lib.added(parts, {"m": state}, None, None)
    totals = sums._host(sums.Sums(parts=parts))
    assert totals["m", 0].item() == 2 * (2**24 + 1)
    assert totals["m", 1].tolist() == [2 * (2**24 + 1), 2]
    assert totals["m", 2].tolist() == [0.5, 1.0]


def test_a_metric_state_may_be_a_vector_of_counts() -> None:
    """A part may be a per-class vector: it is summed elementwise over batches."""
    per_class = ft.Metric(
        state=lambda out, y: (torch.bincount(y, minlength=3),),
        compute=lambda total: total[0].float(),
    )
    batches = [
        (torch.randn(4, 2), torch.tensor([0, 1, 1, 2])),
        (torch.randn(2, 2), torch.tensor([2, 2])),
    ]
    result = ft.evaluate(
        nn.Linear(2, 3), batches, nn.CrossEntropyLoss(), "cpu", metrics={"n": per_class}
    )
    assert result.metrics["n"].tolist() == [1.0, 2.0, 3.0]


@settings(max_examples=25, deadline=None)
@given(batches=st.integers(1, 6), size=st.integers(2, 5))
def test_a_metric_state_tensor_is_summed_and_left_unchanged(batches: int, size: int) -> None:
    """A state part is only read: the same tensor returned by every batch sums to batches * it."""
    part = torch.arange(1.0, size + 1)
    expected = part.clone()
    metric = ft.Metric(state=lambda out, y: (part,), compute=lambda total: total[0])
    data = make_data(batches * 4, 4, 3, 0)
    result = ft.evaluate(
        nn.Linear(4, 3), loader(data, 4), nn.CrossEntropyLoss(), "cpu", metrics={"m": metric}
    )
    assert torch.equal(part, expected)
    assert torch.equal(result.metrics["m"], batches * expected)


@settings(max_examples=20, deadline=None)
@given(samples=st.integers(1, 60), batch=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_a_per_class_report_equals_scikit_learn(samples: int, batch: int, seed: int) -> None:
    """evaluate with average=None torchmetrics gives sklearn's per-class P/R/F1, any batching."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from torchmetrics.classification import (
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    gen = torch.Generator().manual_seed(seed)
    outputs = torch.randn(samples, 4, generator=gen)
    targets = torch.randint(0, 4, (samples,), generator=gen)
    per_class = {
        "precision": MulticlassPrecision(num_classes=4, average=None),
        "recall": MulticlassRecall(num_classes=4, average=None),
        "f1": MulticlassF1Score(num_classes=4, average=None),
    }
    batches = list(zip(outputs.split(batch), targets.split(batch), strict=True))
    report = ft.evaluate(nn.Identity(), batches, nn.CrossEntropyLoss(), "cpu", metrics=per_class)
    expected = sklearn_metrics.precision_recall_fscore_support(
        targets.numpy(), outputs.argmax(1).numpy(), labels=range(4), zero_division=0
    )
    for name, values in zip(("precision", "recall", "f1"), expected[:3], strict=True):
        assert len(report.metrics[name]) == 4
        assert report.metrics[name] == pytest.approx(list(values), abs=1e-6), name


@settings(max_examples=15, deadline=None)
@given(samples=st.integers(1, 40), batch=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_one_evaluate_pass_gives_the_loss_and_sklearns_classification_report(
    samples: int, batch: int, seed: int
) -> None:
    """One evaluate with a confusion matrix gives its loss and sklearn's whole report.

    The README recipe: rebuild (true, predicted) pairs from the matrix; the printed report
    equals classification_report on all predictions, the loss the mean over all samples.
    """
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from torchmetrics.classification import MulticlassConfusionMatrix

    gen = torch.Generator().manual_seed(seed)
    outputs = torch.randn(samples, 4, generator=gen)
    targets = torch.randint(0, 4, (samples,), generator=gen)
    batches = list(zip(outputs.split(batch), targets.split(batch), strict=True))
    metrics = {"confusion": MulticlassConfusionMatrix(num_classes=4)}
    ev = ft.evaluate(nn.Identity(), batches, nn.CrossEntropyLoss(), "cpu", metrics=metrics)
    counts = ev.metrics["confusion"].flatten()  # rows: true class, columns: predicted
    pairs = torch.arange(counts.numel())
    y_true, y_pred = (pairs // 4).repeat_interleave(counts), (pairs % 4).repeat_interleave(counts)
    names, kw = ["a", "b", "c", "d"], {"labels": range(4), "zero_division": 0, "digits": 4}
    expected = sklearn_metrics.classification_report(
        targets, outputs.argmax(1), target_names=names, **kw
    )
    assert (
        sklearn_metrics.classification_report(y_true, y_pred, target_names=names, **kw) == expected
    )
    assert ev.loss == pytest.approx(float(nn.functional.cross_entropy(outputs, targets)), abs=1e-6)


def test_parts_reach_compute_in_state_order_wherever_they_were_summed() -> None:
    """A vector part (summed as a tensor) before a count (summed on the host) keeps its place.

    On a GPU every tensor part is summed on the device and every number on the host; the
    parts must still reach ``compute`` in the order ``state`` returned them.
    """
    metric = ft.Metric(
        state=lambda out, y: (torch.bincount(y, minlength=3), y.numel()),
        compute=lambda total: total[0].float() / total[1],
    )
    batches = [
        (torch.randn(4, 2), torch.tensor([0, 1, 1, 2])),
        (torch.randn(2, 2), torch.tensor([2, 2])),
    ]
    result = ft.evaluate(
        nn.Linear(2, 3), batches, nn.CrossEntropyLoss(), "cpu", metrics={"m": metric}
    )
    assert result.metrics["m"].tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_a_metric_named_loss_is_kept_apart_from_the_loss() -> None:
    """metrics={'loss': ...} neither changes the reported loss nor takes it as its state."""
    data = make_data(24, 4, 3, 0)
    model = nn.Linear(4, 3)
    plain = ft.evaluate(model, loader(data, 8), nn.CrossEntropyLoss(), "cpu")
    named = ft.evaluate(
        model, loader(data, 8), nn.CrossEntropyLoss(), "cpu",
        metrics={"loss": ft.accuracy(), "acc": ft.accuracy()},
    )  # fmt: skip
    assert named.loss == plain.loss
    assert named.metrics["loss"] == named.metrics["acc"] <= 1.0


# --- accuracy judges what it can and refuses what it cannot ---------------------------------


@FAST
@given(samples=s.sample_counts, seed=s.seeds, column=st.booleans(), float_targets=st.booleans())
def test_binary_accuracy_on_logits_equals_torchmetrics(
    samples: int, seed: int, column: bool, float_targets: bool
) -> None:
    """One logit column or 1-D logits (BCEWithLogitsLoss): a logit above 0 predicts class 1."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, generator=gen) * 3
    labels = torch.randint(0, 2, (samples,), generator=gen)
    expected = torchmetrics.functional.classification.binary_accuracy(logits.sigmoid(), labels)
    outputs = logits[:, None] if column else logits
    targets = labels.float() if float_targets else labels
    targets = targets[:, None] if column else targets
    assert _value(ft.accuracy(), outputs, targets) == pytest.approx(expected.item())
    probabilities = ft.accuracy(threshold=0.5)  # for a model that ends in a sigmoid
    assert _value(probabilities, outputs.sigmoid(), targets) == pytest.approx(expected.item())


@FAST
@given(
    samples=s.sample_counts, classes=s.class_counts, extra=st.integers(0, 3), seed=s.seeds,
    ignore=st.booleans(),
)  # fmt: skip
def test_multiclass_accuracy_over_any_dense_shape_equals_torchmetrics(
    samples: int, classes: int, extra: int, seed: int, ignore: bool
) -> None:
    """(N, C, *) scores and (N, *) indices, with ignore_index, as MulticlassAccuracy(micro)."""
    gen = torch.Generator().manual_seed(seed)
    outputs = torch.randn(samples, classes, *[2] * extra, generator=gen)
    targets = torch.randint(0, classes, (samples, *[2] * extra), generator=gen)
    if ignore:
        targets[torch.rand(targets.shape, generator=gen) < 0.3] = -100
    expected = torchmetrics.functional.classification.multiclass_accuracy(
        outputs, targets, num_classes=classes, average="micro",
        ignore_index=-100 if ignore else None, multidim_average="global",
    )  # fmt: skip
    metric = ft.accuracy(ignore_index=-100) if ignore else ft.accuracy()
    value = _value(metric, outputs, targets)
    assert value == pytest.approx(expected.item()) or (value != value and (targets < 0).all())


@pytest.mark.parametrize(
    ("outputs", "targets", "advice"),
    [
        (torch.randn(6, 1), torch.rand(6, 1) * 10, "MeanAbsoluteError"),  # regression
        (torch.randn(6), torch.randn(6), "MeanAbsoluteError"),
        (torch.randn(6, 1), torch.tensor([0, 1, 2, 0, 1, 2]), "MeanAbsoluteError"),
        (torch.randn(6, 4), torch.ones(6, 4), "MultilabelAccuracy"),  # several 1s per row
        (torch.randn(6, 4), torch.randn(6, 4) * 5, "MeanAbsoluteError"),  # real-valued rows
        (torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]), r"class indices in \[0,"),
        (torch.randn(6, 3), torch.tensor([0, -1, 2, 1, 0, 1]), r"class indices in \[0,"),
        (torch.randn(6, 3), torch.tensor([0.0, 1.5, 2.0, 1.0, 0.0, 1.0]), r"class indices in \[0,"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("metric", ["accuracy", "top_k"])
def test_accuracy_refuses_targets_it_cannot_judge_and_names_the_metric_to_use(
    outputs: torch.Tensor, targets: torch.Tensor, advice: str, metric: str
) -> None:
    """Regression values, multi-hot rows and out-of-range indices raise instead of scoring."""
    chosen = ft.accuracy() if metric == "accuracy" else ft.top_k_accuracy(1)
    if outputs.dim() == 1 or outputs.shape[-1] == 1:  # one column: accuracy only
        chosen = ft.accuracy()
    with pytest.raises(ValueError, match=advice):
        _value(chosen, outputs, targets)
    with pytest.raises(ValueError, match=rf"metrics\['acc'\].*{advice}"):
        ft.evaluate(nn.Identity(), [(outputs, targets)], lambda o, t: o.sum() * 0, "cpu",
                    metrics={"acc": chosen})  # fmt: skip


@FAST
@given(
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32]),
    values=st.lists(st.integers(-3, 7), min_size=1, max_size=12),
    dense=st.booleans(),
    seed=s.seeds,
)
def test_accuracy_refuses_exactly_the_targets_outside_the_classes(
    dtype: torch.dtype, values: list[int], dense: bool, seed: int
) -> None:
    """Any integer dtype, any shape: out of [0, classes) raises, else it counts argmax hits."""
    classes, targets = 5, torch.tensor(values).to(dtype)  # uint8 wraps -1 to 255: outside too
    gen = torch.Generator().manual_seed(seed)
    shape = (1, classes, len(values)) if dense else (len(values), classes)
    outputs, targets = torch.randn(shape, generator=gen), targets.reshape(shape[:1] + shape[2:])
    if ((targets < 0) | (targets >= classes)).any():
        with pytest.raises(ValueError, match=r"not class indices in \[0, number of classes\)"):
            _value(ft.accuracy(), outputs, targets)
    else:
        hits = (outputs.argmax(dim=1) == targets.long()).sum().item()
        assert _value(ft.accuracy(), outputs, targets) == hits / len(values)


def test_a_refusal_found_on_the_device_is_raised_when_the_epoch_is_computed() -> None:
    """Counts of targets it cannot judge add up like any part; compute refuses them."""
    metric = ft.accuracy()
    meta = {"device": "meta"}
    bad = metric.state(torch.randn(4, 3, **meta), torch.zeros(4, dtype=torch.long, **meta))
    assert len(bad) == 5 and len(metric.state(torch.randn(4, 3), torch.zeros(4).long())) == 2
    totals = (torch.tensor(3), torch.tensor(4), torch.tensor(1), torch.tensor(0), torch.tensor(0))
    with pytest.raises(ValueError, match=r"1 target.*class indices"):
        metric.compute(totals)


def test_top_k_accuracy_needs_several_classes() -> None:
    """top_k_accuracy on one logit column says it needs class scores."""
    with pytest.raises(ValueError, match=r"top_k_accuracy.*one output column"):
        ft.top_k_accuracy(1).state(torch.randn(4, 1), torch.zeros(4, 1))


@settings(max_examples=15, deadline=None)
@given(samples=s.sample_counts, batch=st.integers(1, 16), seed=s.seeds)
def test_a_metric_state_may_be_a_list(samples: int, batch: int, seed: int) -> None:
    """A state returned as a list of parts is summed as the same parts in a tuple are."""

    def metric(kind: type) -> ft.Metric:
        return ft.Metric(
            state=lambda out, y: kind(((out.argmax(1) == y).sum(), y.numel())),
            compute=lambda total: float(total[0]) / float(total[1]),
        )

    data, model = make_data(samples, 4, 3, seed), nn.Linear(4, 3)
    runs = [{"m": metric(kind), "acc": ft.accuracy()} for kind in (list, tuple)]
    values = [
        ft.evaluate(model, loader(data, batch), nn.CrossEntropyLoss(), "cpu", metrics=m).metrics
        for m in runs
    ]
    assert values[0] == values[1] and values[0]["m"] == pytest.approx(values[0]["acc"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": float("nan")}, r"'threshold' must be a finite number, but got nan"),
        ({"threshold": float("inf")}, r"'threshold' must be a finite number, but got inf"),
        ({"threshold": "0.5"}, r"'threshold' must be a finite number, but got '0.5'"),
        ({"threshold": None}, r"'threshold' must be a finite number, but got None"),
        ({"threshold": True}, r"'threshold' must be a finite number, but got True"),
        ({"ignore_index": -100.0}, r"'ignore_index' must be an int or None, but got -100.0"),
        ({"ignore_index": "-100"}, r"'ignore_index' must be an int or None, but got '-100'"),
        ({"ignore_index": True}, r"'ignore_index' must be an int or None, but got True"),
    ],
)
def test_bad_accuracy_arguments_are_refused_at_construction(kwargs: dict, message: str) -> None:
    """accuracy() refuses a non-finite or non-numeric threshold and a non-int ignore_index."""
    with pytest.raises((TypeError, ValueError), match=message):
        ft.accuracy(**kwargs)


def test_accuracy_with_ignore_index_averages_over_the_items_not_the_samples() -> None:
    """With ignore_index, each non-ignored target (token) counts once, however many a sample has."""
    outputs = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 0, 0], [0, -100, -100]])  # 3 right tokens; 1 wrong, 2 ignored
    assert _value(ft.accuracy(ignore_index=-100), outputs, targets) == 0.75  # not (1 + 0) / 2
    assert "per item" in ft.accuracy.__doc__
