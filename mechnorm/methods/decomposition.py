"""GlobEnc (Modarressi et al., NAACL 2022) and ALTI (Ferrando, Gállego & Costa-jussà, EMNLP 2022) from one cache.

Both split each block's attention sublayer output at token i into one vector per source token
j, the **transformed vectors** ``T_i(x_j)``, built from the cached pattern, values and W_O
(``mechnorm.circuits.attention_by_source``) and the residual:

    z_ij = Σ_h α^h_ij (v^h_j W_O^h) + δ_ij x_j          (b_O belongs to no token)

* **Post-LN encoders (BERT)**: the block is ``h = LN1(x + attn(x))``, ``out = LN2(h + FFN(h))``.
  ``T_i(x_j) = LN1_lin(z_ij)``: the LayerNorm split linearly with the model's own divisor
  (``ln1.hook_scale``; see ``circuits/norm_split.py``), without β. This is the papers' setting.
* **Pre-LN decoders (GPT-2, Llama, SmolLM2)**: the block is ``x + attn(LN1(x))`` (then the
  MLP). LN1 acts on each source token alone, inside v_j, so no decomposition is needed:
  ``T_i(x_j) = z_ij`` and the attention sublayer output is ``resid_mid_i = Σ_j z_ij + b_O``.
  Parallel attention+MLP blocks (GPT-NeoX) read the same way: ``y_i = x_i + attn_out_i``.
  There is no norm after the residual addition (the next block's LN1 acts per token again),
  so GlobEnc's LN2 step has no counterpart; RMSNorm (Llama) only ever appears inside v_j.

The FFN/MLP is ignored in both methods, as in both papers (its output mixes no tokens).
Causal attention: ``α_ij = 0`` for j > i, so those entries are exactly zero.

**GlobEnc¬** (``aggregate="none"``) is the per-block matrix ``N_ij = ‖LN2_lin(T_i(x_j))‖₂``
(the paper's ``N_Enc``: attention, both residuals and both LayerNorms, FFN bypassed, LN2 with
the model's divisor ``ln2.hook_scale``); ``‖T_i(x_j)‖₂`` in a pre-LN decoder (Kobayashi et al.
2021's ``N_Res``, the closest decoder analogue). **GlobEnc** rolls the row-normalised
matrices out across blocks (``aggregate="rollout"``, the default).

**ALTI¬**: ``c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁)``, rows normalised, with ``y_i`` the
sublayer's actual output (LN1's output in BERT, ``blocks.{l}.hook_resid_mid`` in a pre-LN
decoder: ``Σ_j T_i(x_j)`` plus the bias terms); **ALTI** is its rollout (the default).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..circuits.decompose import attention_by_source, attention_output_weights
from ..circuits.norm_split import SCALE_HOOK, block_norm, norm_linear
from ..inputs import is_encoder
from ..residual import INPUT_HOOK, check_mask, model_is_post_norm, n_blocks, require_hooks
from ..targets import Target
from .arguments import prepare
from .mixing import Aggregate, check_aggregate, mixing_attribution, prediction_index, visible_keys
from .registry import HookFilter, register

RESID_PRE = "blocks.{i}.hook_resid_pre"
_PATTERNS = {RESID_PRE, "blocks.{i}.attn.hook_pattern", "blocks.{i}.attn.hook_v"}
_NORM_SCALES = {SCALE_HOOK.format(i="{i}", norm="ln1"), SCALE_HOOK.format(i="{i}", norm="ln2")}
_HOOKS = HookFilter(patterns=frozenset(_PATTERNS | _NORM_SCALES))
Vectors = Float[Tensor, "batch query src d_model"]


def is_post_ln(model) -> bool:
    """True for a post-LN encoder (BERT-like: HookedEncoder, or a TransformerBridge around one).

    Example:
        >>> is_post_ln(mechnorm.load_model("zoo:bert-lexicon"))      # doctest: +SKIP
        True
    """
    return model_is_post_norm(model) or is_encoder(model)


def block_hooks(model, block: int, globenc: bool = False) -> list[str]:
    """The hooks :func:`transformed_vectors` (``globenc``: and :func:`globenc_matrix`) reads for ``block``.

    Example:
        >>> block_hooks(model, 0)                                    # doctest: +SKIP
        ['blocks.0.attn.hook_pattern', 'blocks.0.attn.hook_v', 'blocks.0.hook_resid_pre']
    """
    names = [p.format(i=block) for p in sorted(_PATTERNS)]
    if is_post_ln(model):
        names.append(SCALE_HOOK.format(i=block, norm="ln1"))
        if globenc:
            names.append(SCALE_HOOK.format(i=block, norm="ln2"))
    return names


@torch.inference_mode()
def transformed_vectors(cache, block: int, model=None) -> tuple[Vectors, Float[Tensor, "batch query d_model"]]:
    """``(T, y)``: the transformed vectors ``T[b, i, j] = T_i(x_j)`` of block ``block`` and
    the attention sublayer's output ``y_i`` they add up to (plus biases), float32.

    Post-LN: ``T_i(x_j) = LN1_lin(z_ij)`` and ``y_i = Σ_j T_i(x_j) + LN1_lin(b_O) + β₁``
    (= LN1's output); pre-LN: ``T_i(x_j) = z_ij`` and ``y_i = Σ_j z_ij + b_O`` (= resid_mid).
    Memory: ``O(batch · pos² · d_model)``.

    Example:
        >>> T, y = transformed_vectors(cache, 0)                     # doctest: +SKIP
        >>> T.shape                                                  # [batch, query, src, d_model]  # doctest: +SKIP
    """
    model = model if model is not None else cache.model
    require_hooks(cache, block_hooks(model, block), "transformed_vectors")
    x = cache[RESID_PRE.format(i=block)].float()  # [batch, src, d_model]
    z = attention_by_source(cache, block).float()  # [batch, query, src, d_model]
    src = torch.arange(x.shape[1], device=x.device)
    z[:, src, src] += x  # the residual: token i's own input, δ_ij x_j
    _, b_o = attention_output_weights(model, block)
    bias = torch.zeros_like(x[0, 0]) if b_o is None else b_o.float().to(x.device)
    if not is_post_ln(model):
        return z, z.sum(2) + bias
    ln1 = block_norm(model, block, "ln1")
    scale = cache[SCALE_HOOK.format(i=block, norm="ln1")].float()  # [batch, query, 1]
    transformed = norm_linear(z, ln1, scale)
    bias_part = norm_linear(bias.expand(*x.shape[:2], 1, -1), ln1, scale)[:, :, 0]
    beta = 0.0 if ln1.bias is None else ln1.bias.float().to(x.device)
    return transformed, transformed.sum(2) + bias_part + beta


def globenc_matrix(cache, block: int, model=None) -> Float[Tensor, "batch query src"]:
    """GlobEnc's ``N_Enc`` for one block (unnormalised): ``‖LN2_lin(T_i(x_j))‖₂``, or
    ``‖T_i(x_j)‖₂`` in a pre-LN decoder (see the module docstring).

    Example:
        >>> globenc_matrix(cache, 0)[0]                              # doctest: +SKIP
    """
    model = model if model is not None else cache.model
    require_hooks(cache, block_hooks(model, block, globenc=True), "globenc")
    transformed, _ = transformed_vectors(cache, block, model)
    if is_post_ln(model):
        scale = cache[SCALE_HOOK.format(i=block, norm="ln2")].float()
        transformed = norm_linear(transformed, block_norm(model, block, "ln2"), scale)
    return transformed.norm(dim=-1)


def alti_matrix(cache, block: int, model=None) -> Float[Tensor, "batch query src"]:
    """ALTI's contributions for one block (unnormalised): ``max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁)``.

    Example:
        >>> alti_matrix(cache, 0)[0]                                 # doctest: +SKIP
    """
    transformed, y = transformed_vectors(cache, block, model)
    y = y[:, :, None]
    return (y.abs().sum(-1) - (y - transformed).abs().sum(-1)).clamp_min(0.0)


def _mixing(method, matrix_fn, cache, model, aggregate, attention_mask, target, positions, layers, tokens,
            return_matrices):
    cache, _, target, attention_mask, tokens = prepare(cache, None, target, attention_mask, tokens, model=model,
                                                       need_head=False, need_target=False)
    check_aggregate(aggregate)
    model = model if model is not None else getattr(cache, "model", None)
    if model is None:
        raise ValueError(f"{method} needs the model's weights (W_O, norms): pass model=..., or a cache from "
                         "model.run_with_cache (which keeps its model).")
    require_hooks(cache, [INPUT_HOOK], method)
    batch, pos = cache[INPUT_HOOK].shape[:2]
    mask = check_mask(attention_mask, batch, pos, device=cache[INPUT_HOOK].device)
    pred = prediction_index(model, mask, target, positions)
    visible = visible_keys(model, mask)
    return mixing_attribution(
        method, lambda block: matrix_fn(cache, block, model) * visible, n_blocks(cache), mask, pred, layers,
        aggregate, return_matrices, cache=cache, tokens=tokens, metadata={"post_ln": is_post_ln(model)},
    )


@register(
    "globenc",
    "GlobEnc (Modarressi et al. 2022): norms of attention+residual+LayerNorm transformed vectors, rolled out.",
    _HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def globenc(
    cache,
    model=None,
    aggregate: Aggregate = "rollout",
    attention_mask=None,
    target: Target | None = None,
    positions: int | Tensor | None = None,
    layers: int | Sequence[int] | None = None,
    tokens=None,
    return_matrices: bool = False,
):
    """GlobEnc: how much each token contributes to the prediction position's representation, per layer.

    Row l (blocks applied) reads block l−1's ``N_Enc`` matrix, rows normalised
    (``aggregate="none"``, the paper's GlobEnc¬) or their rollout over blocks 0…l−1
    (``"rollout"``, GlobEnc). Layer 0 is the identity. See the module docstring for what is
    computed on post-LN encoders and pre-LN decoders.

    Args:
        cache: an ``ActivationCache`` with ``mechnorm.hooks_for("globenc")``.
        model: the model (default: ``cache.model``); its W_O, b_O and norms are read.
        aggregate: ``"rollout"`` (GlobEnc) or ``"none"`` (GlobEnc¬).
        attention_mask: ``[batch, pos]``, False at padding (left or right).
        target: only its ``positions`` are used, when set.
        positions: prediction position(s); default last real token, ``[CLS]`` in an encoder.
        layers: rows to report, 0…L; negatives count from L.
        tokens: ``[batch, pos]`` ids, only to label the result.
        return_matrices: keep the token-to-token matrices of the reported layers in
            ``metadata["matrices"]``, ``[batch, layer, query, key]``.

    Returns:
        An :class:`~mechnorm.result.Attribution` ``[layer, batch, pos]``, unsigned, rows sum to 1.

    Example:
        >>> _, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("globenc"))  # doctest: +SKIP
        >>> mechnorm.globenc(cache, aggregate="none").top_k(3)       # doctest: +SKIP
    """
    return _mixing("globenc", globenc_matrix, cache, model, aggregate, attention_mask, target, positions, layers,
                   tokens, return_matrices)


@register(
    "alti",
    "ALTI (Ferrando et al. 2022): L1 proximity of each token's transformed vector to the attention block output.",
    _HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def alti(
    cache,
    model=None,
    aggregate: Aggregate = "rollout",
    attention_mask=None,
    target: Target | None = None,
    positions: int | Tensor | None = None,
    layers: int | Sequence[int] | None = None,
    tokens=None,
    return_matrices: bool = False,
):
    """ALTI: contributions ``c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁)``, row-normalised, per layer.

    ``aggregate="none"`` gives ALTI¬ (block l−1's matrix at row l); ``"rollout"`` (the
    default) multiplies them through the blocks, as the paper's ALTI. Arguments and result as
    for :func:`globenc`.

    Example:
        >>> _, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("alti"))  # doctest: +SKIP
        >>> mechnorm.alti(cache).top_k(3)                            # doctest: +SKIP
    """
    return _mixing("alti", alti_matrix, cache, model, aggregate, attention_mask, target, positions, layers, tokens,
                   return_matrices)
