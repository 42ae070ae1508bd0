"""save_checkpoint and load_checkpoint: atomic, code-free, complete, checked before loading."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fntrain import rng
from fntrain.errors import CheckpointError
from fntrain.records import Checkpoint, SavedCheckpoint

FORMAT = "fntrain.checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_PLAIN = (bool, int, float, str, type(None))

PathLike = str | os.PathLike[str]


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the plain model inside DDP/DataParallel and ``torch.compile`` wrappers."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, parallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` / ``_orig_mod.`` prefixes shared by every key of a state dict."""
    state = dict(state)
    stripped = True
    while state and stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                stripped = True
    return state


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is plain data that loads with ``weights_only``."""
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} must have str or int keys, but has the key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} must hold only plain data (None, bool, int, float, str, tensors, and "
        f"lists, tuples and dicts of them) so that it loads with weights_only=True, but "
        f"it is a {type(value).__module__}.{type(value).__qualname__}"
    )


def _check_count(name: str, value: Any) -> None:
    """Raise unless ``value`` is a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{name}' must be a non-negative int, but got {value!r}")


def _target(path: PathLike) -> Path:
    """Return ``path`` as a Path after checking it can be written as a file."""
    target = Path(path)
    if target.is_dir():
        raise CheckpointError(f"'path' {str(target)!r} is a folder, not a checkpoint file")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"the folder of 'path' does not exist: {str(target.parent)!r}"
        )
    return target


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entry table to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(payload: dict[str, Any], target: Path) -> None:
    """Write to a temporary file beside ``target``, fsync it, and rename it over ``target``."""
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed before the rename
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
    _fsync_folder(target.parent)


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
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
    any moment leaves either the old file or the new one, never a torn one. Everything
    in it loads with ``torch.load(..., weights_only=True)``.

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

    Example:
        >>> import tempfile, os, torch, fntrain as ft
        >>> model = torch.nn.Linear(4, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
        >>> ft.save_checkpoint(path, model, epoch=3, metrics={"acc": 0.9}).epoch
        3
    """
    target = _target(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type(model).__name__}")
    _check_count("epoch", epoch)
    _check_count("step", step)
    metrics, extra = dict(metrics or {}), dict(extra or {})
    _check_plain(metrics, "'metrics'")
    _check_plain(extra, "'extra'")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "model": _unwrap(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "extra": extra,
        "rng": rng.capture(),
    }
    _write_atomically(payload, target)
    return SavedCheckpoint(path=target, size=target.stat().st_size, epoch=epoch, step=step)


def _read(target: Path, map_location: Any) -> Any:
    """Load ``target`` with ``weights_only=True``; turn every failure into CheckpointError."""
    try:
        return torch.load(target, map_location=map_location, weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if "weights only load failed" in str(error).lower():
            raise CheckpointError(
                f"refused to load {str(target)!r}: it holds objects other than tensors and "
                f"plain data, whose unpickling could run code ({reason})"
            ) from None
        raise CheckpointError(
            f"{str(target)!r} is not a loadable checkpoint (empty, truncated, or not a file "
            f"written by torch.save): {type(error).__name__}: {reason}"
        ) from None


def _is_state_dict(payload: Any) -> bool:
    """Tell whether ``payload`` is a bare ``model.state_dict()``."""
    return (
        isinstance(payload, dict)
        and bool(payload)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items())
    )


def _normalise(payload: Any, target: Path) -> dict[str, Any]:
    """Return an fntrain payload; a bare state_dict becomes one with no epoch."""
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if payload.get("version") != VERSION:
            raise CheckpointError(
                f"{str(target)!r} is an fntrain checkpoint of version "
                f"{payload.get('version')!r}, but this fntrain reads version {VERSION}"
            )
        return payload
    if _is_state_dict(payload):
        return {"model": payload, "epoch": None, "step": None, "metrics": {}, "extra": {}}
    kind = f"a dict with keys {list(payload)[:8]}" if isinstance(payload, dict) else None
    raise CheckpointError(
        f"{str(target)!r} is neither an fntrain checkpoint nor a model state_dict; it holds "
        f"{kind or 'a ' + type(payload).__name__}"
    )


def _model_problems(
    saved: Mapping[str, Any], current: Mapping[str, torch.Tensor], strict: bool
) -> list[str]:
    """List every difference between the file's and the model's keys and shapes."""
    problems = []
    if strict:
        missing = [key for key in current if key not in saved]
        unexpected = [key for key in saved if key not in current]
        if missing:
            problems.append(f"missing in the file: {', '.join(map(repr, missing))}")
        if unexpected:
            problems.append(f"unexpected in the file: {', '.join(map(repr, unexpected))}")
    for key, value in saved.items():
        if key in current and tuple(value.shape) != tuple(current[key].shape):
            problems.append(
                f"key {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(current[key].shape)} in the model"
            )
    return problems


def _shape_differs(value: Any, param: torch.Tensor | None) -> bool:
    """Tell whether a per-parameter optimizer tensor has another shape than its parameter."""
    return (
        param is not None
        and isinstance(value, torch.Tensor)
        and value.dim() > 0
        and value.shape != param.shape
    )


def _optimizer_problems(saved: Any, optimizer: torch.optim.Optimizer) -> list[str]:
    """List every way the file's optimizer state does not fit ``optimizer``."""
    if saved is None:
        return ["'optimizer' was given but the file holds no optimizer state"]
    groups, current = saved["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        return [
            f"the optimizer in the file has param groups of sizes "
            f"{[len(g['params']) for g in groups]} but 'optimizer' has "
            f"{[len(g['params']) for g in current]}"
        ]
    indices = [index for group in groups for index in group["params"]]
    params = dict(zip(indices, (p for group in current for p in group["params"]), strict=True))
    problems = []
    for index, state in saved["state"].items():
        param = params.get(index)
        for name, value in state.items():
            if _shape_differs(value, param):
                problems.append(
                    f"optimizer state {name!r} of parameter {index} has shape "
                    f"{tuple(value.shape)} in the file but the parameter has "
                    f"{tuple(param.shape)}"
                )
    return problems


def _problems(
    payload: dict[str, Any],
    model_state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    strict: bool,
    restore_rng: bool,
) -> list[str]:
    """Collect everything that keeps ``payload`` from loading, before anything changes."""
    problems = _model_problems(model_state, model.state_dict(), strict)
    if optimizer is not None:
        problems += _optimizer_problems(payload.get("optimizer"), optimizer)
    for name, given in (("scheduler", scheduler), ("scaler", scaler)):
        if given is not None and payload.get(name) is None:
            problems.append(f"'{name}' was given but the file holds no {name} state")
    if restore_rng and "rng" in payload:
        try:
            rng.check(payload["rng"])
        except ValueError as error:
            problems.append(str(error))
    return problems


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    map_location: Any = "cpu",
    strict: bool = True,
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore a checkpoint into ``model`` (and optimizer, scheduler, scaler) in place.

    The file is read with ``torch.load(..., weights_only=True)``, so a pickle that would
    run code is refused. Everything is checked before anything changes: missing and
    unexpected keys and shape mismatches are reported together, and on any error the
    model, optimizer and RNG states are untouched. A bare ``model.state_dict()`` saved
    with ``torch.save`` loads too (its epoch is None), and ``module.``/``_orig_mod.``
    prefixes from DDP or ``torch.compile`` are handled on both sides.

    Args:
        path: the checkpoint file.
        model: the model to restore into (plain, DDP-wrapped or compiled).
        optimizer: restored when given; the file must hold an optimizer state.
        scheduler: an LR scheduler, restored when given.
        scaler: a ``torch.amp.GradScaler``, restored when given.
        map_location: where tensors are loaded first, as for ``torch.load``; the model's
            and optimizer's own devices are kept.
        strict: require the file's model keys to match the model's exactly.
        restore_rng: restore the RNG states saved in the file (for bit-exact resume).

    Returns:
        A frozen ``Checkpoint(path, epoch, step, metrics, extra)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a loadable checkpoint, or does not fit.

    Example:
        >>> import tempfile, os, torch, fntrain as ft
        >>> path = os.path.join(tempfile.mkdtemp(), "last.pt")
        >>> _ = ft.save_checkpoint(path, torch.nn.Linear(4, 2), epoch=3)
        >>> ft.load_checkpoint(path, torch.nn.Linear(4, 2)).epoch
        3
    """
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint at 'path' {str(target)!r}")
    if target.is_dir():
        raise CheckpointError(f"'path' {str(target)!r} is a folder, not a checkpoint file")
    payload = _normalise(_read(target, map_location), target)
    inner = _unwrap(model)
    model_state = _strip_wrapper_prefixes(payload["model"])
    problems = _problems(
        payload, model_state, inner, optimizer, scheduler, scaler, strict, restore_rng
    )
    if problems:
        listed = "\n  ".join(problems)
        raise CheckpointError(
            f"{str(target)!r} does not fit what was given; nothing was loaded:\n  {listed}"
        )
    inner.load_state_dict(model_state, strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng and "rng" in payload:
        rng.restore(payload["rng"])
    return Checkpoint(
        path=target,
        epoch=payload["epoch"],
        step=payload["step"],
        metrics=payload["metrics"],
        extra=payload["extra"],
    )
