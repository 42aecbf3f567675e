"""mechnorm: which input tokens, and which layers, carry a language model's prediction.

NormXLogit and its baselines computed from one TransformerLens cache. The public API is
re-exported here; nothing is defined in this file.
"""

from .heads import FinalNorm, Head, LinearHead, ModuleHead, ProcessedWeightsWarning, UnembedHead, weight_processing
from .inputs import Batch, pad, run_with_cache, tokenize
from .methods import HookFilter, embedding_norm, get_method, hooks_for, list_methods, logat, normxlogit
from .models import load_model
from .residual import MissingHooksError
from .result import Attribution
from .targets import Target, contrast, predicted, token_target

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Batch",
    "FinalNorm",
    "Head",
    "HookFilter",
    "LinearHead",
    "MissingHooksError",
    "ModuleHead",
    "ProcessedWeightsWarning",
    "Target",
    "UnembedHead",
    "contrast",
    "embedding_norm",
    "get_method",
    "hooks_for",
    "list_methods",
    "load_model",
    "logat",
    "normxlogit",
    "pad",
    "predicted",
    "run_with_cache",
    "token_target",
    "tokenize",
    "weight_processing",
]
