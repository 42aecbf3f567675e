"""Display names of the methods: the one place that maps a registry name to the name a paper uses.

Plots, reports and descriptions read :data:`DISPLAY_NAMES` through :func:`display_name`, so a
figure titled for a paper says "NormXLogit", not ``normxlogit``.

Example:
    >>> display_name("normxlogit")
    'NormXLogit'
    >>> display_name("my_method")
    'my_method'
"""

from __future__ import annotations

__all__ = ["DISPLAY_NAMES", "display_name"]

#: registry name -> the name used in the papers (NormXLogit, EMNLP 2025, and the baselines' own papers)
DISPLAY_NAMES: dict[str, str] = {
    "normxlogit": "NormXLogit",
    "logat": "LogAt",
    "embedding_norm": "Embedding norm",
    "logit_lens": "Logit lens",
    "attention": "Raw attention",
    "rollout": "Attention rollout",
    "saliency": "Saliency",
    "grad_x_input": "Gradient × input",
    "integrated_gradients": "Integrated gradients",
    "globenc": "GlobEnc",
    "alti": "ALTI",
    "alti_logit": "ALTI-Logit",
    "decompx": "DecompX",
    "value_zeroing": "Value Zeroing",
}


def display_name(method: str) -> str:
    """The paper's name for a registry method name; unknown names are returned unchanged.

    Example:
        >>> display_name("grad_x_input")
        'Gradient × input'
    """
    return DISPLAY_NAMES.get(method, method)
