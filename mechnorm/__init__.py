"""mechnorm: which input tokens, and which layers, carry a language model's prediction.

NormXLogit and its baselines computed from one TransformerLens cache. The public API is
re-exported here; nothing is defined in this file. Submodules: ``mechnorm.plot`` (figures),
``mechnorm.evaluate`` (faithfulness, alignment, agreement), ``mechnorm.similarity`` and
``mechnorm.stitching`` (representation similarity), ``mechnorm.circuits`` (decomposition,
direct logit attribution, patching), ``mechnorm.repmatch`` (training-data similarity through
LoRA subspaces), ``mechnorm.tasks`` and ``mechnorm.zoo`` (tasks with known evidence and the
small models trained on them).
"""

# methods first: circuits' modules register their hooks in methods.registry, and methods'
# decomposition methods import circuits.decompose
from .methods import (
    HookFilter,
    LensResult,
    alti,
    alti_logit,
    attention_rollout,
    attention_weights,
    decompx,
    embedding_norm,
    get_method,
    globenc,
    grad_x_input,
    hooks_for,
    integrated_gradients,
    list_methods,
    logat,
    logit_lens,
    normxlogit,
    saliency,
    value_zeroing,
)
from . import circuits, evaluate, plot, repmatch, similarity, stitching, tasks, zoo
from . import names, persist, words  # display names, save/load of results, subword -> word aggregation
from .circuits import (
    ComponentAttribution,
    ComponentStack,
    HeadTokenAttribution,
    PatchingResult,
    activation_patching,
    attention_by_source,
    attribution_patching,
    components,
    direct_logit_attribution,
    dla_exactness,
    head_token_attribution,
)
from .compare import Comparison, attribute
from . import plot_generation
from .generation import GenerationAttribution, explain_generation
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
from .models import ModelLoadError, load_model
from .protected import protected_positions
from .residual import MissingHooksError, NonFiniteError
from .runner import run_dataset  # also makes mechnorm.runner (read, read_evaluation) available
from .result import Attribution
from .similarity import LayerSimilarity, layer_similarity, linear_cka, procrustes_distance, rbf_cka
from .stitching import StitchResult, stitch
from .streaming import can_stream, run_streamed
from .targets import Target, contrast, predicted, token_target

__version__ = "0.1.0"

__all__ = [
    "AffineHead",
    "Attribution",
    "Batch",
    "Comparison",
    "ComponentAttribution",
    "ComponentStack",
    "FinalNorm",
    "GenerationAttribution",
    "Head",
    "HeadTokenAttribution",
    "HookFilter",
    "LayerSimilarity",
    "LensResult",
    "LinearHead",
    "MissingHooksError",
    "NonFiniteError",
    "protected_positions",
    "ModelLoadError",
    "ModuleHead",
    "PatchingResult",
    "ProcessedWeightsWarning",
    "StitchResult",
    "Target",
    "UnembedHead",
    "activation_patching",
    "alti",
    "alti_logit",
    "attention_by_source",
    "attention_rollout",
    "attention_weights",
    "attribute",
    "attribution_patching",
    "circuits",
    "components",
    "contrast",
    "decompx",
    "direct_logit_attribution",
    "dla_exactness",
    "embedding_norm",
    "evaluate",
    "explain_generation",
    "get_method",
    "globenc",
    "grad_x_input",
    "head_token_attribution",
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
    "plot_generation",
    "predicted",
    "procrustes_distance",
    "rbf_cka",
    "run_dataset",
    "repmatch",
    "run_with_cache",
    "saliency",
    "similarity",
    "stitch",
    "stitching",
    "tasks",
    "token_target",
    "tokenize",
    "run_streamed",
    "can_stream",
    "value_zeroing",
    "weight_processing",
    "zoo",
]
