"""Whether a checkpoint's contents fit the model, optimizer, scheduler and scaler given."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from fntrain import rng

Scheduler = LRScheduler | ReduceLROnPlateau
_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def type_name(value: Any) -> str:
    """Return the qualified name of ``value``'s type, for error messages."""
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


@attrs.frozen
class Into:
    """What load_checkpoint restores into, and how."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Scheduler | None
    scaler: torch.amp.GradScaler | None
    strict: bool
    restore_rng: bool


def _model_problems(
    saved: Mapping[str, Any], current: Mapping[str, Any], strict: bool
) -> list[str]:
    """List every difference between the file's and the model's keys and tensor shapes."""
    problems = []
    if strict:
        missing = [key for key in current if key not in saved]
        unexpected = [key for key in saved if key not in current]
        if missing:
            problems.append(f"missing in the file: {', '.join(map(repr, missing))}")
        if unexpected:
            problems.append(f"unexpected in the file: {', '.join(map(repr, unexpected))}")
    for key, value in saved.items():
        other = current.get(key)
        tensors = isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor)
        if tensors and tuple(value.shape) != tuple(other.shape):
            problems.append(
                f"key {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(other.shape)} in the model"
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


def _is_optimizer_state(saved: dict[str, Any]) -> bool:
    """Tell whether ``saved`` has the form of ``Optimizer.state_dict()``."""
    groups, state = saved.get("param_groups"), saved.get("state")
    return (
        isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and isinstance(state, dict)
        and all(isinstance(s, dict) for s in state.values())
    )


def _optimizer_fit(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
    """List every way the file's optimizer state does not fit ``optimizer``."""
    if not _is_optimizer_state(saved):
        return ["the optimizer state in the file has not the form of Optimizer.state_dict()"]
    groups, current = saved["param_groups"], optimizer.param_groups
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        return [
            f"the optimizer in the file has param groups of sizes "
            f"{[len(g['params']) for g in groups]} but 'optimizer' has "
            f"{[len(g['params']) for g in current]}"
        ]
    indices = [index for group in groups for index in group["params"]]
    params = dict(zip(indices, (p for group in current for p in group["params"]), strict=True))
    return [
        f"optimizer state {name!r} of parameter {index} has shape {tuple(value.shape)} in "
        f"the file but the parameter has {tuple(params[index].shape)}"
        for index, state in saved["state"].items()
        for name, value in state.items()
        if _shape_differs(value, params.get(index))
    ]


def _scheduler_fit(saved: dict[str, Any], scheduler: Scheduler) -> list[str]:
    """List nothing: a scheduler of the same class takes any state dict of its class."""
    return []


def _scaler_fit(saved: dict[str, Any], scaler: torch.amp.GradScaler) -> list[str]:
    """List why a GradScaler state cannot go into ``scaler`` (a disabled one loads nothing)."""
    if not scaler.is_enabled():
        return []
    if not saved:
        return [
            "'scaler' is enabled but the file's GradScaler state is empty (it was saved from "
            "a disabled GradScaler)"
        ]
    bad = [
        key
        for key in _SCALER_KEYS
        if isinstance(saved.get(key), bool) or not isinstance(saved.get(key), int | float)
    ]
    return [f"the GradScaler state in the file lacks numbers for {bad}"] if bad else []


def _state_problem(name: str, payload: dict[str, Any], given: object) -> str | None:
    """Say why the file's ``name`` state cannot go into ``given``: absent, other class, no dict."""
    saved, saved_class = payload.get(name), payload.get(f"{name}_class")
    if saved is None:
        return f"'{name}' was given but the file holds no {name} state"
    if saved_class is not None and saved_class != type(given).__qualname__:
        return f"'{name}' is {type(given).__qualname__} but the file holds {saved_class} state"
    if not isinstance(saved, dict):
        return f"the {name} state in the file is a {type_name(saved)}, not a dict"
    return None


def _states_problems(payload: dict[str, Any], into: Into) -> list[str]:
    """List why the file's optimizer, scheduler and scaler states do not fit those given."""
    problems: list[str] = []
    fits = {"optimizer": _optimizer_fit, "scheduler": _scheduler_fit, "scaler": _scaler_fit}
    for name, fit in fits.items():
        given = getattr(into, name)
        if given is not None:
            problem = _state_problem(name, payload, given)
            problems += [problem] if problem else fit(payload[name], given)
    return problems


def _rng_problems(payload: dict[str, Any]) -> list[str]:
    """List why the file's RNG states cannot be restored (nothing if there are none)."""
    if "rng" not in payload:
        return []
    try:
        rng.check(payload["rng"])
    except ValueError as error:
        return [str(error)]
    return []


def fit_problems(
    payload: dict[str, Any], model_state: Mapping[str, Any], current: Mapping[str, Any], into: Into
) -> list[str]:
    """Collect everything that keeps ``payload`` from loading, before anything changes."""
    problems = _model_problems(model_state, current, into.strict)
    problems += _states_problems(payload, into)
    return problems + (_rng_problems(payload) if into.restore_rng else [])
