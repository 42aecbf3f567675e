"""Integrated gradients' completeness check, and advice that fits the model's architecture."""

from __future__ import annotations

from torch import Tensor

from ..warn import warn


def _warn_if_not_converged(attributions: Tensor, delta: Tensor, n_steps: int, tolerance: float = 0.05,
                           model=None, baseline=None) -> None:
    """Warn when completeness fails by more than ``tolerance`` of ``f(x) − f(baseline)``, with
    advice that fits the model: with a position table (GPT-2, BERT) the zero baseline is a valid
    input and only the integration is too coarse; without one (Llama, GPT-NeoX, Gemma: rotary)
    a zero embedding sits on the first norm's singularity."""
    total = attributions.detach().float().sum((1, 2))
    change = (total - delta).abs()  # captum's delta = Σ attributions − (f(x) − f(baseline))
    error = delta.abs() / change.clamp_min(1e-6)
    if not (error > tolerance).any():
        return
    bad = int((error > tolerance).sum())
    message = (f"Integrated gradients did not converge: completeness is off by up to {float(error.max()):.0%} "
               f"of f(x) − f(baseline) ({bad} of {len(error)} sequences over {tolerance:.0%}) at n_steps={n_steps}. ")
    named = baseline if isinstance(baseline, str) else None
    table = _has_position_table(model) if model is not None else None
    if table:
        message += (f"This model adds a position table before its first norm, so the {named or 'given'} baseline "
                    f"is a valid input and the path is only steep: raise n_steps (e.g. to {4 * n_steps})"
                    + (", or pass baseline='mean', which converges in fewer steps." if named != "mean" else "."))
    elif table is False:
        message += ("This model normalises the embedding first (no position table, as in Llama, GPT-NeoX, Gemma): "
                    + ("a zero embedding sits on the norm's singularity: pass baseline='mean' (or a token's "
                       "embedding), and raise n_steps." if named in ("zero", "pad", None) else "raise n_steps.")
                    + " Keep hold_first=True on a causal LM.")
    else:
        message += ("Raise n_steps; where the first operation normalises the embedding (Llama, GPT-NeoX) "
                    "pass baseline='mean' rather than a zero embedding.")
    warn(message)


def _has_position_table(model) -> bool:
    """Whether the token embedding is summed with a learned/sinusoidal position table before
    the first norm (GPT-2, BERT) rather than positions entering inside attention (rotary)."""
    kind = getattr(getattr(model, "cfg", None), "positional_embedding_type", None)
    if isinstance(kind, str):
        return kind in ("standard", "shortformer")
    return any("pos_embed" in name for name in getattr(model, "hook_dict", {}))
