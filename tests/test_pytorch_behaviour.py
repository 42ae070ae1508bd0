"""Executable documentation of the PyTorch behaviours that training tutorials rely on.

Each test states one property of PyTorch itself (not of fntrain) in its docstring and fails
if that property stops holding: how ``train()``/``eval()`` change BatchNorm and Dropout, what
``torch.no_grad``/``torch.inference_mode`` do and do not do, where ``zero_grad`` may go in a
training loop, how ``CrossEntropyLoss`` (with and without label smoothing) is defined, which
gradients ``optimizer.zero_grad()`` and ``model.zero_grad()`` clear, and why an epoch loss must
be averaged per sample rather than per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

SETTINGS = settings(max_examples=25, deadline=None)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)

BatchList = list[tuple[Tensor, Tensor]]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global CPU RNG for the duration of the block, then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Clone every BatchNorm buffer (running_mean, running_var, num_batches_tracked)."""
    return {
        name: buf.detach().clone()
        for name, buf in model.named_buffers()
        if name.rsplit(".", 1)[-1] in {"running_mean", "running_var", "num_batches_tracked"}
    }


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def small_bn_model(features: int, two_d: bool) -> nn.Module:
    if two_d:
        return nn.Sequential(nn.Conv2d(3, features, 3, padding=1), nn.BatchNorm2d(features))
    return nn.Sequential(nn.Linear(5, features), nn.BatchNorm1d(features))


def small_bn_input(batch: int, size: int, two_d: bool, gen: torch.Generator) -> Tensor:
    shape = (batch, 3, size, size) if two_d else (batch, 5)
    return 3.0 * torch.randn(shape, generator=gen) + 2.0


def mlp(seed: int, dropout: float = 0.0) -> nn.Sequential:
    with seeded(seed):
        return nn.Sequential(
            nn.Linear(6, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(16, 4),
        )


def make_batches(seed: int, n_batches: int = 5, batch: int = 8) -> BatchList:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 6, generator=gen), torch.randint(0, 4, (batch,), generator=gen))
        for _ in range(n_batches)
    ]


def make_optimizer(name: str, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=1e-2)


def train_weights(
    placement: str, optimizer_name: str, seed: int, batches: BatchList
) -> list[Tensor]:
    """Train a fresh model with ``zero_grad`` at ``placement`` and return its final parameters.

    ``placement`` is ``"loop_start"``, ``"before_backward"`` or ``"after_step"``; any other value
    never calls ``zero_grad``, so gradients accumulate across steps.
    """
    model = mlp(seed)
    optimizer = make_optimizer(optimizer_name, model.parameters())
    for x, y in batches:
        if placement == "loop_start":
            optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if placement == "before_backward":
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if placement == "after_step":
            optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def tiny_resnet() -> nn.Module:
    with seeded(0):
        return torchvision.models.resnet18(weights=None, num_classes=7)


def tiny_images(seed: int) -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- BatchNorm -------------------------------------------------------------------------------


@SETTINGS
@given(
    batch=st.integers(2, 8),
    features=st.integers(1, 6),
    size=st.integers(1, 4),
    two_d=st.booleans(),
    seed=SEEDS,
)
def test_eval_mode_leaves_batchnorm_running_stats_bit_identical(
    batch: int, features: int, size: int, two_d: bool, seed: int
) -> None:
    """Eval-mode forward passes leave running_mean, running_var and num_batches_tracked as is."""
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = small_bn_model(features, two_d)
    model.train()
    model(small_bn_input(batch, size, two_d, gen))
    before = bn_buffers(model)
    assert before and int(before["1.num_batches_tracked"]) == 1

    model.eval()
    for _ in range(3):
        model(small_bn_input(batch, size, two_d, gen))

    after = bn_buffers(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@SETTINGS
@given(
    batch=st.integers(2, 8),
    features=st.integers(1, 6),
    size=st.integers(1, 4),
    two_d=st.booleans(),
    seed=SEEDS,
)
def test_train_mode_updates_batchnorm_running_stats(
    batch: int, features: int, size: int, two_d: bool, seed: int
) -> None:
    """A train-mode forward pass changes running_mean and running_var and increments the count."""
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = small_bn_model(features, two_d)
    model.train()
    before = bn_buffers(model)
    model(small_bn_input(batch, size, two_d, gen))
    after = bn_buffers(model)

    assert not torch.equal(before["1.running_mean"], after["1.running_mean"])
    assert not torch.equal(before["1.running_var"], after["1.running_var"])
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1


@SETTINGS
@given(batch=st.integers(2, 6), features=st.integers(1, 6), seed=SEEDS)
def test_eval_mode_batchnorm_output_does_not_depend_on_the_rest_of_the_batch(
    batch: int, features: int, seed: int
) -> None:
    """In eval mode a sample's BatchNorm output is the same alone as inside a batch."""
    gen = torch.Generator().manual_seed(seed)
    with seeded(seed):
        model = small_bn_model(features, two_d=False)
    model.train()
    model(small_bn_input(batch, 1, False, gen))
    x = small_bn_input(batch, 1, False, gen)

    model.eval()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(batch)])
    torch.testing.assert_close(together, alone)

    model.train()
    with torch.no_grad():
        together_train = model(x)
    assert not torch.allclose(together_train, together)


def test_resnet18_eval_mode_leaves_batchnorm_running_stats_bit_identical() -> None:
    """Eval-mode forward passes through resnet18 leave every BatchNorm buffer bit-identical."""
    model = tiny_resnet()
    model.train()
    model(tiny_images(0))
    before = bn_buffers(model)
    assert len(before) == 3 * len(batchnorm_modules(model)) == 3 * 20

    model.eval()
    for seed in (1, 2):
        model(tiny_images(seed))

    after = bn_buffers(model)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_resnet18_train_mode_updates_every_batchnorm_running_stat() -> None:
    """One train-mode forward pass through resnet18 updates the running stats of every BatchNorm."""
    model = tiny_resnet()
    model.train()
    before = bn_buffers(model)
    model(tiny_images(0))
    after = bn_buffers(model)

    for name in before:
        if name.endswith("num_batches_tracked"):
            assert int(after[name]) == int(before[name]) + 1, name
        else:
            assert not torch.equal(before[name], after[name]), name


# --- Dropout ---------------------------------------------------------------------------------


@SETTINGS
@given(
    p=st.floats(0.1, 0.9),
    shape=st.tuples(st.integers(1, 4), st.integers(512, 1024)),
    seed=SEEDS,
)
def test_dropout_is_the_identity_in_eval_mode(p: float, shape: tuple[int, int], seed: int) -> None:
    """In eval mode Dropout returns its input unchanged, whatever p is."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    drop = nn.Dropout(p).eval()
    with seeded(seed):
        assert torch.equal(drop(x), x)


@SETTINGS
@given(
    p=st.floats(0.1, 0.9),
    shape=st.tuples(st.integers(1, 4), st.integers(512, 1024)),
    seed=SEEDS,
)
def test_dropout_in_train_mode_zeroes_at_random_and_rescales_by_one_over_keep(
    p: float, shape: tuple[int, int], seed: int
) -> None:
    """In train mode Dropout zeroes random elements and multiplies the kept ones by 1/(1-p)."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    drop = nn.Dropout(p).train()
    with seeded(seed):
        first = drop(x)
    with seeded(seed + 1):
        second = drop(x)

    kept = first != 0
    assert (~kept).any()
    assert kept.any()
    torch.testing.assert_close(first[kept], x[kept] / (1 - p))
    assert not torch.equal(first, second)


# --- Autograd: no_grad, inference_mode, eval, requires_grad ----------------------------------


def test_no_grad_builds_no_graph_and_leaves_parameters_without_grad() -> None:
    """Under torch.no_grad() outputs carry no graph, backward raises, and no .grad appears."""
    model = mlp(0)
    x, y = make_batches(0, n_batches=1)[0]
    with torch.no_grad():
        out = model(x)
        loss = F.cross_entropy(out, y)

    assert not out.requires_grad and out.grad_fn is None
    assert not loss.requires_grad and loss.grad_fn is None
    with pytest.raises(RuntimeError):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_no_grad_as_a_decorator_behaves_like_the_context_manager() -> None:
    """A function decorated with @torch.no_grad() returns graph-free outputs, then restores grad."""
    model = mlp(0)
    x = make_batches(0, n_batches=1)[0][0]

    @torch.no_grad()
    def predict(inputs: Tensor) -> Tensor:
        return model(inputs)

    out = predict(x)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.is_grad_enabled()
    assert model(x).requires_grad


def test_inference_mode_outputs_are_inference_tensors_unusable_in_autograd() -> None:
    """torch.inference_mode() yields inference tensors, which autograd refuses to save later."""
    model = mlp(0).eval()
    x = make_batches(0, n_batches=1)[0][0]
    with torch.inference_mode():
        out = model(x)
    with torch.no_grad():
        plain = model(x)

    assert out.is_inference() and not out.requires_grad
    assert not plain.is_inference()
    with pytest.raises(RuntimeError):
        nn.Linear(4, 2)(out)
    nn.Linear(4, 2)(plain).sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_eval_mode_alone_does_not_stop_gradients(dropout: float) -> None:
    """model.eval() leaves autograd on: outputs still require grad and backward fills .grad."""
    model = mlp(0, dropout=dropout).eval()
    x, y = make_batches(0, n_batches=1)[0]
    out = model(x)
    assert out.requires_grad and out.grad_fn is not None

    F.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_parameters_with_requires_grad_false_get_no_grad_and_are_not_stepped() -> None:
    """Parameters frozen by requires_grad_(False) get no .grad and an optimizer step skips them."""
    model = mlp(0)
    frozen = model[0]
    frozen.requires_grad_(False)
    frozen_before = [p.detach().clone() for p in frozen.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)

    x, y = make_batches(0, n_batches=1)[0]
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None for p in model[4].parameters())

    optimizer.step()
    for before, p in zip(frozen_before, frozen.parameters(), strict=True):
        assert torch.equal(before, p)


# --- Where zero_grad goes --------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(seed=SEEDS, optimizer_name=st.sampled_from(["sgd_momentum", "adam"]))
def test_zero_grad_placements_give_bit_identical_weights(seed: int, optimizer_name: str) -> None:
    """zero_grad at loop start, just before backward, or after step trains to identical weights."""
    batches = make_batches(seed)
    reference = train_weights("loop_start", optimizer_name, seed, batches)
    for placement in ("before_backward", "after_step"):
        weights = train_weights(placement, optimizer_name, seed, batches)
        for ref, w in zip(reference, weights, strict=True):
            assert torch.equal(ref, w), placement

    never_zeroed = train_weights("never", optimizer_name, seed, batches)
    assert not all(torch.equal(r, w) for r, w in zip(reference, never_zeroed, strict=True))


# --- CrossEntropyLoss ------------------------------------------------------------------------


@SETTINGS
@given(batch=st.integers(1, 16), classes=st.integers(2, 10), seed=SEEDS)
def test_cross_entropy_equals_log_softmax_then_nll(batch: int, classes: int, seed: int) -> None:
    """CrossEntropyLoss on logits equals NLLLoss applied to log_softmax of the logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = 4.0 * torch.randn(batch, classes, generator=gen)
    target = torch.randint(0, classes, (batch,), generator=gen)

    for reduction in ("mean", "sum", "none"):
        ce = nn.CrossEntropyLoss(reduction=reduction)(logits, target)
        nll = nn.NLLLoss(reduction=reduction)(F.log_softmax(logits, dim=1), target)
        torch.testing.assert_close(ce, nll)


def smoothed_targets(target: Tensor, classes: int, eps: float) -> Tensor:
    """PyTorch's smoothed target distribution: (1 - eps) * one_hot + eps / C."""
    return (1 - eps) * F.one_hot(target, classes).to(torch.float32) + eps / classes


def tutorial_smoothed_targets(target: Tensor, classes: int, eps: float) -> Tensor:
    """The other common convention: 1 - eps on the target and eps / (C - 1) everywhere else."""
    one_hot = F.one_hot(target, classes).to(torch.float32)
    return (1 - eps) * one_hot + eps / (classes - 1) * (1 - one_hot)


def soft_cross_entropy(logits: Tensor, q: Tensor) -> Tensor:
    return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@SETTINGS
@given(
    eps=st.floats(0.0, 1.0, exclude_max=True),
    batch=st.integers(1, 16),
    classes=st.integers(2, 10),
    seed=SEEDS,
)
def test_label_smoothing_mixes_one_hot_with_uniform_over_all_classes(
    eps: float, batch: int, classes: int, seed: int
) -> None:
    """CrossEntropyLoss(label_smoothing=eps) is cross-entropy against (1-eps)*one_hot + eps/C."""
    gen = torch.Generator().manual_seed(seed)
    logits = 4.0 * torch.randn(batch, classes, generator=gen)
    target = torch.randint(0, classes, (batch,), generator=gen)

    loss = nn.CrossEntropyLoss(label_smoothing=eps)(logits, target)
    q = smoothed_targets(target, classes, eps)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(batch))
    torch.testing.assert_close(loss, soft_cross_entropy(logits, q))


@SETTINGS
@given(
    eps=st.floats(0.05, 0.95),
    batch=st.integers(1, 16),
    classes=st.integers(2, 10),
    seed=SEEDS,
)
def test_label_smoothing_is_not_the_eps_over_c_minus_one_convention(
    eps: float, batch: int, classes: int, seed: int
) -> None:
    """For eps > 0 PyTorch's smoothed loss differs from the 1-eps / eps/(C-1) target convention."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch,), generator=gen)
    logits = torch.randn(batch, classes, generator=gen) + 3.0 * F.one_hot(target, classes)

    loss = nn.CrossEntropyLoss(label_smoothing=eps)(logits, target)
    tutorial = soft_cross_entropy(logits, tutorial_smoothed_targets(target, classes, eps))
    assert not torch.allclose(loss, tutorial)


# --- model.zero_grad() vs optimizer.zero_grad() ----------------------------------------------


def partial_optimizer_setup() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A model with gradients on every parameter and an optimizer that holds only the head."""
    model = mlp(0)
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.1)
    x, y = make_batches(0, n_batches=1)[0]
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    return model, optimizer


def test_optimizer_zero_grad_only_clears_the_parameters_it_holds() -> None:
    """optimizer.zero_grad() sets its own parameters' .grad to None and leaves the others intact."""
    model, optimizer = partial_optimizer_setup()
    head = {id(p) for p in model[4].parameters()}
    body_grads_before = {
        name: p.grad.clone()
        for name, p in model.named_parameters()
        if id(p) not in head and p.grad is not None
    }
    assert len(body_grads_before) == len(list(model.parameters())) - len(head) > 0

    optimizer.zero_grad()

    for name, p in model.named_parameters():
        if id(p) in head:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
            assert torch.equal(p.grad, body_grads_before[name]), name


def test_model_zero_grad_clears_every_parameter() -> None:
    """model.zero_grad() sets .grad to None on every parameter, held by the optimizer or not."""
    model, _ = partial_optimizer_setup()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_zero_grad_with_set_to_none_false_keeps_zero_tensors() -> None:
    """zero_grad(set_to_none=False) leaves .grad as zero tensors instead of None."""
    model, _ = partial_optimizer_setup()
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, torch.zeros_like(p))


# --- Averaging the loss over an epoch --------------------------------------------------------


@SETTINGS
@given(
    batch_size=st.integers(2, 16),
    full_batches=st.integers(1, 3),
    data=st.data(),
    seed=SEEDS,
)
def test_epoch_loss_must_be_weighted_by_batch_size_when_the_last_batch_is_short(
    batch_size: int, full_batches: int, data: st.DataObject, seed: int
) -> None:
    """With a short last batch, the mean of batch means differs from the sample-weighted mean."""
    remainder = data.draw(st.integers(1, batch_size - 1), label="remainder")
    n_samples = full_batches * batch_size + remainder

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, 6, generator=gen)
    y = torch.randint(0, 4, (n_samples,), generator=gen)
    model = mlp(seed).eval()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)

    batch_means: list[float] = []
    weighted_sum = 0.0
    with torch.no_grad():
        for xb, yb in loader:
            batch_loss = F.cross_entropy(model(xb), yb).item()
            batch_means.append(batch_loss)
            weighted_sum += batch_loss * len(yb)
        whole = F.cross_entropy(model(x), y).item()

    assert len(batch_means) == math.ceil(n_samples / batch_size)
    per_sample = weighted_sum / n_samples
    per_batch = sum(batch_means) / len(batch_means)
    assert per_sample == pytest.approx(whole, rel=1e-5, abs=1e-6)
    assert per_batch != pytest.approx(whole, rel=1e-5, abs=1e-6)
