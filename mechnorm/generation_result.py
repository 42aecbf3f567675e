"""The result of explaining a generation: scores ``[step, layer, pos]`` for each generated token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .result import token_label


@dataclass
class GenerationAttribution:
    """Each generated token explained over the prompt and the tokens generated before it.

    Step t explains the token at position ``p_t = prompt_length + t``, predicted at
    ``p_t − 1``; only positions ``< p_t`` are visible to it (``mask[t]``), and its scores are
    NaN elsewhere.

    Attributes:
        scores: float32 ``[step, layer, pos]`` over the whole sequence (prompt + generated).
        layers: the layer (blocks applied, 0…L) of each row.
        mask: ``[step, pos]``, True at the positions step t can see (``pos < p_t``).
        method: the method's registry name.
        token_ids: ``[pos]`` ids of the prompt followed by the generated tokens.
        prompt_length: number of prompt tokens P.
        probabilities: ``[step]`` the model's probability of each generated token at its step.
        tokens: token strings of the whole sequence, when a tokenizer is known.
        signed: whether scores carry a sign.
        protected: ``[step, pos]`` positions never ranked (``mechnorm.protected``): each step's
            prediction position ``p_t − 1`` and a leading special token (BOS), or None.
        metadata: options, head, and ``seconds`` spent generating and attributing.

    Example:
        >>> gen = mechnorm.explain_generation(model, "The keys to the", generate=4)   # doctest: +SKIP
        >>> gen.summary()                                                            # doctest: +SKIP
    """

    scores: Float[Tensor, "step layer pos"]
    layers: tuple[int, ...]
    mask: Bool[Tensor, "step pos"]
    method: str
    token_ids: Int[Tensor, "pos"]
    prompt_length: int
    probabilities: Float[Tensor, "step"]
    tokens: list[str] | None = None
    signed: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    protected: Bool[Tensor, "step pos"] | None = None

    def __post_init__(self) -> None:
        steps, n_layers, length = self.scores.shape if self.scores.ndim == 3 else (None,) * 3
        if steps is None:
            raise ValueError(f"scores must be [step, layer, pos], got shape {tuple(self.scores.shape)}.")
        self.layers = tuple(int(layer) for layer in self.layers)
        if len(self.layers) != n_layers:
            raise ValueError(f"{len(self.layers)} layer labels for {n_layers} rows of scores.")
        if tuple(self.mask.shape) != (steps, length):
            raise ValueError(f"mask shape {tuple(self.mask.shape)} != scores' [step, pos] {(steps, length)}.")
        if self.token_ids.shape != (length,) or self.prompt_length + steps != length:
            raise ValueError(f"token_ids must hold the prompt ({self.prompt_length}) and {steps} generated tokens.")
        if self.tokens is not None and len(self.tokens) != length:
            raise ValueError("tokens must hold one string per position.")
        if self.probabilities.shape != (steps,):
            raise ValueError(f"probabilities must be [step={steps}], got {tuple(self.probabilities.shape)}.")
        self.mask = self.mask.bool()
        if self.protected is not None:
            if tuple(self.protected.shape) != (steps, length):
                raise ValueError(f"protected must be [step, pos] {(steps, length)}, got {tuple(self.protected.shape)}.")
            self.protected = self.protected.bool() & self.mask
        self.scores = self.scores.float().masked_fill(~self.mask[:, None, :], float("nan"))

    @property
    def n_steps(self) -> int:
        """Number of generated tokens."""
        return self.scores.shape[0]

    @property
    def generated(self) -> Int[Tensor, "step"]:
        """The generated token ids."""
        return self.token_ids[self.prompt_length :]

    @property
    def generated_tokens(self) -> list[str]:
        """The generated tokens as strings (ids as text without a tokenizer)."""
        return [self._token(p) for p in range(self.prompt_length, len(self.token_ids))]

    def row(self, layer: int = -1) -> Float[Tensor, "step pos"]:
        """Scores at one layer: a layer index from ``layers``, or -1 for the last row."""
        if layer == -1:
            return self.scores[:, -1]
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not computed; this result has layers {self.layers}.")
        return self.scores[:, self.layers.index(layer)]

    def top_k(self, step: int | None = None, k: int = 5, layer: int = -1, include_protected: bool = False) -> pd.DataFrame:
        """The ``k`` highest-scoring visible positions of a step (all steps when None), leaving
        out the protected ones (the step's prediction position, BOS) unless ``include_protected``.

        Returns a DataFrame with columns step, generated, rank, pos, token, label (quoted, with
        ``@pos`` for a repeated token), score.

        Example:
            >>> gen.top_k(step=0, k=3)                                # doctest: +SKIP
        """
        scores = self.row(layer)
        steps = range(self.n_steps) if step is None else [self._step(step)]
        rows = []
        for t in steps:
            ranked = self.mask[t] if include_protected or self.protected is None else self.mask[t] & ~self.protected[t]
            visible = ranked.nonzero().flatten()
            order = scores[t, visible].argsort(descending=True)[:k]
            strings = [self._token(p) for p in range(self.mask.shape[1])]
            seen = self.mask[t].nonzero().flatten().tolist()
            for rank, index in enumerate(order.tolist(), start=1):
                pos = int(visible[index])
                rows.append({"step": t, "generated": self._token(self.prompt_length + t), "rank": rank, "pos": pos,
                             "token": strings[pos], "label": token_label(strings, pos, seen), "score": float(scores[t, pos])})
        return pd.DataFrame(rows, columns=["step", "generated", "rank", "pos", "token", "label", "score"])

    def to_frame(self) -> pd.DataFrame:
        """Tidy scores: one row per (step, layer, visible position).

        Columns: method, step, generated, probability, layer, pos, token, score, protected.
        """
        step_ids, positions = self.mask.nonzero(as_tuple=True)
        frames = []
        for row, layer in enumerate(self.layers):
            frames.append(pd.DataFrame({
                "method": self.method,
                "step": step_ids.numpy(),
                "generated": [self._token(self.prompt_length + int(t)) for t in step_ids],
                "probability": self.probabilities[step_ids].numpy(),
                "layer": layer,
                "pos": positions.numpy(),
                "token": [self._token(int(p)) for p in positions],
                "score": self.scores[step_ids, row, positions].numpy(),
                "protected": False if self.protected is None else self.protected[step_ids, positions].numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def summary(self, k: int = 3, layer: int = -1) -> pd.DataFrame:
        """One line per step: the generated token, its probability and its ``k`` top sources.

        Example:
            >>> print(gen.summary().to_string(index=False))           # doctest: +SKIP
        """
        top = self.top_k(k=k, layer=layer)
        sources = top.groupby("step")["label"].agg(" | ".join)
        return pd.DataFrame({
            "step": range(self.n_steps),
            "generated": self.generated_tokens,
            "probability": self.probabilities.numpy(),
            f"top {k} sources": [sources.get(t, "") for t in range(self.n_steps)],
        })

    def plot(self, layer: int = -1, normalize: bool = False, title: str | None = None):
        """Heatmap: generated tokens (rows) × prompt and earlier generations (columns).

        See :func:`mechnorm.plot_generation.generation_heatmap`.

        Example:
            >>> gen.plot().write_html("generation.html")              # doctest: +SKIP
        """
        from .plot_generation import generation_heatmap  # plotting sits above the results

        return generation_heatmap(self, layer=layer, normalize=normalize, title=title)

    def _step(self, step: int) -> int:
        if not -self.n_steps <= step < self.n_steps:
            raise ValueError(f"Step {step} is out of range: {self.n_steps} tokens were generated.")
        return step % self.n_steps

    def _token(self, pos: int) -> str:
        return self.tokens[pos] if self.tokens is not None else str(int(self.token_ids[pos]))

    def __repr__(self) -> str:
        return (f"GenerationAttribution(method={self.method!r}, steps={self.n_steps}, prompt={self.prompt_length} "
                f"tokens, layers={self.layers[0]}…{self.layers[-1]} ({len(self.layers)} rows))")
