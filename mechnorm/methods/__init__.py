"""Attribution methods, one file per family, each a pure function of (cache, head, target)."""

from .normxlogit import embedding_norm, logat, normxlogit
from .registry import HookFilter, MethodSpec, get_method, hooks_for, list_methods, register

__all__ = [
    "HookFilter",
    "MethodSpec",
    "embedding_norm",
    "get_method",
    "hooks_for",
    "list_methods",
    "logat",
    "normxlogit",
    "register",
]
