"""Checkpoints of sharded (FSDP2) models: torch.distributed.checkpoint folders, swapped in whole."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import pickle
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fntrain import distributed
from fntrain.records import CheckpointError

_METADATA = ".metadata"
_PACKED = "fntrain"
_DCP = "torch.distributed.checkpoint."
_METADATA_CLASSES = (  # and below, what a .metadata pickle may name, nothing else
    "Metadata MetadataIndex StorageMeta TensorProperties TensorStorageMetadata "
    "BytesStorageMetadata ChunkStorageMetadata _MEM_FORMAT_ENCODING"
)
_ALLOWED = {(f"{_DCP}metadata", name) for name in _METADATA_CLASSES.split()} | {
    (f"{_DCP}filesystem", "_StorageInfo"), ("torch", "Size"), ("collections", "OrderedDict"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
}  # fmt: skip


def is_dtensor(value: Any) -> bool:
    """Tell whether ``value`` is a DTensor (none exists before its module is imported)."""
    lib = sys.modules.get("torch.distributed.tensor")
    return lib is not None and isinstance(value, lib.DTensor)


def _fsdp2(model: nn.Module) -> list[Any]:
    """Return the modules of ``model`` that ``fully_shard`` (FSDP2) made FSDPModules."""
    lib = sys.modules.get("torch.distributed.fsdp")  # none before its module is imported
    return [] if lib is None else [m for m in model.modules() if isinstance(m, lib.FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Tell whether ``model`` is sharded with ``fully_shard`` (FSDP2)."""
    return bool(_fsdp2(model))


def reshard(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters again: a root keeps unsharded ones after a forward."""
    for module in _fsdp2(model):
        module.reshard()


def in_lockstep(model: nn.Module) -> bool:
    """Tell whether ``model`` runs collectives every batch: DDP or FSDP2 over several ranks."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    return distributed.world()[1] > 1 and (ddp or is_sharded(model))


def refuse_fsdp1(model: nn.Module, what: str) -> None:
    """Raise TypeError if ``model`` contains FSDP1 (``FullyShardedDataParallel``) modules."""
    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise TypeError(
            f"'model' is wrapped in FullyShardedDataParallel (FSDP1), whose state and gradients "
            f"hold only this rank's shard, so {what} would be silently partial; shard the model "
            f"with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )


def _tensors_apart(entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a state dict into its tensors and everything else (extra state, step counts)."""
    tensors = {name: value for name, value in entry.items() if isinstance(value, torch.Tensor)}
    return tensors, {name: value for name, value in entry.items() if name not in tensors}


def split(payload: dict[str, Any], buffers: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``payload``'s tensors (for DCP) and the plain rest, to check and pack."""
    tensors, model_rest = _tensors_apart(payload["model"])
    meta = {key: value for key, value in payload.items() if key not in ("model", "optimizer")}
    meta["model_rest"], shards = model_rest, {"model": tensors}
    rank, size = distributed.world()
    if size > 1:  # DCP keeps one rank's copy of a plain tensor: FSDP2 leaves buffers unsynced
        shards[f"rank{rank}"] = {k: v for k, v in tensors.items() if k in buffers}
    if (optimizer := payload.get("optimizer")) is not None:
        parts = {fqn: _tensors_apart(entry) for fqn, entry in optimizer["state"].items()}
        shards["optimizer"] = {fqn: kept for fqn, (kept, _) in parts.items()}
        rest = {fqn: other for fqn, (_, other) in parts.items()}
        meta["optimizer"] = {"param_groups": optimizer["param_groups"], "state": rest}
        meta["optimizer_tensors"] = [[fqn, n] for fqn, (kept, _) in parts.items() for n in kept]
    return shards, meta


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2``); False where unsupported."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not Linux, an old libc
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(first), -100, os.fsencode(second), 2) == 0
    return False


def _swap_in(temp: Path, target: Path, started: float) -> int:
    """Put the complete folder ``temp`` at ``target``, remove the old one; return the bytes."""
    size = sum(entry.stat().st_size for entry in temp.iterdir())
    if not target.exists():
        os.rename(temp, target)
    elif not _exchange(temp, target):  # elsewhere: a moment without target, the old kept aside
        aside = temp.with_name(f"{temp.name}.old")  # swept as an orphan if a crash keeps it
        os.rename(target, aside)
        os.rename(temp, target)
        temp = aside
    shutil.rmtree(temp, ignore_errors=True)  # now the old checkpoint
    with contextlib.suppress(OSError):  # make the renames durable
        os.fsync(folder := os.open(target.parent, os.O_RDONLY))
        os.close(folder)
    for orphan in target.parent.glob(f".{target.name}.*.tmp*"):  # from killed saves
        if orphan.stat().st_mtime < started:
            shutil.rmtree(orphan, ignore_errors=True)
    return size


def save(target: Path, shards: dict[str, Any], meta: dict[str, Any]) -> int:
    """Write ``shards`` (each rank its own), rank 0's ``meta`` to a temp folder; swap it in."""
    import torch.distributed.checkpoint as dcp

    tensors, started = dict(shards), time.time()
    if distributed.is_main():  # and rank 0 the rest, packed by torch.save as one uint8 tensor
        buffer = io.BytesIO()
        torch.save(meta, buffer)
        tensors[_PACKED] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    temp = target.with_name(f".{target.name}.{_one_path(target)}.tmp")
    try:
        dcp.save(tensors, checkpoint_id=temp)
    except BaseException as error:
        if distributed.is_main():
            shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, dcp.api.CheckpointException):  # a BaseException, with every failure
            rank, (cause, _) = next(iter(error.failures.items()))
            problem = f"rank {rank} could not write {str(target)!r}, the old checkpoint is intact"
            raise OSError(getattr(cause, "errno", None), f"{problem}: {cause}") from None
        raise
    return distributed.on_main(lambda: _swap_in(temp, target, started))


def _one_path(target: Path) -> str:
    """Return rank 0's random name for the temp folder; raise if the ranks name other folders."""
    asked = distributed.all_gather((str(target.absolute()), secrets.token_hex(8)))
    if len({path for path, _ in asked}) > 1:
        raise ValueError(
            f"'path' differs between the ranks ({[path for path, _ in asked]}, by rank), but a "
            f"sharded checkpoint is one folder all ranks share; give every rank the same path"
        )
    return asked[0][1]


def strays(target: Path) -> list[str] | None:
    """Return the files in folder ``target`` fntrain did not write (None: not its checkpoint)."""
    with contextlib.suppress(CheckpointError):
        if _PACKED in (metadata := _metadata(target)).state_dict_metadata:
            ours = {_METADATA, *(info.relative_path for info in metadata.storage_data.values())}
            return sorted(entry.name for entry in target.iterdir() if entry.name not in ours)
    return None


def _metadata(target: Path) -> Any:
    """Return the folder's metadata if allow-listed, all tensors, all files in the folder."""
    # DCP would unpickle a non-tensor entry with weights_only=False
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    class Unpickler(pickle.Unpickler):  # refuses every global outside _ALLOWED
        def find_class(self, module: str, name: str) -> Any:
            """Return an allowed class or dtype; raise CheckpointError for anything else."""
            dtype = getattr(torch, name, None) if module == "torch" else None
            if (module, name) in _ALLOWED or isinstance(dtype, torch.dtype):
                return super().find_class(module, name)
            raise CheckpointError(
                f"refused to load {str(target)!r}: its {_METADATA} names {module}.{name}, which "
                f"a checkpoint's metadata does not hold, and unpickling it could run code"
            )

    try:
        with open(target / _METADATA, "rb") as handle:
            metadata = Unpickler(handle).load()
        entries, files = metadata.state_dict_metadata, metadata.storage_data.values()
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"{str(target)!r} is not a loadable sharded checkpoint: its {_METADATA} is "
            f"unreadable ({type(error).__name__}: {error})"
        ) from None
    odd = [key for key, entry in entries.items() if type(entry) is not TensorStorageMetadata]
    paths = [getattr(info, "relative_path", None) for info in files]
    if type(metadata) is not Metadata or odd or any(Path(str(p)).name != p for p in paths):
        raise CheckpointError(
            f"refused to load {str(target)!r}: its {_METADATA} lists "
            f"{f'non-tensor entries {odd[:3]}' if odd else 'files outside the folder'}, "
            f"which fntrain never writes, and loading them could run code or read other files"
        )
    return metadata


def _load(target: Path, state: dict[str, Any], alone: bool) -> None:
    """Load ``state`` in place from ``target`` (with the other ranks unless ``alone``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):  # DCP's, the metadata read through _metadata
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _metadata(target)
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled": loading alone is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=Reader(target), no_dist=alone)
    except (Exception, dcp.api.CheckpointException) as error:  # the latter is a BaseException
        lines = [line for line in str(error).splitlines() if "Error" in line] or [repr(error)]
        raise CheckpointError(
            f"{str(target)!r} is not a loadable sharded checkpoint (a shard missing or "
            f"truncated?); nothing was loaded: {lines[-1].strip()}"
        ) from error


def _blank(like: torch.Tensor | None, entry: Any) -> torch.Tensor:
    """Return a tensor to load ``entry`` into: shaped as ``like`` where it fits, else plain."""
    size, dtype = tuple(entry.size), entry.properties.dtype
    if like is not None and tuple(like.shape) == size:
        return torch.empty_like(like, dtype=dtype)  # a DTensor keeps its placement
    return torch.empty(size, dtype=dtype)


def read(target: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Read a sharded folder into fresh tensors laid out as ``model``'s; return the payload."""
    entries = _metadata(target).state_dict_metadata
    if _PACKED not in entries:
        raise CheckpointError(f"{str(target)!r} is a sharded checkpoint not written by fntrain")
    head, alone = {_PACKED: _blank(None, entries[_PACKED])}, not is_sharded(model)
    if not alone:
        _one_path(target)
    _load(target, head, alone)  # a plain model reads the whole folder itself: no collective
    try:
        payload = torch.load(io.BytesIO(head[_PACKED].numpy().tobytes()), weights_only=True)
        rest = dict(payload.pop("model_rest", {}))
    except Exception as error:
        raise CheckpointError(
            f"{str(target)!r} is a malformed sharded checkpoint: its packed entries do not "
            f"load with weights_only=True ({type(error).__name__})"
        ) from None
    current = model.state_dict()  # keys it lacks or shapes that differ load as plain tensors
    weights = {key[6:]: _blank(current.get(key[6:]), entry)
               for key, entry in entries.items() if key.startswith("model.")}  # fmt: skip
    own = f"rank{0 if alone else distributed.world()[0]}."  # this rank's buffers, else rank 0's
    own = own if any(key.startswith(own) for key in entries) else "rank0."
    mine = {key[len(own):]: _blank(current.get(key[len(own):]), entry)
            for key, entry in entries.items() if key.startswith(own)}  # fmt: skip
    wanted: dict[str, Any] = {"model": weights, **({own[:-1]: mine} if mine else {})}
    saved, kind = payload.get("optimizer"), type(optimizer).__qualname__
    if optimizer is not None and saved and payload.get("optimizer_class") == kind:  # by name
        names = [fqn for group in saved["param_groups"] for fqn in group["params"]]
        ours = (p for group in optimizer.param_groups for p in group["params"])
        params = dict(zip(names, ours, strict=False))
        wanted["optimizer"] = {}
        for fqn, name in payload.get("optimizer_tensors", []):
            entry = entries[f"optimizer.{fqn}.{name}"]
            wanted["optimizer"].setdefault(fqn, {})[name] = _blank(params.get(fqn), entry)
    _load(target, wanted, alone)
    payload["model"] = {**weights, **mine, **rest}
    for fqn, tensors in wanted.get("optimizer", {}).items():
        saved["state"].setdefault(fqn, {}).update(tensors)
    return payload
