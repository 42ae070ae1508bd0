"""The recipes: param_groups (weight decay without biases) and mixup."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
from tests import strategies as s
from tests.helpers import loader, make_data

LAYERS = {
    "linear": lambda: nn.Linear(4, 4),
    "conv": lambda: nn.Conv1d(4, 4, 1),
    "embedding": lambda: nn.Embedding(10, 4),
    "batchnorm": lambda: nn.BatchNorm1d(4),
    "layernorm": lambda: nn.LayerNorm(4),
    "groupnorm": lambda: nn.GroupNorm(2, 4),
    "attention": lambda: nn.MultiheadAttention(4, 2),
    "lstm": lambda: nn.LSTM(4, 4),
    "prelu": lambda: nn.PReLU(),
}
DECAYED = {"linear", "conv", "embedding", "attention", "lstm"}


def _ids(params: list[torch.Tensor]) -> set[int]:
    return {id(p) for p in params}


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=6),
    frozen=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_every_trainable_parameter_is_in_exactly_one_group(
    names: list[str], frozen: list[bool]
) -> None:
    """Trainable parameters appear once across the groups; frozen ones do not appear."""
    model = nn.ModuleList([LAYERS[name]() for name in names])
    for layer, freeze in zip(model, frozen, strict=False):
        layer.requires_grad_(not freeze)
    groups = ft.param_groups(model, weight_decay=0.1)
    listed = [p for group in groups for p in group["params"]]
    assert len(listed) == len(_ids(listed))
    assert _ids(listed) == {id(p) for p in model.parameters() if p.requires_grad}


@settings(max_examples=40, deadline=None)
@given(names=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=6))
def test_decay_goes_to_weight_matrices_of_weight_layers_only(names: list[str]) -> None:
    """The decay group holds exactly the >=2-D weights of Linear/Conv/Embedding/attention/RNN."""
    model = nn.ModuleList([LAYERS[name]() for name in names])
    expected = {
        id(p)
        for name, layer in zip(names, model, strict=True)
        if name in DECAYED
        for p in layer.parameters()
        if p.dim() >= 2
    }
    groups = {g["weight_decay"]: _ids(g["params"]) for g in ft.param_groups(model, 0.05)}
    assert groups.get(0.05, set()) == expected
    biases_and_norms = {id(p) for p in model.parameters()} - expected
    assert groups.get(0.0, set()) == biases_and_norms


def test_resnet18_batchnorm_and_biases_get_no_decay() -> None:
    """On resnet18 only conv kernels and the fc weight decay; BatchNorm weights do not."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    decay, no_decay = ft.param_groups(model, 1e-4)
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert _ids(bn) <= _ids(no_decay["params"])
    assert _ids(decay["params"]) == {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    }
    assert id(model.fc.bias) in _ids(no_decay["params"])


def test_the_tutorials_name_suffix_rule_decays_batchnorm_weights() -> None:
    """Splitting by the 'bias' name suffix (as a tutorial does) wrongly decays norm weights."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    by_suffix = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    decay = ft.param_groups(model, 0.1)[0]["params"]
    assert id(model[1].weight) in _ids(by_suffix)
    assert id(model[1].weight) not in _ids(decay)


def test_tied_weights_appear_once() -> None:
    """A weight shared by two layers (tied embeddings) is listed once."""
    embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    groups = ft.param_groups(nn.ModuleList([embed, head]), 0.1)
    assert [len(g["params"]) for g in groups] == [1]


def test_the_groups_feed_an_optimizer_with_the_right_decay() -> None:
    """AdamW takes the groups as they are and applies decay per group."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(ft.param_groups(model, 0.3), lr=1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]


@pytest.mark.parametrize("decay", [-0.1, "0.1", True])
def test_bad_weight_decay_is_named(decay: object) -> None:
    """A negative or non-numeric weight_decay names the argument."""
    with pytest.raises((TypeError, ValueError), match="'weight_decay' must be"):
        ft.param_groups(nn.Linear(2, 2), decay)  # type: ignore[arg-type]


FAST = settings(max_examples=30, deadline=None)


def _batch(samples: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 3, generator=gen), torch.randint(
        0, classes, (samples,), generator=gen
    )


@FAST
@given(
    samples=st.integers(1, 20),
    classes=s.class_counts,
    alpha=st.floats(0.05, 5.0),
    seed=s.seeds,
)
def test_targets_stay_probability_vectors(
    samples: int, classes: int, alpha: float, seed: int
) -> None:
    """Mixed targets are non-negative and sum to one per sample, for any alpha."""
    inputs, targets = _batch(samples, classes, seed)
    gen = torch.Generator().manual_seed(seed)
    _, soft = ft.mixup(inputs, targets, alpha=alpha, num_classes=classes, generator=gen)
    assert soft.shape == (samples, classes)
    assert torch.all(soft >= 0)
    torch.testing.assert_close(soft.sum(1), torch.ones(samples))


@FAST
@given(samples=st.integers(1, 20), classes=s.class_counts, seed=s.seeds)
def test_lambda_one_leaves_the_batch_unchanged(samples: int, classes: int, seed: int) -> None:
    """With lam=1 the inputs are returned bit for bit and the targets are one-hot."""
    inputs, targets = _batch(samples, classes, seed)
    mixed, soft = ft.mixup(inputs, targets, alpha=0.2, num_classes=classes, lam=1.0)
    assert torch.equal(mixed, inputs)
    assert torch.equal(soft, nn.functional.one_hot(targets, classes).float())


@FAST
@given(samples=st.integers(2, 20), lam=st.floats(0.0, 1.0), seed=s.seeds)
def test_inputs_and_targets_are_mixed_with_the_same_weight_and_partner(
    samples: int, lam: float, seed: int
) -> None:
    """Every sample is lam * itself + (1 - lam) * one partner, in inputs and in targets."""
    inputs, targets = _batch(samples, 4, seed)
    gen = torch.Generator().manual_seed(seed)
    mixed, soft = ft.mixup(inputs, targets, alpha=1.0, num_classes=4, generator=gen, lam=lam)
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    one_hot = nn.functional.one_hot(targets, 4).float()
    torch.testing.assert_close(mixed, lam * inputs + (1 - lam) * inputs[order])
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot[order])


def test_a_generator_makes_mixup_reproducible_and_leaves_the_global_rng() -> None:
    """The same generator seed gives the same mix; the global RNG is not consumed."""
    inputs, targets = _batch(16, 5, 0)
    state = torch.get_rng_state()
    first = ft.mixup(
        inputs, targets, alpha=0.4, num_classes=5, generator=torch.Generator().manual_seed(3)
    )
    second = ft.mixup(
        inputs, targets, alpha=0.4, num_classes=5, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_mixup_in_forward_trains_with_cross_entropy_and_accuracy() -> None:
    """ft.mixup inside forward= trains with CrossEntropyLoss on soft targets."""
    data = make_data(64, 4, 3, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)

    def mix(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = ft.mixup(*batch, alpha=0.3, num_classes=3)
        return model(inputs), targets

    results = [
        ft.train_epoch(
            model, loader(data, 16, seed=epoch), nn.CrossEntropyLoss(), opt, "cpu",
            metrics={"acc": ft.accuracy()}, forward=mix,
        )
        for epoch in range(15)
    ]  # fmt: skip
    assert results[-1].loss < results[0].loss
    assert 0.0 <= results[-1].metrics["acc"] <= 1.0
    ev = ft.evaluate(
        model, loader(data, 16), nn.CrossEntropyLoss(), "cpu", metrics={"acc": ft.accuracy()}
    )
    assert ev.metrics["acc"] > 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0, "num_classes": 3}, "'alpha' must be a positive number"),
        ({"alpha": 0.2, "num_classes": 1}, "'num_classes' must be an int >= 2"),
        ({"alpha": 0.2, "num_classes": 3, "lam": 1.5}, r"'lam' must be in \[0, 1\]"),
        ({"alpha": 0.2, "num_classes": 2}, r"class indices in \[0, 2\)"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    """Bad alpha, num_classes, lam or out-of-range targets name the argument."""
    inputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=message):
        ft.mixup(inputs, targets, **kwargs)


def test_integer_inputs_are_refused() -> None:
    """Mixing needs floating-point inputs; uint8 images must be converted first."""
    with pytest.raises(TypeError, match="'inputs' must be a floating-point tensor"):
        ft.mixup(
            torch.zeros(2, 3, dtype=torch.uint8), torch.tensor([0, 1]), alpha=0.2, num_classes=2
        )
