"""param_groups: weight decay on weight matrices, never on biases or normalisation layers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import fntrain as ft

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


@pytest.mark.parametrize("decay", [-0.1, "0.1", True, math.nan, math.inf, -math.inf])
def test_bad_weight_decay_is_named(decay: object) -> None:
    """A negative, non-finite or non-numeric weight_decay names the argument."""
    with pytest.raises((TypeError, ValueError), match="'weight_decay' must be"):
        ft.param_groups(nn.Linear(2, 2), decay)  # type: ignore[arg-type]


PARAMETRIZE = {
    "weight_norm": lambda m: parametrizations.weight_norm(m),
    "weight_norm_scalar_g": lambda m: parametrizations.weight_norm(m, dim=None),
    "orthogonal": lambda m: parametrizations.orthogonal(m),
    "spectral_norm": lambda m: parametrizations.spectral_norm(m),
}


@settings(max_examples=40, deadline=None)
@given(
    layers=st.lists(
        st.tuples(
            st.sampled_from(["linear", "conv", "layernorm"]), st.sampled_from(sorted(PARAMETRIZE))
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_parametrized_weight_decays_as_the_owning_layer_decides(
    layers: list[tuple[str, str]],
) -> None:
    """weight_norm/orthogonal/spectral_norm: a weight layer's >=2-D originals decay, others not."""
    model = nn.ModuleList()
    for name, how in layers:
        layer = LAYERS[name]()
        model.append(PARAMETRIZE[how](layer) if name != "layernorm" else layer)
    expected = {
        id(p)
        for (name, _), layer in zip(layers, model, strict=True)
        if name != "layernorm"
        for p in layer.parametrizations.weight.parameters()
        if p.dim() >= 2
    }
    groups = {g["weight_decay"]: _ids(g["params"]) for g in ft.param_groups(model, 0.05)}
    assert expected or {name for name, _ in layers} == {"layernorm"}  # each has a 2-D one
    assert groups.get(0.05, set()) == expected
    assert groups.get(0.0, set()) == {id(p) for p in model.parameters()} - expected


def test_weight_norm_decays_as_the_older_weight_norm_does() -> None:
    """The parametrization's g (out, 1) and v decay like nn.utils.weight_norm's weight_g/_v."""
    with pytest.warns(FutureWarning):
        older = nn.utils.weight_norm(nn.Conv1d(4, 6, 3))
    newer = parametrizations.weight_norm(nn.Conv1d(4, 6, 3))
    decayed = [ft.param_groups(m, 0.1)[0] for m in (older, newer)]
    assert [sorted(p.shape for p in d["params"]) for d in decayed] == [
        sorted([(6, 1, 1), (6, 4, 3)])
    ] * 2
    assert [d["weight_decay"] for d in decayed] == [0.1, 0.1]


def test_a_parametrized_norm_weight_or_bias_gets_no_decay() -> None:
    """A parametrization on a LayerNorm weight or on a Linear's bias leaves it undecayed."""
    norm, linear = nn.LayerNorm(4), nn.Linear(4, 4)
    parametrize.register_parametrization(norm, "weight", _Square())
    parametrize.register_parametrization(linear, "bias", _Square())
    groups = ft.param_groups(nn.ModuleList([norm, linear]), 0.1)
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 1), (0.0, 3)]
    assert _ids(groups[0]["params"]) == {id(linear.weight)}


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x
