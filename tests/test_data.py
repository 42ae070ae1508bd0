"""Batches and devices: default_device, moving nested batches, TensorLoader."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fntrain as ft
from fntrain.data import as_device, concat, to_device
from tests import strategies as s
from tests.helpers import assert_bit_identical, mlp, snapshot


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


FAST = settings(max_examples=25, deadline=None)


def _data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 4, generator=gen), torch.randint(0, 3, (samples,), generator=gen)


@FAST
@given(
    samples=s.sample_counts,
    batch_size=s.batch_sizes,
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    own_generator=st.booleans(),
    seed=s.seeds,
)
def test_batches_equal_dataloader_batches_epoch_after_epoch(
    samples: int, batch_size: int, shuffle: bool, drop_last: bool, own_generator: bool, seed: int
) -> None:
    """For the same seed, TensorLoader yields DataLoader's batches, for three epochs running."""
    x, y = _data(samples, seed)
    epochs = []
    for make in ("torch", "fntrain"):
        gen = torch.Generator().manual_seed(seed) if own_generator else None
        torch.manual_seed(seed)
        if make == "torch":
            loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                                generator=gen, drop_last=drop_last)  # fmt: skip
        else:
            loader = ft.TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle,
                                     generator=gen, drop_last=drop_last)  # fmt: skip
        runs = [[tuple(b) for b in loader] for _ in range(3)]
        epochs.append((len(loader), runs, torch.get_rng_state()))
    (torch_len, torch_runs, torch_rng), (ft_len, ft_runs, ft_rng) = epochs
    assert torch_len == ft_len == len(torch_runs[0])
    for a_epoch, b_epoch in zip(torch_runs, ft_runs, strict=True):
        assert len(a_epoch) == len(b_epoch)
        for a, b in zip(a_epoch, b_epoch, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert torch.equal(torch_rng, ft_rng)  # the global RNG advanced alike (dropout follows)


@pytest.mark.slow
def test_training_over_it_is_bit_identical_to_training_over_a_dataloader() -> None:
    """Two shuffled epochs of train_epoch give the same weights with either loader."""
    x, y = _data(100, 0)
    results = []
    for make in ("torch", "fntrain"):
        model = mlp(4, 3, 0, dropout=0.3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)
        if make == "torch":
            loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
        else:
            loader = ft.TensorLoader(x, y, batch_size=16, shuffle=True)
        for _ in range(2):
            ft.train_epoch(model, loader, nn.CrossEntropyLoss(), opt, "cpu")
        results.append(snapshot(model))
    assert_bit_identical(*results)


def test_its_generator_state_resumes_the_shuffle_exactly(tmp_path) -> None:
    """The generator's state, saved in a checkpoint's extra, resumes the same order."""
    x, y = _data(30, 0)
    gen = torch.Generator().manual_seed(5)
    loader = ft.TensorLoader(x, y, batch_size=8, shuffle=True, generator=gen)
    list(loader)
    ft.save_checkpoint(tmp_path / "c.pt", nn.Linear(4, 3), epoch=1, extra={"gen": gen.get_state()})
    expected = [b[1] for b in loader]
    fresh_gen = torch.Generator().manual_seed(99)
    fresh = ft.TensorLoader(x, y, batch_size=8, shuffle=True, generator=fresh_gen)
    fresh_gen.set_state(ft.load_checkpoint(tmp_path / "c.pt", nn.Linear(4, 3)).extra["gen"])
    assert all(torch.equal(a, b[1]) for a, b in zip(expected, fresh, strict=True))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"batch_size": 2}, "needs at least one tensor"),
        ((torch.zeros(3), torch.zeros(4)), {"batch_size": 2}, "same length in dim 0"),
        ((torch.zeros(3), [1, 2, 3]), {"batch_size": 2}, r"'tensors\[1\]' must be a tensor"),
        ((torch.zeros(3),), {"batch_size": 0}, "'batch_size' must be an int >= 1"),
        ((torch.zeros(3),), {"batch_size": 2, "generator": 3}, "'generator' must be"),
    ],
)
def test_bad_arguments_are_named(args: tuple, kwargs: dict, message: str) -> None:
    """Mismatched lengths, non-tensors, bad batch sizes and generators are named."""
    with pytest.raises((TypeError, ValueError), match=message):
        ft.TensorLoader(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_give_cuda_batches() -> None:
    """CUDA tensors give CUDA batches, shuffled too."""
    x, y = _data(20, 0)
    on_gpu = ft.TensorLoader(x.cuda(), y.cuda(), batch_size=8, shuffle=True)
    assert all(t.is_cuda for batch in on_gpu for t in batch)


@FAST
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6), kind=st.sampled_from([list, tuple])
)
def test_concat_joins_per_batch_lists_of_names_into_one_list(sizes: list[int], kind: type) -> None:
    """Per-batch lists or tuples of str/int ids (file names) become one list in loader order."""
    names = [f"img{i}.png" for i in range(sum(sizes))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = [kind(names[start : start + n]) for start, n in zip(starts, sizes, strict=True)]
    assert concat(parts) == names
    assert concat(
        [kind(range(start, start + n)) for start, n in zip(starts, sizes, strict=True)]
    ) == list(range(sum(sizes)))
    nested = concat([(torch.zeros(len(part)), part) for part in parts])  # default_collate's shape
    assert isinstance(nested, tuple) and nested[0].shape == (sum(sizes),) and nested[1] == names


def test_concat_of_tensors_of_other_lengths_names_predict_and_padding() -> None:
    """Outputs of (4, 7) then (4, 9) get an error naming predict, padding and forward=."""
    message = r"predict.*\(4, 7\) in batch 0 but \(4, 9\) in batch 1.*pad.*forward="
    with pytest.raises(ValueError, match=message):
        concat([torch.zeros(4, 7), torch.zeros(4, 9)])
    with pytest.raises(ValueError, match=r"\(2, 3, 5\) in batch 2"):
        concat([{"x": torch.zeros(2, 3, 4)}] * 2 + [{"x": torch.zeros(2, 3, 5)}])
