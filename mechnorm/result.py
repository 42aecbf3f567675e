"""The result every attribution method returns: scores by layer, batch and position."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor


@dataclass
class Attribution:
    """Token scores ``[layer, batch, pos]`` with their labels.

    Attributes:
        scores: float32 ``[n_layers_reported, batch, pos]``; NaN at padding.
        layers: the layer index (blocks applied, 0…L) of each row of ``scores``.
        mask: ``[batch, pos]``, False at padding.
        method: the method's registry name, e.g. ``"normxlogit"``.
        tokens: token strings per sequence (padding included), when known.
        target_labels: the explained output per sequence (e.g. ``" are"``), when known.
        signed: whether scores carry a sign (plots then centre their colour scale on 0).
        metadata: anything else the method records (head, space, norm, …).

    Example:
        >>> attr = mechnorm.normxlogit(cache, head, target)          # doctest: +SKIP
        >>> attr.top_k(3)                                             # doctest: +SKIP
        >>> attr.to_frame().head()                                    # doctest: +SKIP
    """

    scores: Float[Tensor, "layer batch pos"]
    layers: tuple[int, ...]
    mask: Bool[Tensor, "batch pos"]
    method: str
    tokens: list[list[str]] | None = None
    target_labels: tuple[str, ...] | None = None
    signed: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 3:
            raise ValueError(f"scores must be [layer, batch, pos], got shape {tuple(self.scores.shape)}.")
        self.layers = tuple(int(layer) for layer in self.layers)
        if len(self.layers) != self.scores.shape[0]:
            raise ValueError(f"{len(self.layers)} layer labels for {self.scores.shape[0]} rows of scores.")
        if tuple(self.mask.shape) != tuple(self.scores.shape[1:]):
            raise ValueError(f"mask shape {tuple(self.mask.shape)} != scores' [batch, pos] {tuple(self.scores.shape[1:])}.")
        if self.tokens is not None and [len(t) for t in self.tokens] != [self.scores.shape[2]] * self.scores.shape[1]:
            raise ValueError("tokens must hold one string per position for every sequence.")
        self.mask = self.mask.bool()
        self.scores = self.scores.float().masked_fill(~self.mask, float("nan"))

    @property
    def batch_size(self) -> int:
        """Number of sequences."""
        return self.scores.shape[1]

    def row(self, layer: int = -1) -> Float[Tensor, "batch pos"]:
        """Scores at one layer: a layer index from ``layers``, or -1 for the last row."""
        if layer == -1:
            return self.scores[-1]
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not computed; this result has layers {self.layers}.")
        return self.scores[self.layers.index(layer)]

    def top_k(self, k: int = 5, layer: int = -1) -> pd.DataFrame:
        """The ``k`` highest-scoring real tokens of each sequence at ``layer`` (signed, largest first).

        Returns a DataFrame with columns batch, rank, pos, token, score.
        """
        scores = self.row(layer)
        rows = []
        for b in range(self.batch_size):
            real = self.mask[b].nonzero().flatten()
            order = scores[b, real].argsort(descending=True)[:k]
            for rank, index in enumerate(order.tolist(), start=1):
                pos = int(real[index])
                rows.append({"batch": b, "rank": rank, "pos": pos, "token": self._token(b, pos), "score": float(scores[b, pos])})
        return pd.DataFrame(rows, columns=["batch", "rank", "pos", "token", "score"])

    def to_frame(self) -> pd.DataFrame:
        """Tidy scores: one row per (layer, sequence, real position).

        Columns: method, layer, batch, pos, token, score.
        """
        index = self.mask.nonzero()  # [n_real, 2]
        frames = []
        for row, layer in enumerate(self.layers):
            values = self.scores[row][self.mask]
            frames.append(
                pd.DataFrame(
                    {
                        "method": self.method,
                        "layer": layer,
                        "batch": index[:, 0].numpy(),
                        "pos": index[:, 1].numpy(),
                        "token": [self._token(int(b), int(p)) for b, p in index.tolist()],
                        "score": values.numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def _token(self, batch: int, pos: int) -> str:
        return self.tokens[batch][pos] if self.tokens is not None else str(pos)

    def __repr__(self) -> str:
        return (
            f"Attribution(method={self.method!r}, layers={self.layers[0]}…{self.layers[-1]} "
            f"({len(self.layers)} rows), batch={self.batch_size}, pos={self.scores.shape[2]})"
        )

    def _repr_html_(self) -> str:
        """Each sequence's tokens shaded by their score at the last layer (see ``plot.token_highlight``)."""
        from .plot import token_highlight  # plot sits above result; imported only when rendering

        header = f"<div><b>{html.escape(self.method)}</b>, layer {self.layers[-1]}</div>"
        return header + token_highlight(self)


def token_strings(tokenizer, tokens: Tensor | None) -> list[list[str]] | None:
    """Decode ``[batch, pos]`` ids to one string per token, or None without a tokenizer."""
    if tokenizer is None or tokens is None:
        return None
    return [[tokenizer.decode([i]) for i in row] for row in torch.as_tensor(tokens).tolist()]


def cache_token_strings(cache, tokens: Tensor | None) -> list[list[str]] | None:
    """Token strings for ``tokens`` with the tokenizer of the model that produced ``cache``."""
    return token_strings(getattr(getattr(cache, "model", None), "tokenizer", None), tokens)
