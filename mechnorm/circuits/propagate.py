"""Per-source-token propagation of the residual stream through norms, attention and MLPs.

DecompX (Modarressi et al., ACL 2023) writes every position's residual as a sum over source
tokens, ``x_i = Σ_k x_{i←k}``, and carries that decomposition through each operation of a
block with the operation made linear in its input:

* **attention** (linear in the values given the cached pattern α):
  ``a_{i←k} = Σ_h Σ_j α^h_{ij} (y_{j←k} W_V^h) W_O^h``; the biases ``Σ_h b_V^h W_O^h + b_O``
  are shared out (below) over the decomposition they are added to;
* **LayerNorm** with the statistics of the whole vector:
  ``LN(x)_{←k} = γ ⊙ (x_{←k} − mean(x_{←k})) / σ(x)``, plus a share of β; RMSNorm is
  ``γ ⊙ x_{←k} / rms(x)`` (no β);
* **MLP**, each neuron linearised at its own activation: ``z = W_in y + b_in`` is split as
  ``z_{←k} = W_in y_{←k}`` plus a share of ``b_in``; then ``f(z)_{←k} = (f(z)/z) ⊙ z_{←k}``
  (DecompX's zero-origin "GeLU_ZO" linearisation); then ``W_out`` and a share of ``b_out``.
  A gated MLP ``act(x W_gate) ⊙ (x W_in)`` is linearised by freezing the gate at its value
  ``act(g)`` (read from the cache): ``h_{←k} = act(g) ⊙ (y_{←k} W_in + share of its bias)``,
  so the decomposition travels through the linear ("up") branch, the gate acting as a
  per-neuron gain exactly as f(z)/z does in the ungated case. Both are exact in sum.

**Biases** are shared as the paper's default ("absdot"): bias ``b`` added to the parts
``{v_k}`` gives part k the share ``|v_k · b| / Σ_k' |v_k' · b|``. Every share sums to the whole,
so the parts always sum to the model's own vector (float error aside).

Layout: parts are ``[batch, pos, src, d_model]`` — the most memory this module holds per
block, besides one tensor of the same size per intermediate step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from ..heads import AffineHead, FinalNorm, Head, UnembedHead
from .decompose import attention_output_weights
from .norm_split import block_norm

Parts = Float[Tensor, "batch pos src d_model"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class BlockWeights:
    """What :func:`propagate_block` needs of one transformer block, read from the model."""

    ln1: FinalNorm
    ln2: FinalNorm
    W_V: Float[Tensor, "head d_model d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    attn_bias: Float[Tensor, "d_model"]  # Σ_h b_V^h W_O^h + b_O: the rows of α sum to 1
    W_in: Float[Tensor, "d_model d_mlp"]
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, "d_model"]
    act: Callable[[Tensor], Tensor] | None  # the gate's activation, for a gated MLP only
    gated: bool
    post_norm: bool  # BERT: norms after the residual additions
    parallel: bool  # GPT-NeoX / GPT-J: attention and MLP both read the block input


def block_weights(model, block: int, post_norm: bool) -> BlockWeights:
    """Read block ``block``'s weights from a HookedTransformer, HookedEncoder or TransformerBridge.

    Example:
        >>> weights = block_weights(model, 0, post_norm=False)        # doctest: +SKIP
    """
    module = model.blocks[block]
    attn, mlp = module.attn, module.mlp
    n_heads = model.cfg.n_heads
    W_O, b_O = attention_output_weights(model, block)
    W_O, b_O = W_O.float(), None if b_O is None else b_O.float()
    W_V = _float(attn.W_V)
    b_V = _maybe(attn, "b_V")
    if W_V.shape[0] != n_heads:  # grouped-query attention: key-value heads shared by query heads
        repeat = n_heads // W_V.shape[0]
        W_V = W_V.repeat_interleave(repeat, dim=0)
        b_V = None if b_V is None else b_V.repeat_interleave(repeat, dim=0)
    attn_bias = torch.zeros(W_O.shape[-1], device=W_O.device)
    if b_V is not None:
        attn_bias = attn_bias + torch.einsum("he,hed->d", b_V, W_O)
    if b_O is not None:
        attn_bias = attn_bias + b_O
    W_gate = _maybe(mlp, "W_gate")
    act = None
    if W_gate is not None:
        name = str(model.cfg.act_fn)
        if name not in _ACTIVATIONS:
            raise ValueError(f"Gated MLP activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}.")
        act = _ACTIVATIONS[name]
    b_out = _maybe(mlp, "b_out")
    W_out = _float(mlp.W_out)
    return BlockWeights(
        ln1=block_norm(model, block, "ln1"),
        ln2=block_norm(model, block, "ln2"),
        W_V=W_V,
        W_O=W_O,
        attn_bias=attn_bias,
        W_in=_float(mlp.W_in),
        W_out=W_out,
        b_out=torch.zeros(W_out.shape[-1], device=W_out.device) if b_out is None else b_out,
        act=act,
        gated=W_gate is not None,
        post_norm=post_norm,
        parallel=bool(getattr(model.cfg, "parallel_attn_mlp", False)),
    )


def mlp_hooks(block: int, gated: bool) -> list[str]:
    """The cached MLP activations :func:`propagate_block` reads for block ``block``."""
    names = [f"blocks.{block}.mlp.hook_pre", f"blocks.{block}.mlp.hook_post"]
    return names + [f"blocks.{block}.mlp.hook_pre_linear"] if gated else names


def share_bias(parts: Float[Tensor, "*lead src d"], bias: Tensor, valid: Tensor | None = None) -> Float[Tensor, "*lead src d"]:
    """Add ``bias`` to ``parts`` split by DecompX's "absdot" rule: part k gets ``|v_k·b| / Σ|v·b|``.

    ``bias`` is ``[d]`` or ``[*lead, d]`` (a per-position bias). ``valid`` (``[*lead, src]``)
    restricts the sharing to some sources (the others get nothing).

    Example:
        >>> parts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> share_bias(parts, torch.tensor([1.0, 1.0])).sum(0)
        tensor([2., 3.])
    """
    bias = bias.to(parts)
    dots = torch.einsum("...sd,...d->...s", parts, bias.expand(*parts.shape[:-2], parts.shape[-1])).abs()
    if valid is not None:
        dots = dots * valid
    weights = dots / dots.sum(-1, keepdim=True).clamp_min(torch.finfo(dots.dtype).tiny)
    return parts + weights[..., None] * bias.unsqueeze(-2)


def norm_parts(parts: Parts, norm: FinalNorm, valid=None, scale: Tensor | None = None) -> Parts:
    """A norm applied to a decomposition, with the statistics of the whole (summed) vector.

    ``scale`` replaces the divisor recomputed from the sum (``[batch, pos, 1]``, a frozen norm).
    """
    if norm.kind == "none":
        return parts
    total = parts.sum(-2)
    _, divisor = norm.moments(total, scale)
    out = parts - parts.mean(-1, keepdim=True) if norm.kind == "layernorm" else parts
    out = out / divisor[..., None, :]
    if norm.weight is not None:
        out = out * norm.weight.to(out)
    if norm.bias is not None:
        out = share_bias(out, norm.bias, valid)
    return out


def attention_parts(parts: Parts, pattern: Float[Tensor, "batch head query key"], weights: BlockWeights) -> Parts:
    """``Σ_h Σ_j α^h_{ij} (y_{j←k} W_V^h) W_O^h`` for every query i and source k (no bias)."""
    values = torch.einsum("bjkd,hde->bhjke", parts, weights.W_V.to(parts))
    mixed = torch.einsum("bhqj,bhjke->bhqke", pattern, values)
    del values
    return torch.einsum("bhqke,hed->bqkd", mixed, weights.W_O.to(parts))


def mlp_parts(parts: Parts, cache, block: int, weights: BlockWeights, valid, chunk: int = 64) -> Parts:
    """The MLP's output split by source, each neuron linearised at its cached activation.

    Positions are independent, so the work is done ``chunk`` query positions at a time.
    """
    pre = torch.nan_to_num(cache[f"blocks.{block}.mlp.hook_pre"].float())  # [batch, pos, d_mlp]
    post = torch.nan_to_num(cache[f"blocks.{block}.mlp.hook_post"].float())
    if weights.gated:
        gain = weights.act(pre)  # the gate, frozen
        linear = torch.nan_to_num(cache[f"blocks.{block}.mlp.hook_pre_linear"].float())
        post_bias = post - gain * linear  # TL's b_in after the product
    else:
        # f(z)/z; where z == 0 the neuron's part is 0 whatever the ratio
        gain = torch.where(pre == 0, torch.zeros_like(pre), post / pre)
        linear, post_bias = pre, None
    out = torch.empty_like(parts)
    W_in, W_out = weights.W_in.to(parts), weights.W_out.to(parts)
    for start in range(0, parts.shape[1], chunk):
        s = slice(start, start + chunk)
        z = torch.einsum("bqkd,dm->bqkm", parts[:, s], W_in)
        # the bias of the linear branch is what the cached activation holds beyond W_in·y
        z = share_bias(z, linear[:, s] - z.sum(-2), valid[:, s])
        h = z * gain[:, s, None, :]
        if post_bias is not None:
            h = share_bias(h, post_bias[:, s], valid[:, s])
        out[:, s] = share_bias(torch.einsum("bqkm,md->bqkd", h, W_out), weights.b_out, valid[:, s])
    return out


def propagate_block(parts: Parts, cache, block: int, weights: BlockWeights, mask: Bool[Tensor, "batch pos"]) -> Parts:
    """One block applied to a decomposition: ``x_{i←k}`` in, the block output's ``x'_{i←k}`` out.

    Pre-LN: ``r = x + Attn(LN1 x)``, ``x' = r + MLP(LN2 r)`` (parallel: ``MLP(LN2 x)``).
    Post-LN (BERT): ``r = LN1(x + Attn(x))``, ``x' = LN2(r + MLP(r))``. Padded positions
    (``mask`` False) neither receive nor give anything.

    Example:
        >>> parts = propagate_block(parts, cache, 0, block_weights(model, 0, False), mask)  # doctest: +SKIP
    """
    valid = mask[:, :, None] & mask[:, None, :]  # [batch, pos, src]: who may share a bias
    # padded keys and queries attend nowhere (a fully masked row may even hold NaN)
    pattern = torch.nan_to_num(cache[f"blocks.{block}.attn.hook_pattern"].float()) * valid[:, None].float()
    attn_in = parts if weights.post_norm else norm_parts(parts, weights.ln1, valid)
    resid = share_bias(parts + attention_parts(attn_in, pattern, weights), weights.attn_bias, valid)
    del attn_in
    if weights.post_norm:
        resid = norm_parts(resid, weights.ln1, valid)
        out = norm_parts(resid + mlp_parts(resid, cache, block, weights, valid), weights.ln2, valid)
    else:
        mlp_in = norm_parts(parts if weights.parallel else resid, weights.ln2, valid)
        out = resid + mlp_parts(mlp_in, cache, block, weights, valid)
    return out.masked_fill(~mask[:, :, None, None], 0.0)


def head_parts(
    parts: Float[Tensor, "batch src d_model"],
    head: Head,
    columns: Tensor,
    valid: Bool[Tensor, "batch src"],
    scale: Tensor | None = None,
) -> Float[Tensor, "batch src k"]:
    """Each source's share of the head's logits of ``columns`` (``[batch, k]``).

    The head's norm is split as above (statistics of the whole vector, or the given frozen
    ``scale`` ``[batch, 1]``); its output bias ``b[c]`` is shared by the absdot rule over the
    whole output vector, as DecompX does for the classifier: part k's weight is
    ``|y_k · b| = |n_k · (W b)|``, with ``n_k`` the normalised part.
    """
    if not isinstance(head, AffineHead) or not (head.norm is None or isinstance(head.norm, FinalNorm)):
        raise TypeError(
            f"DecompX needs a head it can split linearly: UnembedHead, or LinearHead with a FinalNorm or no "
            f"norm; got {head!r}. Wrap a classifier's weights in mechnorm.LinearHead(weight, bias, norm=FinalNorm(...))."
        )
    normed = parts if head.norm is None else norm_parts(parts[:, None], head.norm, valid[:, None], None if scale is None else scale[:, None])[:, 0]
    W = head.weight_out.float().to(parts.device)
    picked = W.T[columns.to(parts.device)]  # [batch, k, d_model]
    out = torch.einsum("bsd,bkd->bsk", normed, picked)
    if head.bias_out is None:
        return out
    bias = head.bias_out.float().to(parts.device)
    direction = W @ bias  # [d_model]: y_k · b without building y_k over every output
    dots = (normed @ direction).abs() * valid
    weights = dots / dots.sum(-1, keepdim=True).clamp_min(torch.finfo(dots.dtype).tiny)
    return out + weights[..., None] * bias[columns.to(parts.device)][:, None, :]


def frozen_head_scale(head: Head, cache) -> Tensor | None:
    """The final norm's cached scale ``[batch, pos, 1]`` for a frozen-norm head, else None."""
    if isinstance(head, UnembedHead):
        return head.frozen_scale(cache)
    return None


def _maybe(module, name: str) -> Tensor | None:
    try:
        value = getattr(module, name)
    except (AttributeError, TypeError):
        return None
    return None if value is None else _float(value)


def _float(tensor: Tensor) -> Tensor:
    return tensor.detach().float()
