"""The logit lens's per-chunk sums as one compiled kernel (``torch.compile``), eager as the fallback.

Each vocabulary chunk of the stacked logits ``g`` (``[N, chunk]``, N = layers · R rows, the
final layer's R rows last) updates, per row, relative to the running maximum ``m``:

* ``sum_exp       = Σ_c exp(g_c − m)``                 (the normaliser: ``log Z = m + log sum_exp``)
* ``sum_exp_logit = Σ_c exp(g_c − m) · g_c``           (the entropy: ``log Z − sum_exp_logit / sum_exp``)
* ``cross         = Σ_c exp(f_c − m_f) · g_c``         (f: the final layer's logits at the same position;
  the KL divergence from the final layer)
* ``above         = #{c : g_c > target logit}``        (the target's rank)
* the maxima of the chunk's 16 strided column blocks (the top-k's candidates).

In eager PyTorch these are a dozen passes over the chunk, which on a CPU cost as much as the
bf16 matmul that made it; compiled, they are one or two passes that read the chunk in its
matmul dtype while it is still in cache. The compiled kernel is built on first use (a few
seconds, then cached by PyTorch), so by default it is used only on a CPU and where the
matmuls dwarf that cost (:func:`use_fused`). Where ``torch.compile`` cannot build it (no C++ compiler, no Triton),
the eager route runs instead, with one warning: the results agree to rounding either way.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..warn import warn

BLOCK = 16  # columns per block for the top-k's block maxima
#: stacked rows x vocabulary from which the compiled kernel pays for its build (~5 s on a CPU)
MIN_ELEMENTS = 1 << 28

_compiled = None
_failure: str | None = None  # why torch.compile could not build the kernel, once it failed


def use_fused(fused: bool | None, rows: int, columns: int, device: torch.device | str = "cpu") -> bool:
    """Whether to run the compiled kernel: ``fused`` if given, else on a CPU for a lens of at
    least ``MIN_ELEMENTS`` logits (``rows · columns``); never after the kernel failed to build.

    On a GPU the default stays eager: the kernel's speed-up was measured on CPUs only, and
    its first build there (Triton) takes longer; ``fused=True`` opts in.

    Example:
        >>> use_fused(None, 13 * 1024, 50257), use_fused(None, 13 * 20, 50257), use_fused(False, 10**6, 10**6)
        (True, False, False)
        >>> use_fused(None, 13 * 1024, 50257, "cuda")
        False
    """
    if _failure is not None:
        return False
    if fused is None:
        return torch.device(device).type == "cpu" and rows * columns >= MIN_ELEMENTS
    return bool(fused)


def chunk_sums(
    logits: Float[Tensor, "N chunk"],
    running: tuple[Tensor, Tensor, Tensor, Tensor],
    target_logit: Float[Tensor, " N"],
    groups: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Int[Tensor, " N"]]:
    """Fold one chunk into the running ``(max, sum_exp, sum_exp_logit, cross)``.

    ``logits`` may be in the matmul dtype (read as float32); its width is a multiple of
    :data:`BLOCK`. ``groups`` is the number of stacked layers, the last being the final one.

    Returns:
        ``(block_max [N, chunk / BLOCK], chunk_max, max, sum_exp, sum_exp_logit, cross,
        above [N])``, the sums rescaled to the new running max; ``above`` counts this chunk only, the
        target's own column included (the caller removes it).

    Example:
        >>> g = torch.tensor([[0.0] * 16, [1.0] * 16])  # two layers of one row each
        >>> start = (torch.full((2,), float("-inf")),) + tuple(torch.zeros(2) for _ in range(3))
        >>> chunk_sums(g, start, torch.zeros(2), groups=2)[3]  # Σ exp(g − max) per row
        tensor([16., 16.])
    """
    values = logits.float()
    rows, width = values.shape
    torch._check(width % BLOCK == 0)
    torch._check(rows % groups == 0)
    old_max, sum_exp, sum_exp_logit, cross = running
    block_max = values.view(rows, BLOCK, width // BLOCK).amax(1)  # block j: columns j, j + nb, …
    chunk_max = block_max.amax(-1)
    new_max = torch.maximum(old_max, chunk_max)
    rescale = torch.exp(old_max - new_max)
    weights = torch.exp(values - new_max[:, None])
    per_layer = rows // groups
    # the final rows' weights computed again from their logits: a slice of ``weights`` would make
    # the compiler write the whole [N, chunk] weights to memory instead of summing them in registers
    final_weights = torch.exp(values[-per_layer:] - new_max[-per_layer:, None])
    cross_chunk = (values.view(groups, per_layer, width) * final_weights).sum(-1).flatten()
    return (
        block_max,
        chunk_max,
        new_max,
        sum_exp * rescale + weights.sum(-1),
        sum_exp_logit * rescale + (weights * values).sum(-1),
        cross * rescale[-per_layer:].repeat(groups) + cross_chunk,
        (values > target_logit[:, None]).sum(-1, dtype=torch.int32),
    )


def fused_chunk_sums(logits, running, target_logit, groups: int):
    """:func:`chunk_sums` compiled, or None when ``torch.compile`` cannot build it (warned once)."""
    global _compiled, _failure
    if _failure is not None:
        return None
    if _compiled is None:
        _compiled = torch.compile(chunk_sums, dynamic=True)
    try:
        return _compiled(logits, running, target_logit, groups)
    except Exception as error:  # noqa: BLE001 - any build failure: the eager route gives the same sums
        _failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        warn(f"torch.compile could not build the logit lens's fused kernel ({_failure[:200]}); the lens runs "
             "eagerly instead (same results, slower on large inputs). Pass fused=False to skip the attempt.")
        return None
