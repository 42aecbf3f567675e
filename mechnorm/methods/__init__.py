"""Attribution methods, one file per family, each a pure function of (cache, head, target)."""

from .normxlogit import embedding_norm, logat, normxlogit
from .registry import HookFilter, MethodSpec, get_method, hooks_for, list_methods, register
from .lens import LensResult, logit_lens
from .attention import attention_rollout, attention_weights
from .gradients import grad_x_input, integrated_gradients, saliency
from .decompx import decompx
from .alti_logit import alti_logit
from .decomposition import alti, globenc
from .value_zeroing import value_zeroing

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
    "LensResult",
    "logit_lens",
    "attention_rollout",
    "attention_weights",
    "saliency",
    "grad_x_input",
    "integrated_gradients",
    "decompx",
    "alti_logit",
    "alti",
    "globenc",
    "value_zeroing",
]
