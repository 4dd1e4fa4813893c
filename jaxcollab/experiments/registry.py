"""Strategies by name: the built-in ones and those a user's own module adds, without editing the package.

A strategy is a function `(lab, j) -> ModelHandle`: the model it has after round j (1-based), built with
the `Lab` it is given (`lab.base()` is the base's handle). Register one with the decorator:

    from jaxcollab.experiments import strategy

    @strategy("lora_from_base", setting="semi")
    def lora_from_base(lab, j):
        return lab.train(lab.base(), lab.task(j), "lora", label=f"lora-task{j}")

and name its module in `--config.plugins=my_module` (imported before the run) and the strategy in
`--config.strategies=...`. A family (`olora_<λ>`) is a prefix whose suffix picks the function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxcollab.experiments.lab import Lab
    from jaxcollab.experiments.runner import ModelHandle

StrategyFn = Callable[["Lab", int], "ModelHandle"]
SETTINGS = ("semi", "full")

_STRATEGIES: dict[str, dict[str, StrategyFn]] = {s: {} for s in SETTINGS}
_FAMILIES: dict[str, dict[str, Callable[[str], StrategyFn]]] = {s: {} for s in SETTINGS}


class StrategyError(ValueError):
    """A strategy or plugin that cannot be registered, found or imported."""


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise StrategyError(f"setting={setting!r}; valid: {', '.join(SETTINGS)}")


def strategy(name: str, *, setting: str) -> Callable[[StrategyFn], StrategyFn]:
    """Register the decorated `(lab, j) -> ModelHandle` as strategy `name` of `setting` (semi | full)."""
    _check_setting(setting)
    if not name.isidentifier():
        raise StrategyError(f"strategy name {name!r}: use letters, digits and underscores")

    def register(fn: StrategyFn) -> StrategyFn:
        known = _STRATEGIES[setting].get(name)
        same = known is not None and (known.__module__, known.__qualname__) == (fn.__module__, fn.__qualname__)
        if known is not None and not same:  # re-importing a module is fine
            raise StrategyError(f"strategy {name!r} of the {setting} setting is registered already"
                                f" ({known.__module__}.{known.__qualname__})")
        _STRATEGIES[setting][name] = fn
        return fn

    return register


StrategyMaker = Callable[[str], StrategyFn]


def strategy_family(prefix: str, *, setting: str) -> Callable[[StrategyMaker], StrategyMaker]:
    """Register `make(suffix) -> strategy` for the names `prefix + suffix` (e.g. `olora_0.1`)."""
    _check_setting(setting)

    def register(make: StrategyMaker) -> StrategyMaker:
        _FAMILIES[setting][prefix] = make
        return make

    return register


def registered(setting: str) -> list[str]:
    """The strategy names of `setting`, in registration order (built-ins first)."""
    _check_setting(setting)
    return list(_STRATEGIES[setting])


def is_registered(setting: str, name: str) -> bool:
    return name in _STRATEGIES[setting] or any(name.startswith(p) and name != p for p in _FAMILIES[setting])


def get(setting: str, name: str) -> StrategyFn:
    """The strategy function of `name`; a StrategyError lists the valid names."""
    _check_setting(setting)
    if name in _STRATEGIES[setting]:
        return _STRATEGIES[setting][name]
    for prefix, make in _FAMILIES[setting].items():
        if name.startswith(prefix) and name != prefix:
            return make(name[len(prefix):])
    raise StrategyError(f"unknown strategy {name!r} for the {setting} setting; valid strategies:"
                        f" {', '.join(registered(setting))}")


def import_plugins(modules: list[str]) -> None:
    """Import the user's modules that register strategies (config.plugins)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise StrategyError(f"config.plugins: cannot import {module!r} ({e}); it must be importable"
                                " (on PYTHONPATH or installed)") from None
