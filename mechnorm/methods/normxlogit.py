"""NormXLogit ("The Head-on-Top Never Lies", EMNLP 2025) and its two factors.

* ``embedding_norm[i] = ‖x_i⁰‖₂`` — the norm of token i's input representation;
* ``logat[l, i] = Head(x_iˡ)[ŷ]`` — token i's own layer-l residual, alone, through the
  model's head-on-top, read at the prediction ŷ (signed, not softmaxed);
* ``normxlogit[l, i] = embedding_norm[i] · logat[l, i]`` — the paper's score is l = L.

All three read one cache; no forward pass is run.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from ..heads import Head, warn_if_processed
from ..residual import (
    INPUT_HOOK,
    RESID_PATTERNS,
    TOKEN_EMBED_HOOKS,
    cache_mask,
    layer_residuals,
    n_blocks,
    require_finite,
    require_hooks,
    resolve_layers,
    token_embed_hook,
)
from ..result import Attribution
from ..targets import Target
from .arguments import prepare
from .output import method_result
from .registry import HookFilter, register

Space = Literal["logit", "logprob"]
_RESID_HOOKS = HookFilter(frozenset({INPUT_HOOK, *TOKEN_EMBED_HOOKS, "ln_final.hook_scale"}), RESID_PATTERNS)


@register(
    "embedding_norm",
    "L2 norm of each token's input representation (blocks.0.hook_resid_pre, or hook_embed).",
    HookFilter(frozenset({INPUT_HOOK, *TOKEN_EMBED_HOOKS})),
)
@torch.inference_mode()
def embedding_norm(cache, which: Literal["input", "token"] = "input", attention_mask=None, tokens=None) -> Attribution:
    """The L2 norm of every token's input representation.

    Args:
        cache: an ``ActivationCache`` holding ``blocks.0.hook_resid_pre`` (``which="input"``,
            token + position embedding, the paper's ``hidden_states[0]``) or the word
            embedding alone (``which="token"``: ``hook_embed``, or ``embed.hook_embed`` /
            ``embed.hook_out`` in a HookedEncoder / TransformerBridge).
        which: ``"input"`` or ``"token"``.
        attention_mask: ``[batch, pos]``, False at padding.
        tokens: ``[batch, pos]`` ids, only to label the result with token strings.

    Returns:
        An :class:`Attribution` with one row (layer 0), unsigned.

    Example:
        >>> mechnorm.embedding_norm(cache).top_k(3)                  # doctest: +SKIP
    """
    cache, _, _, attention_mask, tokens = prepare(cache, None, None, attention_mask, tokens, need_head=False, need_target=False)
    if which not in ("input", "token"):
        raise ValueError(f"which must be 'input' or 'token', got {which!r}.")
    hook = INPUT_HOOK if which == "input" else token_embed_hook(cache)
    mask = cache_mask(cache, attention_mask)
    require_hooks(cache, [hook], f"embedding_norm(which={which!r})")
    _warn_for(cache)
    norms = require_finite(cache[hook], hook, mask).float().norm(dim=-1)
    return method_result("embedding_norm", norms[None], (0,), mask, cache, tokens, None, signed=False,
                         metadata={"which": which, "hook": hook})


@register(
    "logat",
    "Logit of the prediction read from each token's own layer-l residual through the head (LogAt).",
    _RESID_HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def logat(
    cache,
    head: Head | None = None,
    target: Target | int | str | Sequence | None = None,
    layers: int | Sequence[int] | None = None,
    attention_mask=None,
    space: Space = "logit",
    tokens=None,
) -> Attribution:
    """LogAt: the head's logit of the target read from each position's own representation.

    ``logat[l, i] = Head(x_iˡ)[target]`` for every layer l (blocks applied, 0…L) and
    position i; a contrastive target gives ``Head(x_iˡ)[target] − Head(x_iˡ)[foil]``.

    Args:
        cache: an ``ActivationCache`` with the residual hooks of the requested layers
            (``mechnorm.hooks_for("logat")``).
        head: maps residuals to logits, e.g. ``mechnorm.UnembedHead(model)``; the model itself,
            or None (the cache's model), stands for its ``UnembedHead``.
        target: what to explain: a Target (``mechnorm.predicted(logits)``), a token id or
            string (``" are"``), a list of them (one per sequence), or None for the model's own
            prediction at each sequence's last real token (read from the cached final residual).
        layers: None for all layers 0…L, an int, or a list; negatives count from L.
        attention_mask: ``[batch, pos]``, False at padding (scores there are NaN); by default
            inferred from the tokenizer's pad id in a padded batch (``model.to_tokens([...])``).
            A cache made with ``remove_batch_dim=True`` is read as a batch of one.
        space: ``"logit"`` (the paper's raw logit) or ``"logprob"`` (logit minus the
            log-normaliser over the whole output, streamed in chunks; unchanged by
            TransformerLens's ``center_unembed``).
        tokens: ``[batch, pos]`` ids, only to label the result.

    Returns:
        An :class:`Attribution` of shape ``[len(layers), batch, pos]``.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("logat"))  # doctest: +SKIP
        >>> attr = mechnorm.logat(cache, mechnorm.UnembedHead(model), mechnorm.predicted(logits))   # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens)
    scores, layer_ids, mask = _logat_scores(cache, head, target, layers, attention_mask, space, "logat")
    return method_result("logat", scores, layer_ids, mask, cache, tokens, target.prediction_positions(mask), target,
                         metadata={"space": space, "head": repr(head), "contrast": target.is_contrast})


@register(
    "normxlogit",
    "NormXLogit: input-embedding norm × LogAt (the paper's score is the final layer).",
    _RESID_HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def normxlogit(
    cache,
    head: Head | None = None,
    target: Target | int | str | Sequence | None = None,
    layers: int | Sequence[int] | None = None,
    norm: Literal["input", "token"] = "input",
    attention_mask=None,
    space: Space = "logit",
    tokens=None,
) -> Attribution:
    """NormXLogit: ``embedding_norm[i] · logat[l, i]``, signed; rank tokens largest first.

    Args:
        cache, head, target, layers, attention_mask, space, tokens: as for :func:`logat`.
        norm: which embedding norm to multiply by: ``"input"`` (``blocks.0.hook_resid_pre``,
            the paper's) or ``"token"`` (``hook_embed``).

    Returns:
        An :class:`Attribution` of shape ``[len(layers), batch, pos]``; the paper's single
        score per token is the last row (layer L).

    Example:
        >>> attr = mechnorm.normxlogit(cache, mechnorm.UnembedHead(model), mechnorm.predicted(logits))  # doctest: +SKIP
        >>> attr = mechnorm.normxlogit(cache, model, " are")          # doctest: +SKIP
        >>> attr.top_k(3)                                             # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens)
    norms = embedding_norm(cache, which=norm, attention_mask=attention_mask).scores[0]
    scores, layer_ids, mask = _logat_scores(cache, head, target, layers, attention_mask, space, "normxlogit")
    return method_result("normxlogit", scores.cpu() * norms[None], layer_ids, mask, cache, tokens,
                         target.prediction_positions(mask), target,
                         metadata={"space": space, "norm": norm, "head": repr(head), "contrast": target.is_contrast})


def _logat_scores(cache, head, target, layers, attention_mask, space, method) -> tuple[Tensor, list[int], Tensor]:
    if space not in ("logit", "logprob"):
        raise ValueError(f"space must be 'logit' or 'logprob', got {space!r}.")
    if not isinstance(target, Target):
        raise TypeError(f"target must be a mechnorm Target (predicted, token_target, contrast), got {type(target).__name__}.")
    mask = cache_mask(cache, attention_mask)
    batch = mask.shape[0]
    target.check(head.n_outputs, batch)
    _warn_for(cache)
    layer_ids = resolve_layers(layers, n_blocks(cache))
    columns = target.columns(batch).to(mask.device)
    rows = []
    for resid in layer_residuals(cache, layer_ids, method, mask):  # one layer at a time: no stacked copy
        picked = head(resid, columns, cache=cache)  # [batch, pos, k]
        if space == "logprob" and not target.is_contrast:  # a contrast's normaliser cancels
            picked = picked - head.log_normalizer(resid, cache=cache)[..., None]
        rows.append(target.reduce(picked))
    return torch.stack(rows), layer_ids, mask


def _warn_for(cache) -> None:
    model = getattr(cache, "model", None)
    if model is not None:
        warn_if_processed(model)
