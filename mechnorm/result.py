"""The result every attribution method returns: scores by layer, batch and position."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .warn import warn
from .persist import ResultIO


@dataclass
class Attribution(ResultIO):
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
        protected: ``[batch, pos]``, True at positions the method cannot meaningfully rank
            (the prediction position, a leading BOS/[CLS], the attention sink for attention
            methods; see :mod:`mechnorm.protected`): left out of :meth:`top_k` by default.
        target_probs: ``[batch]`` probability of the explained output at its prediction
            position, when known (``Target.probs``).

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
    protected: Bool[Tensor, "batch pos"] | None = None
    target_probs: Float[Tensor, "batch"] | None = None

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
        bad = ~torch.isfinite(self.scores) & self.mask
        if bool(bad.any()):  # NaN is how padding looks: a NaN score at a real token must not pass as padding
            _, b, p = bad.nonzero()[0].tolist()
            warn(f"{self.method} scores are NaN or inf at {int(bad.sum())} real (non-padding) position(s), first at "
                 f"batch {b}, pos {p}; they are ranked last. Check the model's activations and the method's inputs.")
        self.scores = self.scores.float().masked_fill(~self.mask, float("nan"))
        if self.protected is not None:
            if tuple(self.protected.shape) != tuple(self.mask.shape):
                raise ValueError(f"protected shape {tuple(self.protected.shape)} != mask shape {tuple(self.mask.shape)}.")
            self.protected = self.protected.bool().to(self.mask.device) & self.mask
        if self.target_probs is not None:
            self.target_probs = torch.as_tensor(self.target_probs).float().reshape(-1).cpu()
            if self.target_probs.shape[0] != self.batch_size:
                raise ValueError(f"{self.target_probs.shape[0]} target probabilities for {self.batch_size} sequences.")

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

    def top_k(self, k: int = 5, layer: int = -1, include_protected: bool = False) -> pd.DataFrame:
        """The ``k`` highest-scoring real tokens of each sequence at ``layer`` (signed, largest first).

        Protected positions (the prediction position, a leading BOS/[CLS], …: see
        :attr:`protected`) are left out unless ``include_protected=True``.

        Returns a DataFrame with columns batch, rank, pos, token, label, score, protected;
        ``label`` is the quoted token (whitespace visible) with ``@pos`` appended when the
        same token occurs more than once in the sequence (``' D'@3``).

        Example:
            >>> attr.top_k(3)                                             # doctest: +SKIP
        """
        scores = self.row(layer)
        protected = self._protected()
        rows = []
        for b in range(self.batch_size):
            rankable = self.mask[b] if include_protected else self.mask[b] & ~protected[b]
            real = rankable.nonzero().flatten()
            values = scores[b, real].nan_to_num(nan=-math.inf)  # a NaN at a real token ranks last, never first
            order = values.argsort(descending=True, stable=True)[:k]
            for rank, index in enumerate(order.tolist(), start=1):
                pos = int(real[index])
                rows.append({"batch": b, "rank": rank, "pos": pos, "token": self._token(b, pos),
                             "label": self.label(b, pos), "score": float(scores[b, pos]), "protected": bool(protected[b, pos])})
        return pd.DataFrame(rows, columns=["batch", "rank", "pos", "token", "label", "score", "protected"])

    def label(self, batch: int, pos: int) -> str:
        """The token at ``pos`` quoted so whitespace shows (``' D'``), with ``@pos`` when the
        same token occurs more than once among the sequence's real tokens (``' D'@3``).

        Example:
            >>> attr.label(0, 3)                                          # doctest: +SKIP
            "' D'@3"
        """
        if self.tokens is None:
            return f"@{pos}"
        return token_label(self.tokens[batch], pos, self.mask[batch].nonzero().flatten().tolist())

    def describe(self, batch: int = 0, layer: int = -1) -> str:
        """One sentence saying what the score is: the method's paper name, the layer (and
        whether it is the final one), the target and its probability, units and sign.

        Example:
            >>> attr.describe()                                           # doctest: +SKIP
            "NormXLogit at layer 30 (final, blocks applied): the input-embedding norm × the logit of ' are' ..."
        """
        from .describe import describe

        return describe(self, batch, layer)

    def _protected(self) -> Bool[Tensor, "batch pos"]:
        return self.protected if self.protected is not None else torch.zeros_like(self.mask)

    def to_frame(self) -> pd.DataFrame:
        """Tidy scores: one row per (layer, sequence, real position).

        Columns: method, layer, batch, pos, token, score, protected.
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
                        "protected": self._protected()[self.mask].numpy(),
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

        header = f"<div><b>{html.escape(self.method)}</b>: {html.escape(self.describe())}</div>"
        return header + token_highlight(self)

    # ---- figures, saving, words (thin wrappers over mechnorm.plot, mechnorm.persist, mechnorm.words)

    def plot(self, **kwargs):
        """Layers × tokens heatmap (:func:`mechnorm.plot.layer_token_heatmap`; keywords go there).

        Example:
            >>> attr.plot(batch=0, normalize="layer")                       # doctest: +SKIP
        """
        from .plot import layer_token_heatmap

        return layer_token_heatmap(self, **kwargs)


    def by_word(self, how: str = "sum", pieces=None) -> "Attribution":
        """Subword scores aggregated to words (:func:`mechnorm.words.by_word`).

        Example:
            >>> attr.by_word().top_k(3)                                     # doctest: +SKIP
        """
        from .words import by_word

        return by_word(self, how=how, pieces=pieces)


def token_label(strings: list[str], pos: int, among: list[int]) -> str:
    """``strings[pos]`` quoted so whitespace shows, with ``@pos`` when the same string stands at
    another of the positions ``among`` (a repeated token needs its position).

    Example:
        >>> token_label([" D", " and", " D"], 2, [0, 1, 2])
        "' D'@2"
    """
    token = strings[pos]
    repeated = sum(strings[p] == token for p in among) > 1
    return repr(token) + (f"@{pos}" if repeated else "")


def token_strings(tokenizer, tokens: Tensor | None) -> list[list[str]] | None:
    """Decode ``[batch, pos]`` ids to one string per token, or None without a tokenizer."""
    if tokenizer is None or tokens is None:
        return None
    return [[tokenizer.decode([i]) for i in row] for row in torch.as_tensor(tokens).tolist()]


def cache_token_strings(cache, tokens: Tensor | None) -> list[list[str]] | None:
    """Token strings for ``tokens`` with the tokenizer of the model that produced ``cache``."""
    return token_strings(getattr(getattr(cache, "model", None), "tokenizer", None), tokens)
