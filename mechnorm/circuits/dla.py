"""Direct logit attribution: which components write the target logit, and from which tokens.

For a head ``logit_t(x) = norm(x) · W_U[:, t] + b_U[t]`` and the final residual
``x = Σ_c c`` (:func:`~mechnorm.circuits.decompose.components`):

* **DLA** (``ln="frozen"``) reads every component through the head with the final norm's
  scale ``σ`` frozen at its value on the whole residual (``ln_final.hook_scale``):
  ``DLA_c = ((c − mean(c)) ⊙ γ) · W_U[:, t] / σ`` (RMSNorm: no mean). It is linear, so
  ``Σ_c DLA_c + β · W_U[:, t] + b_U[t] = logit_t(x)`` exactly (the constant is
  :attr:`ComponentAttribution.constant`).
* **Direct effect** (``ln="recompute"``): ``DE_c = Head(x)[t] − Head(x − c)[t]`` with the
  final norm recomputed on ``x − c`` (the component removed from the final residual only;
  nothing downstream of it is re-run). *Transformers Don't Need LayerNorm at Inference Time*
  (Baroni et al. 2025) compares the two by ``NMAE = mean|DLA − DE| / mean|DE|``
  (:func:`dla_exactness`); without a final norm they coincide.
* **Head-token attribution**: head (l, h)'s output at the prediction position p is
  ``Σ_j pattern[p, j] · v_j W_O^h``, so its DLA splits over source tokens j as
  ``pattern[p, j] · (v_j · (W_O^h u)) / σ`` with ``u`` the norm-folded target direction
  (``γ ⊙ W_U[:, t]``, centred for LayerNorm). ``W_O^h u`` is formed first, so memory is
  ``O(layer · head · batch · pos)``.

A contrastive target (``mechnorm.contrast``) scores ``logit[target] − logit[foil]``. Scores are
in the space of the head as loaded (TransformerLens weight processing changes the constant).
"""

from __future__ import annotations

from typing import Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..heads import FINAL_SCALE_HOOK, AffineHead, FinalNorm, UnembedHead
from ..methods.arguments import prepare
from ..methods.registry import HookFilter, register_hooks
from ..residual import at_positions, check_mask, final_resid_hook, require_hooks
from ..result import cache_token_strings
from ..targets import Target
from .decompose import (
    ATTN_OUT_HOOK,
    COMPONENT_HOOKS,
    PATTERN_HOOK,
    SOURCE_HOOKS,
    V_HOOK,
    _model,
    _repeat_kv,
    attention_output_weights,
    check_pre_norm,
    components,
    resolve_positions,
)
from .result import ComponentAttribution, HeadTokenAttribution, parse_label

By = Literal["head", "layer", "component"]
# heads are read from hook_z, and by="layer" sums them, so hook_attn_out is not cached
DLA_HOOKS = HookFilter(COMPONENT_HOOKS.names | {FINAL_SCALE_HOOK}, COMPONENT_HOOKS.patterns - {ATTN_OUT_HOOK})
HEAD_TOKEN_HOOKS = SOURCE_HOOKS | HookFilter(names=frozenset({FINAL_SCALE_HOOK}))
register_hooks("dla", DLA_HOOKS)
register_hooks("head_token_attribution", HEAD_TOKEN_HOOKS)


def _readout(head, columns) -> tuple[FinalNorm | None, Tensor, Tensor]:
    """``(norm, folded [batch, k, d_model], constant [batch, k])`` with
    ``logit = centre(x) · folded / divisor + constant``: the head's linear part."""
    if not isinstance(head, AffineHead):
        raise TypeError(f"Direct logit attribution needs a linear read-out (UnembedHead or LinearHead), got "
                        f"{type(head).__name__}; a ModuleHead is not linear in the residual.")
    if getattr(head, "softcap", None) is not None:
        raise ValueError("This head soft-caps its logits (tanh), which is not linear: DLA does not sum to its logits.")
    norm = head.norm
    if norm is not None and not isinstance(norm, FinalNorm):
        raise TypeError("DLA needs the head's norm as a mechnorm.FinalNorm (or none), not an arbitrary callable.")
    picked = head.weight_out.float().T[columns]  # [batch, k, d_model]
    constant = torch.zeros(picked.shape[:2], device=picked.device) if head.bias_out is None else head.bias_out.float()[columns]
    if norm is None or norm.kind == "none":
        return None, picked, constant
    folded = picked if norm.weight is None else picked * norm.weight.float()
    if norm.bias is not None:
        constant = constant + picked @ norm.bias.float()
    return norm, folded, constant


def _read(vectors: Float[Tensor, "*lead batch k d_model"], folded, norm, scale=None) -> Float[Tensor, "*lead batch k cols"]:
    """``centre(v) · folded / divisor``: frozen with ``scale`` ``[batch, k, 1]``, else recomputed."""
    out = torch.einsum("...bkd,bcd->...bkc", vectors, folded)
    if norm is None:
        return out
    mean, divisor = norm.moments(vectors, scale)
    if mean is not None:
        out = out - mean * folded.sum(-1)[:, None, :]
    return out / divisor


def _frozen_scale(cache, head, norm, positions, residual=None) -> Tensor | None:
    """The final norm's divisor on the whole residual, ``[batch, k, 1]``: cached for an UnembedHead."""
    if norm is None:
        return None
    if isinstance(head, UnembedHead):
        require_hooks(cache, [FINAL_SCALE_HOOK], "direct logit attribution (frozen final norm)")
        return at_positions(cache[FINAL_SCALE_HOOK], positions).float()
    if residual is None:
        name = final_resid_hook(_model(cache))
        require_hooks(cache, [name], "head_token_attribution with a normalising LinearHead")
        residual = at_positions(cache[name], positions).float()
    return norm.moments(residual)[1]


def _by_layer(vectors: Tensor, labels: list[str]) -> tuple[Tensor, list[str]]:
    """Each block's heads and attention bias summed into one ``"Li.attn"`` component."""
    grouped: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        block, head = parse_label(label)
        grouped.setdefault(f"L{block}.attn" if head is not None or label.endswith(".attn_bias") else label, []).append(i)
    return torch.stack([vectors[rows].sum(0) for rows in grouped.values()]), list(grouped)


def _query_positions(cache, target: Target, positions, mask, reference: str):
    """``([batch, k] positions, squeeze)``: the target's prediction positions by default."""
    if isinstance(positions, str) and positions == "prediction":
        return target.prediction_positions(mask)[:, None], True
    index = resolve_positions(cache, positions, None, reference=reference)
    squeeze = not isinstance(positions, str) and torch.as_tensor(positions).ndim < 2
    return index, squeeze


@torch.inference_mode()
def direct_logit_attribution(
    cache,
    head=None,
    target: Target | int | str | Sequence | None = None,
    by: By = "component",
    ln: Literal["frozen", "recompute"] = "frozen",
    positions="prediction",
    attention_mask=None,
    tokens=None,
) -> ComponentAttribution:
    """How much each component of the final residual writes into the target logit.

    ``ln="frozen"``: ``DLA_c = centre(c) ⊙ γ · W_U[:, t] / σ`` with σ the final norm's cached
    scale; scores plus ``result.constant`` (``β · W_U[:, t] + b_U[t]``) sum to the head's logit.
    ``ln="recompute"``: the direct effect ``Head(x)[t] − Head(x − c)[t]``, norm recomputed.

    Args:
        cache: an ``ActivationCache`` with ``mechnorm.hooks_for("dla")``.
        head: an :class:`~mechnorm.UnembedHead` (either ``ln``; its own mode is not used) or a
            :class:`~mechnorm.LinearHead`.
        target: the output to explain (``mechnorm.predicted``, ``token_target``, ``contrast``).
        by: ``"component"`` (embeddings, every head, attention biases, MLPs), ``"head"`` (the
            attention heads only) or ``"layer"`` (embeddings, then each block's attention and MLP).
        ln: ``"frozen"`` (DLA) or ``"recompute"`` (direct effect).
        positions: ``"prediction"`` (the target's positions, else each sequence's last real
            token) gives scores ``[component, batch]``; ``"all"`` or ``[batch, k]`` indices give
            ``[component, batch, k]``, NaN at padding positions.
        attention_mask: ``[batch, pos]``, False at padding.
        tokens: ``[batch, pos]`` ids, only to label the result.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("dla"))  # doctest: +SKIP
        >>> dla = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), mechnorm.predicted(logits))  # doctest: +SKIP
        >>> dla.top_k(5)                                                # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens)
    if by not in ("head", "layer", "component"):
        raise ValueError(f"by must be 'head', 'layer' or 'component', got {by!r}.")
    if ln not in ("frozen", "recompute"):
        raise ValueError(f"ln must be 'frozen' or 'recompute', got {ln!r}.")
    model = _model(cache)
    check_pre_norm(model)
    require_hooks(cache, ["hook_embed"], "direct_logit_attribution")
    batch, pos = cache["hook_embed"].shape[:2]
    mask = check_mask(attention_mask, batch, pos, device=cache["hook_embed"].device)
    target = target.to(mask.device)
    target.check(head.n_outputs, batch)
    index, squeeze = _query_positions(cache, target, positions, mask, "hook_embed")
    stack = components(cache, positions=index)
    vectors, labels = _by_layer(stack.vectors, stack.labels) if by == "layer" else (stack.vectors, stack.labels)
    norm, folded, constant = _readout(head, target.columns(batch))
    residual = stack.residual()
    if ln == "frozen":
        scale = _frozen_scale(cache, head, norm, index, residual)
        scores = target.reduce(_read(vectors, folded, norm, scale))
        constant = target.reduce(constant)[:, None].expand(index.shape)
    else:
        full = _read(residual, folded, norm)
        scores = target.reduce(full - _read(residual - vectors, folded, norm))
        constant = None
    if by == "head":
        keep = [i for i, label in enumerate(labels) if label.startswith("L") and "." not in label]
        scores, labels = scores[keep], [labels[i] for i in keep]
        constant = None  # the other components are left out, so nothing sums to the logit
    real = at_positions(mask, index)  # [batch, k]: padding positions read as NaN
    scores = scores.masked_fill(~real, float("nan"))
    if squeeze:
        scores, constant = scores[..., 0], None if constant is None else constant[:, 0]
    return ComponentAttribution(
        scores=scores, labels=labels, positions=index, method="dla" if ln == "frozen" else "direct_effect",
        constant=constant, tokens=cache_token_strings(cache, tokens), target_labels=target.labels,
        metadata={"head": repr(head), "by": by, "ln": ln},
    )


@torch.inference_mode()
def dla_exactness(
    cache, head, target: Target, by: By = "component", positions="prediction", attention_mask=None
) -> pd.DataFrame:
    """How far DLA (frozen norm) is from the direct effect (norm recomputed), per component.

    ``NMAE_c = mean_{b,p} |DLA_c − DE_c| / mean_{b,p} |DE_c|`` and, in the last row
    (``component="overall"``), the same over every component at once (Baroni et al. 2025).
    0 means DLA is the exact direct effect (a model without a final norm).

    Returns:
        A DataFrame with columns component, mean_abs_error, mean_abs_direct_effect, nmae.

    Example:
        >>> mechnorm.dla_exactness(cache, head, target).tail(1)         # doctest: +SKIP
    """
    kwargs = dict(by=by, positions=positions, attention_mask=attention_mask)
    dla = direct_logit_attribution(cache, head, target, ln="frozen", **kwargs)
    effect = direct_logit_attribution(cache, head, target, ln="recompute", **kwargs)
    error = (dla.scores - effect.scores).abs().flatten(1)
    size = effect.scores.abs().flatten(1)
    frame = pd.DataFrame({
        "component": dla.labels + ["overall"],
        "mean_abs_error": error.nanmean(1).tolist() + [error.nanmean().item()],  # NaN: padding positions
        "mean_abs_direct_effect": size.nanmean(1).tolist() + [size.nanmean().item()],
    })
    frame["nmae"] = frame["mean_abs_error"] / frame["mean_abs_direct_effect"]
    return frame


@torch.inference_mode()
def head_token_attribution(
    cache,
    head=None,
    target: Target | int | str | Sequence | None = None,
    layers: int | Sequence[int] | None = None,
    positions="prediction",
    attention_mask=None,
    tokens=None,
) -> HeadTokenAttribution:
    """The target logit reaching the prediction from each source token through each head.

    ``score[l, h, b, j] = pattern_l[b, h, p_b, j] · (v_l[b, j, h] · (W_O^{l,h} u_b)) / σ_b`` with
    ``u_b`` the norm-folded target direction and ``σ_b`` the final norm's frozen scale at the
    prediction position ``p_b``. Summed over ``j`` it is head (l, h)'s DLA.

    Args:
        cache: an ``ActivationCache`` with ``mechnorm.hooks_for("head_token_attribution")``.
        head: an :class:`~mechnorm.UnembedHead` or :class:`~mechnorm.LinearHead` (a normalising
            LinearHead also needs the final residual cached).
        target: the output to explain; a contrast gives logit differences.
        layers: block indices (0…L−1, heads are ``L{block}H{head}``); None = every block.
        positions: ``"prediction"`` or ``[batch]`` query positions, one per sequence.
        attention_mask: ``[batch, pos]``, False at padding.
        tokens: ``[batch, pos]`` ids, only to label the result.

    Returns:
        A :class:`HeadTokenAttribution` ``[block, head, batch, src]``.

    Example:
        >>> hta = mechnorm.head_token_attribution(cache, mechnorm.UnembedHead(model), target)  # doctest: +SKIP
        >>> mechnorm.plot.head_token_heatmap(hta)                       # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens)
    model = _model(cache)
    check_pre_norm(model)
    n_blocks = int(model.cfg.n_layers)
    blocks = list(range(n_blocks)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    blocks = [b + n_blocks if b < 0 else b for b in blocks]
    if not blocks or any(not 0 <= b < n_blocks for b in blocks):
        raise ValueError(f"layers must be block indices in 0…{n_blocks - 1} (None for all), got {layers!r}.")
    reference = PATTERN_HOOK.format(i=blocks[0])
    require_hooks(cache, [name.format(i=b) for b in blocks for name in (PATTERN_HOOK, V_HOOK)], "head_token_attribution")
    batch, pos = cache[reference].shape[0], cache[reference].shape[-1]
    mask = check_mask(attention_mask, batch, pos, device=cache[reference].device)
    target = target.to(mask.device)
    target.check(head.n_outputs, batch)
    if isinstance(positions, str) and positions == "prediction":
        query = target.prediction_positions(mask)
    else:
        query = torch.as_tensor(positions, device=mask.device).long().reshape(-1)
        if query.shape[0] not in (1, batch):
            raise ValueError(f"positions must be 'prediction', an int or [batch={batch}] indices (one query per sequence), "
                             f"got {query.shape[0]} values.")
        query = query.expand(batch).clone()
        if (query < -pos).any() or (query >= pos).any():
            raise ValueError(f"positions {query.tolist()} are outside the sequence length {pos}; give one per sequence.")
        query = query % pos
    norm, folded, _ = _readout(head, target.columns(batch))
    direction = target.reduce(folded.transpose(1, 2))  # [batch, d_model]
    if norm is not None and norm.kind == "layernorm":
        direction = direction - direction.mean(-1, keepdim=True)  # centre(c)·u = c·(u − mean u)
    scale = _frozen_scale(cache, head, norm, query[:, None])
    divisor = torch.ones(batch, device=mask.device) if scale is None else scale.reshape(batch)
    rows = torch.arange(batch, device=mask.device)
    scores = []
    for block in blocks:
        w_o, _ = attention_output_weights(model, block)
        head_dirs = torch.einsum("hed,bd->bhe", w_o.float().to(direction.device), direction)  # W_O^h u: [batch, head, d_head]
        v = _repeat_kv(cache[V_HOOK.format(i=block)].float(), w_o.shape[0])  # [batch, src, head, d_head]
        value_scores = torch.einsum("bjhe,bhe->hbj", v, head_dirs)
        pattern = cache[PATTERN_HOOK.format(i=block)][rows, :, query].float()  # [batch, head, src]
        scores.append(pattern.transpose(0, 1) * value_scores / divisor[None, :, None])
    return HeadTokenAttribution(
        scores=torch.stack(scores), blocks=tuple(blocks), mask=mask, positions=query,
        tokens=cache_token_strings(cache, tokens), target_labels=target.labels,
        metadata={"head": repr(head)},
    )
