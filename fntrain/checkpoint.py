"""save_checkpoint and load_checkpoint: atomic, code-free, complete, checked before loading."""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fntrain import distributed, rng
from fntrain.atomic import write_atomically
from fntrain.errors import CheckpointError
from fntrain.fit import Into, Scheduler, fit_problems, type_name
from fntrain.records import Checkpoint, SavedCheckpoint

FORMAT = "fntrain.checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EXTRA_STATE = "_extra_state"
_PLAIN = (bool, int, float, str, type(None))
_ATOMS = (torch.dtype, torch.device, torch.Tensor, nn.Parameter)
_SEQUENCES = (list, tuple, torch.Size)
_MAPPINGS = (dict, OrderedDict)
_LABELS = {
    "model": "'model' state",
    "optimizer": "'optimizer' state",
    "scheduler": "'scheduler' state",
    "scaler": "'scaler' state",
    "metrics": "'metrics'",
    "extra": "'extra'",
    "rng": "the RNG state",
}

PathLike = str | os.PathLike[str]
MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None


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


def _match_keys(state: Mapping[str, Any], model_keys: Iterable[str]) -> dict[str, Any]:
    """Return ``state`` with the ``module.``/``_orig_mod.`` prefixes that best fit the model.

    The keys are kept as they are unless stripping shared wrapper prefixes gives more keys
    in common with the model, so a child that is really named ``module`` stays.
    """
    wanted = set(model_keys)
    return max(_variants(dict(state)), key=lambda variant: len(wanted.intersection(variant)))


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is data that ``torch.load(weights_only=True)`` loads."""
    if type(value) in _PLAIN or type(value) in _ATOMS:
        return
    if type(value) in _SEQUENCES:
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if type(value) in _MAPPINGS:
        for key, item in value.items():
            if type(key) not in _PLAIN:
                raise TypeError(f"{where} must have str or number keys, but has the key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} must hold only plain data (None, bool, int, float, str, tensors, dtypes, "
        f"devices, and lists, tuples and dicts of them) so that it loads with "
        f"weights_only=True, but it is a {type_name(value)}"
    )


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"'model' must be a torch.nn.Module, but got {type_name(model)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"'optimizer' must be a torch.optim.Optimizer or None, but got {type_name(optimizer)}"
        )
    if scheduler is not None and not all(
        callable(getattr(scheduler, method, None)) for method in ("state_dict", "load_state_dict")
    ):
        raise TypeError(
            f"'scheduler' must be an LR scheduler (with state_dict and load_state_dict) or "
            f"None, but got {type_name(scheduler)}"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"'scaler' must be a torch.amp.GradScaler or None, but got {type_name(scaler)}"
        )


def _as_path(path: Any) -> Path:
    """Return ``path`` as a Path; raise TypeError naming 'path' if it is not str or PathLike."""
    if isinstance(path, str | os.PathLike):
        with contextlib.suppress(TypeError):
            return Path(path)
    raise TypeError(f"'path' must be a str or os.PathLike of str, but got {type_name(path)}")


def _target(path: Any) -> Path:
    """Return ``path`` as a Path after checking it can be written as a file."""
    target = _as_path(path)
    if target.is_dir():
        raise CheckpointError(f"'path' {str(target)!r} is a folder, not a checkpoint file")
    if not target.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, f"the folder of 'path' does not exist: {str(target.parent)!r}"
        )
    return target


def _state_of(obj: Any) -> Any:
    """Return ``obj.state_dict()``, or None for no object."""
    return None if obj is None else obj.state_dict()


def _class_of(obj: Any) -> str | None:
    """Return the class name of ``obj``, or None for no object."""
    return None if obj is None else type(obj).__qualname__


def _payload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Scheduler | None,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Gather the format, model, optimizer, scheduler, scaler and RNG states to save."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "model": _unwrap(model).state_dict(),
        "optimizer": _state_of(optimizer),
        "optimizer_class": _class_of(optimizer),
        "scheduler": _state_of(scheduler),
        "scheduler_class": _class_of(scheduler),
        "scaler": _state_of(scaler),
        "rng": rng.capture(),
    }


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
    target = _target(path)
    _check_objects(model, optimizer, scheduler, scaler)
    _check_count("epoch", epoch)
    _check_count("step", step)
    payload = _payload(model, optimizer, scheduler, scaler)
    payload.update(
        epoch=epoch, step=step, metrics=_mapping("metrics", metrics), extra=_mapping("extra", extra)
    )
    for key, value in payload.items():
        _check_plain(value, _LABELS.get(key, repr(key)))
    if distributed.is_main():  # under DDP rank 0 writes; the others wait for the file
        write_atomically(target, lambda handle: torch.save(payload, handle))
    distributed.barrier()
    return SavedCheckpoint(path=target, size=target.stat().st_size, epoch=epoch, step=step)


def _check_device(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` names a device that exists here."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{where} must name a device such as 'cpu' or 'cuda:0', but got {value!r}"
        ) from None
    available = getattr(getattr(torch, device.type, None), "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"{where} is {value!r}, but {device.type} is not available here")


def _check_map_location(value: Any) -> None:
    """Raise unless ``value`` is a map_location torch.load takes: None, device, dict, callable."""
    if value is None or callable(value):
        return
    if isinstance(value, dict):
        for key, device in value.items():
            if not isinstance(device, str):
                raise TypeError(
                    f"'map_location'[{key!r}] must be a str, but got {type_name(device)}"
                )
            _check_device(device, f"'map_location'[{key!r}]")
        return
    if not isinstance(value, str | torch.device):
        raise TypeError(
            f"'map_location' must be a str, torch.device, dict, callable or None, but got "
            f"{type_name(value)}"
        )
    _check_device(value, "'map_location'")


def _check_readable(target: Path) -> None:
    """Raise unless ``target`` is an existing file."""
    if not target.exists():
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint at 'path' {str(target)!r}")
    if target.is_dir():
        raise CheckpointError(f"'path' {str(target)!r} is a folder, not a checkpoint file")


def _read(target: Path, map_location: MapLocation) -> Any:
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


def _is_extra_state(key: str) -> bool:
    """Tell whether a state_dict key holds a module's ``get_extra_state()`` value."""
    return key.rsplit(".", 1)[-1] == _EXTRA_STATE


def _state_dict_problem(value: Any) -> str | None:
    """Say how ``value`` is not a model state_dict (str keys to tensors or extra state)."""
    if not isinstance(value, dict):
        return f"it is a {type_name(value)}, not a dict"
    for key, item in value.items():
        if not isinstance(key, str):
            return f"it has the key {key!r}, not a str"
        if not isinstance(item, torch.Tensor) and not _is_extra_state(key):
            return f"its key {key!r} holds a {type_name(item)}, not a tensor"
    return None


def _is_state_dict(payload: Any) -> bool:
    """Tell whether ``payload`` is a bare ``model.state_dict()``."""
    return isinstance(payload, dict) and bool(payload) and _state_dict_problem(payload) is None


def _payload_problem(payload: dict[str, Any]) -> str | None:
    """Name the first entry of an fntrain payload that is not what save_checkpoint writes."""
    if "model" not in payload:
        return "it has no 'model' entry"
    problem = _state_dict_problem(payload["model"])
    if problem is not None:
        return f"its 'model' entry is not a model state_dict: {problem}"
    expected = {"epoch": int, "step": int, "metrics": dict, "extra": dict}
    for name, kind in expected.items():
        value = payload.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its {name!r} entry must be a {kind.__name__}, but is a {type_name(value)}"
    return None


def _normalise(payload: Any, target: Path) -> dict[str, Any]:
    """Return a checked fntrain payload; a bare state_dict becomes one with no epoch."""
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if payload.get("version") != VERSION:
            raise CheckpointError(
                f"{str(target)!r} is an fntrain checkpoint of version "
                f"{payload.get('version')!r}, but this fntrain reads version {VERSION}"
            )
        problem = _payload_problem(payload)
        if problem is not None:
            raise CheckpointError(f"{str(target)!r} is a malformed fntrain checkpoint: {problem}")
        return payload
    if _is_state_dict(payload):
        return {"model": payload}
    kind = f"a dict with keys {list(payload)[:8]}" if isinstance(payload, dict) else None
    raise CheckpointError(
        f"{str(target)!r} is neither an fntrain checkpoint nor a model state_dict; it holds "
        f"{kind or 'a ' + type(payload).__name__}"
    )


def _apply(
    payload: dict[str, Any], model_state: Mapping[str, Any], into: Into
) -> tuple[Any, list[str]]:
    """Load every checked state in place; return the model's skipped keys and RNG notes."""
    keys = into.model.load_state_dict(model_state, strict=into.strict)
    for name in ("optimizer", "scheduler", "scaler"):
        given = getattr(into, name)
        if given is not None:
            given.load_state_dict(payload[name])
    notes = rng.restore(payload["rng"]) if into.restore_rng and "rng" in payload else []
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
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore a checkpoint into ``model`` (and optimizer, scheduler, scaler) in place.

    The file is read with ``torch.load(..., weights_only=True)``, so a pickle that would
    run code is refused. Everything is checked before anything changes: missing and
    unexpected keys and shape mismatches are reported together, an optimizer or scheduler
    of another class is refused, and on any error the model, optimizer, scheduler, scaler
    and RNG states are untouched. A bare ``model.state_dict()`` saved with ``torch.save``
    loads too (its epoch is None), and ``module.``/``_orig_mod.`` prefixes from DDP or
    ``torch.compile`` are handled on both sides.

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
        restore_rng: restore the RNG states saved in the file (for bit-exact resume). A
            RuntimeWarning says when one cannot be restored here (NumPy not installed,
            CUDA not available).

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
    _check_map_location(map_location)
    _check_readable(target)
    payload = _normalise(_read(target, map_location), target)
    into = Into(_unwrap(model), optimizer, scheduler, scaler, strict, restore_rng)
    current = into.model.state_dict()
    model_state = _match_keys(payload["model"], current.keys())
    problems = fit_problems(payload, model_state, current, into)
    if problems:
        listed = "\n  ".join(problems)
        raise CheckpointError(
            f"{str(target)!r} does not fit what was given; nothing was loaded:\n  {listed}"
        )
    keys, notes = _apply(payload, model_state, into)
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
