"""A small registry of attribution methods: name -> function, description, hooks it reads."""

from __future__ import annotations

import difflib
import inspect
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
#: other accepted names -> registry name: every public function's own name (``attention_rollout``
#: -> ``rollout``) and the functions of hooks-only analyses (``direct_logit_attribution`` -> ``dla``)
_ALIASES: dict[str, str] = {"direct_logit_attribution": "dla", "attention_weights": "attention"}


def register(name: str, description: str, hooks: HookFilter, needs_gradients: bool = False, layerwise: bool = False):
    """Decorator adding a method to the registry under ``name``."""

    def add(function: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"A method named {name!r} is already registered.")
        _REGISTRY[name] = MethodSpec(name, function, description, needs_gradients, hooks, layerwise)
        if function.__name__ != name:
            _ALIASES[function.__name__] = name
        return function

    return add


def canonical_name(name: str) -> str:
    """The registry name of a method or analysis given by its registry name or its function's
    name (``"attention_rollout"`` -> ``"rollout"``); an unknown name raises a ``KeyError`` that
    lists the closest known names.

    Example:
        >>> canonical_name("attention_rollout")
        'rollout'
    """
    if name in _REGISTRY or name in _HOOKS_ONLY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = sorted({*_REGISTRY, *_HOOKS_ONLY, *_ALIASES})
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise KeyError(f"No method named {name!r}.{hint} Known methods: {sorted(_REGISTRY)} "
                   f"(mechnorm.list_methods()); other analyses: {sorted(_HOOKS_ONLY)}.") from None


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (its registry name or its function's name, e.g.
    ``"rollout"`` or ``"attention_rollout"``); an unknown name lists the closest known ones.

    Example:
        >>> get_method("attention_rollout").name  # doctest: +SKIP
        'rollout'
    """
    resolved = canonical_name(name)
    if resolved not in _REGISTRY:
        raise KeyError(f"{name!r} is an analysis with hooks (hooks_for({name!r})), not an attribution method; "
                       f"call mechnorm.{_function_name(resolved)}(...) directly. Methods: {sorted(_REGISTRY)}.")
    return _REGISTRY[resolved]


def _function_name(name: str) -> str:
    return next((alias for alias, target in _ALIASES.items() if target == name), name)


def list_methods() -> pd.DataFrame:
    """The registered methods: name, the function's name where it differs (``alias``, accepted
    wherever a method name is), description, whether they need gradients, layer-wise or not.

    Example:
        >>> mechnorm.list_methods().set_index("name").loc["rollout", "alias"]  # doctest: +SKIP
        'attention_rollout'
    """
    aliases: dict[str, list[str]] = {}
    for alias, target in _ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    rows = [
        {"name": s.name, "alias": ", ".join(aliases.get(s.name, [])), "description": s.description,
         "needs_gradients": s.needs_gradients, "layerwise": s.layerwise}
        for s in _REGISTRY.values()
    ]
    return pd.DataFrame(rows, columns=["name", "alias", "description", "needs_gradients", "layerwise"])


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

    Names are registry names or function names (``"attention_rollout"``). The word embeddings
    (one ``[batch, pos, d_model]`` tensor) are always kept too: from them a method reads which
    tokens the cache holds, to label its result and to find padding without ``tokens=``.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("normxlogit"))  # doctest: +SKIP
    """
    if not method_names:
        raise ValueError("Name at least one method, e.g. hooks_for('normxlogit').")
    combined = HookFilter(WORD_EMBED_HOOKS)
    for name in method_names:
        name = canonical_name(name)
        combined = combined | (_HOOKS_ONLY[name] if name in _HOOKS_ONLY else _REGISTRY[name].hooks)
    return combined


#: the word-embedding hooks of HookedTransformer, HookedEncoder and TransformerBridge
#: (the same names as ``mechnorm.residual.TOKEN_EMBED_HOOKS``; the registry imports nothing above it)
WORD_EMBED_HOOKS = frozenset({"hook_embed", "embed.hook_embed", "embed.hook_out"})


def is_lens(method: str) -> bool:
    """Whether a registered method returns a layer-by-layer readout (``LensResult``), not token scores.

    Example:
        >>> is_lens("logit_lens"), is_lens("normxlogit")
        (True, False)
    """
    return "LensResult" in str(inspect.signature(get_method(method).function).return_annotation)
