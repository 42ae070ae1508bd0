"""mixup: convex mixing of inputs and one-hot targets, usable per batch in train_epoch."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fntrain as ft
from tests import strategies as s
from tests.helpers import loader, make_data

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


def test_mixup_as_a_transform_trains_with_cross_entropy_and_accuracy() -> None:
    """transform=partial(ft.mixup, ...) trains with CrossEntropyLoss on soft targets."""
    data = make_data(64, 4, 3, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    mix = functools.partial(ft.mixup, alpha=0.3, num_classes=3)
    results = [
        ft.train_epoch(
            model, loader(data, 16, seed=epoch), nn.CrossEntropyLoss(), opt, "cpu",
            metrics={"acc": ft.accuracy()}, transform=mix,
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
