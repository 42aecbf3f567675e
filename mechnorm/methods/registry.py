"""A small registry of attribution methods: name -> function, description, hooks it reads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pandas as pd


@dataclass(frozen=True)
class HookFilter:
    """A ``names_filter`` for ``run_with_cache`` that caches only the hooks methods read.

    ``names`` are fixed hook names; ``patterns`` are per-block templates such as
    ``"blocks.{i}.hook_resid_post"``. Call it with a hook name, or list the names for a
    model with :meth:`names`.
    """

    names: frozenset[str] = frozenset()
    patterns: frozenset[str] = frozenset()

    def __call__(self, name: str) -> bool:
        return name in self.names or any(_template_regex(p).fullmatch(name) for p in self.patterns)

    def __or__(self, other: "HookFilter") -> "HookFilter":
        return HookFilter(self.names | other.names, self.patterns | other.patterns)

    def hook_names(self, n_layers: int) -> list[str]:
        """Every hook name this filter keeps for a model with ``n_layers`` blocks."""
        expanded = {p.format(i=i) for p in self.patterns for i in range(n_layers)}
        return sorted(self.names | expanded)


def _template_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"\d+"))


@dataclass(frozen=True)
class MethodSpec:
    """An attribution method as the registry knows it."""

    name: str
    function: Callable
    description: str
    needs_gradients: bool
    hooks: HookFilter
    layerwise: bool


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, description: str, hooks: HookFilter, needs_gradients: bool = False, layerwise: bool = False):
    """Decorator adding a method to the registry under ``name``."""

    def add(function: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"A method named {name!r} is already registered.")
        _REGISTRY[name] = MethodSpec(name, function, description, needs_gradients, hooks, layerwise)
        return function

    return add


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"No method named {name!r}. Known methods: {sorted(_REGISTRY)}.") from None


def list_methods() -> pd.DataFrame:
    """The registered methods: name, description, whether they need gradients, layer-wise or not."""
    rows = [
        {"name": s.name, "description": s.description, "needs_gradients": s.needs_gradients, "layerwise": s.layerwise}
        for s in _REGISTRY.values()
    ]
    return pd.DataFrame(rows, columns=["name", "description", "needs_gradients", "layerwise"])


#: analyses that are not token-attribution methods (no ``attribute()``/``list_methods()`` entry)
#: but whose hooks ``hooks_for`` knows: name -> HookFilter
_HOOKS_ONLY: dict[str, HookFilter] = {}


def register_hooks(name: str, hooks: HookFilter) -> None:
    """Make ``hooks_for(name)`` return ``hooks`` for an analysis that is not an attribution
    method (circuits: ``"components"``, ``"dla"``, ...); it stays out of ``list_methods()``.

    Example:
        >>> register_hooks("my-analysis", HookFilter(names=frozenset({"hook_embed"})))  # doctest: +SKIP
    """
    if name in _REGISTRY or name in _HOOKS_ONLY:
        raise ValueError(f"A method or analysis named {name!r} is already registered.")
    _HOOKS_ONLY[name] = hooks


def hooks_for(*method_names: str) -> HookFilter:
    """The hooks the named methods read, as a ``names_filter`` for ``run_with_cache``.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("normxlogit"))  # doctest: +SKIP
    """
    if not method_names:
        raise ValueError("Name at least one method, e.g. hooks_for('normxlogit').")
    combined = HookFilter()
    for name in method_names:
        if name in _HOOKS_ONLY:
            combined = combined | _HOOKS_ONLY[name]
            continue
        try:
            combined = combined | get_method(name).hooks
        except KeyError:
            raise KeyError(f"No method named {name!r}. Known methods: {sorted(_REGISTRY)}; "
                           f"other analyses: {sorted(_HOOKS_ONLY)}.") from None
    return combined
