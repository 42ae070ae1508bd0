"""Every example runs with --quick from any working folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fntrain as ft
from tests.helpers import torchrun

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OWN_TEST = {"digits.py"}  # run --quick by its own test below, which checks more


def _run(args: list[str], cwd: Path, **options: object) -> subprocess.CompletedProcess[str]:
    """Run ``python args`` in ``cwd`` with this checkout's fntrain first on the path."""
    path = [str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **options
    )


def _digits_cnn() -> object:
    """Return the digits example's model, imported from the example itself."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from digits import small_cnn
    finally:
        sys.path.remove(str(EXAMPLES))
    return small_cnn()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted({p.name for p in EXAMPLES.glob("*.py")} - OWN_TEST))
def test_example_runs_quick(script: str, tmp_path: Path) -> None:
    """The example finishes with --quick, run from an unrelated folder."""
    pytest.importorskip("sklearn")
    out = _run([str(EXAMPLES / script), "--quick"], tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "the example printed nothing"


def _test_accuracy(lines: list[str]) -> float:
    """Return the accuracy of the demo's one ``test accuracy`` line."""
    (line,) = [line for line in lines if line.startswith("test accuracy")]
    return float(line.split()[2])


@pytest.mark.slow
def test_digits_quick_prints_its_epochs_its_accuracy_and_where_it_wrote_its_files(
    tmp_path: Path,
) -> None:
    """The README's main job prints one line per epoch, the held-out accuracy and, last,
    where it wrote the learning curve and best.pt (runs/digits/ in the working folder)."""
    pytest.importorskip("sklearn")
    out = _run([str(EXAMPLES / "digits.py"), "--quick"], tmp_path, timeout=240, check=True)
    lines = out.stdout.splitlines()
    assert sum(line.startswith("epoch") for line in lines) == 2
    accuracy = _test_accuracy(lines)
    assert 0.5 < accuracy <= 1.0  # two epochs already learn the digits; 20 reach >= 0.97
    assert "digit  precision  recall     f1" in lines and len(lines) >= 14  # the report
    written = tmp_path.resolve() / "runs" / "digits"
    assert (written / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    best = ft.load_checkpoint(written / "best.pt", _digits_cnn(), restore_rng=False)
    assert 1 <= best.epoch <= 2
    assert lines[-2:] == [
        f"learning curve: {written / 'learning_curve.png'}",
        f"best model (epoch {best.epoch}): {written / 'best.pt'}",
    ]


def test_digits_learning_curve_labels_its_axes_and_marks_the_best_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's plot has epoch on x, loss and accuracy on y, and a line at best.pt's epoch."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    sys.path.insert(0, str(EXAMPLES))
    try:
        from digits import plot_curves
    finally:
        sys.path.remove(str(EXAMPLES))
    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *_, **__: saved.append(figure))
    keys = ("train_loss", "val_loss", "train_acc", "val_acc")
    history = [{"epoch": e, **dict.fromkeys(keys, 1 / e)} for e in (1, 2, 3)]
    assert plot_curves(history, 2, tmp_path / "curve.png")
    (figure,) = saved
    for axis, quantity in zip(figure.axes, ("loss", "accuracy"), strict=True):
        assert (axis.get_xlabel(), axis.get_ylabel()) == ("epoch", quantity)
        (best,) = [line for line in axis.get_lines() if "best.pt" in line.get_label()]
        assert list(best.get_xdata()) == [2, 2]


@pytest.mark.slow
def test_digits_full_run_reaches_97_percent_held_out_accuracy(tmp_path: Path) -> None:
    """The README's main job, run in full, reaches >= 97% accuracy on held-out digits."""
    pytest.importorskip("sklearn")
    out = _run([str(EXAMPLES / "digits.py")], tmp_path, timeout=600, check=True)
    assert _test_accuracy(out.stdout.splitlines()) >= 0.97, out.stdout


@pytest.mark.slow
def test_ddp_example_runs_on_two_ranks_with_torchrun(tmp_path: Path) -> None:
    """examples/ddp.py --quick trains, evaluates, checkpoints and resumes on 2 gloo ranks."""
    pytest.importorskip("sklearn")
    out = torchrun([str(EXAMPLES / "ddp.py"), "--quick"], tmp_path)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 ranks")
    assert sum(line.startswith("epoch") for line in lines) == 2  # printed by rank 0 only
    resumed = lines[-1].split()
    assert resumed[0] == "resumed" and resumed[6] == resumed[8].rstrip(")")


@pytest.mark.slow
def test_fsdp_example_checkpoints_sharded_and_converts_to_one_file(tmp_path: Path) -> None:
    """examples/fsdp.py --quick: FSDP2 on 2 gloo ranks, sharded save, resume, one-file copy."""
    pytest.importorskip("sklearn")
    out = torchrun([str(EXAMPLES / "fsdp.py"), "--quick"], tmp_path)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2 ranks") and "FSDP2" in lines[0]
    assert sum(line.startswith("epoch") for line in lines) == 2
    resumed = next(line for line in lines if line.startswith("resumed")).split()
    assert resumed[6] == resumed[8].rstrip(")")
    assert sorted(p.name for p in (tmp_path / "fsdp_last").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    plain = ft.load_checkpoint(tmp_path / "fsdp_last.pt", _digits_cnn())
    assert plain.epoch == 1 and lines[-1].startswith("one file for inference")


@pytest.mark.slow
def test_tensorboard_logging_writes_events_and_csv_per_epoch(tmp_path: Path) -> None:
    """The logging example writes every record's numbers to TensorBoard and to a CSV."""
    pytest.importorskip("sklearn")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run([str(EXAMPLES / "tensorboard_logging.py"), "--quick"], tmp_path, timeout=240, check=True)
    written = tmp_path / "runs" / "tensorboard"
    rows = (written / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "train/loss", "train/seconds"]
    assert "val/acc" in rows[0] and "train/lr" in rows[0] and len(rows) == 3
    events = EventAccumulator(str(written))
    events.Reload()
    for tag in ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    last_acc = float(rows[2].split(",")[rows[0].split(",").index("val/acc")])
    assert events.Scalars("val/acc")[-1].value == pytest.approx(last_acc, rel=1e-6)


def test_cifar_fake_test_images_are_not_training_images() -> None:
    """FakeData seeds image i with i + random_offset: the two sets must not share seeds.

    With offsets 0 and 1 the test set was the training set shifted by one image, and
    "test accuracy" measured memorisation (23% after a full run on random labels).
    """
    pytest.importorskip("torchvision")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from cifar_resnet import datasets
    finally:
        sys.path.remove(str(EXAMPLES))
    from torchvision.transforms.functional import pil_to_tensor

    train, test = datasets(None, fake_size=16)
    train.transform = test.transform = None  # compare the images before augmentation
    train_images = [pil_to_tensor(train[i][0]) for i in range(len(train))]
    for j in range(len(test)):
        image = pil_to_tensor(test[j][0])
        assert not any(torch.equal(image, seen) for seen in train_images), j


@pytest.mark.slow
def test_gan_example_trains_two_optimizers_and_resumes_both(tmp_path: Path) -> None:
    """examples/gan.py --quick: one file holds G, D, G's optimizer and D's optimizer in extra."""
    pytest.importorskip("sklearn")
    checkpoint = tmp_path / "out" / "gan.pt"
    out = _run(
        [str(EXAMPLES / "gan.py"), "--quick", "--out", str(checkpoint)],
        tmp_path, timeout=240, check=True,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    epochs = [line.split() for line in lines if line.startswith("epoch")]
    assert [int(words[1]) for words in epochs] == [1, 2, 3]
    for words in epochs:  # epoch N  D loss x  G loss y  held-out D acc z
        assert float(words[4]) > 0 and float(words[7]) > 0
        assert 0.0 <= float(words[-1]) <= 1.0
    assert lines[-1].startswith("loaded epoch 3")

    saved_path = sys.path[:]
    sys.path.insert(0, str(EXAMPLES))
    try:
        from gan import adam, discriminator, generator
    finally:
        sys.path[:] = saved_path  # gan.py adds its own folder too
    g, d = generator(), discriminator()
    g_opt, d_opt = adam(g), adam(d)
    both = torch.nn.ModuleDict({"generator": g, "discriminator": d})
    ckpt = ft.load_checkpoint(checkpoint, both, g_opt, restore_rng=False)
    d_opt.load_state_dict(ckpt.extra["d_optimizer"])
    assert ckpt.epoch == 3
    assert ckpt.metrics["acc"] == pytest.approx(float(epochs[-1][-1]), abs=5e-5)
    batches = -(-int(lines[0].split()[2]) // 64)  # one G and one D step per real batch of 64
    for optimizer in (g_opt, d_opt):
        steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
        assert steps == {3 * batches}
    samples = ft.predict(g, [torch.randn(8, 16)], "cpu").outputs
    assert samples.shape == (8, 1, 8, 8) and 0.0 <= samples.min() <= samples.max() <= 1.0
