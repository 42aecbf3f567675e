"""Whether a head read from a model reproduces that model's own head, and what it needs to.

:class:`mechnorm.heads.UnembedHead` reads the final norm and unembedding out of a model; this
module holds what that reading depends on beyond the weights: the ``(1 + w)`` RMSNorm offset of
the Gemma family (from the HF config's ``model_type``), the final-logit soft-cap (Gemma 2), the
head scalings mechnorm does not model (refused), and a check of the norm on random vectors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .heads import FinalNorm

__all__ = ["UNIT_OFFSET_NORMS", "UNSUPPORTED_HEAD_CONFIG", "check_final_norm"]

#: HF ``model_type``s whose RMSNorm scales by ``(1 + w)`` (the stored weight is an offset from 1)
UNIT_OFFSET_NORMS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma"})
#: HF config attributes that change the head in ways UnembedHead does not reproduce
UNSUPPORTED_HEAD_CONFIG = ("logit_scale", "logits_scaling", "output_multiplier_scale", "mup_width_scale")


def _hf_config(model):
    """The wrapped HF model's config (a ``TransformerBridge``), else None."""
    return getattr(getattr(model, "original_model", None), "config", None)


def _hf_model_type(model) -> str:
    return str(getattr(_hf_config(model), "model_type", "") or "")


def _read_softcap(model, name: str) -> float | None:
    """The final-logit soft-cap from the HF config, else TL's cfg; refuse unsupported head scalings."""
    hf_config = _hf_config(model)
    for attr in UNSUPPORTED_HEAD_CONFIG:
        value = getattr(hf_config, attr, None)
        if value is not None and value != 1:
            raise ValueError(
                f"UnembedHead cannot reproduce {name}'s head: its config sets {attr}={value}, which "
                "rescales the logits in a way mechnorm does not model. Wrap the model's own head "
                "(final norm and lm_head, with that scaling) in mechnorm.ModuleHead instead."
            )
    cap = getattr(hf_config, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


def check_final_norm(norm: FinalNorm, module: torch.nn.Module, name: str = "the model") -> None:
    """Raise ``ValueError`` if ``norm`` does not reproduce ``module`` on a few random vectors.

    Example:
        >>> from mechnorm.heads import FinalNorm
        >>> ln = torch.nn.LayerNorm(8)
        >>> check_final_norm(FinalNorm("layernorm", ln.weight, ln.bias, ln.eps), ln)  # passes silently
    """
    if norm.kind == "none":
        return
    d_model = norm.weight.shape[-1] if norm.weight is not None else getattr(module, "normalized_shape", (None,))[-1]
    param = next(module.parameters(), None)
    if d_model is None:
        d_model = param.shape[-1] if param is not None else None
    if d_model is None:
        return  # a weightless norm of unknown width: nothing to compare its scale against
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else "cpu"
    probe = torch.randn(3, d_model, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    probe = probe.to(device=device, dtype=dtype)
    with torch.no_grad():
        expected = module(probe).float()
    got = norm(probe.float())
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * expected.abs().max().clamp_min(1.0)
    if (got - expected).abs().max() > tolerance:
        raise ValueError(
            f"UnembedHead cannot reproduce the final norm of {name} ({type(module).__name__}): "
            f"its {norm.kind} reading differs from the module's output by {(got - expected).abs().max():.3g}. "
            "If its norm scales by (1 + w), add its HF model_type to mechnorm.heads.UNIT_OFFSET_NORMS; "
            "otherwise wrap the model's own head in mechnorm.ModuleHead."
        )
