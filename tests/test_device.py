"""Devices: the default choice, resolution, and moving nested batches."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import fntrain as ft
from fntrain.device import as_device, to_device


def test_default_device_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """default_device() picks CUDA when available, then MPS, then the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert ft.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert ft.default_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ft.default_device() == torch.device("cuda", 0)


def test_as_device_accepts_strings_and_devices() -> None:
    """A str or torch.device is accepted; anything else names 'device'."""
    assert as_device("cpu") == torch.device("cpu")
    assert as_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'device' must name a device"):
        as_device("tpu:9x")
    with pytest.raises(TypeError, match=r"'device' must be a torch\.device"):
        as_device(3)  # type: ignore[arg-type]


Pair = namedtuple("Pair", "image mask")


def test_to_device_keeps_the_structure_and_leaves_non_tensors() -> None:
    """Tensors in tuples, lists, dicts and namedtuples move; the structure and the rest stay."""
    batch = {
        "pair": Pair(torch.ones(2), torch.zeros(2)),
        "list": [torch.ones(1), "name", 3],
        "tuple": (torch.ones(1),),
    }
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved["pair"], Pair) and moved["pair"].image.device.type == "meta"
    assert moved["list"][1:] == ["name", 3] and moved["list"][0].is_meta
    assert isinstance(moved["tuple"], tuple) and moved["tuple"][0].is_meta
