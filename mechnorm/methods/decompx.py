"""DecompX (Modarressi, Fayyaz, Aghazadeh, Yaghoobzadeh & Pilehvar, ACL 2023): each token's
contribution to the target's logit, by propagating a per-source decomposition of every
position's residual through the whole model and the head-on-top.

The propagation itself (attention, norms, MLPs, bias sharing) lives in
:mod:`mechnorm.circuits.propagate`; this module streams it block by block and reads the
decomposition at the prediction position through the head after every block.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..circuits.propagate import block_weights, frozen_head_scale, head_parts, mlp_hooks, propagate_block
from ..heads import Head, warn_if_processed
from ..inputs import is_encoder, prediction_positions
from ..residual import INPUT_HOOK, at_positions, cache_mask, n_blocks, require_hooks, resolve_layers
from ..result import Attribution
from ..targets import Target
from .arguments import prepare
from .output import method_result
from .registry import HookFilter, register

DECOMPX_HOOKS = HookFilter(
    frozenset({INPUT_HOOK}),
    frozenset({
        "blocks.{i}.attn.hook_pattern",
        "blocks.{i}.mlp.hook_pre",
        "blocks.{i}.mlp.hook_pre_linear",
        "blocks.{i}.mlp.hook_post",
    }),
)


@register(
    "decompx",
    "DecompX (Modarressi et al. 2023): per-source decomposition propagated through every block and the head; sums to the logit.",
    DECOMPX_HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def decompx(
    cache,
    head: Head | None = None,
    target: Target | int | str | Sequence | None = None,
    model=None,
    layers: int | Sequence[int] | None = None,
    attention_mask=None,
    tokens=None,
    return_matrices: bool = False,
) -> Attribution:
    """DecompX: each source token's share of the target's logit, exact in sum.

    Every position's residual is kept as a sum over source tokens, ``x_i = Σ_k x_{i←k}``,
    starting from ``x⁰_{i←k} = δ_ik x⁰_i`` (``blocks.0.hook_resid_pre``) and carried through
    each block with every operation made linear in its input as the paper does
    (:mod:`mechnorm.circuits.propagate` writes out each step):

    * attention, given the cached pattern: ``a_{i←k} = Σ_h Σ_j α^h_{ij} y_{j←k} W_V^h W_O^h``;
    * LayerNorm / RMSNorm with the statistics of the whole vector, ``γ ⊙ (x_{←k} − μ(x_{←k})) / σ(x)``;
    * the MLP with each neuron linearised at its own activation, ``f(z)_{←k} = (f(z)/z) ⊙ z_{←k}``;
    * every bias (``b_V W_O + b_O``, β of each norm, ``b_in``, ``b_out``, the head's bias)
      shared over the parts it is added to in proportion to ``|v_k · b|`` (the paper's "absdot").

    The score of token k at layer l is ``Head(x^l_{pred←k})[target]``: the decomposition of
    the prediction position after l blocks read through the head-on-top (final norm +
    unembedding, or a classifier ``LinearHead``), norm statistics and bias shares again from
    the whole vector. **The scores of each row sum to the head's logit of that row's
    residual** (``logat``'s value at the prediction position; the last row sums to the model's
    own logit): no term is kept apart, because every bias is shared out.

    Pre-LN decoders vs post-LN encoders: in a post-LN encoder (BERT) a block is
    ``LN2(r + MLP(r))`` with ``r = LN1(x + Attn(x))``, as in the paper (which targets BERT and
    RoBERTa); the decomposition starts after the embedding LayerNorm. The pre-LN decoder form,
    ``r = x + Attn(LN1 x)``, ``x' = r + MLP(LN2 r)`` (or ``x + Attn + MLP`` with parallel
    blocks), is this module's adaptation: the same per-operation rules in the decoder's order,
    with the attention biases shared over ``x + Attn`` as the paper shares them over its
    residual sum. RMSNorm (Llama) has no centring and no β. Rotary position embeddings act on
    queries and keys only, so they are inside the cached pattern. A gated MLP (SwiGLU)
    ``act(x W_gate) ⊙ (x W_in)`` is linearised by freezing the gate at its cached value, so the
    decomposition travels through the up-projection; this plays the role of the paper's
    per-neuron ratio f(z)/z and keeps the sum exact. The paper's pooler (tanh) is not part of
    mechnorm's heads; a classifier head is a (norm +) linear map.

    Args:
        cache: an ``ActivationCache`` with ``mechnorm.hooks_for("decompx")`` (the attention
            patterns, the MLP pre/post activations and the input residual).
        head: an ``UnembedHead`` or a ``LinearHead`` (with a ``FinalNorm`` or no norm).
        target: what to explain (a contrast gives target − foil).
        model: the model that produced ``cache`` (for its weights); by default ``cache.model``.
        layers: which rows to report: None for 0…L, an int or a list.
        attention_mask: ``[batch, pos]``, False at padding.
        tokens: ``[batch, pos]`` ids, only to label the result.
        return_matrices: also keep, in ``metadata`` (batch first, so batches concatenate),
            ``"matrices"`` ``[batch, layer, pos, src]`` (``‖x^l_{i←k}‖``, the token-to-token
            norm matrices) and ``"prediction_parts"`` ``[batch, layer, src, d_model]`` (the
            vectors read through the head).

    Returns:
        An :class:`Attribution` ``[len(layers), batch, pos]``, signed; ``metadata["logit"]``
        holds each row's sum (the head's logit per layer, ``[batch, layer]``).

    Memory: one ``[batch, pos, src, d_model]`` float32 decomposition (plus a few of the same
    size while a block is processed); time grows with the cube of the length (attention
    mixes a ``pos × src`` decomposition over ``pos`` keys).

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("decompx"))  # doctest: +SKIP
        >>> attr = mechnorm.decompx(cache, mechnorm.UnembedHead(model), mechnorm.predicted(logits))   # doctest: +SKIP
        >>> attr.top_k(3)                                                                              # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens, model=model)
    model = model if model is not None else getattr(cache, "model", None)
    if model is None:
        raise ValueError("decompx needs the model's weights: pass model=..., or a cache from model.run_with_cache.")
    if not isinstance(target, Target):
        raise TypeError(f"target must be a mechnorm Target (predicted, token_target, contrast), got {type(target).__name__}.")
    warn_if_processed(model)
    mask = cache_mask(cache, attention_mask)
    batch = mask.shape[0]
    target.check(head.n_outputs, batch)
    n_layers = n_blocks(cache)
    layer_ids = resolve_layers(layers, n_layers)
    post_norm = is_encoder(model)
    weights = [block_weights(model, i, post_norm) for i in range(max(layer_ids))]
    require_hooks(cache, _needed(weights), "decompx")

    pred = target.prediction_positions(mask) if target.positions is not None else prediction_positions(model, mask)
    if not mask[torch.arange(batch, device=mask.device), pred].all():
        raise ValueError("A prediction position is a padding token; pass the attention mask used for the forward pass.")
    columns = target.columns(batch).to(mask.device)
    scale = frozen_head_scale(head, cache)
    scale = None if scale is None else at_positions(scale.float(), pred)  # [batch, 1]

    x0 = cache[INPUT_HOOK].float().masked_fill(~mask[..., None], 0.0)
    parts = torch.diag_embed(x0.transpose(1, 2)).permute(0, 2, 3, 1).contiguous()  # [batch, pos, src, d]: δ_ik x_i
    rows, logits, matrices, read = {}, {}, [], []
    for layer in range(max(layer_ids) + 1):
        if layer > 0:
            parts = propagate_block(parts, cache, layer - 1, weights[layer - 1], mask)
        if layer in layer_ids:
            at_pred = at_positions(parts, pred)  # [batch, src, d_model]
            shares = target.reduce(head_parts(at_pred, head, columns, mask, scale))  # [batch, src]
            rows[layer], logits[layer] = shares, shares.sum(-1)
            if return_matrices:
                matrices.append(parts.norm(dim=-1).cpu())
                read.append(at_pred.cpu())
    metadata = {
        "head": repr(head),
        "contrast": target.is_contrast,
        "positions": pred.cpu(),
        "logit": torch.stack([logits[l] for l in layer_ids], dim=1).cpu(),  # batch first, like all metadata
        "architecture": "post-LN encoder" if post_norm else "pre-LN decoder",
    }
    if return_matrices:
        metadata["matrices"] = torch.stack(matrices, dim=1)
        metadata["prediction_parts"] = torch.stack(read, dim=1)
    return method_result("decompx", torch.stack([rows[l] for l in layer_ids]), layer_ids, mask, cache, tokens, pred,
                         target, metadata=metadata)


def _needed(weights) -> list[str]:
    names = [INPUT_HOOK]
    for block, w in enumerate(weights):
        names += [f"blocks.{block}.attn.hook_pattern", *mlp_hooks(block, w.gated)]
    return names


def decompx_matrices(cache, head: Head, target: Target, **kwargs) -> Float[Tensor, "batch layer pos src"]:
    """DecompX's token-to-token matrices ``‖x^l_{i←k}‖`` for every layer (``return_matrices=True``).

    Example:
        >>> mechnorm.methods.decompx.decompx_matrices(cache, head, target).shape   # doctest: +SKIP
    """
    return decompx(cache, head, target, return_matrices=True, **kwargs).metadata["matrices"]
