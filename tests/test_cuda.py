"""CUDA paths: no host sync per batch, the on-device non-finite check, fp16, pinned loading.

Skipped without a CUDA device. Syncs are counted with ``torch.cuda.set_sync_debug_mode``
("warn" issues one warning per synchronizing call): a pass over twice the batches must
not sync more often than a pass over the batches once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import fntrain as ft
from tests.helpers import hand_train_epoch, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``n`` batches of 16 samples already on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=gen).cuda(), torch.randint(0, 3, (16,), generator=gen).cuda())
        for _ in range(n)
    ]


def _syncs(run: Callable[[], Any]) -> int:
    """Return how many synchronizing CUDA calls ``run`` made."""
    run()  # warm up: the first pass allocates and may sync for reasons of its own
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing" in str(w.message) for w in caught)


def _model() -> nn.Module:
    return mlp(4, 3, 0, dropout=0.1).to(_device())


def test_evaluate_makes_no_host_sync_per_batch() -> None:
    """evaluate's loss and metric sums stay on the GPU until the pass ends."""
    model, loss = _model(), nn.CrossEntropyLoss()
    metrics = {"acc": ft.accuracy(), "top2": ft.top_k_accuracy(2)}

    def passes(n: int) -> int:
        data = _batches(n)
        return _syncs(lambda: ft.evaluate(model, data, loss, _device(), metrics=metrics))

    assert passes(8) == passes(4)


@pytest.mark.parametrize("fused", [False, True])
def test_the_default_check_syncs_once_per_batch(fused: bool) -> None:
    """on_nonfinite='raise' reads the loss before each step: one sync per batch, no more."""
    model, loss = _model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused or None)

    def passes(n: int) -> int:
        data = _batches(n)
        return _syncs(lambda: ft.train_epoch(model, data, loss, opt, _device()))

    assert passes(8) - passes(4) == 4


def test_a_shuffled_tensor_loader_on_the_gpu_makes_no_host_sync() -> None:
    """TensorLoader over CUDA tensors gathers on the GPU without waiting for it."""
    x, y = torch.randn(4096, 4).cuda(), torch.randint(0, 3, (4096,)).cuda()

    def passes(batch_size: int) -> int:
        data = ft.TensorLoader(x, y, batch_size=batch_size, shuffle=True)
        return _syncs(lambda: [b[0].sum() for b in data])

    assert passes(16) == passes(32) == 0


@pytest.mark.parametrize("fused", [True, False])
def test_a_nan_batch_on_the_gpu_leaves_the_model_as_after_the_last_good_batch(
    fused: bool,
) -> None:
    """Fused or foreach AdamW: the error names the batch; weights and buffers are as before it."""
    good = _batches(5, seed=1)
    bad = (torch.full_like(good[2][0], float("nan")), good[2][1])
    reference, model = _model(), _model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=fused)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    torch.manual_seed(0)
    hand_train_epoch(reference, good[:2], nn.CrossEntropyLoss(), ref_opt, _device())
    torch.manual_seed(0)
    with pytest.raises(ft.NonFiniteLossError, match="batch 2") as caught:
        ft.train_epoch(
            model, [*good[:2], bad, *good[3:]], nn.CrossEntropyLoss(), opt, _device(),
        )  # fmt: skip
    assert caught.value.batch_index == 2 and math.isnan(caught.value.loss)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ref_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_train_epoch_on_the_gpu_is_bit_identical_to_the_hand_written_loop() -> None:
    """The tutorial identity holds on CUDA too, with a fused optimizer."""
    data = _batches(6, seed=2)
    reference, model = _model(), _model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    torch.manual_seed(3)
    expected = hand_train_epoch(reference, data, nn.CrossEntropyLoss(), ref_opt, _device())
    torch.manual_seed(3)
    result = ft.train_epoch(model, data, nn.CrossEntropyLoss(), opt, _device())
    assert result.loss == pytest.approx(expected, rel=1e-6)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_predict_and_evaluate_keep_no_activations_across_batches() -> None:
    """Peak GPU memory of a pass does not grow with the number of batches."""
    model = nn.Sequential(nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 8)).to(_device())
    loss = nn.CrossEntropyLoss()

    def peak(n: int, run: Callable[[list[Any]], Any]) -> int:
        gen = torch.Generator().manual_seed(0)
        data = [
            (torch.randn(512, 256, generator=gen), torch.randint(0, 8, (512,), generator=gen))
            for _ in range(n)
        ]
        run(data)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(data)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def evaluate(data: list[Any]) -> Any:
        return ft.evaluate(model, data, loss, _device(), metrics={"acc": ft.accuracy()})

    def predict(data: list[Any]) -> Any:
        return ft.predict(model, data, _device())

    assert peak(8, evaluate) == peak(2, evaluate)
    assert peak(8, predict) == peak(2, predict)


def test_a_checkpoint_saved_on_the_gpu_loads_on_the_cpu(tmp_path: Any) -> None:
    """map_location='cpu': weights and Adam state written on CUDA load into CPU objects."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ft.train_epoch(model, _batches(3), nn.CrossEntropyLoss(), opt, _device())
    ft.save_checkpoint(tmp_path / "gpu.pt", model, opt, epoch=4)
    on_cpu = mlp(4, 3, 1, dropout=0.1)
    cpu_opt = torch.optim.Adam(on_cpu.parameters(), lr=1e-2)
    ckpt = ft.load_checkpoint(
        tmp_path / "gpu.pt", on_cpu, cpu_opt, map_location="cpu", restore_rng=False
    )
    assert ckpt.epoch == 4
    for a, b in zip(model.state_dict().values(), on_cpu.state_dict().values(), strict=True):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b)
    for state in cpu_opt.state.values():
        assert all(t.device.type == "cpu" for t in state.values() if torch.is_tensor(t))
    result = ft.evaluate(on_cpu, [(x.cpu(), y.cpu()) for x, y in _batches(2)],
                         nn.CrossEntropyLoss(), "cpu")  # fmt: skip
    assert math.isfinite(result.loss)


def test_metrics_on_the_gpu_equal_the_same_metrics_on_the_cpu() -> None:
    """Parts summed on the GPU reach compute in state order: the CPU's values, exactly.

    The counts of ``accuracy`` are summed on the device and its sample count on the host;
    once they reached compute swapped, and accuracy on CUDA came out above 1.
    """
    vector_first = ft.Metric(
        state=lambda out, y: (torch.bincount(y, minlength=3), y.numel()),
        compute=lambda total: total[0].double() / total[1],
    )
    metrics = {"acc": ft.accuracy(), "top2": ft.top_k_accuracy(2), "share": vector_first}
    model = _model()
    data = _batches(5, seed=4)
    on_gpu = ft.evaluate(model, data, nn.CrossEntropyLoss(), _device(), metrics=metrics)
    model.cpu()
    cpu_data = [(x.cpu(), y.cpu()) for x, y in data]
    on_cpu = ft.evaluate(model, cpu_data, nn.CrossEntropyLoss(), "cpu", metrics=metrics)
    assert 0.0 <= on_gpu.metrics["acc"] <= 1.0
    assert on_gpu.metrics["acc"] == on_cpu.metrics["acc"]
    assert on_gpu.metrics["top2"] == on_cpu.metrics["top2"]
    assert torch.equal(on_gpu.metrics["share"], on_cpu.metrics["share"])
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-5)
