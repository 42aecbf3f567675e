"""mechnorm: which input tokens, and which layers, carry a language model's prediction.

NormXLogit and its baselines computed from one TransformerLens cache. The public API is
re-exported here; nothing is defined in this file. Submodules: ``mechnorm.plot`` (figures),
``mechnorm.evaluate`` (faithfulness, alignment, agreement), ``mechnorm.similarity`` and
``mechnorm.stitching`` (representation similarity), ``mechnorm.tasks`` and ``mechnorm.zoo``
(tasks with known evidence and the small models trained on them).
"""

from . import evaluate, plot, similarity, stitching, tasks, zoo
from .compare import Comparison, attribute
from .heads import (
    AffineHead,
    FinalNorm,
    Head,
    LinearHead,
    ModuleHead,
    ProcessedWeightsWarning,
    UnembedHead,
    weight_processing,
)
from .inputs import Batch, pad, run_with_cache, tokenize
from .methods import (
    HookFilter,
    LensResult,
    attention_rollout,
    attention_weights,
    embedding_norm,
    get_method,
    grad_x_input,
    hooks_for,
    integrated_gradients,
    list_methods,
    logat,
    logit_lens,
    normxlogit,
    saliency,
)
from .models import load_model
from .residual import MissingHooksError
from .result import Attribution
from .similarity import LayerSimilarity, layer_similarity, linear_cka, procrustes_distance, rbf_cka
from .stitching import StitchResult, stitch
from .targets import Target, contrast, predicted, token_target

__version__ = "0.1.0"

__all__ = [
    "AffineHead",
    "Attribution",
    "Batch",
    "Comparison",
    "FinalNorm",
    "Head",
    "HookFilter",
    "LayerSimilarity",
    "LensResult",
    "LinearHead",
    "MissingHooksError",
    "ModuleHead",
    "ProcessedWeightsWarning",
    "StitchResult",
    "Target",
    "UnembedHead",
    "attention_rollout",
    "attention_weights",
    "attribute",
    "contrast",
    "embedding_norm",
    "evaluate",
    "get_method",
    "grad_x_input",
    "hooks_for",
    "integrated_gradients",
    "layer_similarity",
    "linear_cka",
    "list_methods",
    "load_model",
    "logat",
    "logit_lens",
    "normxlogit",
    "pad",
    "plot",
    "predicted",
    "procrustes_distance",
    "rbf_cka",
    "run_with_cache",
    "saliency",
    "similarity",
    "stitch",
    "stitching",
    "tasks",
    "token_target",
    "tokenize",
    "weight_processing",
    "zoo",
]
