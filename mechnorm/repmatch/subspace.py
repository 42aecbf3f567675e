"""Grassmann similarity φ between the subspaces two LoRA updates write into.

For one adapted matrix with update ``ΔW = B · A`` (rank ≤ r), let ``U`` hold its left
singular vectors, ordered by singular value. RepMatch (Modarres, Abbasi & Pilehvar, 2024;
after Hu et al.'s LoRA subspace analysis) compares two updates by

    φ(i, j) = ‖U_aᵀ[:, :i] · U_b[:, :j]‖_F² / min(i, j),   1 ≤ i ≤ r_a, 1 ≤ j ≤ r_b

and reports ``max_{i,j} φ(i, j)`` ∈ [0, 1]: 1 when one top-subspace contains the other,
0 when they are orthogonal. A dataset-to-dataset score averages it over layers and adapted
matrices; the per-layer, per-matrix values are kept.

``U`` is computed without forming ``ΔW``'s full SVD: ``B = Q R`` (QR), then the SVD of the
small ``R · A`` (``r × d_in``) gives ``U = Q · U_small``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import Adapter, as_adapter


def left_singular_vectors(B: Float[Tensor, "... d_out r"], A: Float[Tensor, "... r d_in"]) -> Float[Tensor, "... d_out r"]:
    """The top-``r`` left singular vectors of ``B · A``, largest singular value first (float64).

    Example:
        >>> B, A = torch.randn(6, 2), torch.randn(2, 5)
        >>> U = left_singular_vectors(B, A)
        >>> torch.allclose(U.T @ U, torch.eye(2, dtype=U.dtype))
        True
    """
    Q, R = torch.linalg.qr(B.double())
    U_small, _, _ = torch.linalg.svd(R @ A.double(), full_matrices=False)
    return Q @ U_small


def grassmann(U_a: Float[Tensor, "... d ra"], U_b: Float[Tensor, "... d rb"]) -> Float[Tensor, "..."]:
    """``max_{i ≤ ra, j ≤ rb} ‖U_a[:, :i]ᵀ U_b[:, :j]‖_F² / min(i, j)`` for orthonormal columns.

    Broadcasts over leading dimensions. All ``(i, j)`` at once: cumulative sums of the squared
    entries of ``U_aᵀ U_b`` over both axes.

    Example:
        >>> U = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
        >>> round(float(grassmann(U, U)), 6)
        1.0
    """
    overlap = (U_a.transpose(-1, -2) @ U_b) ** 2  # [..., ra, rb]
    cumulative = overlap.cumsum(-1).cumsum(-2)
    ra, rb = overlap.shape[-2:]
    i = torch.arange(1, ra + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, rb + 1, dtype=overlap.dtype)[None, :]
    return (cumulative / torch.minimum(i, j)).flatten(-2).amax(-1).clamp(0.0, 1.0)


def subspaces(adapter) -> dict[tuple[int, str], Float[Tensor, "d_out r"]]:
    """``(layer, matrix) -> U`` for every adapted matrix of an adapter (or folder, or PeftModel).

    Example:
        >>> sorted(subspaces("adapters/lexicon"))[:1]        # doctest: +SKIP
        [(0, 'query')]
    """
    factors = as_adapter(adapter).factors()
    for key, (B, _) in factors.items():
        if not torch.any(B):
            raise ValueError(f"The adapter's update at layer {key[0]} {key[1]!r} is zero (B = 0: an untrained "
                             "adapter); train it first — a zero update has no subspace.")
    return {key: left_singular_vectors(B, A) for key, (B, A) in factors.items()}


@dataclass
class SubspaceSimilarity:
    """φ between two adapters per layer and adapted matrix, and their mean.

    Attributes:
        frame: one row per ``(layer, matrix)``, column ``phi``.
        mean: φ averaged over layers and matrices (the dataset-to-dataset score).
    """

    frame: pd.DataFrame

    @property
    def mean(self) -> float:
        return float(self.frame["phi"].mean())

    def by_layer(self) -> pd.Series:
        """φ averaged over the matrices of each layer."""
        return self.frame.groupby("layer")["phi"].mean()

    def __float__(self) -> float:
        return self.mean

    def __repr__(self) -> str:
        return f"SubspaceSimilarity(mean={self.mean:.4f}, matrices={len(self.frame)})"


def _shared(a: dict, b: dict) -> list:
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError(f"The adapters share no adapted matrix (first: {sorted(a)[:2]} vs {sorted(b)[:2]}); "
                         "train both on the same model with the same target modules.")
    return keys


def subspace_similarity(adapter_a, adapter_b) -> SubspaceSimilarity:
    """RepMatch's dataset-to-dataset similarity: φ per layer and matrix, and the mean.

    Each argument is an :class:`~mechnorm.repmatch.Adapter`, a peft adapter folder or a ``PeftModel``.

    Example:
        >>> sim = subspace_similarity(adapter_first_half, adapter_second_half)   # doctest: +SKIP
        >>> sim.mean, sim.frame.head(2)                                           # doctest: +SKIP
    """
    U_a, U_b = subspaces(adapter_a), subspaces(adapter_b)
    rows = [dict(layer=k[0], matrix=k[1], phi=float(grassmann(U_a[k], U_b[k]))) for k in _shared(U_a, U_b)]
    return SubspaceSimilarity(pd.DataFrame(rows))


@dataclass
class SimilarityMatrix:
    """φ between every pair of many adapters.

    Attributes:
        names: the adapters' names.
        matrices: the adapted ``(layer, matrix)`` pairs, in order.
        values: ``[n, n, matrix]`` φ per pair and adapted matrix.
    """

    names: list[str]
    matrices: list[tuple[int, str]]
    values: Float[Tensor, "n n matrix"]

    def mean(self) -> pd.DataFrame:
        """``n × n`` φ averaged over layers and matrices, labelled by name."""
        return pd.DataFrame(self.values.mean(-1).numpy(), index=self.names, columns=self.names)

    def at(self, layer: int, matrix: str) -> pd.DataFrame:
        """``n × n`` φ of one adapted matrix."""
        k = self.matrices.index((layer, matrix))
        return pd.DataFrame(self.values[..., k].numpy(), index=self.names, columns=self.names)

    def plot(self, **kwargs):
        """Heatmap of :meth:`mean` (see :func:`mechnorm.repmatch.plots.similarity_matrix_heatmap`)."""
        from .plots import similarity_matrix_heatmap

        return similarity_matrix_heatmap(self, **kwargs)


def similarity_matrix(adapters: Mapping[str, object] | Sequence) -> SimilarityMatrix:
    """φ between all pairs of adapters (each subspace computed once).

    Example:
        >>> sims = similarity_matrix({"half 1": a1, "half 2": a2, "recall": a3})   # doctest: +SKIP
        >>> sims.mean().round(2)                                                   # doctest: +SKIP
    """
    if not isinstance(adapters, Mapping):
        adapters = {f"adapter {i}": a for i, a in enumerate(adapters)}
    if len(adapters) < 1:
        raise ValueError("similarity_matrix needs at least one adapter.")
    spaces = [subspaces(a) for a in adapters.values()]
    keys = spaces[0]
    for other in spaces[1:]:
        keys = {k: None for k in _shared(keys, other)}
    keys = list(keys)
    n = len(spaces)
    values = torch.empty(n, n, len(keys), dtype=torch.float64)
    for m, key in enumerate(keys):
        for p in range(n):
            for q in range(p, n):
                values[p, q, m] = values[q, p, m] = grassmann(spaces[p][key], spaces[q][key])
    return SimilarityMatrix(list(adapters), keys, values)


__all__ = ["Adapter", "SimilarityMatrix", "SubspaceSimilarity", "grassmann", "left_singular_vectors",
           "similarity_matrix", "subspace_similarity", "subspaces"]
