"""save_checkpoint and load_checkpoint: atomic, code-free, complete, all-or-nothing to load."""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import re
import secrets
import stat
import sys
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.serialization import MAP_LOCATION as MapLocation  # a device, str, dict, function

from fntrain import distributed, records, restore, sharded
from fntrain.records import Checkpoint, CheckpointError, MetricValue, SavedCheckpoint, Step

if sys.platform == "win32":  # no advisory locks: orphans are judged by age alone
    fcntl = None
else:
    import fcntl

FORMAT = "fntrain.checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Tensor, nn.Parameter)
_LABELS = {"metrics": "'metrics'", "extra": "'extra'", "rng": "the RNG state"}
_STATES = ("optimizer", "scheduler", "scaler")
_MARKS = {"torch_version", "digest", *(f"{name}_class" for name in _STATES)}  # fntrain's only
_LOOP_KEYS = {  # where hand-written loops' checkpoint dicts keep each state
    "model": ("model", "state_dict", "model_state_dict", "net"),
    "optimizer": ("optimizer", "optimizer_state_dict"), "scaler": ("scaler", "scaler_state_dict"),
    "scheduler": ("scheduler", "lr_scheduler", "scheduler_state_dict"),
}  # fmt: skip

PathLike = str | os.PathLike[str]
Scheduler = LRScheduler | ReduceLROnPlateau


def type_name(value: Any) -> str:
    """Return the qualified name of ``value``'s type, for error messages."""
    module, name = type(value).__module__, type(value).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def write_atomically(target: Path, write: Callable[[BinaryIO], None]) -> int:
    """Run ``write`` on a locked temp file, fsync it, rename it over ``target``; return its size."""
    started, room = time.time(), 255 - 22  # a name's bytes, less the 22 the temp name adds
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no os.pathconf on Windows
        room = os.pathconf(target.parent, "PC_NAME_MAX") - 22  # -23: no limit
    stem = os.fsencode(target.name)[: room if room > 0 else None].decode(errors="ignore")
    temp = target.with_name(f".{stem}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(temp, flags, 0o666), "wb") as handle:  # the umask applies
            with contextlib.suppress(AttributeError, OSError):  # fcntl is None on Windows
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the writer dies
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            with contextlib.suppress(FileNotFoundError):
                os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))
            if os.name == "nt":  # Windows cannot rename an open file; elsewhere, still locked
                handle.close()
            os.replace(temp, target)
    except BaseException as error:
        written = temp.stat().st_size if temp.exists() else 0
        with contextlib.suppress(OSError):
            os.unlink(temp)
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "unexpected pos" in str(error):  # torch's writer after a short write
            old = f"the old {target.name!r} is intact" if target.exists() else "nothing was saved"
            where = f"{str(target.parent)!r} (or quota) after {written} bytes of {target.name!r}"
            raise OSError(errno.ENOSPC, f"no space left in {where}; {old}") from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        os.fsync(folder := os.open(target.parent, os.O_RDONLY))
        os.close(folder)
    names = re.compile(rf"\.{re.escape(stem)}\.[0-9a-f]{{16}}\.tmp")
    with contextlib.suppress(OSError):  # what killed saves of target left: older, unlocked
        for orphan in [e.path for e in os.scandir(target.parent) if names.fullmatch(e.name)]:
            with contextlib.suppress(OSError), open(orphan, "rb") as probe:
                if os.stat(probe.fileno()).st_mtime < started:
                    if fcntl is not None:  # fails while the writing process is alive
                        fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                    os.unlink(orphan)
    return target.stat().st_size


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the plain model inside DDP/DataParallel and ``torch.compile`` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    inner = model.module if isinstance(model, wrappers) else getattr(model, "_orig_mod", None)
    return _unwrap(inner) if isinstance(inner, nn.Module) else model


def _check_plain(value: Any, where: str, inside: tuple[int, ...] = ()) -> None:
    """Raise TypeError unless ``value`` is data that ``torch.load(weights_only=True)`` loads."""
    if isinstance(value, torch.Tensor) and (value.is_meta or value.layout != torch.strided):
        kind = "meta" if value.is_meta else "sparse"
        raise TypeError(f"{where} is a {kind} tensor; save a dense one (.to_dense(), materialised)")
    if type(value) in _PLAIN:
        return
    if type(value) in (list, tuple, torch.Size, dict, OrderedDict):
        if id(value) in inside:
            raise TypeError(f"{where} contains itself (a cycle); a checkpoint holds trees of data")
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if type(key) not in (bool, int, float, str, type(None)):
                raise TypeError(f"{where} must have str or number keys, but has the key {key!r}")
            _check_plain(item, f"{where}[{key!r}]", (*inside, id(value)))
        return
    plain = "None, bool, int, float, str, tensors, dtypes, devices and lists, tuples, dicts of them"
    raise TypeError(f"{where} must hold only plain data ({plain}), but it is a {type_name(value)}")


def _digest(payload: dict[str, Any]) -> int:
    """Return a CRC of ``payload`` but its digest: a tensor by dtype, shape, sum of 64-bit words."""
    seen: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta:
            raw = value.detach().resolve_conj().resolve_neg().ravel().view(torch.uint8)  # views too
            whole = raw.numel() // 8 * 8 if raw.storage_offset() % 8 == 0 else 0
            total = int(raw[:whole].view(torch.int64).sum()) if whole else 0  # wraps: fine
            total += int(raw[whole:].sum(dtype=torch.int64)) if whole < raw.numel() else 0
            seen.append((str(value.dtype), tuple(value.shape), total))
        elif isinstance(value, dict):
            for key, item in value.items():
                seen.append(repr(key))
                walk(item)
        elif isinstance(value, list | tuple):
            seen.append((type(value).__name__, len(value)))
            for item in value:
                walk(item)
        else:
            seen.append(repr(value))

    walk({key: value for key, value in payload.items() if key != "digest"})
    return zlib.crc32(repr(seen).encode())


def _check_args(path: Any, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> Path:
    """Return ``path`` as a Path; raise TypeError naming the first argument of the wrong kind."""
    target = None
    with contextlib.suppress(TypeError):  # neither a str nor an os.PathLike of str
        target = Path(path)
    methods = ("state_dict", "load_state_dict")
    checks = [
        ("path", path, target is not None, "a str or os.PathLike of str"),
        ("model", model, isinstance(model, nn.Module), "a torch.nn.Module"),
        ("optimizer", optimizer, isinstance(optimizer, torch.optim.Optimizer | None),
         "a torch.optim.Optimizer or None"),
        ("scheduler", scheduler, scheduler is None or all(callable(getattr(scheduler, m, None))
         for m in methods), "an LR scheduler (with state_dict and load_state_dict) or None"),
        ("scaler", scaler, isinstance(scaler, torch.amp.GradScaler | None),
         "a torch.amp.GradScaler or None"),
    ]  # fmt: skip
    for name, value, fits, kind in checks:
        if not fits:
            raise TypeError(f"'{name}' must be {kind}, but got {type_name(value)}")
    return Path(path)


def _check_is_file(target: Path, must_exist: bool, folder: bool = False) -> None:
    """Raise unless ``target`` is a file (or with ``folder`` a sharded checkpoint's folder)."""
    stray = sharded.strays(target) if folder and not must_exist and target.is_dir() else None
    if stray:  # a save replaces only a folder it wrote
        raise CheckpointError(f"'path' {str(target)!r} holds files fntrain did not write {stray}")
    ours = stray == [] or (must_exist and (target / ".metadata").is_file())
    if target.is_dir() and not (folder and ours):
        kind = "a sharded checkpoint" if folder else "a checkpoint file"
        raise CheckpointError(f"'path' {str(target)!r} is a folder, not {kind}")
    if folder and not must_exist and target.is_file():
        problem = "a sharded (FSDP2) model is saved as a folder of shards; give another path"
        raise CheckpointError(f"'path' {str(target)!r} is a file, but {problem}")
    if must_exist and not target.exists():
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint at 'path' {str(target)!r}")
    if not target.parent.is_dir():
        where = str(target.parent)
        raise FileNotFoundError(errno.ENOENT, f"the folder of 'path' does not exist: {where!r}")


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    step: int | Step = 0,
    metrics: Mapping[str, MetricValue] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> SavedCheckpoint:
    """Write a complete, resumable checkpoint atomically (never torn); return what was written.

    Args:
        path: the file to write (its folder must exist); for an FSDP2 model, a folder of shards.
        model: the model; a DDP or compiled wrapper is saved as the plain model.
        optimizer: its state is saved when given.
        scheduler: an LR scheduler whose state is saved when given.
        scaler: a ``torch.amp.GradScaler`` whose state is saved when given.
        epoch: your epoch counter, stored as given.
        step: the optimizer steps done, or ``on_step``'s ``ft.Step``: ``train_epoch(...,
            resume=ckpt)`` then continues the pass after that step, drawing the same data.
        metrics: name to value (floats or tensors), e.g. ``EvalResult.metrics``.
        extra: your own plain data (numbers, str, tensors, lists and dicts of them).

    Raises:
        TypeError: an argument of the wrong type, or a state weights_only=True would not load.
        ValueError: ``epoch`` or ``step`` is not a non-negative int.

    Example:
        >>> import tempfile, os, torch, fntrain as ft
        >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
        >>> ft.save_checkpoint(path, torch.nn.Linear(4, 2), epoch=3, metrics={"acc": 0.9}).epoch
        3
    """
    target = _check_args(path, model, optimizer, scheduler, scaler)
    sharded.refuse_fsdp1(model, "the checkpoint")
    sharded.reshard(model)
    shards = sharded.is_sharded(model)
    distributed.everywhere(  # a folder is every rank's, a file rank 0's (node-local disks)
        lambda: _check_is_file(target, must_exist=False, folder=shards)
        if shards or distributed.is_main() else None
    )  # fmt: skip
    if isinstance(step, Step) and step.origin is None:
        why = "the origin of its pass (built by hand?); pass on_step's Step, or an int"
        raise ValueError(f"'step' is an ft.Step without {why}")
    at, step = (step, step.index + 1) if isinstance(step, Step) else (None, step)
    for name, value in (("epoch", epoch), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"'{name}' must be a non-negative int, but got {value!r}")
    for name, given in (("metrics", metrics), ("extra", extra)):
        if given is not None and not isinstance(given, Mapping):
            raise TypeError(f"'{name}' must be a mapping or None, but got {type_name(given)}")
    payload = {"format": FORMAT, "version": VERSION, "torch_version": str(torch.__version__)}
    for name, obj in zip(_STATES, (optimizer, scheduler, scaler), strict=True):
        skip = shards and name == "optimizer"  # FSDP2's goes into the shards
        payload[name] = None if obj is None or skip else obj.state_dict()
        payload[f"{name}_class"] = None if obj is None else type(obj).__qualname__
    gathered = distributed.all_gather((restore.capture_rng(), None if at is None else at.origin))
    states, starts = [state for state, _ in gathered], [start for _, start in gathered]  # ranks'
    payload.update(rng=states[0], epoch=epoch, step=step, metrics=dict(metrics or {}))
    if at is not None:
        payload["position"] = {"batch_index": at.batch_index, "index": at.index, "starts": starts}
    payload["extra"] = dict(extra or {})
    if len(states) > 1:
        payload["rng_ranks"] = states
    payload["model"] = None if shards else _unwrap(model).state_dict()
    for key, entry in payload.items():
        _check_plain(entry, _LABELS.get(key, f"'{key}' state"))
    if shards:  # each rank writes its own shards: nothing is gathered
        import torch.distributed.checkpoint.state_dict as dsd

        params = [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]]
        if foreign := len({id(p) for p in params} - {id(p) for p in model.parameters()}):
            why = "a sharded checkpoint keeps optimizer state by the model's names"
            raise ValueError(f"'optimizer' holds {foreign} parameter(s) not the model's, but {why}")
        payload["model"] = dsd.get_model_state_dict(model)
        if optimizer is not None:  # DSD would step an optimizer without state to make one
            state = dsd.get_optimizer_state_dict if optimizer.state else lambda _, o: o.state_dict()
            payload["optimizer"] = state(model, optimizer)
        tensors, meta = sharded.split(payload, {name for name, _ in model.named_buffers()})
        _check_plain(meta, "the checkpoint's non-tensor state")
        size = sharded.save(target, tensors, meta)
    else:
        payload["digest"] = _digest(payload)
        size = distributed.on_main(lambda: write_atomically(target, partial(torch.save, payload)))
    return SavedCheckpoint(path=target, size=size, epoch=epoch, step=step)


def _position(payload: dict[str, Any], target: Path) -> dict[str, Any] | None:
    """Return this rank's place in the pass a file was saved in (None: an epoch boundary)."""
    saved = payload.get("position")
    if saved is None:
        return None
    try:
        starts, (rank, size) = saved["starts"], distributed.world()
        start = starts[rank] if len(starts) == size else starts[0]  # else load_checkpoint warns
        place = {"batch_index": int(saved["batch_index"]), "index": int(saved["index"])}
        return place | {"start": start, "now": _rng_state(payload)[0]}
    except (KeyError, IndexError, TypeError, ValueError) as error:
        why = f"its 'position' entry fails with {error!r}"
        raise CheckpointError(f"{str(target)!r} is a malformed fntrain checkpoint: {why}") from None


def _check_map_location(value: Any, where: str = "'map_location'") -> None:
    """Raise unless ``value`` is a map_location torch.load takes, naming a device that exists."""
    if isinstance(value, dict):
        for key, device in value.items():
            _check_map_location(device, f"'map_location'[{key!r}]")
    elif value is not None and not callable(value):
        if not isinstance(value, str | torch.device):
            kinds = "a str, torch.device, dict, callable or None"
            raise TypeError(f"{where} must be {kinds}, but got {type_name(value)}")
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(f"{where} must name a device like 'cuda:0', not {value!r}") from None
        available = getattr(getattr(torch, device.type, None), "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"{where} is {value!r}, but {device.type} is not available here")


def _read(target: Path, map_location: MapLocation) -> Any:
    """Load ``target`` with ``weights_only=True``; a failure of the file is a CheckpointError."""
    raised: list[BaseException] = []
    where = map_location
    if callable(map_location):

        def where(storage: Any, location: str) -> Any:
            try:
                return map_location(storage, location)
            except Exception as error:  # the user's function failed, not the file
                raised.append(error)
                raise

    try:
        return torch.load(target, map_location=where, weights_only=True)
    except Exception as error:
        if raised:
            prefix = f"'map_location' raised for {str(target)!r}: "
            raise records.reword(raised[0], prefix=prefix) from None
        if "weights only load failed" in str(error).lower():
            found = (re.findall(r"GLOBAL ([\w.]+)", str(error)) or ["object"])[0]
            raise CheckpointError(
                f"refused to load {str(target)!r}: it holds a pickled {found} (a whole model saved "
                f"with torch.save(model)?), which could run code. If you trust it, convert it once:"
                f" torch.save(torch.load({str(target)!r}, weights_only=False).state_dict(), 'w.pt')"
            ) from None
        why = f"(empty, truncated, not torch.save's): {type(error).__name__}: "
        why += records.first_line(error)
        raise CheckpointError(f"{str(target)!r} is not a loadable checkpoint {why}") from None


def _state_dict_problem(value: Any) -> str | None:
    """Say how ``value`` is not a model state_dict (str keys to tensors or extra state)."""
    if not isinstance(value, dict):
        return f"it is a {type_name(value)}, not a dict"
    for key, item in value.items():
        if not isinstance(key, str):
            return f"it has the key {key!r}, not a str"
        if not isinstance(item, torch.Tensor) and not key.endswith("_extra_state"):
            return f"its key {key!r} holds a {type_name(item)}, not a tensor"
    return None


def _from_loop(saved: dict[Any, Any]) -> dict[str, Any] | None:
    """Return a hand-written loop's checkpoint dict as a payload (None if it holds no model)."""
    found = {name: next((k for k in keys if k in saved), None) for name, keys in _LOOP_KEYS.items()}
    models = (k for k in _LOOP_KEYS["model"] if _state_dict_problem(saved.get(k)) is None)
    found["model"] = next(models, None)
    if found["model"] is None:
        return None
    found["epoch"] = "epoch" if type(saved.get("epoch")) is int else None  # stored as written
    taken = {key for key in found.values() if key is not None}
    payload = {name: None if key is None else saved[key] for name, key in found.items()}
    return payload | {"extra": {key: value for key, value in saved.items() if key not in taken}}


def _normalise(payload: Any, target: Path) -> dict[str, Any]:
    """Return a checked fntrain payload; a bare state_dict or a loop's dict becomes one."""
    keys = set(payload) if isinstance(payload, dict) else None  # its marks: a flipped "format"
    if keys is None or (payload.get("format") != FORMAT and len(_MARKS & keys) < len(_MARKS) - 1):
        if keys and _state_dict_problem(payload) is None:
            return {"model": payload}
        if keys and (from_loop := _from_loop(payload)) is not None:
            return from_loop
        held = f"dict with keys {list(payload)[:8]}" if keys is not None else type_name(payload)
        under = ", ".join(map(repr, _LOOP_KEYS["model"]))
        what = f"neither an fntrain checkpoint nor a model state_dict (bare, or under {under})"
        raise CheckpointError(f"{str(target)!r} is {what}; it holds a {held}")
    if (version := payload.get("version")) != VERSION:
        why = f"of version {version!r}, but this fntrain reads version {VERSION}"
        raise CheckpointError(f"{str(target)!r} is an fntrain checkpoint {why}")
    problem = _state_dict_problem(payload["model"]) if "model" in payload else "there is none"
    problem = problem and f"its 'model' entry is not a model state_dict: {problem}"
    for name, kind in {"epoch": int, "step": int, "metrics": dict, "extra": dict}.items():
        value = payload.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            problem = f"its {name!r} entry must be a {kind.__name__}, but is a {type_name(value)}"
    if problem is not None:
        raise CheckpointError(f"{str(target)!r} is a malformed fntrain checkpoint: {problem}")
    if "digest" in payload and payload["digest"] != _digest(payload):  # a flipped "format" too
        why = "its contents do not match their checksum (a byte changed on disk or in transfer)"
        raise CheckpointError(f"{str(target)!r} is corrupt: {why}; nothing was loaded")
    return payload


def _model_problems(saved: dict[str, Any], current: dict[str, Any], strict: bool) -> list[str]:
    """List every difference between the file's and the model's keys and tensor shapes."""
    problems = []
    for label, keys, others in (("missing in", current, saved), ("unexpected in", saved, current)):
        if strict and (absent := [repr(key) for key in keys if key not in others]):
            problems.append(f"{label} the file: {', '.join(absent)}")
    for key, value in saved.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.is_meta or value.layout != torch.strided:
            kind = "meta" if value.is_meta else "sparse"
            problems.append(f"key {key!r} is a {kind} tensor in the file, not a dense one")
        elif isinstance(other := current.get(key), torch.Tensor) and value.shape != other.shape:
            shapes = f"{tuple(value.shape)} in the file but {tuple(other.shape)} in the model"
            problems.append(f"key {key!r} has shape {shapes}")
    return problems


def _optimizer_problems(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
    """List how the file's optimizer state does not fit ``optimizer`` (torch checks the rest)."""
    groups, current = saved.get("param_groups"), optimizer.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return ["the optimizer state in the file has not the form of Optimizer.state_dict()"]
    sizes, own = [len(g.get("params", ())) for g in groups], [len(g["params"]) for g in current]
    if sizes != own:
        return [f"the file's optimizer has param groups of sizes {sizes} but 'optimizer' has {own}"]
    indices = (i for g in groups for i in g["params"])
    params = dict(zip(indices, (p for g in current for p in g["params"]), strict=True))
    state = found if isinstance(found := saved.get("state"), dict) else {}
    return [
        f"optimizer state {name!r} of parameter {index} has shape {tuple(value.shape)} in "
        f"the file but the parameter has {tuple(params[index].shape)}"
        for index, entry in state.items()
        if isinstance(entry, dict) and index in params
        for name, value in entry.items()
        if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape
    ]


def _another_class(name: str, obj: Any, saved: dict[str, Any]) -> str | None:
    """Say if a state of a class the file does not name has keys ``obj``'s lacks, and lacks some."""
    if name == "optimizer":  # its options, but the keys schedulers and named_parameters() add
        groups = found if isinstance(found := saved.get("param_groups"), list) else []
        added = ("params", "names", "_lr", "_momentum")
        theirs = {k for g in groups if isinstance(g, dict) for k in g if not str(k).endswith(added)}
        ours = set(obj.defaults)
    else:
        theirs, ours = set(saved), set(obj.state_dict())
    has, lacks = (", ".join(sorted(map(repr, keys))) for keys in (theirs - ours, ours - theirs))
    state = f"the file's {name} state has {has} and lacks {lacks}: another class's?"
    return f"'{name}' is {type(obj).__name__}, but {state}" if has and lacks else None


def _state_problems(payload: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """List why the file's optimizer, scheduler and scaler states cannot go into those given."""
    problems: list[str] = []
    for name, obj in given.items():
        saved, theirs, own = payload.get(name), payload.get(f"{name}_class"), type(obj).__qualname__
        if saved is None:
            problems.append(f"'{name}' was given but the file holds no {name} state")
        elif theirs not in (None, own):
            problems.append(f"'{name}' is {own} but the file holds {theirs} state")
        elif not isinstance(saved, dict):
            problems.append(f"the {name} state in the file is a {type_name(saved)}, not a dict")
        elif theirs is None and name != "scaler" and (other := _another_class(name, obj, saved)):
            problems.append(other)
        elif name == "optimizer":
            problems += _optimizer_problems(saved, obj)
        elif name == "scaler" and obj.is_enabled() and not saved:
            problems.append("'scaler' is enabled but the file's GradScaler state is empty")
    return problems


def _custom_loading(model: nn.Module) -> bool:
    """Tell whether loading ``model`` runs non-torch code (hooks, extra state) that may fail."""
    for module in model.modules():
        kind = type(module)
        own = kind._load_from_state_dict is not nn.Module._load_from_state_dict
        custom = own and not kind.__module__.startswith("torch.")
        hooks = module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks
        if custom or hooks or kind.set_extra_state is not nn.Module.set_extra_state:
            return True
    return False


def _rng_state(payload: dict[str, Any]) -> tuple[Any, list[str]]:
    """Return this rank's RNG state in the file (None if it has none for it), and why not."""
    rank, size = distributed.world()
    ranks = found if isinstance(found := payload.get("rng_ranks"), list) else [payload.get("rng")]
    if "rng" in payload and len(ranks) == size:
        return ranks[rank], []
    held = f"holds the RNG states of {len(ranks)} process(es)"
    if "rng" in payload and size == 1:
        return ranks[0], [f"the checkpoint {held}; one process takes rank 0's, {restore.NOT_EXACT}"]
    held += f" but {size} ranks load it; they were not restored"
    held = held if "rng" in payload else "holds no RNG state (not saved by fntrain)"
    return None, [f"the checkpoint {held}, {restore.NOT_EXACT}"]


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: MapLocation = "cpu",
    strict: bool = True,
    restore_rng: bool | None = None,
) -> Checkpoint:
    """Restore a checkpoint into ``model`` and the states given, in place, all or nothing.

    Returns a frozen ``Checkpoint(path, epoch, step, metrics, extra, missing_keys, ...)``.

    Args:
        path: the checkpoint (file or folder of shards); a bare ``model.state_dict()`` or a
            loop's dict saved with torch.save loads too (its own keys go to ``extra``).
        model: the model to restore into (plain, DDP-wrapped, compiled or FSDP2-sharded).
        optimizer: restored when given; the file must hold a state of the same class.
        scheduler: an LR scheduler, restored when given.
        scaler: a ``torch.amp.GradScaler``, restored when given.
        map_location: where tensors load first, as for ``torch.load``; the model keeps its devices.
        strict: require the model keys to match exactly; with False, skipped keys are returned.
        restore_rng: restore the RNG states (bit-exact resume); None: if ``optimizer`` is given.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``map_location`` names no device available here.
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a loadable checkpoint (e.g. pickled code), or does not fit.

    Example:
        >>> import tempfile, os, torch, fntrain as ft
        >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
        >>> _ = ft.save_checkpoint(path, torch.nn.Linear(4, 2), epoch=3)
        >>> ft.load_checkpoint(path, torch.nn.Linear(4, 2)).epoch
        3
    """
    target = _check_args(path, model, optimizer, scheduler, scaler)
    sharded.refuse_fsdp1(model, "the loaded state")
    _check_map_location(map_location)
    together = sharded.in_lockstep(model)  # then every rank must load one checkpoint
    check = lambda: _check_is_file(target, must_exist=True, folder=True)  # noqa: E731
    distributed.everywhere(check) if together else check()
    if target.is_dir():  # a sharded checkpoint: read into tensors laid out as the model's
        payload = _normalise(sharded.read(target, _unwrap(model), optimizer), target)
    else:
        with distributed.told() if together else contextlib.nullcontext():
            payload = _normalise(_read(target, map_location), target)
        seen = (payload.get("digest"), payload.get("epoch"), payload.get("step"))
        if together and len(set(distributed.everywhere(lambda: seen))) > 1:
            why = "(node-local copies?): replicas would differ; nothing was loaded"
            raise CheckpointError(f"the ranks read different checkpoints at {str(target)!r} {why}")
        if optimizer is not None and sharded.is_sharded(model):
            why = "loads into a sharded (FSDP2) model's weights, not its optimizer"
            raise CheckpointError(f"{str(target)!r} is a single file: it {why}; omit 'optimizer'")
    position = _position(payload, target)
    plain = _unwrap(model)
    current = plain.state_dict()
    model_state = keyed = dict(payload["model"])  # or, wrapper prefixes cut, what fits it best
    while cut := [p for p in _WRAPPER_PREFIXES if keyed and all(k.startswith(p) for k in keyed)]:
        keyed = {key.removeprefix(cut[0]): value for key, value in keyed.items()}
        model_state = max(model_state, keyed, key=lambda state: len(current.keys() & state.keys()))
    objects = dict(zip(_STATES, (optimizer, scheduler, scaler), strict=True))
    given = {name: obj for name, obj in objects.items() if obj is not None}
    problems = _model_problems(model_state, current, strict) + _state_problems(payload, given)
    unfit = f"{str(target)!r} does not fit what was given; nothing was loaded:"
    if problems:
        raise CheckpointError("\n  ".join([unfit, *problems]))
    undo: dict[str, Callable[[], object]] = {}  # load every state, the model last; or undo all
    try:
        rewind = optimizer is not None if restore_rng is None else restore_rng
        state, notes = _rng_state(payload) if rewind else (None, [])
        if state is not None:
            before = restore.capture_rng()
            undo["the RNG states"] = lambda: restore.restore_rng(before)
            notes += restore.restore_rng(state)
        for name, obj in given.items():
            kept = copy.deepcopy(obj.state_dict()) if name != "optimizer" else obj.state_dict()
            undo[f"'{name}'"] = partial(obj.load_state_dict, kept)
            obj.load_state_dict(payload[name])
        if _custom_loading(plain):  # code that may fail after earlier keys were copied
            kept = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                    for k, v in plain.state_dict().items()}  # fmt: skip
            undo["'model'"] = lambda: plain.load_state_dict(kept, strict=False)
        if not sharded.is_sharded(plain) or any(map(sharded.is_dtensor, model_state.values())):
            keys = plain.load_state_dict(model_state, strict=strict)
        else:  # full tensors into a sharded model: sharded first
            import torch.distributed.checkpoint.state_dict as dsd

            options = dsd.StateDictOptions(full_state_dict=True, strict=strict)
            keys = dsd.set_model_state_dict(plain, dict(model_state), options=options)  # a copy
    except Exception as error:
        failed = []  # an undo that fails does not stop the others
        for what, put_back in reversed(undo.items()):
            try:
                put_back()
            except Exception as undo_error:
                failed.append(f"{what} ({records.first_line(undo_error)})")
        if failed:  # the rest was put back
            unfit = unfit.replace("nothing was loaded", f"could not put back {', '.join(failed)}")
        raise CheckpointError(f"{unfit} {records.first_line(error)}") from error
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    stored: dict[str, Any] = {k: payload.get(k) for k in ("epoch", "step", "metrics", "extra")}
    stored["batch_index"] = None if position is None else position["batch_index"]
    return Checkpoint(path=target, **stored, **keys._asdict(), position=position)
