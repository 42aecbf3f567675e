"""Token-to-token mixing matrices, one per block, turned into layer-wise token scores.

GlobEnc, ALTI and Value Zeroing each give, for every block, a matrix ``M[b, i, j]``: how
much token j contributes to token i's representation after that block. This module holds
what they share: which keys a query may see, row normalisation, rollout across blocks, and
the :class:`~mechnorm.result.Attribution` read at the prediction position.

Layer convention (blocks applied, 0…L): layer 0 is the identity (each token is all its own
importance, no block applied yet); layer l ≥ 1 is block l−1's matrix (``aggregate="none"``)
or the rollout ``R_l = M̃_{l−1} · R_{l−1}``, ``R_0 = I`` (``aggregate="rollout"``, Abnar &
Zuidema 2020, without added identity: these matrices already include the residual path).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..inputs import is_encoder, prediction_positions
from ..residual import at_positions, resolve_layers
from ..result import Attribution
from ..targets import Target
from .output import method_result

Aggregate = Literal["none", "rollout"]
Matrix = Float[Tensor, "batch query key"]


def check_aggregate(aggregate: str) -> None:
    """Raise unless ``aggregate`` is ``"none"`` or ``"rollout"``."""
    if aggregate not in ("none", "rollout"):
        raise ValueError(f"aggregate must be 'none' (per-layer matrix) or 'rollout' (across layers), got {aggregate!r}.")


def visible_keys(model, mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch query key"]:
    """Keys each query can attend to: real tokens, and in a causal model none after the query.

    Example:
        >>> visible_keys(model, torch.ones(1, 3, dtype=torch.bool))[0].int()  # doctest: +SKIP
    """
    visible = mask[:, None, :].expand(-1, mask.shape[1], -1)
    return visible if is_encoder(model) else visible.tril()


def normalise_rows(matrix: Matrix) -> Matrix:
    """Each row divided by its sum (an all-zero row stays zero).

    Example:
        >>> normalise_rows(torch.tensor([[[1.0, 3.0], [0.0, 0.0]]]))
        tensor([[[0.2500, 0.7500],
                 [0.0000, 0.0000]]])
    """
    return matrix / matrix.sum(-1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)


def blocks_needed(layers: Sequence[int], aggregate: Aggregate) -> list[int]:
    """The blocks whose matrices the requested ``layers`` need (all earlier ones for rollout).

    Example:
        >>> blocks_needed([0, 2], "none"), blocks_needed([2], "rollout")
        ([1], [0, 1])
    """
    if aggregate == "rollout":
        return list(range(max(layers)))
    return sorted({layer - 1 for layer in layers if layer > 0})


def prediction_index(model, mask: Bool[Tensor, "batch pos"], target: Target | None, positions) -> Int[Tensor, "batch"]:
    """Each sequence's prediction position: ``positions``, else ``target.positions``, else the
    model's default (last real token; ``[CLS]`` in an encoder). Padding is refused."""
    batch, pos = mask.shape
    if positions is not None:
        pred = torch.as_tensor(positions, device=mask.device).long().reshape(-1).expand(batch)
        if (pred < 0).any() or (pred >= pos).any():
            raise ValueError(f"positions {pred.tolist()} are outside the sequence length {pos}.")
    elif target is not None and target.positions is not None:
        pred = target.prediction_positions(mask)
    else:
        pred = prediction_positions(model, mask)
    if not mask[torch.arange(batch, device=mask.device), pred].all():
        raise ValueError("A prediction position is a padding token; pass the attention mask used for the forward pass.")
    return pred


def mixing_attribution(
    method: str,
    block_matrix: Callable[[int], Matrix],
    n_layers: int,
    mask: Bool[Tensor, "batch pos"],
    pred: Int[Tensor, "batch"],
    layers: int | Sequence[int] | None,
    aggregate: Aggregate,
    return_matrices: bool,
    cache=None,
    tokens=None,
    metadata: dict | None = None,
) -> Attribution:
    """Row-normalised per-block matrices (or their rollout) read at the prediction positions.

    ``block_matrix(b)`` returns block b's unnormalised, non-negative ``[batch, query, key]``
    matrix; it is called once per needed block, in order. With ``return_matrices`` the
    matrices of the reported layers are kept in ``metadata["matrices"]``, laid out
    ``[batch, layer, query, key]`` (batch first, so batches concatenate along it).

    Example:
        >>> eye = lambda b: torch.eye(2).expand(1, 2, 2)
        >>> mask = torch.ones(1, 2, dtype=torch.bool)
        >>> mixing_attribution("demo", eye, 1, mask, torch.tensor([1]), None, "none", False).scores[-1]
        tensor([[0., 1.]])
    """
    check_aggregate(aggregate)
    layer_ids = resolve_layers(layers, n_layers)
    pad = ~mask
    eye = torch.eye(mask.shape[1], device=mask.device).expand(mask.shape[0], -1, -1)
    by_layer: dict[int, Matrix] = {0: eye}
    rolled = eye
    for block in blocks_needed(layer_ids, aggregate):
        # padded queries or keys may hold anything (even NaN): they must not leak into the rollout
        matrix = normalise_rows(block_matrix(block).float().masked_fill(pad[:, :, None] | pad[:, None, :], 0.0))
        rolled = matrix @ rolled if aggregate == "rollout" else matrix
        by_layer[block + 1] = rolled
    scores = torch.stack([at_positions(by_layer[layer], pred) for layer in layer_ids])  # [layer, batch, key]
    info = dict(metadata or {}, aggregate=aggregate, positions=pred.cpu())
    if return_matrices:
        info["matrices"] = torch.stack([by_layer[layer] for layer in layer_ids], dim=1).cpu()
    return method_result(method, scores, layer_ids, mask, cache, tokens, pred, signed=False, metadata=info)
