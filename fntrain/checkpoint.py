"""save_checkpoint and load_checkpoint: atomic, code-free, complete, all-or-nothing to load."""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import random
import re
import secrets
import stat
import time
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from fntrain import distributed, sharded
from fntrain.records import Checkpoint, CheckpointError, SavedCheckpoint, reword

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; orphans are judged by age alone
    fcntl = None  # type: ignore[assignment]

FORMAT = "fntrain.checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Tensor, nn.Parameter)
_LABELS = {"metrics": "'metrics'", "extra": "'extra'", "rng": "the RNG state"}
_STATES = ("optimizer", "scheduler", "scaler")

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None
Scheduler = LRScheduler | ReduceLROnPlateau


def type_name(value: Any) -> str:
    """Return the qualified name of ``value``'s type, for error messages."""
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


# --- random number generator states as plain data (loadable with weights_only=True) ---

_NOT_EXACT = "so resuming will not be bit-exact"


def _capture_rng() -> dict[str, Any]:
    """Return the states of Python's, NumPy's (if installed), torch's CPU and CUDA RNGs."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        keys = torch.from_numpy(keys.astype(np.int64))
        state["numpy"] = (str(kind), keys, int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _bytes(value: Any) -> torch.Tensor:
    """Return ``value`` on the CPU; raise TypeError unless it is a 1-D uint8 tensor."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise TypeError(f"expected a 1-D uint8 tensor, but it is a {type(value).__qualname__}")
    return value.cpu()


def _set_numpy(value: Any) -> list[str]:
    """Set NumPy's global RNG from its five saved parts (or say it is not installed)."""
    types = (str, torch.Tensor, int, int, float)
    if not isinstance(value, tuple | list) or len(value) != len(types):
        raise TypeError(f"expected a tuple of 5 parts, but it is a {type(value).__qualname__}")
    if not all(isinstance(part, kind) for part, kind in zip(value, types, strict=True)):
        raise TypeError(f"expected (str, Tensor, int, int, float), but got {value!r:.80}")
    try:
        import numpy as np
    except ImportError:
        return [f"the checkpoint holds a NumPy RNG state but NumPy is not installed; {_NOT_EXACT}"]
    kind, keys, pos, has_gauss, cached = value
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    return []


def _set_cuda(states: Any) -> list[str]:
    """Set every CUDA device's RNG; say why not where CUDA or devices are missing."""
    if not isinstance(states, list | tuple):
        raise TypeError(f"expected a list of uint8 tensors, but it is a {type(states).__name__}")
    states = [_bytes(state) for state in states]
    if not torch.cuda.is_available() or len(states) != torch.cuda.device_count():
        visible = torch.cuda.device_count() if torch.cuda.is_available() else "no CUDA device"
        return [
            f"the checkpoint holds the CUDA RNG states of {len(states)} device(s) but "
            f"{visible} are visible here; they were not restored, {_NOT_EXACT}"
        ]
    torch.cuda.set_rng_state_all(states)
    return []


def _part(name: str, attempt: Callable[[], list[str] | None]) -> list[str]:
    """Run ``attempt``; raise ValueError naming the ``name`` RNG state if it fails."""
    try:
        return attempt() or []
    except Exception as error:  # any failure means the saved state cannot be restored
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(f"the {name} RNG state in the file cannot be restored: {reason}") from None


def _restore_rng(state: Any) -> list[str]:
    """Restore the states :func:`_capture_rng` wrote; return each part that could not be, and why.

    A malformed part raises ValueError naming it, after the parts before it were set: the
    caller puts back what it captured before. The returned messages say which generator
    was left as it was here (NumPy not installed, CUDA not available).
    """
    if not isinstance(state, dict):
        raise ValueError(f"the RNG state in the file must be a dict, not {type(state).__name__}")
    _part("Python", lambda: random.setstate(state.get("python")))
    _part("torch", lambda: torch.set_rng_state(_bytes(state.get("torch"))))
    notes = _part("NumPy", lambda: _set_numpy(state["numpy"])) if "numpy" in state else []
    return notes + (_part("CUDA", lambda: _set_cuda(state["cuda"])) if "cuda" in state else [])


# --- writing a file atomically ------------------------------------------------------------


def _temp_names(target: Path) -> re.Pattern[str]:
    """Match the names of the temporary files that saves of ``target`` create."""
    return re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{16}}\.tmp")


def _remove_orphans(target: Path, started: float) -> None:
    """Delete temp files that killed saves of ``target`` left: older than ``started``, unlocked."""
    names = _temp_names(target)
    with contextlib.suppress(OSError):
        orphans = [e.path for e in os.scandir(target.parent) if names.fullmatch(e.name)]
        for orphan in orphans:
            with contextlib.suppress(OSError), open(orphan, "rb") as probe:
                if os.stat(probe.fileno()).st_mtime >= started:
                    continue
                if fcntl is not None:  # fails while the writing process is alive
                    fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.unlink(orphan)


def write_atomically(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temporary file beside ``target``, fsync it, rename it over ``target``.

    A crash at any moment leaves either the old ``target`` or the new one. The temporary
    file is removed if ``write`` fails, and holds a lock while it is written so that no
    other save takes it for an orphan; a new file gets the mode ``open()`` gives, an
    existing one keeps its own.
    """
    started = time.time()
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(temp, flags, 0o666), "wb") as handle:  # the umask applies
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the writer dies
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            with contextlib.suppress(FileNotFoundError):
                os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))
            if os.name != "nt":  # renamed while locked
                os.replace(temp, target)
        if os.name == "nt":  # Windows cannot rename an open file
            os.replace(temp, target)
    except BaseException as error:
        written = temp.stat().st_size if temp.exists() else 0
        with contextlib.suppress(OSError):
            os.unlink(temp)
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "unexpected pos" in str(error):  # torch's writer after a short write
            old = f"the old {target.name!r} is intact" if target.exists() else "nothing was saved"
            raise OSError(
                errno.ENOSPC,
                f"no space left in {str(target.parent)!r} (or a quota reached) after writing "
                f"{written} bytes of {target.name!r}; {old} and the partial file was removed",
            ) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        folder = os.open(target.parent, os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)
    _remove_orphans(target, started)


# --- checking arguments ---------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the plain model inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str, inside: tuple[int, ...] = ()) -> None:
    """Raise TypeError unless ``value`` is data that ``torch.load(weights_only=True)`` loads."""
    if isinstance(value, torch.Tensor) and (value.is_meta or value.layout != torch.strided):
        raise TypeError(
            f"{where} is a {'meta' if value.is_meta else 'sparse'} tensor, which would not load "
            f"back into a model's dense tensors; save a dense tensor with real values "
            f"(.to_dense(), or materialise the model first)"
        )
    if type(value) in _PLAIN:
        return
    if type(value) in (list, tuple, torch.Size, dict, OrderedDict) and id(value) in inside:
        raise TypeError(f"{where} contains itself (a cycle); a checkpoint holds trees of data")
    inside = (*inside, id(value))
    if type(value) in (list, tuple, torch.Size):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", inside)
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (bool, int, float, str, type(None)):
                raise TypeError(f"{where} must have str or number keys, but has the key {key!r}")
            _check_plain(item, f"{where}[{key!r}]", inside)
        return
    raise TypeError(
        f"{where} must hold only plain data (None, bool, int, float, str, tensors, dtypes, "
        f"devices, and lists, tuples and dicts of them) so that it loads with "
        f"weights_only=True, but it is a {type_name(value)}"
    )


def _digest(payload: dict[str, Any]) -> int:
    """Return a checksum of everything in ``payload`` but its digest: tensor bytes, plain data.

    Each tensor adds the sum, modulo 2**64, of its bytes read as 64-bit words (any one
    changed byte changes it), its dtype and shape; everything else adds its ``repr``.
    Computed where the tensors are, at a fraction of ``torch.load``'s own time.
    """
    seen: list[Any] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            raw = value.detach().reshape(-1).view(torch.uint8)
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


def _check_count(name: str, value: Any) -> None:
    """Raise unless ``value`` is a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{name}' must be a non-negative int, but got {value!r}")


def _mapping(name: str, value: Any) -> dict[str, Any]:
    """Return ``value`` (None for empty) as a dict; raise TypeError naming ``name`` otherwise."""
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"'{name}' must be a mapping or None, but got {type_name(value)}")
    return dict(value or {})


def _check_objects(model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> None:
    """Raise TypeError naming the first argument that is not the kind of object expected."""
    methods = ("state_dict", "load_state_dict")
    checks = [
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


def _as_path(path: Any) -> Path:
    """Return ``path`` as a Path; raise TypeError naming 'path' if it is not str or PathLike."""
    if isinstance(path, str | os.PathLike):
        with contextlib.suppress(TypeError):
            return Path(path)
    raise TypeError(f"'path' must be a str or os.PathLike of str, but got {type_name(path)}")


def _check_is_file(target: Path, must_exist: bool, folder: bool = False) -> None:
    """Raise unless ``target`` is a file, or with ``folder`` a sharded checkpoint's folder.

    For saving, a free name in an existing folder will do.
    """
    if target.is_dir() and not (folder and (target / ".metadata").is_file()):
        kind = "a sharded checkpoint" if folder else "a checkpoint file"
        raise CheckpointError(f"'path' {str(target)!r} is a folder, not {kind}")
    if folder and not must_exist and target.is_file():
        raise CheckpointError(
            f"'path' {str(target)!r} is a file, but a sharded (FSDP2) model is saved as a "
            f"folder of shards; give another path"
        )
    if must_exist and not target.exists():
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint at 'path' {str(target)!r}")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"the folder of 'path' does not exist: {str(target.parent)!r}"
        )


# --- saving ---------------------------------------------------------------------------------


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Scheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    step: int = 0,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> SavedCheckpoint:
    """Write a complete, resumable checkpoint atomically; return what was written.

    The file holds the model state (unwrapped from DDP and ``torch.compile``), the
    optimizer, scheduler and GradScaler states, epoch, step, metrics, your ``extra``
    plain data, and the RNG states of Python, NumPy, torch and CUDA. It is written to a
    temporary file in the same folder, fsynced and renamed over ``path``, so a crash at
    any moment leaves either the old file or the new one, never a torn one; temporary
    files that killed saves of ``path`` left behind are removed. A new file gets the
    permissions ``open()`` would give it; an existing one keeps its own. Everything in it
    is checked to load with ``torch.load(..., weights_only=True)`` before it is written.

    Args:
        path: the file to write (its folder must exist).
        model: the model; a DDP or compiled wrapper is saved as the plain model.
        optimizer: its state is saved when given.
        scheduler: an LR scheduler whose state is saved when given.
        scaler: a ``torch.amp.GradScaler`` whose state is saved when given.
        epoch: the number of epochs completed.
        step: the number of optimizer steps completed.
        metrics: name to value (floats or tensors), e.g. ``EvalResult.metrics``.
        extra: your own plain data (ints, floats, str, tensors, lists and dicts of them),
            e.g. a DataLoader generator's state ``gen.get_state()``.

    Returns:
        A frozen ``SavedCheckpoint(path, size, epoch, step)``.

    Raises:
        TypeError: an argument has the wrong type, or a state holds something that
            ``weights_only=True`` would not load (the message names where).
        ValueError: ``epoch`` or ``step`` is not a non-negative int.

    Example:
        >>> import tempfile, os, torch, fntrain as ft
        >>> model = torch.nn.Linear(4, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
        >>> ft.save_checkpoint(path, model, epoch=3, metrics={"acc": 0.9}).epoch
        3
    """
    target = _as_path(path)
    _check_objects(model, optimizer, scheduler, scaler)
    sharded.refuse_fsdp1(model, "the checkpoint")
    shards = sharded.is_sharded(model)
    _check_is_file(target, must_exist=False, folder=shards)
    _check_count("epoch", epoch)
    _check_count("step", step)
    payload = {"format": FORMAT, "version": VERSION, "torch_version": str(torch.__version__)}
    for name, obj in zip(_STATES, (optimizer, scheduler, scaler), strict=True):
        payload[name] = (
            None if obj is None or (shards and name == "optimizer") else obj.state_dict()
        )
        payload[f"{name}_class"] = None if obj is None else type(obj).__qualname__
    states = distributed.all_gather(_capture_rng())  # every rank's, for an exact resume
    payload.update(
        rng=states[0],
        epoch=epoch,
        step=step,
        metrics=_mapping("metrics", metrics),
        extra=_mapping("extra", extra),
    )
    if len(states) > 1:
        payload["rng_ranks"] = states
    for key, value in payload.items():
        _check_plain(value, _LABELS.get(key, f"'{key}' state"))
    if shards:  # each rank writes its own shards: nothing is gathered
        payload["model"], payload["optimizer"] = sharded.states(model, optimizer)
        _check_plain(payload["optimizer"] and payload["optimizer"]["param_groups"], "'optimizer'")
        size = sharded.save(target, payload)
        return SavedCheckpoint(path=target, size=size, epoch=epoch, step=step)
    payload["model"] = _unwrap(model).state_dict()
    _check_plain(payload["model"], "'model' state")
    payload["digest"] = _digest(payload)

    def write() -> int:  # rank 0 only: the other ranks never touch the file
        write_atomically(target, lambda handle: torch.save(payload, handle))
        return target.stat().st_size

    size = distributed.on_main(write)
    return SavedCheckpoint(path=target, size=size, epoch=epoch, step=step)


# --- loading --------------------------------------------------------------------------------


def _check_map_location(value: Any, where: str = "'map_location'") -> None:
    """Raise unless ``value`` is a map_location torch.load takes, naming a device that exists."""
    if value is None or callable(value):
        return
    if isinstance(value, dict):
        for key, device in value.items():
            _check_map_location(device, f"'map_location'[{key!r}]")
        return
    if not isinstance(value, str | torch.device):
        raise TypeError(
            f"{where} must be a str, torch.device, dict, callable or None, but got "
            f"{type_name(value)}"
        )
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{where} must name a device such as 'cpu' or 'cuda:0', not {value!r}"
        ) from None
    available = getattr(getattr(torch, device.type, None), "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"{where} is {value!r}, but {device.type} is not available here")


def _first_line(error: BaseException) -> str:
    """Return the first line of an error's message (its repr when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def _read(target: Path, map_location: MapLocation) -> Any:
    """Load ``target`` with ``weights_only=True``; a failure of the file is a CheckpointError."""
    raised: list[BaseException] = []
    located = map_location
    if callable(map_location):

        def located(storage: Any, location: str) -> Any:
            try:
                return map_location(storage, location)  # type: ignore[operator]
            except Exception as error:
                raised.append(error)
                raise

    try:
        return torch.load(target, map_location=located, weights_only=True)
    except Exception as error:
        if raised:  # the user's function failed, not the file
            raise reword(raised[0], prefix=f"'map_location' raised for {str(target)!r}: ") from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        if "weights only load failed" in text.lower():
            found = re.search(r"GLOBAL ([\w.]+)", text)
            raise CheckpointError(
                f"refused to load {str(target)!r}: it holds a pickled "
                f"{found.group(1) if found else 'object'} (a whole model saved with "
                f"torch.save(model)?), not only tensors and plain data, and unpickling it "
                f"could run code. If you trust the file, turn it into a state dict once: "
                f"torch.save(torch.load({str(target)!r}, weights_only=False).state_dict(), "
                f"'weights.pt')"
            ) from None
        raise CheckpointError(
            f"{str(target)!r} is not a loadable checkpoint (empty, truncated, or not a file "
            f"written by torch.save): {type(error).__name__}: {_first_line(error)}"
        ) from None


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


def _normalise(payload: Any, target: Path) -> dict[str, Any]:
    """Return a checked fntrain payload; a bare state_dict becomes one with no epoch."""
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        if isinstance(payload, dict) and payload and _state_dict_problem(payload) is None:
            return {"model": payload}
        kind = f"a dict with keys {list(payload)[:8]}" if isinstance(payload, dict) else None
        raise CheckpointError(
            f"{str(target)!r} is neither an fntrain checkpoint nor a model state_dict; it "
            f"holds {kind or 'a ' + type(payload).__name__}"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{str(target)!r} is an fntrain checkpoint of version {payload.get('version')!r}, "
            f"but this fntrain reads version {VERSION}"
        )
    problem = _state_dict_problem(payload["model"]) if "model" in payload else "there is none"
    if problem is not None:
        problem = f"its 'model' entry is not a model state_dict: {problem}"
    for name, kind in {"epoch": int, "step": int, "metrics": dict, "extra": dict}.items():
        value = payload.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            problem = f"its {name!r} entry must be a {kind.__name__}, but is a {type_name(value)}"
    if problem is not None:
        raise CheckpointError(f"{str(target)!r} is a malformed fntrain checkpoint: {problem}")
    if "digest" in payload and payload["digest"] != _digest(payload):
        raise CheckpointError(
            f"{str(target)!r} is corrupt: its contents do not match the checksum written with "
            f"them (a changed byte on disk or in transfer); nothing was loaded, use another copy"
        )
    return payload


def _variants(state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield ``state``, then ``state`` with each further shared wrapper prefix stripped."""
    while True:
        yield state
        prefix = next(
            (p for p in _WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)), None
        )
        if prefix is None:
            return
        state = {key[len(prefix) :]: value for key, value in state.items()}


def _model_problems(
    saved: Mapping[str, Any], current: Mapping[str, Any], strict: bool
) -> list[str]:
    """List every difference between the file's and the model's keys and tensor shapes."""
    problems = []
    missing = [key for key in current if key not in saved]
    unexpected = [key for key in saved if key not in current]
    if strict and missing:
        problems.append(f"missing in the file: {', '.join(map(repr, missing))}")
    if strict and unexpected:
        problems.append(f"unexpected in the file: {', '.join(map(repr, unexpected))}")
    for key, value in saved.items():
        other = current.get(key)
        if isinstance(value, torch.Tensor) and (value.is_meta or value.layout != torch.strided):
            kind = "meta" if value.is_meta else "sparse"
            problems.append(f"key {key!r} is a {kind} tensor in the file, not a dense one")
            continue
        tensors = isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor)
        if tensors and tuple(value.shape) != tuple(other.shape):
            problems.append(
                f"key {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(other.shape)} in the model"
            )
    return problems


def _optimizer_problems(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
    """List how the file's optimizer state does not fit ``optimizer`` (torch checks the rest)."""
    groups, current = saved.get("param_groups"), optimizer.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return ["the optimizer state in the file has not the form of Optimizer.state_dict()"]
    sizes = [len(g.get("params", ())) for g in groups]
    if sizes != [len(g["params"]) for g in current]:
        return [
            f"the optimizer in the file has param groups of sizes {sizes} but 'optimizer' "
            f"has {[len(g['params']) for g in current]}"
        ]
    params = dict(
        zip(
            (i for g in groups for i in g["params"]),
            (p for g in current for p in g["params"]),
            strict=True,
        )
    )
    state = saved.get("state") if isinstance(saved.get("state"), dict) else {}
    return [
        f"optimizer state {name!r} of parameter {index} has shape {tuple(value.shape)} in "
        f"the file but the parameter has {tuple(params[index].shape)}"
        for index, entry in state.items()
        if isinstance(entry, dict) and index in params
        for name, value in entry.items()
        if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape
    ]


def _state_problems(payload: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """List why the file's optimizer, scheduler and scaler states cannot go into those given."""
    problems: list[str] = []
    for name, obj in given.items():
        saved, saved_class = payload.get(name), payload.get(f"{name}_class")
        if saved is None:
            problems.append(f"'{name}' was given but the file holds no {name} state")
        elif saved_class is not None and saved_class != type(obj).__qualname__:
            problems.append(
                f"'{name}' is {type(obj).__qualname__} but the file holds {saved_class} state"
            )
        elif not isinstance(saved, dict):
            problems.append(f"the {name} state in the file is a {type_name(saved)}, not a dict")
        elif name == "optimizer":
            problems += _optimizer_problems(saved, obj)
        elif name == "scaler" and obj.is_enabled() and not saved:
            problems.append(
                "'scaler' is enabled but the file's GradScaler state is empty (it was saved "
                "from a disabled GradScaler)"
            )
    return problems


def _custom_loading(model: nn.Module) -> bool:
    """Tell whether loading ``model`` runs code beyond torch's (hooks, extra state).

    Keys, shapes and layouts are checked before; torch's own modules cannot fail after
    that, so only such code needs the model's old state kept for a rollback.
    """
    for module in model.modules():
        kind = type(module)
        custom = not kind.__module__.startswith("torch.") and (
            kind._load_from_state_dict is not nn.Module._load_from_state_dict
        )
        hooks = module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks
        if custom or hooks or kind.set_extra_state is not nn.Module.set_extra_state:
            return True
    return False


def _rng_state(payload: dict[str, Any]) -> tuple[Any, list[str]]:
    """Return this rank's RNG state in the file (None if it has none for it), and why not."""
    rank, size = distributed.world()
    ranks = payload.get("rng_ranks")
    if isinstance(ranks, list) and len(ranks) == size:
        return ranks[rank], []
    if size == 1 or "rng" not in payload:
        return payload.get("rng"), []
    saved = len(ranks) if isinstance(ranks, list) else 1
    return None, [
        f"the checkpoint holds the RNG states of {saved} process(es) but {size} ranks load "
        f"it; they were not restored, {_NOT_EXACT}"
    ]


def _load_model(model: nn.Module, state: dict[str, Any], strict: bool) -> Any:
    """Load ``state`` into ``model``; full tensors into a sharded model are sharded first."""
    if not sharded.is_sharded(model) or any(_is_dtensor(v) for v in state.values()):
        return model.load_state_dict(state, strict=strict)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=strict)
    return set_model_state_dict(model, dict(state), options=options)  # it replaces values


def _is_dtensor(value: Any) -> bool:
    """Tell whether ``value`` is a DTensor."""
    return isinstance(value, torch.Tensor) and type(value).__name__ == "DTensor"


def _apply(
    payload: dict[str, Any],
    model: nn.Module,
    model_state: dict[str, Any],
    given: dict[str, Any],
    strict: bool,
    restore_rng: bool,
) -> tuple[Any, list[str]]:
    """Load every state in place, the model last; on any failure put everything back.

    The RNG, optimizer, scheduler and scaler states are small or replaced wholesale by
    ``load_state_dict``, so what they were is kept by reference and restored on failure;
    the model's keys and shapes were checked before, so its load does not fail midway.
    """
    undo: list[Callable[[], object]] = []
    notes: list[str] = []
    try:
        state, notes = _rng_state(payload) if restore_rng else (None, [])
        if state is not None:
            before = _capture_rng()
            undo.append(lambda: _restore_rng(before))
            notes = _restore_rng(state)
        for name, obj in given.items():
            kept = copy.deepcopy(obj.state_dict()) if name != "optimizer" else obj.state_dict()
            undo.append(lambda obj=obj, kept=kept: obj.load_state_dict(kept))
            obj.load_state_dict(payload[name])
        if _custom_loading(model):  # code that may fail after earlier keys were copied
            kept = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                    for k, v in model.state_dict().items()}  # fmt: skip
            undo.append(lambda: model.load_state_dict(kept, strict=False))
        keys = _load_model(model, model_state, strict)
    except Exception as error:
        for step in reversed(undo):
            step()
        raise CheckpointError(f"nothing was loaded: {_first_line(error)}") from error
    return keys, notes


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
    """Restore a checkpoint into ``model`` (and optimizer, scheduler, scaler) in place.

    The file is read with ``torch.load(..., weights_only=True)``, so a pickle that would
    run code is refused. Nothing changes unless everything loads: missing and unexpected
    keys and shape mismatches are reported together before anything is touched, an
    optimizer or scheduler of another class is refused, and if any state fails to load,
    the model, optimizer, scheduler, scaler and RNG states are put back as they were.
    A bare ``model.state_dict()`` saved with ``torch.save`` loads too (its epoch is None),
    and ``module.``/``_orig_mod.`` prefixes from DDP or ``torch.compile`` are handled on
    both sides.

    Args:
        path: the checkpoint file.
        model: the model to restore into (plain, DDP-wrapped or compiled).
        optimizer: restored when given; the file must hold a state of the same class.
        scheduler: an LR scheduler, restored when given.
        scaler: a ``torch.amp.GradScaler``, restored when given.
        map_location: where tensors are loaded first, as for ``torch.load`` (a device,
            a dict of location strings, or a function); the model's and optimizer's own
            devices are kept.
        strict: require the file's model keys to match the model's exactly; with False,
            the keys that were skipped are returned.
        restore_rng: restore the RNG states saved in the file, for a bit-exact resume.
            None (the default) restores them when ``optimizer`` is given (resuming a run)
            and leaves them alone otherwise (loading weights, e.g. ``best.pt`` in the
            middle of a run). A RuntimeWarning says when one cannot be restored here
            (NumPy not installed, CUDA not available).

    Returns:
        A frozen ``Checkpoint(path, epoch, step, metrics, extra, missing_keys,
        unexpected_keys)``.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: ``map_location`` names no device available here.
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a loadable checkpoint, or does not fit.

    Example:
        >>> import tempfile, os, torch, fntrain as ft
        >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
        >>> _ = ft.save_checkpoint(path, torch.nn.Linear(4, 2), epoch=3)
        >>> ft.load_checkpoint(path, torch.nn.Linear(4, 2)).epoch
        3
    """
    target = _as_path(path)
    _check_objects(model, optimizer, scheduler, scaler)
    sharded.refuse_fsdp1(model, "the loaded state")
    _check_map_location(map_location)
    _check_is_file(target, must_exist=True, folder=True)
    if target.is_dir():  # a sharded checkpoint: read into tensors laid out as the model's
        payload = _normalise(sharded.read(target, _unwrap(model), optimizer), target)
    else:
        payload = _normalise(_read(target, map_location), target)
        if optimizer is not None and sharded.is_sharded(model):
            raise CheckpointError(
                f"{str(target)!r} is a single file: it loads into a sharded (FSDP2) model's "
                f"weights, not its optimizer; resume a sharded run from the folder that "
                f"save_checkpoint wrote for it, or load without 'optimizer'"
            )
    plain = _unwrap(model)
    current = plain.state_dict()
    wanted = set(current)  # the variant with the most keys in common with the model
    model_state = max(_variants(dict(payload["model"])), key=lambda v: len(wanted.intersection(v)))
    given = {
        n: o for n, o in zip(_STATES, (optimizer, scheduler, scaler), strict=True) if o is not None
    }
    problems = _model_problems(model_state, current, strict) + _state_problems(payload, given)
    if problems:
        listed = "\n  ".join(problems)
        raise CheckpointError(
            f"{str(target)!r} does not fit what was given; nothing was loaded:\n  {listed}"
        )
    try:
        restore = optimizer is not None if restore_rng is None else bool(restore_rng)
        keys, notes = _apply(payload, plain, model_state, given, strict, restore)
    except CheckpointError as error:
        raise CheckpointError(
            f"{str(target)!r} does not fit what was given; {error}"
        ) from error.__cause__
    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return Checkpoint(
        path=target,
        epoch=payload.get("epoch"),
        step=payload.get("step"),
        metrics=payload.get("metrics"),
        extra=payload.get("extra"),
        missing_keys=keys.missing_keys,
        unexpected_keys=keys.unexpected_keys,
    )
