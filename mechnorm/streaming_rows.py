"""Activations kept at the prediction positions only, read as if they were whole.

Direct logit attribution reads each component (``hook_z``, ``hook_mlp_out``, a learned
``hook_pos_embed``) at the prediction positions only, and those are known from the mask
before the forward pass (each sequence's last real token). :func:`prediction_rows` keeps the
row ``[batch, *]`` of each and shows it as a ``[batch, pos, *]`` tensor (a zero-stride view:
no memory per position) that ``at_positions`` reads at those positions bit for bit as it
reads the whole activation. Reading it anywhere else raises, naming the fix, instead of
returning the prediction row for another position.
"""

from __future__ import annotations

import torch
from torch import Tensor


class PredictionRows(torch.Tensor):
    """A ``[batch, pos, *]`` view of rows kept at one position per sequence (``kept``).

    Only ``values[rows, positions]`` with ``positions`` equal to the kept positions (what
    :func:`mechnorm.residual.at_positions` does at the prediction positions) is allowed;
    every other index raises. Other operations see the zero-stride view and return plain tensors.

    Example:
        >>> act = torch.arange(12.0).view(2, 3, 2)
        >>> kept = prediction_rows(act, torch.tensor([2, 1]), "hook_x")
        >>> kept[torch.arange(2)[:, None], torch.tensor([[2], [1]])].tolist()
        [[[4.0, 5.0]], [[8.0, 9.0]]]
    """

    kept: Tensor
    hook: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is Tensor.__getitem__ and isinstance(args[0], PredictionRows):
            args[0]._check(args[1])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))  # results are plain tensors

    def _check(self, index) -> None:
        if not (isinstance(index, tuple) and len(index) == 2 and all(isinstance(i, Tensor) for i in index)):
            self._refuse(f"index {index!r}")
        with torch._C.DisableTorchFunctionSubclass():
            rows, positions = index
            kept = self.kept.to(positions.device)
            batch = kept.shape[0]
            same_rows = rows.numel() == batch and bool((rows.reshape(-1).cpu() == torch.arange(batch)).all())
            same_positions = (positions.ndim >= 1 and positions.shape[0] == batch
                              and bool((positions == kept.view(-1, *[1] * (positions.ndim - 1))).all()))
        if not (same_rows and same_positions):
            self._refuse(f"positions {positions.tolist()}")

    def _refuse(self, what: str) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            kept = self.kept.tolist()
        raise ValueError(
            f"run_streamed kept {self.hook} only at each sequence's prediction position {kept} (what DLA reads with "
            f"positions='prediction'), but {what} was read. Keep it whole: run_streamed(..., keep=mechnorm.hooks_for('dla')), "
            "or use a cache (model.run_with_cache with names_filter=mechnorm.hooks_for('dla'))."
        )


def prediction_rows(act: Tensor, positions: Tensor, hook: str, out: Tensor | None = None) -> PredictionRows:
    """``act [batch, pos, *]`` kept at ``positions [batch]`` only: a :class:`PredictionRows`.

    ``out``: a flat buffer to copy the rows into (allocated before the forward pass, so the
    kept rows do not sit between the pass's temporaries in the allocator's heap); used when
    it is large enough and of the activation's dtype and device.

    Example:
        >>> prediction_rows(torch.zeros(2, 5, 4), torch.tensor([4, 2]), "hook_x").shape
        torch.Size([2, 5, 4])
    """
    index = torch.arange(act.shape[0], device=act.device)
    rows = act.detach()[index, positions.to(act.device)]  # [batch, *]: a copy, the activation is not held
    if out is not None and out.numel() >= rows.numel() and out.dtype == rows.dtype and out.device == rows.device:
        rows = out[: rows.numel()].view(rows.shape).copy_(rows)
    view = rows[:, None].expand(act.shape).as_subclass(PredictionRows)
    view.kept, view.hook = positions.detach().clone(), hook
    return view


__all__ = ["PredictionRows", "prediction_rows"]
