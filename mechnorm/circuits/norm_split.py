"""A block's LayerNorm/RMSNorm applied to a sum of parts, one part at a time, with the cached scale.

A norm is affine in its input once its divisor is fixed. With the divisor ``s_i`` the model
used (``blocks.{l}.ln1.hook_scale`` / ``ln2.hook_scale``, cached), a position's input
``u_i = Σ_j z_ij (+ biases)`` splits exactly into

    LayerNorm:  LN(u_i) = Σ_j γ ⊙ (z_ij − mean(z_ij)) / s_i  (+ the biases' share) + β
    RMSNorm:    RMS(u_i) = Σ_j γ ⊙ z_ij / s_i  (+ the biases' share)

(Kobayashi et al. 2021; Ferrando et al. 2022, eq. 6). :func:`norm_linear` returns the
per-part terms without β: which parts a bias belongs to is the caller's decision.
GlobEnc and ALTI (``methods/decomposition.py``) read it; DecompX may too.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

from jaxtyping import Float
from torch import Tensor

from ..heads import FinalNorm

SCALE_HOOK = "blocks.{i}.{norm}.hook_scale"


def block_norm(model, block: int, which: Literal["ln1", "ln2"]) -> FinalNorm:
    """Block ``block``'s norm ``which`` with its parameters read out, for any model class.

    Checked against the module itself on random vectors (see ``FinalNorm.from_model``).

    Example:
        >>> block_norm(model, 0, "ln1").kind                          # doctest: +SKIP
        'layernorm'
    """
    if which not in ("ln1", "ln2"):
        raise ValueError(f"which must be 'ln1' or 'ln2', got {which!r}.")
    return FinalNorm.from_model(SimpleNamespace(cfg=model.cfg, ln_final=getattr(model.blocks[block], which)))


def norm_linear(
    parts: Float[Tensor, "*lead src d_model"], norm: FinalNorm, scale: Float[Tensor, "*lead 1"]
) -> Float[Tensor, "*lead src d_model"]:
    """Each part through the norm's linear map with the given divisor: no β, no recomputed statistics.

    ``scale`` is the divisor of the position the parts add up to (its ``hook_scale``), one per
    leading index; summed over ``src`` (plus β) the result is the norm of the summed input.

    Example:
        >>> import torch
        >>> from mechnorm.heads import FinalNorm
        >>> parts = torch.tensor([[[1.0, 3.0], [1.0, -1.0]]])        # 2 parts, d_model = 2
        >>> norm_linear(parts, FinalNorm("rmsnorm", torch.ones(2)), torch.tensor([[2.0]]))
        tensor([[[ 0.5000,  1.5000],
                 [ 0.5000, -0.5000]]])
    """
    if norm.kind == "none":
        return parts
    out = parts - parts.mean(-1, keepdim=True) if norm.kind == "layernorm" else parts
    out = out / scale[..., None, :].to(out)
    return out if norm.weight is None else out * norm.weight.to(out)
