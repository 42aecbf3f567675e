"""Instance-to-dataset RepMatch scores, for a whole batch of instances at once.

RepMatch scores an instance ``x`` against a dataset ``D`` by taking, from one fixed seeded
initial adapter ``θ₀`` (rank 1, ``B₀ = 0``), a single AdamW step on ``x`` alone (batch 1)
and comparing the resulting update ``ΔW_x = B₁ A₁`` with the adapter trained on ``D``:
``φ(U_D, U_x)`` per layer and adapted matrix (see :mod:`.subspace`). The authors reload the
checkpoint and step once per instance.

Here every instance's gradient ``g_x = ∇_θ L(x; θ₀)`` over the LoRA parameters only comes
from one ``torch.func.vmap(grad(...))`` of a ``functional_call``, and the first AdamW step
is applied in closed form. From zero moments, at step 1 (bias corrections exact):

    m̂ = g,  v̂ = g²,  θ₁ = θ₀ · (1 − lr·wd) − lr · g / (|g| + eps)

(computed in the same order as ``torch.optim.AdamW``). As ``B₀ = 0``, ``g_A = 0`` and
``A₁ = (1 − lr·wd) A₀``; ``B₁ ≈ −lr·sign(g_B)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .adapters import QV, Adapter, as_adapter, initial_adapter, lora_config, with_adapter
from .models import Encoded, additive_mask, encode, load_base, per_example_loss
from .subspace import _shared, grassmann, left_singular_vectors, subspaces


@dataclass
class InstanceScores:
    """φ of each instance's one-step update against a reference adapter.

    Attributes:
        matrices: the adapted ``(layer, matrix)`` pairs.
        values: ``[instance, matrix]`` φ.
    """

    matrices: list[tuple[int, str]]
    values: Float[Tensor, "instance matrix"]

    @property
    def score(self) -> Float[Tensor, " instance"]:
        """φ averaged over layers and matrices: one score per instance."""
        return self.values.mean(-1)

    def by_layer(self) -> pd.DataFrame:
        """``[instance, layer]`` φ averaged over each layer's matrices."""
        frame = pd.DataFrame(self.values.numpy(), columns=pd.MultiIndex.from_tuples(self.matrices, names=["layer", "matrix"]))
        return frame.T.groupby(level="layer").mean().T

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per instance, layer and matrix."""
        rows = [dict(instance=n, layer=layer, matrix=matrix, phi=float(self.values[n, k]))
                for n in range(self.values.shape[0]) for k, (layer, matrix) in enumerate(self.matrices)]
        return pd.DataFrame(rows)

    def plot(self, **kwargs):
        """Scores per layer (see :func:`mechnorm.repmatch.plots.instance_scores_plot`)."""
        from .plots import instance_scores_plot

        return instance_scores_plot(self, **kwargs)


def first_adamw_step(theta: Tensor, g: Tensor, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> Tensor:
    """``θ₁`` after one ``torch.optim.AdamW`` step from zero moments, in closed form.

    Broadcasts ``theta`` against a leading batch of gradients ``g``.

    Example:
        >>> theta, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
        >>> first_adamw_step(theta, g, lr=0.1, weight_decay=0.0)
        tensor([ 0.9000, -2.0000])
    """
    beta1, beta2 = betas
    m = g * (1 - beta1)
    v = g * g * (1 - beta2)
    denom = v.sqrt() / (1 - beta2) ** 0.5 + eps
    return theta * (1 - lr * weight_decay) - (lr / (1 - beta1)) * (m / denom)


def instance_similarity(model, examples: Sequence, reference_adapter, *, seed: int = 0, rank: int = 1,
                        lr: float = 1e-3, weight_decay: float = 0.01, alpha: float | None = None, target=QV,
                        chunk_size: int = 64, progress: bool = False) -> InstanceScores:
    """RepMatch instance-to-dataset scores of every example against ``reference_adapter``.

    Equivalent to the authors' loop (reload the seeded initial adapter, one AdamW step on
    the instance alone, compare), computed with per-instance gradients in chunks of at most
    ``chunk_size`` instances of equal length (so nothing is padded). ``seed``, ``rank``, ``alpha`` and ``target`` fix the initial adapter
    (:func:`~mechnorm.repmatch.adapters.initial_adapter`); ``lr`` and ``weight_decay`` the step.

    Example:
        >>> ref = train_adapter("zoo:bert-lexicon", lexicon_train, steps=100)    # doctest: +SKIP
        >>> scores = instance_similarity("zoo:bert-lexicon", lexicon_train, ref)  # doctest: +SKIP
        >>> scores.score.argsort(descending=True)[:10]                           # doctest: +SKIP
    """
    base = load_base(model)
    reference = subspaces(reference_adapter)
    peft_model = with_adapter(base, config=lora_config(base, rank, alpha, target), seed=seed).eval()
    init = as_adapter(peft_model)
    params = {name: p.detach() for name, p in peft_model.named_parameters() if p.requires_grad}
    buffers = dict(peft_model.named_buffers())
    factors = init.factors()
    keys = _shared(reference, factors)
    # state-dict key of each factor -> name of its parameter in peft_model ("...lora_A.default.weight")
    names = {(k, f): _param_name(params, k, f) for k in keys for f in "AB"}

    def loss(p, ids, mask, labels):
        call = lambda **kw: functional_call(peft_model, (p, buffers), kwargs=kw)  # noqa: E731
        return per_example_loss(base, call, Encoded(ids[None], mask, labels[None]))[0]

    per_instance = vmap(grad(loss), in_dims=(None, 0, 0, 0))
    data = encode(base, examples)
    values = torch.empty(len(data), len(keys), dtype=torch.float64)
    for index in tqdm(_equal_length_chunks(data, chunk_size), desc="instance scores", disable=not progress):
        chunk = data[index].trimmed()
        mask = additive_mask(base, chunk.attention_mask)[:, None]  # one [1, 1, pos, pos] mask per instance
        grads = per_instance(params, chunk.input_ids, mask, chunk.labels)
        for k, key in enumerate(keys):
            B1 = first_adamw_step(params[names[key, "B"]], grads[names[key, "B"]], lr, weight_decay)
            A1 = first_adamw_step(params[names[key, "A"]], grads[names[key, "A"]], lr, weight_decay)
            values[index, k] = grassmann(reference[key], left_singular_vectors(B1, A1))
    return InstanceScores(keys, values)


def _equal_length_chunks(data: Encoded, chunk_size: int) -> list[list[int]]:
    """Indices grouped by sequence length, at most ``chunk_size`` per group.

    No instance is ever padded: Adam's first step divides each gradient entry by its own
    size, so entries near ``eps`` flip with float noise, and padding's rounding noise would
    show in the scores (up to ~1e-3 on the zoo BERT); unpadded they match the loop to ~1e-7.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(data.attention_mask.sum(-1).tolist()):
        groups.setdefault(length, []).append(i)
    return [g[s : s + chunk_size] for _, g in sorted(groups.items()) for s in range(0, len(g), chunk_size)]


def _param_name(params: dict, key: tuple[int, str], factor: str) -> str:
    layer, matrix = key
    for name in params:
        if name.endswith(f"{matrix}.lora_{factor}.default.weight") and f".{layer}." in name:
            return name
    raise KeyError(f"No lora_{factor} parameter for layer {layer} {matrix!r}.")


def instance_similarity_loop(model, examples: Sequence, reference_adapter, *, seed: int = 0, rank: int = 1,
                             lr: float = 1e-3, weight_decay: float = 0.01, alpha: float | None = None, target=QV,
                             progress: bool = False) -> InstanceScores:
    """The authors' way, kept as the reference: per instance, reload ``θ₀``, one real AdamW step.

    Slow (one forward/backward and one optimiser per instance); use :func:`instance_similarity`.

    Example:
        >>> slow = instance_similarity_loop("zoo:bert-lexicon", lexicon_train[:20], ref)   # doctest: +SKIP
    """
    base = load_base(model)
    reference = subspaces(reference_adapter)
    peft_model = with_adapter(base, config=lora_config(base, rank, alpha, target), seed=seed).eval()
    checkpoint = {k: v.clone() for k, v in peft_model.state_dict().items()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    rows = []
    for example in tqdm(examples, desc="reload-and-step", disable=not progress):
        peft_model.load_state_dict(checkpoint)
        optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        optimiser.zero_grad()
        per_example_loss(base, peft_model, encode(base, [example]))[0].backward()
        optimiser.step()
        factors = as_adapter(peft_model).factors()
        keys = _shared(reference, factors)
        rows.append([float(grassmann(reference[k], left_singular_vectors(*factors[k]))) for k in keys])
    return InstanceScores(keys, torch.tensor(rows, dtype=torch.float64))


__all__ = ["Adapter", "InstanceScores", "first_adamw_step", "initial_adapter", "instance_similarity",
           "instance_similarity_loop"]
