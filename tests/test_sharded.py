"""FSDP2 models: training, clipping and sharded checkpoints on 2 gloo ranks, and on one process."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

import fntrain as ft
import fntrain.sharded as sharded_module
from tests.fsdp_worker import dropout_model, shard
from tests.helpers import make_data, run_two_ranks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Run the FSDP2 worker on 2 ranks once; load each rank's results."""
    out = tmp_path_factory.mktemp("fsdp")
    return out, run_two_ranks("tests.fsdp_worker", out)


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-process gloo group, in which fully_shard gives DTensor parameters."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_resumed_fsdp2_run_equals_the_uninterrupted_one(ranks: Any) -> None:
    """Sharded save after epoch 1, load into fresh model, optimizer, scheduler: bit-identical."""
    _, results = ranks
    for result in results:
        assert result["sharded"]
        assert all(torch.equal(v, result["resumed"][k]) for k, v in result["straight"].items())
        assert any(
            not torch.equal(v, result["first_epoch"][k]) for k, v in result["straight"].items()
        )


@pytest.mark.slow
def test_every_rank_restores_its_own_rng_state(ranks: Any) -> None:
    """After a load each rank draws what it drew after the save, and the ranks differ."""
    _, results = ranks
    for result in results:
        assert torch.equal(*result["draws"])
    assert not torch.equal(results[0]["draws"][0], results[1]["draws"][0])


@pytest.mark.slow
def test_the_sharded_checkpoint_is_one_folder_of_shards_and_nothing_else(ranks: Any) -> None:
    """Each rank wrote its own shard file; no temporary folder is left; the size adds up."""
    out, results = ranks
    folder = out / "sharded.ckpt"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert results[0]["saved_size"] == sum(p.stat().st_size for p in folder.iterdir())


@pytest.mark.slow
def test_clipping_and_evaluation_under_fsdp2_equal_one_process(ranks: Any) -> None:
    """The clipped norm is the global one; weights, grad_norm and evaluate equal one process's."""
    _, results = ranks
    model = dropout_model()
    model[2].p = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = DataLoader(make_data(48, 4, 3, 2), batch_size=16)
    single = ft.train_epoch(
        model, data, nn.CrossEntropyLoss(), optimizer, "cpu", clip_grad_norm=0.05
    )
    for result in results:
        assert result["grad_norm"] == pytest.approx(single.grad_norm, rel=1e-5)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(result["clipped"][key], value, rtol=1e-5, atol=1e-6)
    val = make_data(51, 4, 3, 4)
    ev = ft.evaluate(model, DataLoader(val, batch_size=7), nn.CrossEntropyLoss(), "cpu",
                     metrics={"acc": ft.accuracy()})  # fmt: skip
    for result in results:
        assert result["eval"].samples == 51
        assert result["eval"].loss == pytest.approx(ev.loss, rel=1e-5)
        assert result["eval"].metrics["acc"] == pytest.approx(ev.metrics["acc"])


@pytest.mark.slow
def test_a_single_file_loads_into_an_fsdp2_models_weights_only(ranks: Any) -> None:
    """A plain model's file shards into the FSDP2 model; with an optimizer it is refused."""
    _, results = ranks
    for result in results:
        assert result["file_loads"]
        assert (
            "loads into a sharded (FSDP2) model's weights, not its optimizer"
            in (result["file_optimizer_refused"])
        )


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_on_one_process_and_converts_to_a_file(
    ranks: Any, tmp_path: Path
) -> None:
    """Without a process group the folder loads into the plain model (and its optimizer)."""
    out, results = ranks
    model = dropout_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    ckpt = ft.load_checkpoint(out / "sharded.ckpt", model, optimizer, scheduler=scheduler)
    assert ckpt.epoch == 1 and scheduler.last_epoch == 4
    assert all(torch.equal(v, results[0]["first_epoch"][k]) for k, v in model.state_dict().items())
    assert len(optimizer.state) == 4 and all(s["step"] == 4 for s in optimizer.state.values())
    ft.save_checkpoint(tmp_path / "one.pt", model, epoch=ckpt.epoch)  # the conversion
    fresh = dropout_model()
    assert ft.load_checkpoint(tmp_path / "one.pt", fresh).epoch == 1
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_ranks_giving_different_paths_to_one_sharded_save_are_refused(ranks: Any) -> None:
    """Every rank raises, naming each rank's path, and nothing is written."""
    _, results = ranks
    for result in results:
        assert "'path' differs between the ranks" in result["own_path_refused"]
        assert "rank1.ckpt" in result["own_path_refused"]
        assert result["left_after_refusal"] == ["sharded.ckpt"]


@pytest.mark.slow
def test_ranks_loading_different_sharded_folders_are_refused(ranks: Any) -> None:
    """Each rank naming its own folder would mix two checkpoints: every rank raises instead."""
    _, results = ranks
    for result in results:
        assert "'path' differs between the ranks" in result["mixed_load_refused"]
        assert result["mixed_load_unchanged"]


@pytest.mark.slow
def test_each_rank_gets_its_own_batchnorm_statistics_back(ranks: Any) -> None:
    """FSDP2 does not sync buffers: each rank's are saved apart (buffers only) and restored;
    a plain model (the conversion to one file) gets rank 0's."""
    out, results = ranks
    for result in results:
        assert result["bn_saved"].keys() == result["bn_loaded"].keys() != set()
        assert all(torch.equal(v, result["bn_loaded"][k]) for k, v in result["bn_saved"].items())
    assert not torch.equal(*(r["bn_saved"]["1.running_mean"] for r in results))
    entries = sharded_module._metadata(out / "bn.ckpt").state_dict_metadata
    apart = sorted(key.split(".", 2)[2] for key in entries if key.startswith("rank"))
    assert apart == sorted(2 * ["num_batches_tracked", "running_mean", "running_var"])
    plain = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    ft.load_checkpoint(out / "bn.ckpt", plain)
    assert torch.equal(plain[1].running_mean, results[0]["bn_saved"]["1.running_mean"])


@pytest.mark.slow
def test_rank_0_alone_loads_a_sharded_folder_into_a_plain_model(ranks: Any) -> None:
    """Under a process group, a plain model reads the folder itself: no collective, no hang."""
    _, results = ranks
    alone, first_epoch = results[0]["alone"], results[0]["first_epoch"]
    assert alone.keys() == first_epoch.keys()
    assert all(torch.equal(v, first_epoch[k]) for k, v in alone.items())


@pytest.mark.slow
def test_a_sharded_checkpoint_that_does_not_fit_changes_nothing(ranks: Any) -> None:
    """Another architecture: every mismatch is named, the model is left as it was."""
    out, _ = ranks
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ft.CheckpointError, match=r"'3.weight' has shape \(3, 16\) in the file"):
        ft.load_checkpoint(out / "sharded.ckpt", model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _Payload:
    """Unpickling this runs a command (the classic pickle exploit)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_metadata_file_that_would_run_code_is_refused_unread(tmp_path: Path) -> None:
    """A .metadata pickle naming anything but checkpoint metadata is refused; nothing runs."""
    folder = tmp_path / "evil.ckpt"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ft.CheckpointError, match=r"names posix.system.*could run code"):
        ft.load_checkpoint(folder, nn.Linear(4, 2))
    assert not marker.exists()


def test_a_metadata_file_of_allowed_classes_that_would_run_code_is_refused(
    one_rank: None, tmp_path: Path
) -> None:
    """Allowed classes dressed up as a tensor entry pointing at a pickle: refused, nothing runs."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )

    folder, marker = tmp_path / "run.ckpt", tmp_path / "ran"
    ft.save_checkpoint(folder, shard(dropout_model()), epoch=1)
    evil = pickle.dumps(_Payload(marker))
    (folder / "evil.distcp").write_bytes(evil)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    fake = BytesStorageMetadata()  # DCP unpickles such an entry with weights_only=False
    fake.size, fake.properties = torch.Size([len(evil)]), TensorProperties(dtype=torch.uint8)
    metadata.state_dict_metadata["fntrain"] = fake
    metadata.storage_data[MetadataIndex("fntrain")] = _StorageInfo("evil.distcp", 0, len(evil))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ft.CheckpointError, match=r"lists non-tensor entries \['fntrain'\]"):
        ft.load_checkpoint(folder, dropout_model())
    metadata.state_dict_metadata["fntrain"] = TensorStorageMetadata(
        TensorProperties(dtype=torch.uint8), torch.Size([3]), []
    )
    metadata.storage_data[MetadataIndex("fntrain")] = _StorageInfo("../secret", 0, 3)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ft.CheckpointError, match="files outside the folder"):
        ft.load_checkpoint(folder, dropout_model())
    assert not marker.exists()


def test_saving_before_the_first_step_leaves_the_optimizer_untouched(
    one_rank: None, tmp_path: Path
) -> None:
    """A sharded save of a fresh Adam creates no state: training after it is bit-identical."""
    data = [(x[None], y[None]) for x, y in make_data(8, 4, 3, 5)]
    trained = []
    for save_first in (False, True):
        model = shard(dropout_model())
        model[2].p = 0.0
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        if save_first:
            ft.save_checkpoint(tmp_path / "fresh.ckpt", model, optimizer, epoch=0)
            assert not optimizer.state
        ft.train_epoch(model, data, nn.CrossEntropyLoss(), optimizer, "cpu")
        trained.append({k: v.full_tensor() for k, v in model.state_dict().items()})
    assert all(torch.equal(v, trained[1][k]) for k, v in trained[0].items())
    fresh = shard(dropout_model())
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    assert ft.load_checkpoint(tmp_path / "fresh.ckpt", fresh, fresh_optimizer).epoch == 0


class _Counted(nn.Module):
    """A model with extra state (a call count) beside its weights."""

    def __init__(self, note: object = 3) -> None:
        super().__init__()
        self.fc, self.note = nn.Linear(4, 2), note

    def get_extra_state(self) -> object:
        return {"note": self.note}

    def set_extra_state(self, state: dict[str, object]) -> None:
        self.note = state["note"]


def test_non_tensor_state_round_trips_or_is_refused_at_save(one_rank: None, tmp_path: Path) -> None:
    """Plain extra state loads back; state weights_only would refuse is refused at save time."""
    model = _Counted(note=[1, "two"])
    fully_shard(model)
    ft.save_checkpoint(tmp_path / "a.ckpt", model, epoch=1)
    other = _Counted()
    fully_shard(other)
    ft.load_checkpoint(tmp_path / "a.ckpt", other)
    assert other.note == [1, "two"]
    odd = _Counted(note=object())
    fully_shard(odd)
    with pytest.raises(
        TypeError, match=r"state\['model_rest'\]\['_extra_state'\]\['note'\] must hold only"
    ):
        ft.save_checkpoint(tmp_path / "b.ckpt", odd, epoch=1)
    assert not (tmp_path / "b.ckpt").exists()


def test_folders_that_are_not_sharded_checkpoints_are_refused(tmp_path: Path) -> None:
    """A plain folder is neither loaded nor overwritten: the error names 'path'."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(ft.CheckpointError, match="is a folder, not a sharded checkpoint"):
        ft.load_checkpoint(tmp_path / "data", nn.Linear(4, 2))
    with pytest.raises(ft.CheckpointError, match="is a folder, not a checkpoint file"):
        ft.save_checkpoint(tmp_path / "data", nn.Linear(4, 2), epoch=0)
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"


def test_a_sharded_save_never_replaces_a_file_or_a_plain_folder(
    one_rank: None, tmp_path: Path
) -> None:
    """An FSDP2 model is saved as a folder: over a file or a folder of data it is refused."""
    model = shard(dropout_model())
    (tmp_path / "a.pt").write_bytes(b"old")
    (tmp_path / "data").mkdir()
    with pytest.raises(ft.CheckpointError, match="is a file, but a sharded"):
        ft.save_checkpoint(tmp_path / "a.pt", model, epoch=0)
    with pytest.raises(ft.CheckpointError, match="is a folder, not a sharded checkpoint"):
        ft.save_checkpoint(tmp_path / "data", model, epoch=0)
    assert (tmp_path / "a.pt").read_bytes() == b"old"


@pytest.mark.parametrize("exchange", [True, False])
def test_a_sharded_save_replaces_the_old_folder_whole(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """The new folder is swapped in (atomically where renameat2 exists); no other folder is left."""
    swaps, real = [], sharded_module._exchange

    def swap(first: Path, second: Path) -> bool:
        swaps.append(exchange and real(first, second))
        return swaps[-1]

    monkeypatch.setattr(sharded_module, "_exchange", swap)
    model = shard(dropout_model())
    target = tmp_path / "run.ckpt"
    ft.save_checkpoint(target, model, epoch=1)
    ft.save_checkpoint(target, model, epoch=2)
    assert swaps == [exchange]  # the second save swapped (atomically, where asked)
    assert ft.load_checkpoint(target, shard(dropout_model())).epoch == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def test_a_sharded_save_that_fails_leaves_the_old_checkpoint_whole(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails midway removes its temporary folder; the old checkpoint loads."""
    import torch.distributed.checkpoint as dcp

    model = shard(dropout_model())
    target = tmp_path / "run.ckpt"
    ft.save_checkpoint(target, model, epoch=1)
    before = sorted((p.name, p.stat().st_size) for p in target.iterdir())

    def failing_save(state: Any, checkpoint_id: Path) -> None:
        checkpoint_id.mkdir()
        (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ft.save_checkpoint(target, model, epoch=2)
    assert sorted((p.name, p.stat().st_size) for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
    monkeypatch.undo()
    assert ft.load_checkpoint(target, shard(dropout_model())).epoch == 1


def test_a_sharded_save_that_fails_in_dcp_raises_an_ordinary_error(
    one_rank: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP's CheckpointException (a BaseException) comes out as the rank's own error type."""
    import torch.distributed.checkpoint as dcp

    model, target = shard(dropout_model()), tmp_path / "run.ckpt"
    ft.save_checkpoint(target, model, epoch=1)

    def full_disk(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full_disk)
    with pytest.raises(Exception) as raised:  # its type is the point
        ft.save_checkpoint(target, model, epoch=2)
    assert isinstance(raised.value, OSError) and "No space left on device" in str(raised.value)
    assert "rank 0" in str(raised.value)
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
    monkeypatch.undo()
    assert ft.load_checkpoint(target, shard(dropout_model())).epoch == 1


def test_a_folder_that_fntrain_did_not_write_is_never_replaced(
    one_rank: None, tmp_path: Path
) -> None:
    """A folder holding a '.metadata' among other files is the user's: a save is refused."""
    notes = tmp_path / "results"
    notes.mkdir()
    (notes / ".metadata").write_text("my notes")
    (notes / "table.csv").write_text("a,b")
    with pytest.raises(ft.CheckpointError, match="is a folder, not a sharded checkpoint"):
        ft.save_checkpoint(notes, shard(dropout_model()), epoch=0)
    assert sorted(p.name for p in notes.iterdir()) == [".metadata", "table.csv"]


@pytest.mark.parametrize("stray", [".DS_Store", "__9_9.distcp"])
def test_a_checkpoint_folder_with_a_file_fntrain_did_not_write_is_not_replaced(
    one_rank: None, tmp_path: Path, stray: str
) -> None:
    """A stray file (a Finder's, a shard .metadata does not list) is kept; the error says why."""
    model, target = shard(dropout_model()), tmp_path / "run.ckpt"
    ft.save_checkpoint(target, model, epoch=1)
    (target / stray).write_bytes(b"mine")
    with pytest.raises(ft.CheckpointError, match="holds files fntrain did not write"):
        ft.save_checkpoint(target, model, epoch=2)
    assert (target / stray).read_bytes() == b"mine"
    assert ft.load_checkpoint(target, shard(dropout_model())).epoch == 1


def test_an_optimizer_with_a_parameter_outside_the_model_is_named(
    one_rank: None, tmp_path: Path
) -> None:
    """A sharded save keys optimizer state by the model's names: others are refused by name."""
    model, temperature = shard(dropout_model()), nn.Parameter(torch.ones(()))
    optimizer = torch.optim.Adam([*model.parameters(), temperature])
    optimizer.zero_grad()
    model(torch.randn(2, 4)).sum().mul(temperature).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="'optimizer' holds 1 parameter"):
        ft.save_checkpoint(tmp_path / "run.ckpt", model, optimizer, epoch=0)
    assert not (tmp_path / "run.ckpt").exists()


def test_after_evaluate_the_root_is_still_known_as_sharded_and_its_parameters_as_the_models(
    one_rank: None, tmp_path: Path
) -> None:
    """FSDP2 keeps a root's unsharded parameters after a forward; train and save see DTensors."""
    model = fully_shard(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    ft.evaluate(model, data, nn.CrossEntropyLoss(), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "parameters of 'optimizer' are not the model's"
        ft.train_epoch(model, data, nn.CrossEntropyLoss(), optimizer, "cpu")
    ft.evaluate(model, data, nn.CrossEntropyLoss(), "cpu")
    ft.save_checkpoint(tmp_path / "run.ckpt", model, optimizer, epoch=0)
    assert (tmp_path / "run.ckpt" / ".metadata").is_file()


def test_fsdp1_models_are_refused_with_a_pointer_to_fully_shard(tmp_path: Path) -> None:
    """FSDP1 (which needs a GPU to build) is refused by name: its state is this rank's shard."""

    class FullyShardedDataParallel(nn.Module):  # stands in for torch's FSDP1 wrapper
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(4, 2)

    model = FullyShardedDataParallel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"FSDP1.*fully_shard \(FSDP2\)"):
        ft.save_checkpoint(tmp_path / "a.pt", model, epoch=0)
    with pytest.raises(TypeError, match=r"FSDP1.*fully_shard \(FSDP2\)"):
        ft.train_epoch(model, [(torch.randn(2, 4), torch.randn(2, 2))], nn.MSELoss(), optimizer,
                       "cpu", clip_grad_norm=1.0)  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_a_truncated_shard_is_an_error_and_changes_nothing(one_rank: None, tmp_path: Path) -> None:
    """A shard file cut short on disk: CheckpointError naming the folder; the model is as before."""
    target = tmp_path / "run.ckpt"
    ft.save_checkpoint(target, shard(dropout_model()), epoch=1)
    shard_file = target / "__0_0.distcp"
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    model = shard(dropout_model())
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(7.0)
    with pytest.raises(ft.CheckpointError, match="not a loadable sharded checkpoint"):
        ft.load_checkpoint(target, model)
    assert all(float(p.detach().full_tensor().min()) == 7.0 for p in model.parameters())


def test_a_sharded_checkpoint_from_elsewhere_is_refused_by_name(tmp_path: Path) -> None:
    """A DCP folder another tool wrote (no fntrain entry) is a CheckpointError; nothing loads."""
    import torch.distributed.checkpoint as dcp

    model = dropout_model()
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):  # DCP says so alone
        dcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path / "other", no_dist=True)
    fresh = dropout_model()
    with torch.no_grad():
        fresh[0].weight.fill_(3.0)
    with pytest.raises(ft.CheckpointError, match="is a sharded checkpoint not written by fntrain"):
        ft.load_checkpoint(tmp_path / "other", fresh)
    assert float(fresh[0].weight.detach().min()) == 3.0
