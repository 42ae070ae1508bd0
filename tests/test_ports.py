"""Five tutorials' training and validation code ported to fntrain, each run against a hand loop."""

from __future__ import annotations

import copy
import inspect
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import classification_report
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from torchmetrics.classification import MulticlassConfusionMatrix

import fntrain as ft
from tests.helpers import assert_bit_identical, hand_train_epoch, loader, mlp, snapshot

CPU = torch.device("cpu")
SEEDS = Path("/work/shared/seeds")  # the tutorials; only on the machine the ports were written on

# Seed -> (original_lines, port_lines). original_lines: the non-blank lines (comments included,
# as the tutorial wrote them) of the seed's ``` code-block lines that the port replaces, listed
# in SEED_LINES; port_lines: the non-blank, non-comment lines of port_NNN between its BEGIN and
# END markers. test_port_line_counts_match_the_port_functions keeps port_lines honest,
# test_original_line_counts_match_the_seed_code_blocks the originals (where the seeds exist).
PORT_LINES: dict[str, tuple[int, int]] = {
    "000": (33, 13),
    "001": (59, 19),
    "002": (0, 14),
    "003": (82, 42),
    "004": (24, 3),
}

# Which lines of each seed file (1-based, inclusive ranges) the ports replace; every range lies
# inside one ``` block ("block N": the Nth fenced block of the file, from 1, indented fences
# included). Where a block repeats the basic loop around a feature (label smoothing,
# mixup), only the feature's lines count; of the scheduler block only the warmup used here.
SEED_LINES: dict[str, tuple[tuple[int, int], ...]] = {
    "000": (
        (74, 87),  # block 9 ``def train(epoch):``, whole
        (93, 105),  # block 10 ``def val(epoch):``, whole
        (110, 116),  # block 11 ``from sklearn.metrics import classification_report``, whole
    ),
    "001": (
        (179, 230),  # block 4 ``def train(train_loader, val_loader, model):`` (train_val), whole
        (234, 253),  # block 5 ``def test(test_loader, model, device):`` + reload, whole
    ),
    "002": (),  # prose only: the seed has no code block (its train.py is not in it)
    "003": (
        (28, 50),  # block 2 (2) basic loop ``# Loss and optimizer``, whole
        (56, 71),  # block 3 (2.1) ``# Test the model``, whole
        (181, 188),  # block 6 (3) in-loop label smoothing: ``N = ...`` to ``loss = ...``
        (197, 197),  # block 7 (4) mixup: ``beta_distribution = ...``
        (201, 209),  # block 7 (4) mixup: ``# Mixup images.`` to the mixed loss
        (247, 251),  # block 10 (7) no weight decay on biases, whole
        (257, 257),  # block 11 (8) ``clip_grad_norm_``, whole
        (353, 354),  # block 17 (13) ``# Learning rate warmup ...`` and its LambdaLR
        (356, 356),  # block 17 (13) the warmup's ``scheduler.step()``
        (385, 408),  # block 19 (14) save and load checkpoint, whole
    ),
    "004": ((92, 122),),  # block 4 ``from tqdm import tqdm`` + ``def valid(...)``, whole
}

BEGIN, END = "# ---- PORT BEGINS ----", "# ---- PORT ENDS ----"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each test on one thread: its tensors are tiny, and threads contend on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Return scikit-learn's digits split 1200/300/297 into train, validation and test sets."""
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16
    targets = torch.tensor(digits.target)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    parts = order.split([1200, 300, len(targets) - 1500])
    train, val, test = (TensorDataset(inputs[part], targets[part]) for part in parts)
    return train, val, test


def _hand_validate(
    model: nn.Module, batches: DataLoader[Any], criterion: Callable[..., torch.Tensor]
) -> tuple[float, float, torch.Tensor]:
    """Validate the tutorial way; return the sample-weighted loss, accuracy and all outputs."""
    model.eval()
    total, correct, samples, outputs = 0.0, 0, 0, []
    with torch.no_grad():
        for data, label in batches:
            output = model(data)
            total += criterion(output, label).item() * data.size(0)
            correct += int((output.argmax(1) == label).sum())
            samples += data.size(0)
            outputs.append(output)
    return total / samples, correct / samples, torch.cat(outputs)


def _numbers(text: str, label: str) -> list[float]:
    """Return the numbers printed after ``label`` in ``text``, in order."""
    return [float(found) for found in re.findall(rf"{label}\s*(-?[0-9.]+(?:e-?\d+)?)", text)]


def _same_optimizer_state(one: torch.optim.Optimizer, other: torch.optim.Optimizer) -> None:
    """Assert two optimizers hold bit-identical states and the same hyperparameters."""
    first, second = one.state_dict(), other.state_dict()
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys()
    for index, entry in first["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, second["state"][index][name]), (index, name)


# --- 000: train(epoch) and val(epoch) printing the losses; a classification report ---------


def port_000(
    model: nn.Module,
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epochs: int,
    class_names: list[str],
) -> str:
    """Train and validate for ``epochs``; return the last validation's classification report."""
    # ---- PORT BEGINS ----
    classes = len(class_names)
    metrics = {"acc": ft.accuracy(), "confusion": MulticlassConfusionMatrix(num_classes=classes)}
    for epoch in range(epochs):
        tr = ft.train_epoch(model, train_loader, criterion, optimizer, device)
        print(f"Epoch: {epoch} \tTraining Loss: {tr.loss:.6f}")
        ev = ft.evaluate(model, val_loader, criterion, device, metrics=metrics)
        print(
            f"Epoch: {epoch} \tValidation Loss: {ev.loss:.6f} \tAccuracy: {ev.metrics['acc']:.6f}"
        )
    # One evaluate pass gave the confusion matrix; (true, predicted) pairs rebuilt from it:
    pairs = torch.arange(classes * classes).repeat_interleave(ev.metrics["confusion"].flatten())
    return classification_report(
        (pairs // classes).numpy(), (pairs % classes).numpy(), target_names=class_names
    )
    # ---- PORT ENDS ----


def test_port_000_trains_like_the_hand_loop_and_reports_like_sklearn(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Port 000 trains bit-identically, prints true losses and gives sklearn's report."""
    train, val, _ = _digits()
    names = [f"digit {c}" for c in range(10)]
    criterion = nn.CrossEntropyLoss()
    runs = {}
    for run in ("hand", "port"):
        model = mlp(64, 10, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(1)  # dropout
        train_loader = loader(train, batch_size=64, seed=2)  # 1200 = 18 * 64 + 48: uneven
        val_loader = loader(val, batch_size=64)
        if run == "hand":
            losses = []
            for _ in range(3):
                losses.append(hand_train_epoch(model, train_loader, criterion, optimizer, CPU))
                losses.append(_hand_validate(model, val_loader, criterion)[0])
        else:
            report = port_000(model, train_loader, val_loader, criterion, optimizer, CPU, 3, names)
        runs[run] = (model, optimizer)
    printed = capsys.readouterr().out
    assert_bit_identical(snapshot(runs["hand"][0]), snapshot(runs["port"][0]))
    _same_optimizer_state(runs["hand"][1], runs["port"][1])
    shown = [float(x) for x in re.findall(r"(?:Training|Validation) Loss: (\S+)", printed)]
    assert shown == pytest.approx(losses, abs=1.5e-6)
    predictions = ft.predict(runs["port"][0], val_loader, CPU)
    expected = classification_report(
        predictions.targets.numpy(), predictions.outputs.argmax(1).numpy(), target_names=names
    )
    assert report == expected
    assert "digit 9" in report and "accuracy" in report


# --- 001: train_val keeping the best model by validation accuracy; test() predicts ----------


def port_001(
    model: nn.Module,
    make_model: Callable[[], nn.Module],
    train_loader: DataLoader[Any],
    val_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    num_epoch: int,
    model_path: Path,
) -> list[int]:
    """Train, keep the best model by validation accuracy, reload it and predict the test set."""
    # ---- PORT BEGINS ----
    metrics = {"acc": ft.accuracy()}
    best_acc = 0.0
    for epoch in range(num_epoch):
        tr = ft.train_epoch(model, train_loader, loss, optimizer, device, metrics=metrics)
        ev = ft.evaluate(model, val_loader, loss, device, metrics=metrics)
        print(
            f"[{epoch + 1:03d}/{num_epoch:03d}]",
            f"Train Acc: {tr.metrics['acc']:3.6f}",
            f"Loss: {tr.loss:3.6f}",
            f"| Val Acc: {ev.metrics['acc']:3.6f}",
            f"loss: {ev.loss:3.6f}",
        )
        if ev.metrics["acc"] > best_acc:  # the model improved: keep this epoch's weights
            best_acc = ev.metrics["acc"]
            ft.save_checkpoint(model_path, model, epoch=epoch, metrics=ev.metrics)
            print(f"saving model with acc {best_acc:.3f}")
    # Reload the best model and predict:
    model = make_model().to(device)
    ft.load_checkpoint(model_path, model, map_location=device)
    return ft.predict(model, test_loader, device).outputs.argmax(1).tolist()
    # ---- PORT ENDS ----


class _LastPassMislabelled:
    """Yield a loader's batches; on pass ``last`` (from 1), with every label moved to the next."""

    def __init__(self, batches: DataLoader[Any], last: int, classes: int) -> None:
        self.batches, self.last, self.classes, self.passes = batches, last, classes, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.passes += 1
        for x, y in self.batches:
            yield x, (y + 1) % self.classes if self.passes == self.last else y


def test_port_001_keeps_and_restores_the_best_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Port 001 predicts with the best validation epoch's weights, not the last epoch's."""
    train, val, test = _digits()
    loss = nn.CrossEntropyLoss()
    epochs = 4  # the last one trains on wrong labels: it cannot be the best
    for run in ("hand", "port"):
        model = mlp(64, 10, seed=3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(4)
        train_loader = _LastPassMislabelled(loader(train, batch_size=64, seed=5), epochs, 10)
        val_loader = loader(val, batch_size=64)
        test_loader = DataLoader(test.tensors[0], batch_size=64)  # bare inputs, as in test()
        if run == "hand":
            best, accs, train_losses, batch_means = None, [], [], []
            for epoch in range(epochs):
                batch_losses, sizes = [], []
                model.train()
                for x, y in train_loader:  # the tutorial's order: step, then zero_grad
                    batch_loss = loss(model(x), y)
                    batch_losses.append(batch_loss.item())
                    sizes.append(len(y))
                    batch_loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                train_losses.append(sum(map(float.__mul__, batch_losses, sizes)) / sum(sizes))
                batch_means.append(sum(batch_losses) / len(batch_losses))  # the tutorial's
                accs.append(_hand_validate(model, val_loader, loss)[1])
                if best is None or accs[-1] > accs[best]:
                    best, best_state = epoch, copy.deepcopy(model.state_dict())
            last_state = snapshot(model, grads=False)
            model.load_state_dict(best_state)
            model.eval()
            with torch.no_grad():
                expected = [int(p) for x in test_loader for p in model(x).argmax(1)]
        else:
            path = tmp_path / "model.ckpt"
            predicted = port_001(
                model,
                lambda: mlp(64, 10, seed=99),
                train_loader,
                val_loader,
                test_loader,
                loss,
                optimizer,
                CPU,
                epochs,
                path,
            )
            assert_bit_identical(snapshot(model, grads=False), last_state)  # trained alike
    assert best is not None and best < epochs - 1  # the case this test is about
    assert not all(torch.equal(v, last_state[f"state:{k}"]) for k, v in best_state.items())
    assert predicted == expected
    kept = ft.load_checkpoint(path, mlp(64, 10, seed=99))
    assert kept.epoch == best and kept.metrics["acc"] == accs[best]
    printed = capsys.readouterr().out
    assert _numbers(printed, "Val Acc:") == pytest.approx(accs, abs=1e-6)
    assert printed.count("saving model with acc") == len(
        {max(accs[: i + 1]) for i in range(epochs)}
    )
    shown = _numbers(printed, "Loss:")  # the sample-weighted loss, not the mean of batch means
    assert shown == pytest.approx(train_losses, abs=1.5e-6)
    assert shown != pytest.approx(batch_means, abs=1.5e-6)


# --- 002: the train/test loop of the prose, with TensorBoard and a saved model per epoch -----


def port_002(
    model: nn.Module,
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    device: torch.device,
    epoch: int,
    log_dir: Path,
    save_dir: Path,
) -> None:
    """Train and test ``epoch`` times, logging to TensorBoard and saving the model each epoch."""
    # ---- PORT BEGINS ----
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    total_train_step = 0
    with SummaryWriter(log_dir) as writer:

        def log(step: ft.Step) -> None:  # after every optimizer step
            writer.add_scalar("train_loss", step.loss, total_train_step + step.index + 1)

        for i in range(epoch):
            tr = ft.train_epoch(model, train_loader, loss_fn, optimizer, device, on_step=log)
            total_train_step += tr.steps
            ev = ft.evaluate(model, test_loader, loss_fn, device, metrics={"acc": ft.accuracy()})
            print(f"epoch {i}: test loss {ev.loss}, test accuracy {ev.metrics['acc']}")
            writer.add_scalar("test_loss", ev.loss, i)
            writer.add_scalar("test_accuracy", ev.metrics["acc"], i)
            ft.save_checkpoint(save_dir / f"model_{i}.pt", model, optimizer, epoch=i)
    # ---- PORT ENDS ----


def test_port_002_logs_the_hand_loops_numbers_to_tensorboard(tmp_path: Path) -> None:
    """Port 002 trains bit-identically and logs each step's loss and each test to TensorBoard."""
    train, val, _ = _digits()
    epochs = 3
    models = {}
    for run in ("hand", "port"):
        model = mlp(64, 10, seed=6)
        torch.manual_seed(7)
        train_loader = loader(train, batch_size=32, seed=8)  # 1200 = 37 * 32 + 16
        test_loader = loader(val, batch_size=64)
        if run == "hand":
            loss_fn = nn.CrossEntropyLoss()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            step_losses, tests = [], []
            for _ in range(epochs):
                model.train()
                for images, targets in train_loader:
                    loss = loss_fn(model(images), targets)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    step_losses.append(loss.item())
                tests.append(_hand_validate(model, test_loader, loss_fn)[:2])
        else:
            port_002(model, train_loader, test_loader, CPU, epochs, tmp_path / "runs", tmp_path)
        models[run] = model
    assert_bit_identical(snapshot(models["hand"]), snapshot(models["port"]))
    logged = EventAccumulator(str(tmp_path / "runs"), size_guidance={"scalars": 0}).Reload()
    train_loss = logged.Scalars("train_loss")
    assert [event.step for event in train_loss] == list(range(1, len(step_losses) + 1))
    as_float32 = torch.tensor(step_losses, dtype=torch.float32).tolist()  # as TensorBoard keeps it
    assert [event.value for event in train_loss] == as_float32
    for tag, column in (("test_loss", 0), ("test_accuracy", 1)):
        events = logged.Scalars(tag)
        assert [event.step for event in events] == list(range(epochs))
        wanted = [test[column] for test in tests]
        assert [event.value for event in events] == pytest.approx(wanted, rel=1e-6)
    restored = mlp(64, 10, seed=99)
    assert ft.load_checkpoint(tmp_path / f"model_{epochs - 1}.pt", restored).epoch == epochs - 1
    assert_bit_identical(snapshot(restored, grads=False), snapshot(models["port"], grads=False))


# --- 003: the cookbook loop with label smoothing, mixup, no-bias weight decay, clipping,
# --- warmup, test accuracy and a resumable checkpoint {'best_acc', 'epoch', 'model', ...} ----


def port_003(
    model: nn.Module,
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    device: torch.device,
    num_epochs: int,
    num_classes: int,
    model_dir: Path,
    resume: bool,
    max_norm: float = 20,
) -> float:
    """Train with the cookbook's recipes, test each epoch, checkpoint; return the best accuracy."""
    # ---- PORT BEGINS ----
    # The tutorial's smoothed targets (0.9 on the label, 0.1 / (C - 1) elsewhere):
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1 * num_classes / (num_classes - 1))
    optimizer = torch.optim.SGD(ft.param_groups(model, weight_decay=1e-4), lr=1e-2, momentum=0.9)
    # Built before loading, so that its base lr is the configured one, not the loaded one.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 10))
    beta_distribution = torch.distributions.Beta(0.2, 0.2)

    def mixup(net: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        images, labels = batch
        lambda_ = beta_distribution.sample([]).item()
        index = torch.randperm(images.size(0), device=images.device)
        mixed_images = lambda_ * images + (1 - lambda_) * images[index, :]
        return net(mixed_images), (labels, labels[index], lambda_)

    def mixup_loss(
        scores: torch.Tensor, mixed: tuple[torch.Tensor, torch.Tensor, float]
    ) -> torch.Tensor:
        labels, shuffled, lambda_ = mixed
        return lambda_ * criterion(scores, labels) + (1 - lambda_) * criterion(scores, shuffled)

    def show(step: ft.Step) -> None:
        if (step.index + 1) % 100 == 0:
            print(
                f"Epoch: [{t + 1}/{num_epochs}], Step: [{step.index + 1}/{len(train_loader)}],",
                f"Loss: {step.loss}",
            )

    start_epoch, best_acc = 0, 0.0
    model_path = model_dir / "checkpoint.pth.tar"
    if resume:  # the tutorial's dict {'best_acc', 'epoch': t + 1, 'model', 'optimizer'} or ours
        checkpoint = ft.load_checkpoint(model_path, model, optimizer, map_location=device)
        start_epoch, best_acc = checkpoint.epoch, checkpoint.extra["best_acc"]
        scheduler.last_epoch = start_epoch  # the file's optimizer holds this epoch's lr already
        print(f"Load checkpoint at epoch {start_epoch}.")
    for t in range(start_epoch, num_epochs):
        ft.train_epoch(
            model, train_loader, mixup_loss, optimizer, device,
            forward=mixup, on_step=show, clip_grad_norm=max_norm,
        )  # fmt: skip
        scheduler.step()
        ev = ft.evaluate(model, test_loader, criterion, device, metrics={"acc": ft.accuracy()})
        current_acc = ev.metrics["acc"]
        print(f"Test accuracy of the model on the {ev.samples} test images: {100 * current_acc} %")
        is_best, best_acc = current_acc > best_acc, max(best_acc, current_acc)
        ft.save_checkpoint(model_path, model, optimizer, epoch=t + 1, extra={"best_acc": best_acc})
        if is_best:
            shutil.copy(model_path, model_dir / "model_best.pth.tar")
    return best_acc
    # ---- PORT ENDS ----


def _tutorial_smoothed_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the tutorial's in-loop label-smoothing loss (0.9 on the label)."""
    n, classes = scores.shape
    smoothed = torch.full((n, classes), 0.1 / (classes - 1))
    smoothed.scatter_(1, labels.unsqueeze(1), 0.9)
    return -torch.sum(nn.functional.log_softmax(scores, dim=1) * smoothed) / n


def _hand_003(
    model: nn.Module,
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any],
    num_epochs: int,
    save_after: int,
    path: Path,
) -> dict[str, Any]:
    """Run the cookbook loop by hand, saving the tutorial's checkpoint dict after ``save_after``."""
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1 * 10 / 9)
    decay = [p for p in model.parameters() if p.dim() > 1]  # weight matrices, not BN or biases
    rest = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 10))
    beta_distribution = torch.distributions.Beta(0.2, 0.2)
    best_acc, step_losses, accs, resume_at, norms = 0.0, [], [], {}, []
    for t in range(num_epochs):
        model.train()
        for i, (images, labels) in enumerate(train_loader):
            lambda_ = beta_distribution.sample([]).item()
            index = torch.randperm(images.size(0))
            mixed_images = lambda_ * images + (1 - lambda_) * images[index, :]
            scores = model(mixed_images)
            loss = lambda_ * criterion(scores, labels) + (1 - lambda_) * criterion(
                scores, labels[index]
            )
            optimizer.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)))
            optimizer.step()
            if (i + 1) % 100 == 0 and t >= save_after:
                step_losses.append(loss.item())
        scheduler.step()
        current_acc = _hand_validate(model, test_loader, criterion)[1]
        accs.append(current_acc)
        best_acc = max(best_acc, current_acc)
        if t + 1 == save_after:
            checkpoint = {
                "best_acc": best_acc,
                "epoch": t + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
            torch.save(checkpoint, path)
            resume_at = {"rng": torch.get_rng_state(), "loader": train_loader.generator.get_state()}
    found = {"step_losses": step_losses, "accs": accs, "largest_norm": max(norms)}
    return {"optimizer": optimizer, **found, **resume_at}


def test_port_003_resumes_a_tutorial_checkpoint_bit_identically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Port 003 resumes from the tutorial's own checkpoint dict and ends as the hand loop does."""
    train, val, _ = _digits()
    scores, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    smoothed = nn.CrossEntropyLoss(label_smoothing=0.1 * 10 / 9)(scores, labels)
    torch.testing.assert_close(smoothed, _tutorial_smoothed_loss(scores, labels))
    train = TensorDataset(*train[:800])  # batches of 8: 100 steps, a line at step 100
    epochs, save_after = 3, 1
    hand_dir, port_dir = tmp_path / "hand", tmp_path / "port"
    hand_dir.mkdir(), port_dir.mkdir()
    hand_model = mlp(64, 10, seed=9)
    torch.manual_seed(10)
    train_loader = loader(train, batch_size=8, seed=11)
    test_loader = loader(val, batch_size=64)
    hand = _hand_003(hand_model, train_loader, test_loader, epochs, save_after, hand_dir / "t.pt")
    saved = torch.load(hand_dir / "t.pt")  # the tutorial's format, read as fntrain reads it
    assert set(saved) == {"best_acc", "epoch", "model", "optimizer"}
    shutil.copy(hand_dir / "t.pt", port_dir / "checkpoint.pth.tar")
    read = ft.load_checkpoint(port_dir / "checkpoint.pth.tar", mlp(64, 10, seed=99))
    assert (read.epoch, read.extra) == (save_after, {"best_acc": max(hand["accs"][:save_after])})

    port_model = mlp(64, 10, seed=99)  # the weights come from the checkpoint
    torch.set_rng_state(hand["rng"])  # the tutorial's dict keeps no RNG: give the port the same
    train_loader.generator.set_state(hand["loader"])
    best_acc = port_003(port_model, train_loader, test_loader, CPU, epochs, 10, port_dir, True, 1.0)

    assert_bit_identical(snapshot(hand_model), snapshot(port_model))
    assert hand["largest_norm"] > 1.0  # clipping took part (the tutorial's 20 never would here)
    port_optimizer = torch.optim.SGD(ft.param_groups(port_model, 1e-4), lr=1e-2, momentum=0.9)
    last = ft.load_checkpoint(port_dir / "checkpoint.pth.tar", port_model, port_optimizer)
    _same_optimizer_state(hand["optimizer"], port_optimizer)
    assert best_acc == max(hand["accs"])
    assert (last.epoch, last.extra) == (epochs, {"best_acc": best_acc})
    best_epoch = hand["accs"].index(best_acc) + 1  # as the checkpoints count: t + 1
    assert best_epoch > save_after  # found after the resume: the port copied that epoch's file
    assert ft.load_checkpoint(port_dir / "model_best.pth.tar", mlp(64, 10, seed=99)).epoch == (
        best_epoch
    )
    printed = capsys.readouterr().out
    assert printed.startswith(f"Load checkpoint at epoch {save_after}.\n")
    assert re.findall(r"Step: \[(\d+)/(\d+)\]", printed) == [("100", "100")] * 2
    assert _numbers(printed, "Loss:") == pytest.approx(hand["step_losses"], rel=1e-12)
    shown = _numbers(printed, "test images:")
    assert shown == pytest.approx([100 * acc for acc in hand["accs"][save_after:]], rel=1e-12)


# --- 004: valid() with a tqdm bar of the running loss and accuracy ----------------------------


def port_004(
    dataloader: DataLoader[Any], model: nn.Module, criterion: nn.Module, device: torch.device
) -> float:
    """Validate on the validation set with progress; return the accuracy."""
    # ---- PORT BEGINS ----
    metrics = {"accuracy": ft.accuracy()}
    ev = ft.evaluate(model, dataloader, criterion, device, metrics=metrics, progress=True)
    return ev.metrics["accuracy"]
    # ---- PORT ENDS ----


def test_port_004_validates_with_progress_lines_and_leaves_the_model_as_it_was(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Port 004 prints loss and accuracy lines, returns the true accuracy and changes no state."""
    _, val, _ = _digits()
    model = mlp(64, 10, seed=12)
    criterion = nn.CrossEntropyLoss()
    dataloader = loader(val, batch_size=64)  # 300 = 4 * 64 + 44: uneven batches
    hand_loss, hand_acc, outputs = _hand_validate(copy.deepcopy(model), dataloader, criterion)
    for training in (True, False):
        model.train(training)
        before = snapshot(model)
        accuracy = port_004(dataloader, model, criterion, CPU)
        assert_bit_identical(before, snapshot(model))  # BatchNorm statistics too
        assert all(module.training == training for module in model.modules())
        assert accuracy == hand_acc
        lines = capsys.readouterr().err.splitlines()
        assert lines and all("loss " in line and "accuracy " in line for line in lines)
        assert _numbers(lines[-1], "loss") == pytest.approx([hand_loss], abs=5e-5)
        assert f"accuracy {hand_acc:.4f}" in lines[-1]
    hits = outputs.argmax(1) == val.tensors[1]
    batch_means = [float(part.float().mean()) for part in hits.split(64)]
    assert accuracy != pytest.approx(sum(batch_means) / len(batch_means))  # the tutorial's


# --- the line counts --------------------------------------------------------------------------


def _port_lines(port: Callable[..., Any]) -> int:
    """Count the non-blank, non-comment lines between a port's BEGIN and END markers."""
    lines = [line.strip() for line in inspect.getsource(port).splitlines()]
    body = lines[lines.index(BEGIN) + 1 : lines.index(END)]
    return sum(1 for line in body if line and not line.startswith("#"))


def _fenced_lines(text: str) -> set[int]:
    """Return the 1-based numbers of the lines inside ``` blocks (indented fences too)."""
    inside, found = False, set()
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            found.add(number)
    return found


def test_port_line_counts_match_the_port_functions() -> None:
    """PORT_LINES holds each port function's current count of non-blank, non-comment lines."""
    ports = {"000": port_000, "001": port_001, "002": port_002, "003": port_003, "004": port_004}
    assert {key: _port_lines(port) for key, port in ports.items()} == {
        key: lines for key, (_, lines) in PORT_LINES.items()
    }


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the tutorials are not in this checkout")
def test_original_line_counts_match_the_seed_code_blocks() -> None:
    """PORT_LINES holds the non-blank count of the seed code-block lines each port replaces."""
    counted = {}
    for key, ranges in SEED_LINES.items():
        (path,) = SEEDS.glob(f"{key}_*.txt")
        text = path.read_text(encoding="utf-8")
        lines, fenced = text.splitlines(), _fenced_lines(text)
        numbers = [n for first, last in ranges for n in range(first, last + 1)]
        assert set(numbers) <= fenced, f"{key}: a counted line is outside the ``` blocks"
        counted[key] = sum(1 for n in numbers if lines[n - 1].strip())
    assert counted == {key: original for key, (original, _) in PORT_LINES.items()}
