"""Results of the circuit analyses: scores per component, and per head and source token."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_HEAD_LABEL = re.compile(r"L(\d+)H(\d+)")


def parse_label(label: str) -> tuple[int | None, int | None]:
    """``(block, head)`` of a component label: ``"L3H7"`` → (3, 7), ``"L3.mlp"`` → (3, None),
    ``"embed"`` → (None, None).

    Example:
        >>> parse_label("L3H7"), parse_label("L2.mlp"), parse_label("pos_embed")
        ((3, 7), (2, None), (None, None))
    """
    head = _HEAD_LABEL.fullmatch(label)
    if head:
        return int(head.group(1)), int(head.group(2))
    block = re.match(r"L(\d+)\.", label)
    return (int(block.group(1)) if block else None), None


@dataclass
class ComponentAttribution:
    """Scores of model components (heads, MLPs, embeddings) for a target logit.

    Attributes:
        scores: float32 ``[component, batch]`` (one prediction position per sequence) or
            ``[component, batch, pos]`` (several positions; ``positions`` says which).
        labels: one name per component (``"embed"``, ``"L0H3"``, ``"L0.mlp"``, ...).
        positions: ``[batch, k]`` positions the scores were read at.
        method: ``"dla"`` (frozen final norm) or ``"direct_effect"`` (norm recomputed).
        constant: the head's constant terms (norm bias · W_U + b_U, contrasted when the
            target is), ``[batch]`` / ``[batch, pos]``, for ``"dla"``: scores summed over all
            components plus ``constant`` is the head's logit. None where it does not apply.
        tokens: token strings per sequence, when known.
        target_labels: the explained output per sequence, when known.
        metadata: anything else (head, by, ln).

    Example:
        >>> dla = mechnorm.direct_logit_attribution(cache, head, target)  # doctest: +SKIP
        >>> dla.top_k(5)                                                  # doctest: +SKIP
    """

    scores: Float[Tensor, "component batch *pos"]
    labels: list[str]
    positions: Int[Tensor, "batch k"]
    method: str
    constant: Float[Tensor, "batch *pos"] | None = None
    tokens: list[list[str]] | None = None
    target_labels: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim not in (2, 3) or self.scores.shape[0] != len(self.labels):
            raise ValueError(f"scores must be [component={len(self.labels)}, batch(, pos)], got {tuple(self.scores.shape)}.")
        self.scores = self.scores.float()

    @property
    def per_position(self) -> bool:
        """True when scores have a position axis (``[component, batch, pos]``)."""
        return self.scores.ndim == 3

    def _flat(self) -> Float[Tensor, "component batch k"]:
        return self.scores if self.per_position else self.scores[..., None]

    def total(self) -> Float[Tensor, "batch *pos"]:
        """Scores summed over components, plus the constant terms when there are some."""
        total = self.scores.sum(0)
        return total if self.constant is None else total + self.constant

    def layer_head(self) -> tuple[Float[Tensor, "layer head batch *pos"], list[int]]:
        """The head components arranged ``[block, head, batch(, pos)]`` and the block indices.

        Example:
            >>> grid, blocks = dla.layer_head()                          # doctest: +SKIP
        """
        parsed = [(i, *parse_label(lab)) for i, lab in enumerate(self.labels)]
        heads = [(i, b, h) for i, b, h in parsed if h is not None]
        if not heads:
            raise ValueError("This result has no per-head components; compute it with by='head' or by='component'.")
        blocks = sorted({b for _, b, _ in heads})
        n_heads = max(h for _, _, h in heads) + 1
        grid = torch.full((len(blocks), n_heads, *self.scores.shape[1:]), float("nan"))
        for i, b, h in heads:
            grid[blocks.index(b), h] = self.scores[i]
        return grid, blocks

    def to_frame(self) -> pd.DataFrame:
        """Tidy scores: one row per (component, sequence, position).

        Columns: method, component, block, head, batch, pos, token, score.
        """
        flat = self._flat()
        rows = []
        for c, label in enumerate(self.labels):
            block, head = parse_label(label)
            for b in range(flat.shape[1]):
                for k in range(flat.shape[2]):
                    pos = int(self.positions[b, k])
                    rows.append({"method": self.method, "component": label, "block": block, "head": head,
                                 "batch": b, "pos": pos, "token": self._token(b, pos), "score": float(flat[c, b, k])})
        return pd.DataFrame(rows, columns=["method", "component", "block", "head", "batch", "pos", "token", "score"])

    def top_k(self, k: int = 5, by_abs: bool = False) -> pd.DataFrame:
        """The ``k`` highest-scoring components for each sequence and position (signed, largest
        first; ``by_abs`` ranks by magnitude). Columns: batch, pos, rank, component, score."""
        flat = self._flat()
        rows = []
        for b in range(flat.shape[1]):
            for j in range(flat.shape[2]):
                values = flat[:, b, j]
                order = (values.abs() if by_abs else values).argsort(descending=True)[:k]
                for rank, c in enumerate(order.tolist(), start=1):
                    rows.append({"batch": b, "pos": int(self.positions[b, j]), "rank": rank,
                                 "component": self.labels[c], "score": float(values[c])})
        return pd.DataFrame(rows, columns=["batch", "pos", "rank", "component", "score"])

    def plot(self, batch: int = 0, **kwargs):
        """Component bars for one sequence (:func:`mechnorm.plot.component_bars`)."""
        from .plots import component_bars

        return component_bars(self, batch=batch, **kwargs)

    def _token(self, batch: int, pos: int) -> str:
        return self.tokens[batch][pos] if self.tokens is not None else str(pos)

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.scores.shape)
        return f"ComponentAttribution(method={self.method!r}, components={len(self.labels)}, scores {shape})"

    def _repr_html_(self) -> str:
        """The top components of each sequence as an HTML table."""
        target = f" → {html.escape(', '.join(map(repr, self.target_labels)))}" if self.target_labels else ""
        return f"<div><b>{html.escape(self.method)}</b>{target}</div>" + self.top_k(5).to_html(index=False)


@dataclass
class HeadTokenAttribution:
    """The logit contribution reaching the prediction from each source token through each head.

    Attributes:
        scores: float32 ``[block, head, batch, src]``; NaN at padding sources.
        blocks: the block index of each row (heads are named ``L{block}H{head}``).
        mask: ``[batch, src]``, False at padding.
        positions: ``[batch]`` prediction (query) positions.
        tokens, target_labels, metadata: as for :class:`ComponentAttribution`.

    Example:
        >>> hta = mechnorm.head_token_attribution(cache, head, target)  # doctest: +SKIP
        >>> hta.scores.nansum(-1)  # each head's DLA                      # doctest: +SKIP
    """

    scores: Float[Tensor, "block head batch src"]
    blocks: tuple[int, ...]
    mask: Bool[Tensor, "batch src"]
    positions: Int[Tensor, "batch"]
    tokens: list[list[str]] | None = None
    target_labels: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 4 or self.scores.shape[0] != len(self.blocks):
            raise ValueError(f"scores must be [block={len(self.blocks)}, head, batch, src], got {tuple(self.scores.shape)}.")
        self.blocks = tuple(int(b) for b in self.blocks)
        self.mask = self.mask.bool()
        self.scores = self.scores.float().masked_fill(~self.mask, float("nan"))

    def per_head(self) -> Float[Tensor, "block head batch"]:
        """Summed over source tokens: each head's direct logit attribution."""
        return self.scores.nansum(-1)

    def to_frame(self) -> pd.DataFrame:
        """Tidy scores, one row per (head, sequence, real source). Columns: block, head, batch, src, token, score."""
        rows = []
        for i, block in enumerate(self.blocks):
            for h in range(self.scores.shape[1]):
                for b in range(self.scores.shape[2]):
                    for src in self.mask[b].nonzero().flatten().tolist():
                        token = self.tokens[b][src] if self.tokens is not None else str(src)
                        rows.append({"block": block, "head": h, "batch": b, "src": src, "token": token,
                                     "score": float(self.scores[i, h, b, src])})
        return pd.DataFrame(rows, columns=["block", "head", "batch", "src", "token", "score"])

    def plot(self, batch: int = 0, **kwargs):
        """Heads × source tokens heatmap for one sequence (:func:`mechnorm.plot.head_token_heatmap`)."""
        from .plots import head_token_heatmap

        return head_token_heatmap(self, batch=batch, **kwargs)

    def __repr__(self) -> str:
        shape = "×".join(str(s) for s in self.scores.shape)
        return f"HeadTokenAttribution(blocks={self.blocks[0]}…{self.blocks[-1]}, scores {shape})"
