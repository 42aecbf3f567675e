"""ALTI-Logit and Logit (Ferrando, Gállego, Tsiamas & Costa-jussà, ACL 2023, "Explaining How
Transformers Use Context to Build Predictions") for decoder language models.

Each block's attention output at the prediction position t updates the target's logit, and
that update splits over the positions j it reads from:

    Δlogit^l_{w←j} = ( Σ_h α^{l,h}_{t,j} v^{l,h}_j W_O^{l,h} ) · ∂logit_w

where ``· ∂logit_w`` is the final norm made linear with the scale it applied at t in the
final residual (LayerNorm: ``(u − mean(u)) / σ_t ⊙ γ``; RMSNorm: ``u / rms_t ⊙ γ``) followed
by the unembedding column ``W_U[:, w]``; biases belong to no position and are left out.

* **Logit** assumes position j at layer l−1 still stands for token j and sums the updates:
  ``Σ_l Δlogit^l_{w←j}``.
* **ALTI-Logit** sends each update back to the input tokens through ALTI's rolled-out
  contributions of the layer below: ``Σ_l Σ_k Δlogit^l_{w←k} R^{l−1}_{k,j}``, with
  ``R^0 = I`` and ``R^l = C^l R^{l−1}`` (``C^l``: block l's row-normalised ALTI matrix,
  :func:`mechnorm.methods.decomposition.alti_matrix`).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from ..circuits.decompose import attention_by_source
from ..circuits.norm_split import norm_linear
from ..heads import FINAL_SCALE_HOOK, AffineHead, FinalNorm, Head, warn_if_processed
from ..inputs import is_encoder
from ..residual import INPUT_HOOK, at_positions, cache_mask, n_blocks, require_hooks, resolve_layers
from ..result import Attribution
from ..targets import Target
from .arguments import prepare
from .decomposition import alti_matrix, block_hooks
from .mixing import normalise_rows, prediction_index, visible_keys
from .output import method_result
from .registry import HookFilter, get_method, register

Mixing = Literal["alti", "none"]
_HOOKS = get_method("alti").hooks | HookFilter(frozenset({INPUT_HOOK, FINAL_SCALE_HOOK}))


@register(
    "alti_logit",
    "ALTI-Logit (Ferrando et al. 2023): each block's attention logit update, sent back to the input tokens by ALTI rollout.",
    _HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def alti_logit(
    cache,
    head: Head | None = None,
    target: Target | int | str | Sequence | None = None,
    model=None,
    mixing: Mixing = "alti",
    layers: int | Sequence[int] | None = None,
    attention_mask=None,
    tokens=None,
    return_matrices: bool = False,
) -> Attribution:
    """ALTI-Logit: how much each input token, through every attention block, moved the target's logit.

    Row l (blocks applied) is the sum over blocks 1…l of the logit updates
    ``Σ_k Δlogit^{l'}_{w←k} R^{l'−1}_{k,j}`` (see the module docstring for the formula); row 0
    is zero, and the last row is the paper's explanation. With ``mixing="none"`` it is the
    paper's **Logit** explanation (``R = I``: position j stands for token j).

    What is explained: the attention updates only. The embedding of the predicted position
    itself, the MLPs and the biases also write to the logit, so the scores do not sum to the
    logit, as in the paper; when the cache also holds the final residual
    (``blocks.{L-1}.hook_resid_post``, e.g. ``hooks_for("alti_logit", "logat")``) their total is
    ``metadata["unexplained"]`` (``[batch]``: the head's logit minus the last row's sum).

    Model families: the paper explains decoders (the decoder of an NMT model, and LMs), where
    every block adds its attention output to the residual stream; that is what this reads.
    Post-LN encoders (BERT) rescale the residual after each block, so the updates of
    different blocks are not on one scale: they are refused (use ``decompx``). RMSNorm (Llama)
    is linearised like LayerNorm without centring; grouped-query attention shares each
    key-value head among its query heads.

    Args:
        cache: an ``ActivationCache`` with ``mechnorm.hooks_for("alti_logit")``.
        head: an ``UnembedHead`` or ``LinearHead`` (with a ``FinalNorm`` or no norm).
        target: what to explain (a contrast gives target − foil).
        model: the model that produced ``cache``; by default ``cache.model``.
        mixing: ``"alti"`` (ALTI-Logit) or ``"none"`` (Logit).
        layers: which rows to report: None for 0…L, an int or a list.
        attention_mask: ``[batch, pos]``, False at padding.
        tokens: ``[batch, pos]`` ids, only to label the result.
        return_matrices: also keep ``metadata["updates"]`` ``[batch, layer, src]`` (each
            block's Δlogit by source position, before mixing; layer 0 is zero) and
            ``metadata["matrices"]`` ``[batch, layer, query, src]`` (the ALTI rollout ``R^l``).

    Returns:
        An :class:`Attribution` ``[len(layers), batch, pos]``, signed.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("alti_logit"))  # doctest: +SKIP
        >>> mechnorm.alti_logit(cache, mechnorm.UnembedHead(model), mechnorm.predicted(logits)).top_k(3)  # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens, model=model)
    if mixing not in ("alti", "none"):
        raise ValueError(f"mixing must be 'alti' (ALTI-Logit) or 'none' (Logit), got {mixing!r}.")
    model = model if model is not None else getattr(cache, "model", None)
    if model is None:
        raise ValueError("alti_logit needs the model's weights: pass model=..., or a cache from model.run_with_cache.")
    if not isinstance(target, Target):
        raise TypeError(f"target must be a mechnorm Target (predicted, token_target, contrast), got {type(target).__name__}.")
    if is_encoder(model):
        raise ValueError("alti_logit explains decoders (pre-LN residual stream); this is a post-LN encoder: use decompx.")
    warn_if_processed(model)
    mask = cache_mask(cache, attention_mask)
    batch, pos = mask.shape
    target.check(head.n_outputs, batch)
    layer_ids = resolve_layers(layers, n_blocks(cache))
    blocks = range(max(layer_ids))
    require_hooks(cache, [INPUT_HOOK, FINAL_SCALE_HOOK] + [h for b in blocks for h in block_hooks(model, b)], "alti_logit")
    pred = prediction_index(model, mask, target, None)
    columns = target.columns(batch).to(mask.device)
    direction = _logit_directions(head, columns)  # [batch, k, d_model]
    norm = getattr(head, "norm", None)
    scale = at_positions(cache[FINAL_SCALE_HOOK].float(), pred)  # [batch, 1]
    visible = visible_keys(model, mask) & mask[:, :, None]

    rollout = torch.eye(pos, device=mask.device).expand(batch, -1, -1)  # R^0 = I
    total = torch.zeros(batch, pos, device=mask.device)
    rows, updates, matrices = {0: total}, [total], [rollout]
    for block in blocks:
        parts = attention_by_source(cache, block, positions=pred[:, None])[:, 0].float()  # [batch, src, d_model]
        parts = parts.masked_fill(~mask[..., None], 0.0)
        if isinstance(norm, FinalNorm):
            parts = norm_linear(parts, norm, scale)
        update = target.reduce(torch.einsum("bsd,bkd->bsk", parts, direction))  # Δlogit by position
        total = total + (torch.einsum("bk,bkj->bj", update, rollout) if mixing == "alti" else update)
        if mixing == "alti":
            contributions = normalise_rows((alti_matrix(cache, block, model) * visible).masked_fill(~visible, 0.0))
            rollout = contributions @ rollout
        rows[block + 1] = total
        if return_matrices:
            updates.append(update)
            matrices.append(rollout)

    final = head(cache[_final_resid(cache)].float(), columns, cache=cache) if _final_resid(cache) in cache else None
    metadata = {"head": repr(head), "mixing": mixing, "contrast": target.is_contrast, "positions": pred.cpu()}
    if final is not None and max(layer_ids) == n_blocks(cache):
        metadata["unexplained"] = (at_positions(target.reduce(final), pred) - rows[max(layer_ids)].sum(-1)).cpu()
    if return_matrices:
        metadata["updates"] = torch.stack(updates, dim=1).cpu()
        metadata["matrices"] = torch.stack(matrices, dim=1).cpu()
    return method_result("alti_logit", torch.stack([rows[l] for l in layer_ids]), layer_ids, mask, cache, tokens, pred,
                         target, metadata=metadata)


def _logit_directions(head: Head, columns: Tensor) -> Tensor:
    """``[batch, k, d_model]``: the output columns the (linearised) head reads, γ folded in."""
    if not isinstance(head, AffineHead) or not (head.norm is None or isinstance(head.norm, FinalNorm)):
        raise TypeError(f"alti_logit needs a head that is a norm plus a linear map (UnembedHead, LinearHead); got {head!r}.")
    picked = head.weight_out.float().T[columns.to(head.weight_out.device)]
    return picked  # γ is applied by norm_linear with the parts


def _final_resid(cache) -> str:
    return f"blocks.{n_blocks(cache) - 1}.hook_resid_post"
