"""The residual stream split into the components that wrote it, and attention split by source.

In a pre-norm transformer every block adds its outputs to the residual stream, so the
residual after ``l`` blocks (layer l, blocks applied) is exactly

    x^l = embed + pos_embed + Σ_{i<l} ( Σ_h z_i^h W_O^{i,h} + b_O^i + mlp_i )

with ``z_i^h`` the head's mixed values (``blocks.{i}.attn.hook_z``), ``W_O^{i,h}`` its slice of
the output projection, ``b_O^i`` the attention output bias and ``mlp_i`` the MLP output
(``blocks.{i}.hook_mlp_out``). Parallel attention+MLP blocks (GPT-NeoX, GPT-J) obey the same
sum. :func:`components` returns these vectors, labelled in TransformerLens's naming, at the
positions asked for only.

A head's output at query q is in turn a sum over source tokens j:
``z_q^h W_O^h = Σ_j pattern[h, q, j] · (v_j^h W_O^h)`` (grouped-query attention: each
key-value head serves ``n_heads / n_kv_heads`` consecutive query heads).
:func:`attention_by_source` returns those terms. Neither touches the cache's tensors in place.

Which hooks are read, and why: the head outputs (``hook_result``) are not cached by default
(HookedTransformer needs ``use_attn_result``; the TransformerBridge of TransformerLens 3.9 and
4.x does not populate it), so heads are computed from ``hook_z`` and ``W_O`` instead;
``hook_z``, ``hook_v``, ``hook_pattern``, ``hook_attn_out``, ``hook_mlp_out``, ``hook_embed``
and (learned positions) ``hook_pos_embed`` exist in every supported model class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..inputs import is_encoder, prediction_positions
from ..methods.registry import HookFilter, register_hooks
from ..targets import last_positions
from ..residual import INPUT_HOOK, TOKEN_EMBED_HOOK, at_positions, check_mask, model_is_post_norm, require_hooks, resid_hook
from ..warn import warn

POS_EMBED_HOOK = "hook_pos_embed"
Z_HOOK = "blocks.{i}.attn.hook_z"
V_HOOK = "blocks.{i}.attn.hook_v"
PATTERN_HOOK = "blocks.{i}.attn.hook_pattern"
ATTN_OUT_HOOK = "blocks.{i}.hook_attn_out"
MLP_OUT_HOOK = "blocks.{i}.hook_mlp_out"

#: the hooks :func:`components` reads (either ``split_heads`` setting)
COMPONENT_HOOKS = HookFilter(
    names=frozenset({TOKEN_EMBED_HOOK, POS_EMBED_HOOK, INPUT_HOOK}),
    patterns=frozenset({Z_HOOK, ATTN_OUT_HOOK, MLP_OUT_HOOK}),
)
#: the hooks :func:`attention_by_source` reads
SOURCE_HOOKS = HookFilter(patterns=frozenset({PATTERN_HOOK, V_HOOK}))
#: everything the decomposition reads: :func:`components` and :func:`attention_by_source`
DECOMPOSITION_HOOKS = COMPONENT_HOOKS | SOURCE_HOOKS
register_hooks("components", COMPONENT_HOOKS)
register_hooks("attention_by_source", SOURCE_HOOKS)


@dataclass
class ComponentStack:
    """The components of layer ``layer``'s residual at chosen positions; they sum to it exactly.

    Attributes:
        vectors: float32 ``[component, batch, k, d_model]``.
        labels: one name per component: ``"embed"``, ``"pos_embed"``, ``"L0H3"``,
            ``"L0.attn_bias"``, ``"L0.mlp"`` (``"L0.attn"`` when heads are not split).
        layer: blocks applied (0…L).
        positions: ``[batch, k]`` positions the vectors were read at.

    Example:
        >>> stack = mechnorm.components(cache, layer=2)              # doctest: +SKIP
        >>> stack.vectors.sum(0)  # == cache["blocks.1.hook_resid_post"] at the prediction positions  # doctest: +SKIP
    """

    vectors: Float[Tensor, "component batch k d_model"]
    labels: list[str]
    layer: int
    positions: Int[Tensor, "batch k"]

    def __post_init__(self) -> None:
        if self.vectors.ndim != 4 or self.vectors.shape[0] != len(self.labels):
            raise ValueError(
                f"vectors must be [component={len(self.labels)}, batch, k, d_model], got {tuple(self.vectors.shape)}."
            )

    def residual(self) -> Float[Tensor, "batch k d_model"]:
        """The residual the components add up to."""
        return self.vectors.sum(0)

    def index(self, label: str) -> int:
        """Row of ``vectors`` holding component ``label``."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"No component {label!r}; components are {self.labels}.") from None


def _model(cache):
    model = getattr(cache, "model", None)
    if model is None:
        raise ValueError("The decomposition needs the model's weights (W_O): pass an ActivationCache from "
                         "model.run_with_cache, which keeps a reference to its model.")
    return model


def check_pre_norm(model) -> None:
    """Raise for post-LN encoders, whose residual is not a sum of block outputs."""
    if model_is_post_norm(model) or is_encoder(model):
        raise ValueError(
            "This is a post-LN encoder (BERT-like): each block's output LayerNorm rescales the whole "
            "residual, so it is not a sum of component outputs. The decomposition and DLA need a pre-norm "
            "model (GPT-2, Llama, NeoX, ...); for encoders use the norm-aware methods (GlobEnc, ALTI, DecompX)."
        )


def resolve_positions(
    cache, positions="prediction", attention_mask=None, model=None, reference: str = TOKEN_EMBED_HOOK
) -> Int[Tensor, "batch k"]:
    """``[batch, k]`` positions from ``"prediction"``, ``"all"``, an int, ``[batch]`` or ``[batch, k]``.

    ``"prediction"`` is each sequence's prediction position under the mask (last real token
    in a causal LM, whether padded left or right). The batch and sequence length are read from
    the cached ``reference`` hook (``[batch, pos, ...]``).

    Example:
        >>> resolve_positions(cache, "prediction", attention_mask=batch.attention_mask)  # doctest: +SKIP
    """
    require_hooks(cache, [reference], "mechnorm.circuits")
    batch, pos = cache[reference].shape[:2]
    device = cache[reference].device
    if isinstance(positions, str):
        if positions == "all":
            return torch.arange(pos, device=device).expand(batch, pos)
        if positions != "prediction":
            raise ValueError(f"positions must be 'prediction', 'all', an int or [batch, k] indices, got {positions!r}.")
        mask = check_mask(attention_mask, batch, pos, device=device)
        model = model if model is not None else getattr(cache, "model", None)
        return (prediction_positions(model, mask) if model is not None else last_positions(mask))[:, None]
    if attention_mask is not None:
        check_mask(attention_mask, batch, pos, device=device)
    index = torch.as_tensor(positions, device=device).long()
    if index.ndim == 0:
        index = index.expand(batch)[:, None]
    elif index.ndim == 1:
        if index.shape[0] != batch:
            raise ValueError(f"positions has {index.shape[0]} entries but the batch has {batch} sequences; "
                             "give [batch] or [batch, k] indices.")
        index = index[:, None]
    if index.ndim != 2 or index.shape[0] != batch:
        raise ValueError(f"positions must be [batch={batch}, k] indices, got shape {tuple(index.shape)}.")
    index = torch.where(index < 0, index + pos, index)
    if index.numel() and (index.min() < 0 or index.max() >= pos):
        raise ValueError(f"positions {index.tolist()} are outside the sequence length {pos}.")
    return index


def attention_output_weights(model, block: int) -> tuple[Float[Tensor, "head d_head d_model"], Float[Tensor, "d_model"] | None]:
    """``(W_O [head, d_head, d_model], b_O [d_model] or None)`` of block ``block``'s attention.

    Reads a ``HookedTransformer``, ``HookedEncoder`` or ``TransformerBridge`` (TransformerLens
    3.9 and 4.x) alike; a bias-free projection gives ``None``.

    Example:
        >>> W_O, b_O = attention_output_weights(model, 0)          # doctest: +SKIP
    """
    n_blocks = int(model.cfg.n_layers)
    if not 0 <= block < n_blocks:
        raise ValueError(f"Block {block} is out of range: this model has blocks 0…{n_blocks - 1}.")
    attn = model.blocks[block].attn
    w_o = getattr(attn, "W_O", None)
    if w_o is None:
        raise ValueError(f"blocks.{block}.attn exposes no W_O; the decomposition needs TransformerLens's W_O.")
    w_o = w_o.detach()
    if w_o.ndim == 2:  # [n_heads * d_head, d_model]
        w_o = w_o.reshape(int(model.cfg.n_heads), -1, w_o.shape[-1])
    try:
        b_o = getattr(attn, "b_O", None)
    except AttributeError:
        b_o = None
    return w_o, None if b_o is None else b_o.detach()


def _bias_matters(bias: Tensor | None) -> bool:
    return bias is not None and bool(bias.ne(0).any())


@torch.inference_mode()
def components(
    cache,
    layer: int | None = None,
    positions="prediction",
    attention_mask=None,
    split_heads: bool = True,
) -> ComponentStack:
    """Layer ``layer``'s residual at ``positions``, split into the components that wrote it.

    ``x^l = embed + pos_embed + Σ_{i<l} (Σ_h z_i^h W_O^{i,h} + b_O^i + mlp_i)``; the vectors
    sum to the cached residual exactly (up to float rounding). Components: ``"embed"``,
    ``"pos_embed"`` (learned position tables only), per block ``i < l`` each head ``"LiHh"``
    and ``"Li.attn_bias"`` (or the whole ``"Li.attn"`` with ``split_heads=False``), then
    ``"Li.mlp"``. Output biases that are absent or all zero (Llama) are left out. Only the
    positions asked for are materialised: memory ``O(component · batch · k · d_model)``.

    Args:
        cache: an ``ActivationCache`` holding ``mechnorm.hooks_for("components")``.
        layer: blocks applied, 0…L (negatives count from L); None = L, the final residual.
        positions: ``"prediction"`` (each sequence's prediction position under
            ``attention_mask``), ``"all"``, an int, or ``[batch]`` / ``[batch, k]`` indices.
        attention_mask: ``[batch, pos]``, False at padding (for ``"prediction"``).
        split_heads: one component per head (from ``hook_z``) or one per attention layer
            (``hook_attn_out``).

    Returns:
        A :class:`ComponentStack`.

    Example:
        >>> _, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("components"))  # doctest: +SKIP
        >>> stack = mechnorm.components(cache)                       # doctest: +SKIP
        >>> stack.labels[:3], stack.vectors.shape                    # doctest: +SKIP
    """
    model = _model(cache)
    check_pre_norm(model)
    n_layers = int(model.cfg.n_layers)
    layer = n_layers if layer is None else int(layer)
    if layer < 0:
        layer += n_layers + 1
    if not 0 <= layer <= n_layers:
        raise ValueError(f"Layer {layer} is out of range: this model has layers 0…{n_layers} (blocks applied).")
    index = resolve_positions(cache, positions, attention_mask, model)
    learned_pos = getattr(model.cfg, "positional_embedding_type", "standard") == "standard"
    names = [TOKEN_EMBED_HOOK] + ([POS_EMBED_HOOK] if learned_pos else [])
    for i in range(layer):
        names += [(Z_HOOK if split_heads else ATTN_OUT_HOOK).format(i=i), MLP_OUT_HOOK.format(i=i)]
    require_hooks(cache, names, "components")

    vectors, labels = [at_positions(cache[TOKEN_EMBED_HOOK], index).float()], ["embed"]
    if learned_pos:
        vectors.append(at_positions(cache[POS_EMBED_HOOK], index).float())
        labels.append("pos_embed")
    for i in range(layer):
        if split_heads:
            w_o, b_o = attention_output_weights(model, i)
            z = at_positions(cache[Z_HOOK.format(i=i)], index).float()  # [batch, k, head, d_head]
            vectors.extend(torch.einsum("bkhe,hem->hbkm", z, w_o.float().to(z.device)).unbind(0))
            labels += [f"L{i}H{h}" for h in range(w_o.shape[0])]
            if _bias_matters(b_o):
                vectors.append(b_o.float().to(z.device).expand_as(vectors[0]))
                labels.append(f"L{i}.attn_bias")
        else:
            vectors.append(at_positions(cache[ATTN_OUT_HOOK.format(i=i)], index).float())
            labels.append(f"L{i}.attn")
        vectors.append(at_positions(cache[MLP_OUT_HOOK.format(i=i)], index).float())
        labels.append(f"L{i}.mlp")
    stack = ComponentStack(torch.stack(vectors), labels, layer, index)
    _check_sum(cache, stack)
    return stack


def _check_sum(cache, stack: ComponentStack) -> None:
    """Where the cache holds the residual itself, warn when the components do not add up to it
    (an architecture this decomposition does not cover: post-block norms, scaled embeddings)."""
    name = resid_hook(stack.layer)
    if name not in cache:
        return
    expected = at_positions(cache[name], stack.positions).float()
    error = (stack.residual() - expected).norm(dim=-1).max().item()
    size = expected.norm(dim=-1).max().item()
    if error > 1e-3 * size + 1e-5:
        warn(f"The components of layer {stack.layer} do not sum to the cached residual {name} (largest error "
             f"{error:.3g} against norm {size:.3g}): this architecture writes to the residual stream in a way "
             "the decomposition does not model (e.g. norms after attention/MLP, scaled embeddings).")


def _repeat_kv(v: Tensor, n_heads: int) -> Tensor:
    """Grouped-query attention: key-value head g serves query heads g·r … g·r + r − 1."""
    n_kv = v.shape[-2]
    if n_kv == n_heads:
        return v
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key-value heads evenly.")
    return v.repeat_interleave(n_heads // n_kv, dim=-2)


@torch.inference_mode()
def attention_by_source(
    cache, block: int, positions=None, split_heads: bool = False
) -> Float[Tensor, "batch k *head src d_model"]:
    """Block ``block``'s attention output at query positions, split by source token.

    ``out[b, k, (h,) j] = pattern[b, h, q_k, j] · (v[b, j, h] @ W_O[block, h])``. Summed over
    ``j`` (and ``h``), plus ``b_O[block]``, it equals ``blocks.{block}.hook_attn_out`` at those
    positions; ``b_O`` is not included (it belongs to no source token). Memory
    ``O(batch · k · [head ·] src · d_model)`` plus ``O(batch · head · src · d_model)`` for the
    projected values.

    Args:
        cache: an ``ActivationCache`` with ``blocks.{block}.attn.hook_pattern`` and ``hook_v``.
        block: the block index, 0…L−1.
        positions: query positions: None for every position, or anything
            :func:`resolve_positions` takes (``"prediction"``, ``"all"``, ``[batch, k]``).
        split_heads: keep the head axis (``[batch, k, head, src, d_model]``) or sum over it.

    Example:
        >>> parts = attention_by_source(cache, 0, positions=torch.tensor([[5]]))  # doctest: +SKIP
        >>> parts.shape                                              # doctest: +SKIP
        torch.Size([1, 1, 6, 768])
    """
    model = _model(cache)
    w_o, _ = attention_output_weights(model, block)
    names = [PATTERN_HOOK.format(i=block), V_HOOK.format(i=block)]
    require_hooks(cache, names, "attention_by_source")
    pattern, v = cache[names[0]], cache[names[1]]  # [batch, head, q, src], [batch, src, kv_head, d_head]
    index = resolve_positions(cache, "all" if positions is None else positions, None, model, reference=names[1])
    rows = at_positions(pattern.transpose(1, 2), index).float()  # [batch, k, head, src]
    v = _repeat_kv(v.float(), w_o.shape[0])
    values_out = torch.einsum("bjhe,hem->bhjm", v, w_o.float().to(v.device))  # [batch, head, src, d_model]
    if split_heads:
        return torch.einsum("bkhj,bhjm->bkhjm", rows, values_out)
    return torch.einsum("bkhj,bhjm->bkjm", rows, values_out)

