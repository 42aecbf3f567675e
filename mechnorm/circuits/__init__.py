"""The mechanism view on the same cache: which components (heads, MLPs, embeddings) write the
prediction, and from which source tokens.

``decompose`` splits the residual into components and attention into source tokens (shared by
DLA, head-token attribution and the norm-aware methods); ``dla`` reads components through the
head (direct logit attribution, direct effect, exactness); ``patching`` intervenes (activation
and attribution patching, ``PatchingResult``); ``plots`` and ``patching_plots`` draw the results.
"""

from .decompose import (
    COMPONENT_HOOKS,
    DECOMPOSITION_HOOKS,
    SOURCE_HOOKS,
    ComponentStack,
    attention_by_source,
    attention_output_weights,
    components,
    resolve_positions,
)
from .dla import DLA_HOOKS, HEAD_TOKEN_HOOKS, direct_logit_attribution, dla_exactness, head_token_attribution
from .patching import activation_patching, attribution_patching
from .patching_result import PatchingResult
from .result import ComponentAttribution, HeadTokenAttribution

__all__ = [
    "COMPONENT_HOOKS",
    "ComponentAttribution",
    "DLA_HOOKS",
    "PatchingResult",
    "activation_patching",
    "attribution_patching",
    "HEAD_TOKEN_HOOKS",
    "HeadTokenAttribution",
    "direct_logit_attribution",
    "dla_exactness",
    "head_token_attribution",
    "DECOMPOSITION_HOOKS",
    "SOURCE_HOOKS",
    "ComponentStack",
    "attention_by_source",
    "attention_output_weights",
    "components",
    "resolve_positions",
]
