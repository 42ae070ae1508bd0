"""The same functions on DistributedDataParallel: 2 gloo ranks under torchrun, on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fntrain as ft
from tests.distributed_worker import small_model
from tests.helpers import (
    TokenModel,
    make_data,
    pad_cat,
    run_two_ranks,
    summed_tokens,
    token_batches,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Run the worker on 2 ranks once (free port chosen by --standalone); load each result."""
    out = tmp_path_factory.mktemp("ddp")
    return out, run_two_ranks("tests.distributed_worker", out)


@pytest.mark.slow
def test_global_evaluation_equals_one_process_on_all_the_data(ranks: Any) -> None:
    """With ShardSampler, the global loss and accuracy equal a single process's on all data."""
    _, results = ranks
    data = make_data(51, 4, 3, 0)
    from torchmetrics.classification import MulticlassF1Score

    metrics = {"acc": ft.accuracy(), "f1": MulticlassF1Score(num_classes=3, average="macro")}
    single = ft.evaluate(small_model(), DataLoader(data, batch_size=7), nn.CrossEntropyLoss(),
                         "cpu", metrics=metrics)  # fmt: skip
    for result in results:
        assert result["exact"]["samples"] == 51
        assert result["exact"]["loss"] == pytest.approx(single.loss, rel=1e-6)
        assert result["exact"]["metrics"]["acc"] == pytest.approx(single.metrics["acc"])
        assert result["exact"]["metrics"]["f1"] == pytest.approx(single.metrics["f1"], rel=1e-6)


@pytest.mark.slow
def test_a_padded_distributed_sampler_counts_its_repeated_sample(ranks: Any) -> None:
    """DistributedSampler pads 51 samples to 52 on 2 ranks; the record shows the 52."""
    _, results = ranks
    assert [r["padded"]["samples"] for r in results] == [52, 52]


@pytest.mark.slow
def test_ddp_training_equals_one_process_on_the_combined_batches(ranks: Any) -> None:
    """After one DDP epoch every rank holds the same weights as one process on 2x batches."""
    _, results = ranks
    assert all(torch.equal(results[0]["params"][k], v) for k, v in results[1]["params"].items())
    data = make_data(48, 4, 3, 1)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ft.train_epoch(model, DataLoader(data, batch_size=16), nn.CrossEntropyLoss(), optimizer, "cpu")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(results[0]["params"][key], value, rtol=1e-5, atol=1e-6)
    assert results[0]["trained"]["samples"] == 48 and results[0]["trained"]["steps"] == 3


@pytest.mark.slow
def test_accumulation_under_ddp_all_reduces_once_per_optimizer_step(ranks: Any) -> None:
    """With accumulate=3 over 7 batches, DDP all-reduces the gradients on each window's last
    backward only (3 times, not 7), and the weights equal a hand-written no_sync loop's bit
    for bit; afterwards the model syncs every backward again, for the user's own loop."""
    _, results = ranks
    for result in results:
        assert (result["no_sync_steps"], result["no_sync_calls"]) == (3, 3)
        assert result["no_sync_same"] and result["no_sync_flag_after"] is True


@pytest.mark.slow
def test_a_loader_shorter_than_its_len_still_syncs_the_last_window(ranks: Any) -> None:
    """A loader whose len() promises one batch more than it yields ends on a window whose
    backward skipped DDP's all-reduce: its gradients are all-reduced at the step, so the
    replicas, trained on different data, still end identical."""
    _, results = ranks
    assert all(map(torch.equal, results[0]["short_params"], results[1]["short_params"]))


@pytest.mark.slow
def test_a_per_item_loss_under_ddp_averages_over_every_ranks_items(ranks: Any) -> None:
    """With (sum, count) losses and accumulate=2, 2 DDP ranks holding unequal token counts step
    like one process on each window's batches of both ranks joined: the mean over all items
    of all ranks, not the mean of the ranks' means; the epoch loss is the global per-item mean."""
    _, results = ranks
    windows = [token_batches(10, [6, 1, 7, 4]), token_batches(11, [3, 8, 5, 2])]
    joined = [pad_cat(windows[0][i : i + 2] + windows[1][i : i + 2]) for i in (0, 2)]
    model = TokenModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    one = ft.train_epoch(model, joined, summed_tokens, optimizer, "cpu")
    for result in results:
        assert result["items_loss"] == pytest.approx(one.loss, rel=1e-5)
        for mine, theirs in zip(result["items_params"], model.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_predict_gathers_names_with_their_outputs_in_data_set_order(ranks: Any) -> None:
    """Targets that are lists of names (default_collate's strings) are gathered in the same
    data set order as the outputs, on every rank."""
    _, results = ranks
    for result in results:
        assert result["named"] == ([float(i) for i in range(11)], [f"n{i}" for i in range(11)])


@pytest.mark.slow
def test_every_rank_returns_the_same_record(ranks: Any) -> None:
    """Loss, metrics, samples, batches and steps agree across ranks (seconds are per rank)."""
    _, results = ranks
    for phase in ("exact", "padded", "trained"):
        first, second = ({k: v for k, v in r[phase].items() if k != "seconds"} for r in results)
        assert first == second, phase


@pytest.mark.slow
def test_a_checkpoint_written_under_ddp_loads_into_a_plain_model(ranks: Any) -> None:
    """Rank 0 wrote the checkpoint (no temp files left); it loads into the plain model."""
    out, results = ranks
    files = sorted(p.name for p in out.iterdir())
    assert files == ["ddp.pt", "node0", "node1", "rank0.pt", "rank1.pt", "rng.pt"]
    assert results[0]["saved_size"] == results[1]["saved_size"] == (out / "ddp.pt").stat().st_size
    model = small_model()
    ft.load_checkpoint(out / "ddp.pt", model)
    for key, value in model.state_dict().items():
        assert torch.equal(results[0]["params"][key], value)


@pytest.mark.slow
def test_different_metrics_on_the_ranks_are_an_error_not_a_hang(ranks: Any) -> None:
    """Ranks passing different metrics all raise a clear error instead of hanging."""
    _, results = ranks
    for result in results:
        assert "every rank must pass the same 'metrics'" in result["mismatch_error"]


@pytest.mark.slow
def test_each_rank_resumes_its_own_rng_state_under_ddp(ranks: Any) -> None:
    """Every rank's generator is saved; after a load each draws what it drew after the save."""
    _, results = ranks
    for result in results:
        assert torch.equal(*result["draws"])
    assert not torch.equal(results[0]["draws"][0], results[1]["draws"][0])


@pytest.mark.slow
def test_skipping_a_non_finite_loss_on_one_rank_skips_it_on_every_rank(ranks: Any) -> None:
    """A NaN in rank 1's batch 2: both ranks skip batch 2, step 7 times, stay identical."""
    _, results = ranks
    assert [r["skip"][:2] for r in results] == [(1, 7), (1, 7)]
    first, second = (r["skip"][2] for r in results)
    assert all(torch.equal(value, second[key]) for key, value in first.items())


@pytest.mark.slow
def test_an_evaluation_error_on_one_rank_raises_on_every_rank(ranks: Any) -> None:
    """Targets only rank 1 cannot take: rank 1 says why, rank 0 that another rank failed."""
    _, results = ranks
    assert "another rank failed in this pass: IndexError" in results[0]["eval_fails_on_one_rank"]
    assert "out of bounds" in results[1]["eval_fails_on_one_rank"]


@pytest.mark.slow
def test_different_batch_counts_on_the_ranks_raise_on_every_rank(ranks: Any) -> None:
    """8 batches on rank 0, 7 on rank 1: told by len() before the first batch, or on the way."""
    _, results = ranks
    for result in results:
        assert (
            "'loader' gives the ranks different numbers of batches ([8, 7]" in result["uneven_len"]
        )
    assert "ran out on another rank before batch 7" in results[0]["uneven_iter"]
    assert "ran out on this rank after 7 batches" in results[1]["uneven_iter"]


@pytest.mark.slow
def test_a_torchmetrics_object_on_one_rank_only_is_an_error_not_a_hang(ranks: Any) -> None:
    """torchmetrics objects sync themselves; a rank without one would hang: both ranks raise."""
    _, results = ranks
    for result in results:
        assert "every rank must pass the same 'metrics'" in result["torchmetrics_on_one_rank"]


@pytest.mark.slow
def test_only_rank_0_touches_the_file_so_node_local_disks_work(ranks: Any) -> None:
    """Each rank saves from its own folder (node-local disks) where only rank 0 made 'ckpt'."""
    out, results = ranks
    assert [p.name for p in (out / "node0" / "ckpt").iterdir()] == ["local.pt"]
    assert not (out / "node1" / "ckpt").exists()
    assert (
        results[0]["local_size"]
        == results[1]["local_size"]
        == (out / "node0" / "ckpt" / "local.pt").stat().st_size
    )


@pytest.mark.slow
def test_a_resume_where_one_node_lacks_the_file_or_holds_another_fails_on_every_rank(
    ranks: Any,
) -> None:
    """DDP replicas never start from different files: missing or different, every rank raises."""
    _, results = ranks
    for result in results:
        assert result["missing_on_one"].startswith("FileNotFoundError")
        assert "the ranks read different checkpoints" in result["stale_on_one"]
        assert result["kept"]


@pytest.mark.parametrize(("size", "world"), [(0, 2), (1, 3), (10, 3), (51, 2), (7, 7)])
def test_shards_cover_every_index_once_without_padding(size: int, world: int) -> None:
    """ShardSampler's shards are disjoint, cover the data set once, and add no padding."""
    shards = [list(ft.ShardSampler(range(size), num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [
        len(ft.ShardSampler(range(size), num_replicas=world, rank=r)) for r in range(world)
    ] == [len(shard) for shard in shards]
    with pytest.raises(ValueError, match="'rank' must be in"):
        ft.ShardSampler(range(size), num_replicas=world, rank=world)


@pytest.mark.slow
def test_predict_gathers_outputs_in_data_set_order_without_padding(ranks: Any) -> None:
    """predict under DDP returns one process's outputs on all data: rank 0, or every rank."""
    _, results = ranks
    data = make_data(51, 4, 3, 0)
    single = ft.predict(small_model(), DataLoader(data, batch_size=7), "cpu")
    outputs, targets, samples = results[0]["predict_main"]
    torch.testing.assert_close(outputs, single.outputs)
    assert torch.equal(targets, single.targets) and samples == 51
    assert results[1]["predict_main"][:2] == (None, None)
    for result in results:  # gather="all" over a padded DistributedSampler
        outputs, targets, samples = result["predict_all"]
        torch.testing.assert_close(outputs, single.outputs)
        assert torch.equal(targets, single.targets) and samples == 51


@pytest.mark.slow
def test_an_empty_training_batch_on_ddp_ranks_is_an_error_not_a_skip(ranks: Any) -> None:
    """Skipped on one rank only, an empty batch would pair its neighbours' all-reduces."""
    _, results = ranks
    for result in results:
        assert "batch 1 is empty on this rank" in result["empty_batch"]


def test_an_empty_batch_alone_in_a_process_group_is_skipped_as_without_one() -> None:
    """With one rank, or a plain model (no per-batch collectives), it is skipped as usual."""
    import torch.distributed as dist

    empty = (torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    model, batches = small_model(), [empty, make_data(8, 4, 3, 0)[:]]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        assert ft.train_epoch(ddp, batches, nn.CrossEntropyLoss(), opt, "cpu").batches == 1
    finally:
        dist.destroy_process_group()


def test_predict_under_a_process_group_needs_a_shard_sampler() -> None:
    """Under torch.distributed, predict names 'loader' unless its sampler says the order."""
    import torch.distributed as dist

    data = make_data(10, 4, 3, 0)
    model = small_model()
    with pytest.raises(ValueError, match="'gather' must be"):
        ft.predict(model, DataLoader(data, batch_size=4), "cpu", gather="rank0")  # type: ignore[arg-type]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="'loader' must be a DataLoader whose sampler"):
            ft.predict(model, DataLoader(data, batch_size=4), "cpu")
        sharded = ft.predict(
            model, DataLoader(data, batch_size=4, sampler=ft.ShardSampler(data)), "cpu"
        )
        assert sharded.samples == 10
        kept = ft.predict(model, DataLoader(data, batch_size=4), "cpu", gather="none")
        torch.testing.assert_close(kept.outputs, sharded.outputs)
    finally:
        dist.destroy_process_group()


def test_progress_bars_show_on_rank_0_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, progress=True draws a bar on rank 0 and nothing on the other ranks."""
    import io

    import fntrain.distributed as fd

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    batches = [(torch.randn(4, 4), torch.randint(0, 3, (4,)))]
    drawn = {}
    for main in (True, False):
        screen = Terminal()
        monkeypatch.setattr("sys.stderr", screen)
        monkeypatch.setattr(fd, "is_main", lambda main=main: main)
        ft.evaluate(small_model(), batches, nn.CrossEntropyLoss(), "cpu", progress=True)
        drawn[main] = screen.getvalue()
    assert "eval" in drawn[True] and drawn[False] == ""
