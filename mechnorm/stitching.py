"""Model stitching: can model B compute with model A's representation?

:func:`stitch` learns an affine map ``W x + b`` from A's residual stream after ``layer_a``
blocks to B's residual stream after ``layer_b`` blocks, with both models frozen, by
minimising B's next-token loss through the stitch (Lenc & Vedaldi 2015; Bansal et al. 2021;
Csiszárik et al. 2021). Layer indices follow the project convention: ``l`` = blocks applied,
so ``0`` is ``blocks.0.hook_resid_pre``, ``l`` is ``blocks.{l-1}.hook_resid_post`` and ``L``
the final residual (input to the final norm).

The stitched model runs A up to ``layer_a`` (cached once, A is frozen), then B with its
layer-``layer_b`` residual replaced, through a TransformerLens forward hook, by the mapped
A residual; B's blocks ``layer_b …`` and unembedding do the rest. The result compares B's
loss and accuracy through the stitch with B's own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechnorm.residual import resid_hook

__all__ = ["StitchData", "StitchResult", "stitch", "stitched_loss"]


@dataclass
class StitchData:
    """Token sequences to stitch on.

    Attributes:
        tokens: ``[batch, pos]`` token ids, identical for both models (a shared tokenizer).
        attention_mask: ``[batch, pos]``, False at padding; default all real.
        loss_mask: ``[batch, pos]``, True at the positions whose *next* token is scored;
            default every position whose next position is a real token. Use it to score
            only the answer of a task (e.g. the position before the recalled value).

    Example:
        >>> data = StitchData(tokens, attention_mask=mask)  # doctest: +SKIP
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"] | None = None
    loss_mask: Bool[Tensor, "batch pos"] | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got {tuple(self.tokens.shape)}")
        shape = tuple(self.tokens.shape)
        if self.attention_mask is None:
            self.attention_mask = torch.ones(shape, dtype=torch.bool, device=self.tokens.device)
        self.attention_mask = self.attention_mask.bool()
        if tuple(self.attention_mask.shape) != shape:
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} != tokens {shape}")
        if self.loss_mask is None:
            m = self.attention_mask
            self.loss_mask = torch.zeros_like(m)
            self.loss_mask[:, :-1] = m[:, :-1] & m[:, 1:]
        self.loss_mask = self.loss_mask.bool()
        if tuple(self.loss_mask.shape) != shape:
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} != tokens {shape}")
        if self.loss_mask[:, -1].any():
            raise ValueError("loss_mask is True at the last position, which has no next token")
        if not self.loss_mask.any():
            raise ValueError("loss_mask selects no position to score")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, idx: Tensor) -> "StitchData":
        """The sequences at ``idx``."""
        return StitchData(self.tokens[idx], self.attention_mask[idx], self.loss_mask[idx])


@dataclass
class StitchResult:
    """Outcome of :func:`stitch`; losses are mean next-token cross-entropy (nats).

    Attributes:
        layer_a, layer_b: the stitched layers (blocks applied).
        loss, accuracy: B through the trained stitch, on the evaluation data.
        loss_b, accuracy_b: B alone on the same data (the ceiling).
        loss_init, accuracy_init: B through the stitch before training (at its ``init``).
        train_losses: the training loss at every step.
        stitch: the trained affine map (``nn.Linear(d_a, d_b)``).
    """

    layer_a: int
    layer_b: int
    loss: float
    accuracy: float
    loss_b: float
    accuracy_b: float
    loss_init: float
    accuracy_init: float
    steps: int
    init: str
    train_losses: list[float] = field(default_factory=list, repr=False)
    stitch: nn.Linear | None = field(default=None, repr=False)

    @property
    def loss_gap(self) -> float:
        """``loss − loss_b``: how much the stitch costs B (0 = nothing lost)."""
        return self.loss - self.loss_b

    def to_dict(self) -> dict:
        """The numbers, for a results table."""
        keys = ["layer_a", "layer_b", "loss", "accuracy", "loss_b", "accuracy_b",
                "loss_init", "accuracy_init", "steps", "init"]
        return {k: getattr(self, k) for k in keys} | {"loss_gap": self.loss_gap}


def _hook(model, layer: int) -> str:
    """The hook holding ``model``'s residual after ``layer`` blocks (see module docstring)."""
    n_layers = model.cfg.n_layers
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer must be in 0..{n_layers} (blocks applied), got {layer}")
    # blocks.{l-1}.hook_resid_post is the same tensor as blocks.{l}.hook_resid_pre, and
    # also exists for l = L
    return resid_hook(layer)


@contextlib.contextmanager
def _frozen(*models: nn.Module):
    """No parameter gradients for these models, restoring the flags afterwards."""
    params = [p for m in models for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _residual(model, data: StitchData, layer: int, batch_size: int) -> Float[Tensor, "batch pos d"]:
    name = _hook(model, layer)
    out = []
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            d = data.subset(torch.arange(s, min(s + batch_size, len(data))))
            _, cache = model.run_with_cache(d.tokens, attention_mask=d.attention_mask, names_filter=[name])
            out.append(cache[name].detach())
    return torch.cat(out)


def _next_token_stats(
    logits: Float[Tensor, "batch pos vocab"], data: StitchData
) -> tuple[Tensor, Tensor, int]:
    """Summed cross-entropy, correct count and count over ``loss_mask`` positions."""
    sel = data.loss_mask[:, :-1]
    pred = logits[:, :-1][sel]
    gold = data.tokens[:, 1:][sel]
    return F.cross_entropy(pred.float(), gold, reduction="sum"), (pred.argmax(-1) == gold).sum(), int(sel.sum())


def _run_b(model_b, data: StitchData, layer_b: int, resid: Tensor | None) -> Tensor:
    """B's logits, with its layer-``layer_b`` residual replaced by ``resid`` when given."""
    if resid is None:
        return model_b(data.tokens, attention_mask=data.attention_mask)

    def inject(act, hook):
        return resid.to(act.dtype)

    name = _hook(model_b, layer_b)
    return model_b.run_with_hooks(
        data.tokens, attention_mask=data.attention_mask, fwd_hooks=[(name, inject)]
    )


def _evaluate(model_b, data, layer_b, resid_a, mapping, batch_size) -> tuple[float, float]:
    loss = correct = count = 0.0
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(data)))
            resid = None if mapping is None else mapping(resid_a[idx].to(mapping.weight.device))
            l, c, n = _next_token_stats(_run_b(model_b, data.subset(idx), layer_b, resid), data.subset(idx))
            loss, correct, count = loss + float(l), correct + float(c), count + n
    return loss / count, correct / count


def stitched_loss(
    model_a, layer_a: int, model_b, layer_b: int, mapping: nn.Module | None, dataset, *, batch_size: int = 32
) -> tuple[float, float]:
    """B's next-token loss and accuracy through a stitch (``mapping=None``: B alone).

    Use it to evaluate a trained :attr:`StitchResult.stitch` on other data or other
    positions than those :func:`stitch` reported.

    Example:
        >>> r = stitch(a, 1, b, 1, train_data)                                # doctest: +SKIP
        >>> stitched_loss(a, 1, b, 1, r.stitch, StitchData(test_tokens))       # doctest: +SKIP
        (0.52, 0.81)
    """
    data = _as_data(dataset)
    resid_a = None if mapping is None else _residual(model_a, data, layer_a, batch_size)
    return _evaluate(model_b, data, layer_b, resid_a, mapping, batch_size)


def _as_data(dataset) -> StitchData:
    if isinstance(dataset, StitchData):
        return dataset
    if isinstance(dataset, Tensor):
        return StitchData(dataset)
    if isinstance(dataset, dict):
        return StitchData(**dataset)
    if isinstance(dataset, (tuple, list)):
        return StitchData(*dataset)
    raise TypeError(f"dataset must be StitchData, a token tensor, a dict or a tuple, got {type(dataset)}")


def stitch(
    model_a,
    layer_a: int,
    model_b,
    layer_b: int,
    dataset,
    *,
    eval_dataset=None,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    init: Literal["lstsq", "identity", "random"] = "lstsq",
) -> StitchResult:
    """Train an affine stitch from A's layer ``layer_a`` into B's layer ``layer_b``.

    Both models stay frozen (their ``requires_grad`` flags are restored afterwards) and in
    whatever train/eval mode they are in — call ``.eval()`` first for dropout models. Training
    minimises B's next-token cross-entropy through the stitch with Adam, on minibatches of
    ``batch_size`` sequences drawn with ``seed``.

    Args:
        model_a, model_b: TransformerLens models with ``cfg.n_layers``, ``run_with_cache`` and
            ``run_with_hooks``, sharing a tokenizer (same token ids in, same vocabulary out).
        layer_a, layer_b: blocks applied, ``0 … L``.
        dataset: a :class:`StitchData`, a ``[batch, pos]`` token tensor, or a tuple / dict of
            ``(tokens, attention_mask, loss_mask)``.
        eval_dataset: data for the reported numbers; default ``dataset`` (in-sample).
        steps: optimiser steps (0 evaluates the initial map only).
        lr: Adam learning rate.
        batch_size: sequences per step and per evaluation batch.
        seed: seeds the initial map (``"random"``) and the minibatch order.
        init: ``"lstsq"`` — least-squares fit of B's residual from A's on the real tokens
            (a strong start); ``"identity"`` — ``W = I, b = 0`` (needs ``d_a == d_b``);
            ``"random"`` — ``nn.Linear``'s default initialisation.

    Returns:
        A :class:`StitchResult` with the stitched and the B-alone loss and accuracy.

    Example:
        >>> r = stitch(gelu_model, 1, solu_model, 1, StitchData(tokens), steps=200)  # doctest: +SKIP
        >>> r.loss, r.loss_b, r.loss_gap                                              # doctest: +SKIP
    """
    train = _as_data(dataset)
    test = train if eval_dataset is None else _as_data(eval_dataset)
    if train.tokens.max() >= model_b.cfg.d_vocab or train.tokens.max() >= model_a.cfg.d_vocab:
        raise ValueError("token ids exceed a model's d_vocab; both models must share a vocabulary")
    gen = torch.Generator().manual_seed(seed)
    d_a, d_b = model_a.cfg.d_model, model_b.cfg.d_model
    device = next(model_b.parameters()).device

    with _frozen(model_a, model_b):
        ra_train = _residual(model_a, train, layer_a, batch_size)
        ra_test = ra_train if test is train else _residual(model_a, test, layer_a, batch_size)

        mapping = nn.Linear(d_a, d_b, dtype=torch.float32)
        with torch.no_grad():
            if init == "random":
                bound = 1 / math.sqrt(d_a)  # nn.Linear's default, but from our generator
                mapping.weight.uniform_(-bound, bound, generator=gen)
                mapping.bias.uniform_(-bound, bound, generator=gen)
            elif init == "identity":
                if d_a != d_b:
                    raise ValueError(f"init='identity' needs d_model equal, got {d_a} and {d_b}")
                mapping.weight.copy_(torch.eye(d_a))
                mapping.bias.zero_()
            elif init == "lstsq":
                rb = _residual(model_b, train, layer_b, batch_size).cpu()
                ra, m = ra_train.cpu(), train.attention_mask.cpu()
                x = torch.cat([ra[m].double(), torch.ones(int(m.sum()), 1, dtype=torch.float64)], 1)
                sol = torch.linalg.lstsq(x, rb[m].double()).solution  # [d_a + 1, d_b]
                mapping.weight.copy_(sol[:-1].T.float())
                mapping.bias.copy_(sol[-1].float())
            else:
                raise ValueError(f"init must be 'lstsq', 'identity' or 'random', got {init!r}")
        mapping = mapping.to(device)

        loss_b, acc_b = _evaluate(model_b, test, layer_b, None, None, batch_size)
        loss_init, acc_init = _evaluate(model_b, test, layer_b, ra_test, mapping, batch_size)

        opt = torch.optim.Adam(mapping.parameters(), lr=lr)
        history = []
        order = torch.empty(0, dtype=torch.long)
        for _ in range(steps):
            if order.numel() < batch_size:
                order = torch.cat([order, torch.randperm(len(train), generator=gen)])
            idx, order = order[:batch_size], order[batch_size:]
            batch = train.subset(idx)
            logits = _run_b(model_b, batch, layer_b, mapping(ra_train[idx].to(device)))
            total, _, count = _next_token_stats(logits, batch)
            loss = total / count
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())

        loss, acc = _evaluate(model_b, test, layer_b, ra_test, mapping, batch_size)

    return StitchResult(
        layer_a=layer_a,
        layer_b=layer_b,
        loss=loss,
        accuracy=acc,
        loss_b=loss_b,
        accuracy_b=acc_b,
        loss_init=loss_init,
        accuracy_init=acc_init,
        steps=steps,
        init=init,
        train_losses=history,
        stitch=mapping.requires_grad_(False),
    )
