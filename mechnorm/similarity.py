"""Representation similarity between activation matrices and between cached layers.

Metrics between two activation matrices ``X [n, d1]`` and ``Y [n, d2]`` (the same ``n``
inputs, any widths), all accumulated in float64:

* :func:`linear_cka` — linear centred kernel alignment (Kornblith et al. 2019),
  ``‖X_cᵀY_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)``; ``debiased=True`` swaps the biased HSIC for
  the unbiased estimator of Song et al. (2012), as used for debiased CKA by Nguyen et al.
  (2021) / Kornblith's reference code. Computed from ``d1 x d2`` statistics accumulated in
  token batches, never from ``n x n`` kernels.
* :func:`rbf_cka` — CKA with Gaussian kernels, bandwidth a fraction of the median pairwise
  distance. Needs ``n x n`` kernels, so it refuses large ``n``.
* :func:`procrustes_distance` — orthogonal Procrustes distance of Ding et al. (2021) on
  centred, Frobenius-normalised matrices: ``2 − 2‖X̂ᵀŶ‖_*``, in [0, 2], 0 = same up to rotation.

:func:`layer_similarity` applies one of them to every pair of layers of one or two
TransformerLens ``ActivationCache``s and returns a :class:`LayerSimilarity` (a labelled
``[layer_a, layer_b]`` matrix; ``.to_frame()`` gives a pandas DataFrame, ``.plot()`` a heatmap).

All metrics are invariant to translation, orthogonal transforms and isotropic scaling of
either matrix, so the statistics are accumulated on inputs shifted by their first batch's
mean (this only improves floating-point conditioning; results are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechnorm.residual import MissingHooksError, check_mask, is_post_norm, n_blocks, resid_hook

__all__ = [
    "linear_cka",
    "rbf_cka",
    "procrustes_distance",
    "layer_similarity",
    "similarity_hooks",
    "LayerSimilarity",
    "SimilarityMetric",
    "list_metrics",
]

DEFAULT_BATCH_SIZE = 1024
DEFAULT_MAX_TOKENS_RBF = 2048


@dataclass(frozen=True)
class SimilarityMetric:
    """What a metric returns: its name, value range and direction."""

    name: str
    range: tuple[float, float]
    higher_is_similar: bool
    label: str  # for axes and titles
    description: str


METRICS: dict[str, SimilarityMetric] = {
    m.name: m
    for m in [
        SimilarityMetric("linear_cka", (0.0, 1.0), True, "linear CKA", "linear CKA (Kornblith et al. 2019)"),
        SimilarityMetric("rbf_cka", (0.0, 1.0), True, "RBF CKA", "CKA with RBF kernels (needs n x n)"),
        SimilarityMetric(
            "procrustes", (0.0, 2.0), False, "Procrustes distance",
            "orthogonal Procrustes distance (Ding et al. 2021)",
        ),
    ]
}


def list_metrics() -> list[str]:
    """Names accepted by ``layer_similarity(metric=...)``.

    Example:
        >>> list_metrics()
        ['linear_cka', 'rbf_cka', 'procrustes']
    """
    return list(METRICS)


# --------------------------------------------------------------------------------------
# Linear statistics, accumulated in token batches
# --------------------------------------------------------------------------------------


class _CrossMoments:
    """Sufficient statistics of paired token streams ``x_t [P, d1]``, ``y_t [Q, d2]``.

    For every pair (p, q) of the P "row" and Q "column" representations it keeps
    ``XᵀY [d1, d2]``, the sums ``Σx``, ``Σy``, and the squared-norm-weighted terms the
    unbiased HSIC needs (``Σ‖y‖²x``, ``Σ‖x‖²y``, ``Σ‖x‖²‖y‖²``). Memory: ``P·Q·d1·d2``
    float64 numbers, independent of the number of tokens.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift_x: Tensor | None = None
        self.shift_y: Tensor | None = None

    def update(self, x: Float[Tensor, "P b d1"], y: Float[Tensor, "Q b d2"], owned: bool = False) -> None:
        """Add a batch of b tokens. ``owned``: x and y are float64 scratch, modified in place."""
        x, y = x.double(), y.double()
        if self.shift_x is None:
            # Any shift leaves every metric unchanged; the first batch mean keeps the
            # uncentred sums small, so centring by subtraction loses little precision.
            self.shift_x = x.mean(1, keepdim=True)
            self.shift_y = y.mean(1, keepdim=True)
            P, Q, d1, d2 = x.shape[0], y.shape[0], x.shape[2], y.shape[2]
            z = dict(dtype=torch.float64, device=x.device)
            self.xty = torch.zeros(P, Q, d1, d2, **z)
            self.sx, self.sy = torch.zeros(P, d1, **z), torch.zeros(Q, d2, **z)
            self.kx, self.ly = torch.zeros(P, **z), torch.zeros(Q, **z)
            self.x_l = torch.zeros(P, Q, d1, **z)  # Σ_t ‖y_t‖² x_t
            self.y_k = torch.zeros(P, Q, d2, **z)  # Σ_t ‖x_t‖² y_t
            self.kl = torch.zeros(P, Q, **z)  # Σ_t ‖x_t‖² ‖y_t‖²
        x = x.sub_(self.shift_x) if owned else x - self.shift_x
        y = y.sub_(self.shift_y) if owned else y - self.shift_y
        k = torch.linalg.vector_norm(x, dim=-1).square_()  # [P, b]: diagonal of the kernel XXᵀ
        l = torch.linalg.vector_norm(y, dim=-1).square_()  # [Q, b]
        self.n += x.shape[1]
        for p in range(x.shape[0]):  # in-place addmm: no [P, Q, d1, d2] temporary
            for q in range(y.shape[0]):
                self.xty[p, q].addmm_(x[p].T, y[q])
        self.sx += x.sum(1)
        self.sy += y.sum(1)
        self.kx += k.sum(1)
        self.ly += l.sum(1)
        for p in range(x.shape[0]):  # matmuls; einsum would broadcast a [Q, b, d] product
            self.x_l[p] += l @ x[p]
            self.y_k[p] += k[p] @ y
        self.kl += k @ l.T

    def centred_cross(self, p: int, q: int) -> Float[Tensor, "d1 d2"]:
        """``X_cᵀ Y_c`` for the pair (p, q)."""
        return self.xty[p, q] - torch.outer(self.sx[p], self.sy[q]) / self.n

    def centred_sq_norms(self) -> tuple[Float[Tensor, " P"], Float[Tensor, " Q"]]:
        """``‖X_c‖²_F`` and ``‖Y_c‖²_F``."""
        return (
            self.kx - (self.sx * self.sx).sum(-1) / self.n,
            self.ly - (self.sy * self.sy).sum(-1) / self.n,
        )

    def hsic(self, debiased: bool) -> Float[Tensor, "P Q"]:
        """Linear-kernel HSIC for every pair, up to a factor that cancels in CKA.

        Biased: ``tr(KHLH) = ‖X_cᵀY_c‖²_F`` (the ``1/(n−1)²`` is dropped).
        Unbiased (Song et al. 2012), with ``K̃``, ``L̃`` the kernels with zeroed diagonal:
        ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``, each term
        rewritten through the accumulated ``d1 x d2`` statistics.
        """
        n = self.n
        # matmuls rather than elementwise ops, which would copy the [P, Q, d1, d2] statistics
        flat = self.xty.flatten(-2)
        sq = (flat[..., None, :] @ flat[..., :, None])[..., 0, 0]  # ‖XᵀY‖²_F, [P, Q]
        sx_xty_sy = ((self.sx[:, None, None, :] @ self.xty) @ self.sy[None, :, :, None])[..., 0, 0]
        sx2, sy2 = (self.sx * self.sx).sum(-1), (self.sy * self.sy).sum(-1)
        if not debiased:
            # ‖XᵀY − Σx Σyᵀ/n‖²_F expanded, so no centred [d1, d2] copy is needed
            return sq - 2 * sx_xty_sy / n + torch.outer(sx2, sy2) / n**2
        if n < 4:
            raise ValueError(f"debiased HSIC needs at least 4 tokens, got {n}")
        tr = sq - self.kl  # tr(K̃L̃)
        one_k_one = sx2 - self.kx  # 1ᵀK̃1, [P]
        one_l_one = sy2 - self.ly  # 1ᵀL̃1, [Q]
        # 1ᵀK̃L̃1 = Σ_t (x_t·Σx − ‖x_t‖²)(y_t·Σy − ‖y_t‖²)
        one_kl_one = (
            sx_xty_sy
            - torch.einsum("pd,pqd->pq", self.sx, self.x_l)
            - torch.einsum("qe,pqe->pq", self.sy, self.y_k)
            + self.kl
        )
        return (
            tr
            + one_k_one[:, None] * one_l_one[None, :] / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one_kl_one
        ) / (n * (n - 3))


def _batches(n: int, batch_size: int | None):
    step = n if not batch_size else batch_size
    for start in range(0, n, max(step, 1)):
        yield slice(start, min(start + step, n))


def _moments(x: Tensor, y: Tensor, batch_size: int | None) -> _CrossMoments:
    m = _CrossMoments()
    for s in _batches(x.shape[0], batch_size):
        m.update(x[None, s], y[None, s])
    return m


def _check_pair(X: Tensor, Y: Tensor) -> None:
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"expected 2-D activation matrices [n, d], got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must hold the same n inputs (rows): got {X.shape[0]} and {Y.shape[0]}"
        )
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 rows (inputs), got {X.shape[0]}")


def _cka_from(cross: Tensor, self_x: Tensor, self_y: Tensor) -> Tensor:
    return cross / (self_x.clamp_min(0).sqrt() * self_y.clamp_min(0).sqrt())


def linear_cka(
    X: Float[Tensor, "n d1"],
    Y: Float[Tensor, "n d2"],
    *,
    debiased: bool = False,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
) -> float:
    """Linear CKA between two activation matrices whose rows are the same inputs.

    Memory is ``O(d1·d2 + d1² + d2²)`` whatever ``n`` is: the statistics are accumulated
    over row batches of ``batch_size`` (``None`` = one batch).

    Args:
        X, Y: activations ``[n, d1]`` and ``[n, d2]``; any float dtype (computed in float64).
        debiased: use the unbiased HSIC estimator (Song et al. 2012), which removes the
            positive bias of CKA for finite ``n`` (it can then be slightly negative).
        batch_size: rows per accumulation step.

    Returns:
        A float, 1 for identical representations (up to rotation and scale).

    Example:
        >>> X = torch.randn(500, 32)
        >>> round(linear_cka(X, X @ torch.linalg.qr(torch.randn(32, 32))[0]), 6)
        1.0
    """
    _check_pair(X, Y)
    with torch.inference_mode():
        xy = _moments(X, Y, batch_size).hsic(debiased)
        xx = _moments(X, X, batch_size).hsic(debiased)
        yy = _moments(Y, Y, batch_size).hsic(debiased)
        return float(_cka_from(xy, xx, yy))


def procrustes_distance(
    X: Float[Tensor, "n d1"],
    Y: Float[Tensor, "n d2"],
    *,
    batch_size: int | None = DEFAULT_BATCH_SIZE,
) -> float:
    """Orthogonal Procrustes distance of Ding, Denain & Steinhardt (2021).

    With ``X̂ = X_c/‖X_c‖_F`` and ``Ŷ = Y_c/‖Y_c‖_F`` (centred over rows, unit Frobenius
    norm), ``d = min_R ‖Ŷ − X̂R‖²_F = 2 − 2‖X̂ᵀŶ‖_*`` over orthogonal ``R`` (zero-padding the
    narrower matrix when ``d1 != d2``). A distance in [0, 2]: 0 means one is a rotated and
    scaled copy of the other. This is the squared form of the paper; take ``sqrt`` for a
    metric. Memory ``O(d1·d2)``, accumulated over row batches.

    Example:
        >>> X = torch.randn(200, 8)
        >>> round(procrustes_distance(X, 3 * X @ torch.linalg.qr(torch.randn(8, 8))[0]), 6)
        0.0
    """
    _check_pair(X, Y)
    with torch.inference_mode():
        return float(_procrustes_from(_moments(X, Y, batch_size))[0, 0])


def _procrustes_from(m: _CrossMoments) -> Float[Tensor, "P Q"]:
    nx, ny = m.centred_sq_norms()
    P, Q = m.xty.shape[:2]
    nuc = torch.tensor(
        [[torch.linalg.matrix_norm(m.centred_cross(p, q), ord="nuc") for q in range(Q)] for p in range(P)],
        dtype=torch.float64,
        device=m.xty.device,
    )
    return (2 - 2 * nuc / (nx[:, None].sqrt() * ny[None, :].sqrt())).clamp_min(0)


# --------------------------------------------------------------------------------------
# RBF kernels (n x n)
# --------------------------------------------------------------------------------------


def _median(v: Tensor) -> Tensor:
    # Average of the two middle values, as numpy's median (torch.median takes the lower).
    v = v.sort().values
    k = v.numel()
    return (v[(k - 1) // 2] + v[k // 2]) / 2


def _rbf_kernel(X: Float[Tensor, "n d"], bandwidth: float) -> Float[Tensor, "n n"]:
    X = X.double()
    X = X - X.mean(0)
    sq = (X * X).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * X @ X.T).clamp_min(0)
    n = X.shape[0]
    iu = torch.triu_indices(n, n, 1, device=X.device)
    med = _median(d2[iu[0], iu[1]])
    if med <= 0:
        raise ValueError("median pairwise distance is 0 (too many identical rows) — RBF undefined")
    # sigma = bandwidth · median distance, so 2σ² = 2·bandwidth²·median(d²)
    return torch.exp(-d2 / (2 * bandwidth**2 * med))


def _hsic_kernel(K: Float[Tensor, "n n"], L: Float[Tensor, "n n"], debiased: bool) -> Tensor:
    """HSIC from full kernels: ``tr(KHLH)`` (biased) or Song et al.'s unbiased estimator."""
    n = K.shape[0]
    if not debiased:
        Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
        return (Kc * L).sum()  # tr(HKH L) = tr(KHLH)
    if n < 4:
        raise ValueError(f"debiased HSIC needs at least 4 rows, got {n}")
    K = K - torch.diag(torch.diag(K))
    L = L - torch.diag(torch.diag(L))
    Ks, Ls = K.sum(0), L.sum(0)
    return (
        (K * L).sum() + Ks.sum() * Ls.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (Ks @ Ls)
    ) / (n * (n - 3))


def _check_rbf_size(n: int, max_tokens: int) -> None:
    if n > max_tokens:
        raise ValueError(
            f"RBF CKA needs n x n kernels and n = {n} tokens exceeds max_tokens = {max_tokens} "
            f"(~{n * n * 8 / 2**20:.0f} MiB per kernel). Use metric='linear_cka' (memory-bounded), "
            "tokens='last', fewer sequences, or raise max_tokens."
        )


def rbf_cka(
    X: Float[Tensor, "n d1"],
    Y: Float[Tensor, "n d2"],
    *,
    bandwidth: float = 1.0,
    debiased: bool = False,
    max_tokens: int = DEFAULT_MAX_TOKENS_RBF,
) -> float:
    """CKA with Gaussian (RBF) kernels, ``k(x, x') = exp(−‖x − x'‖² / (2σ²))``.

    ``σ = bandwidth × median pairwise distance`` of each matrix's rows (the median
    heuristic; Kornblith et al. 2019 use fractions 0.2–1.0). Unlike linear CKA this builds
    the full ``n x n`` kernels — memory ``O(n²)`` — so it raises for ``n > max_tokens``.

    Example:
        >>> X = torch.randn(300, 16)
        >>> round(rbf_cka(X, -2 * X, bandwidth=0.8), 6)
        1.0
    """
    _check_pair(X, Y)
    _check_rbf_size(X.shape[0], max_tokens)
    with torch.inference_mode():
        K, L = _rbf_kernel(X, bandwidth), _rbf_kernel(Y, bandwidth)
        return float(
            _cka_from(
                _hsic_kernel(K, L, debiased),
                _hsic_kernel(K, K, debiased),
                _hsic_kernel(L, L, debiased),
            )
        )


# --------------------------------------------------------------------------------------
# Layer x layer similarity from ActivationCaches
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerSimilarity:
    """A labelled layer x layer similarity matrix.

    Attributes:
        matrix: ``[layer_a, layer_b]`` float64 values; rows are layers of cache A, columns
            layers of cache B (A again when no second cache was given).
        labels_a, labels_b: layer labels; for ``hook="resid_post"`` the number of blocks
            applied, ``"0"`` (= ``blocks.0.hook_resid_pre``) … ``"L"``.
        hooks_a, hooks_b: the hook name behind each row / column.
        metric: a name from :func:`list_metrics`; ``debiased`` and ``bandwidth`` as used.
        n_tokens: how many token positions (rows of X) the metric was computed on.

    Example:
        >>> sim = layer_similarity(cache)          # doctest: +SKIP
        >>> sim.to_frame().round(2)                # doctest: +SKIP
        >>> sim.plot()                             # doctest: +SKIP
    """

    matrix: Float[Tensor, "layer_a layer_b"]
    labels_a: list[str]
    labels_b: list[str]
    hooks_a: list[str]
    hooks_b: list[str]
    metric: str
    n_tokens: int
    debiased: bool = False
    tokens: str = "all"
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.labels_a), len(self.labels_b))
        if tuple(self.matrix.shape) != shape:
            raise ValueError(f"matrix shape {tuple(self.matrix.shape)} != labels {shape}")

    @property
    def info(self) -> SimilarityMetric:
        """The metric's declared range and direction."""
        return METRICS[self.metric]

    @property
    def name(self) -> str:
        """A display name such as ``"debiased linear CKA"``."""
        return ("debiased " if self.debiased else "") + self.info.label

    def diagonal(self) -> Float[Tensor, " layer"]:
        """Matched-layer values ``matrix[i, i]`` (square results only)."""
        return torch.diagonal(self.matrix)

    def to_frame(self):
        """The matrix as a pandas DataFrame indexed by ``labels_a``, columns ``labels_b``."""
        import pandas as pd

        return pd.DataFrame(
            self.matrix.numpy(),
            index=pd.Index(self.labels_a, name="layer_a"),
            columns=pd.Index(self.labels_b, name="layer_b"),
        )

    def plot(self, **kwargs):
        """A heatmap (:func:`mechnorm.plot.similarity_heatmap`); returned, not shown."""
        from mechnorm.plot import similarity_heatmap

        return similarity_heatmap(self, **kwargs)

    def _repr_html_(self) -> str:
        caption = f"{self.name}, {self.n_tokens} tokens ({self.tokens}); rows A, columns B"
        return f"<p>{caption}</p>" + self.to_frame().round(3).to_html()

    def __repr__(self) -> str:
        return (
            f"LayerSimilarity({self.name}, {len(self.labels_a)}x{len(self.labels_b)} layers, "
            f"n_tokens={self.n_tokens})\n{self.to_frame().round(3)}"
        )


def similarity_hooks(n_layers: int, hook: str = "resid_post", *, post_norm: bool = False) -> list[str]:
    """The hook names :func:`layer_similarity` reads, in layer order (a ``names_filter``).

    ``hook="resid_post"`` gives the L+1 residual-stream states of the project's layer
    convention: ``blocks.0.hook_resid_pre`` (layer 0, the embedding) then
    ``blocks.{i}.hook_resid_post`` (layer i+1; ``hook_normalized_resid_post`` for a post-LN
    ``HookedEncoder``, ``post_norm=True``). Any other name ``h`` (``"resid_mid"``,
    ``"mlp_out"``, ``"attn_out"``, …) gives ``blocks.{i}.hook_{h}`` for each block i.

    Example:
        >>> similarity_hooks(2)
        ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
        >>> # _, cache = model.run_with_cache(tokens, names_filter=similarity_hooks(2))
    """
    hook = hook.removeprefix("hook_")
    if hook in ("resid_post", "resid"):
        return [resid_hook(layer, post_norm) for layer in range(n_layers + 1)]
    return [f"blocks.{i}.hook_{hook}" for i in range(n_layers)]


def _layers(cache, hook: str) -> tuple[list[str], list[str]]:
    names = similarity_hooks(n_blocks(cache), hook, post_norm=is_post_norm(cache))
    missing = [h for h in names if h not in cache.keys()]
    if missing:
        raise MissingHooksError(
            f"layer_similarity(hook={hook!r}) needs activations the cache does not hold: {missing}. "
            f"Cache them with model.run_with_cache(tokens, names_filter={names!r})."
        )
    return names, [str(i) for i in range(len(names))]


def _token_index(
    shape: tuple[int, int],
    attention_mask: Tensor | None,
    tokens: str,
    device: torch.device,
) -> Int[Tensor, " n"]:
    """Flat indices into ``batch*pos`` of the positions to compare."""
    batch, pos = shape
    mask = check_mask(attention_mask, batch, pos, device=device)
    if tokens == "all":
        return mask.reshape(-1).nonzero().squeeze(1)
    if tokens == "last":
        # last True position, so left and right padding both work
        last = pos - 1 - mask.flip(1).int().argmax(1)
        return torch.arange(batch, device=device) * pos + last
    raise ValueError(f"tokens must be 'all' or 'last', got {tokens!r}")


def _activation(cache, name: str) -> Float[Tensor, "batch_pos d"]:
    act = cache[name]
    if act.ndim == 2:  # run_with_cache(remove_batch_dim=True)
        act = act[None]
    if act.ndim != 3:
        raise ValueError(f"{name}: expected [batch, pos, d_model], got {tuple(act.shape)}")
    return act


def layer_similarity(
    cache_a,
    cache_b=None,
    *,
    hook: str = "resid_post",
    tokens: Literal["all", "last"] = "all",
    attention_mask: Bool[Tensor, "batch pos"] | None = None,
    metric: str = "linear_cka",
    debiased: bool = False,
    bandwidth: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int = DEFAULT_MAX_TOKENS_RBF,
) -> LayerSimilarity:
    """Similarity of every layer of ``cache_a`` with every layer of ``cache_b``.

    The two caches must come from the same token batch (same ``[batch, pos]``), e.g. two
    models sharing a tokenizer; each token position is one row of the activation matrices.

    Args:
        cache_a, cache_b: TransformerLens ``ActivationCache``s (or dicts of hook name ->
            ``[batch, pos, d]``); ``cache_b=None`` compares ``cache_a`` with itself.
            They must hold :func:`similarity_hooks` for ``hook`` (the error lists them).
        hook: ``"resid_post"`` for the L+1 residual states (layer 0 = ``hook_resid_pre`` of
            block 0), or a per-block hook such as ``"resid_mid"``, ``"mlp_out"``.
        tokens: ``"all"`` real positions, or each sequence's ``"last"`` real token.
        attention_mask: ``[batch, pos]``, False at padding; padding is never compared.
        metric: ``"linear_cka"``, ``"rbf_cka"`` or ``"procrustes"`` (:func:`list_metrics`).
        debiased: unbiased HSIC for the CKA metrics.
        bandwidth: RBF ``σ`` as a fraction of the median pairwise distance.
        batch_size: tokens per accumulation step (linear CKA, Procrustes). Working memory is
            about ``(L_b+1)·(d_a·d_b + batch_size·d_b)`` float64 numbers (one row of layer
            pairs at a time), independent of the number of tokens.
        max_tokens: RBF only — it holds ``(L_b+2)`` ``n x n`` kernels and refuses beyond this.

    Returns:
        A :class:`LayerSimilarity`; ``.matrix [L_a+1, L_b+1]``, ``.to_frame()``, ``.plot()``.

    Example:
        >>> names = similarity_hooks(model.cfg.n_layers)                  # doctest: +SKIP
        >>> _, cache = model.run_with_cache(tokens, names_filter=names)   # doctest: +SKIP
        >>> layer_similarity(cache, attention_mask=mask).to_frame()       # doctest: +SKIP
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list_metrics()}")
    if metric == "procrustes" and debiased:
        raise ValueError("debiased applies to the CKA metrics only")
    same = cache_b is None
    cache_b = cache_a if same else cache_b
    hooks_a, labels_a = _layers(cache_a, hook)
    hooks_b, labels_b = _layers(cache_b, hook)
    acts_a = [_activation(cache_a, h) for h in hooks_a]
    acts_b = [_activation(cache_b, h) for h in hooks_b]
    shape = tuple(acts_a[0].shape[:2])
    if tuple(acts_b[0].shape[:2]) != shape:
        raise ValueError(
            f"the caches hold different token batches: [batch, pos] {shape} vs "
            f"{tuple(acts_b[0].shape[:2])}; run both models on the same tokens"
        )
    device = acts_a[0].device
    idx = _token_index(shape, attention_mask, tokens, device)
    n = idx.numel()
    if n < 2:
        raise ValueError(f"only {n} token(s) selected; need at least 2 to compare representations")

    def rows(acts: list[Tensor], s: slice | None = None) -> Float[Tensor, "layer b d"]:
        sel = idx if s is None else idx[s]
        out = torch.empty(len(acts), len(sel), acts[0].shape[-1], dtype=torch.float64, device=device)
        for k, a in enumerate(acts):
            out[k] = a.reshape(-1, a.shape[-1])[sel.to(a.device)]
        return out

    with torch.inference_mode():
        if metric == "rbf_cka":
            _check_rbf_size(n, max_tokens)
            kb = [_rbf_kernel(y, bandwidth) for y in rows(acts_b)]
            kb_self = torch.stack([_hsic_kernel(L, L, debiased) for L in kb])
            out = torch.zeros(len(hooks_a), len(hooks_b), dtype=torch.float64)
            for i, x in enumerate(rows(acts_a)):
                K = _rbf_kernel(x, bandwidth)
                k_self = _hsic_kernel(K, K, debiased)
                for j, L in enumerate(kb):
                    out[i, j] = _cka_from(_hsic_kernel(K, L, debiased), k_self, kb_self[j])
        else:
            out = _linear_matrix(acts_a, acts_b, rows, n, batch_size, metric, debiased, same)

    return LayerSimilarity(
        matrix=out.cpu(),
        labels_a=labels_a,
        labels_b=labels_b,
        hooks_a=hooks_a,
        hooks_b=hooks_b,
        metric=metric,
        n_tokens=n,
        debiased=debiased,
        tokens=tokens,
        params={"bandwidth": bandwidth} if metric == "rbf_cka" else {},
    )


def _linear_matrix(acts_a, acts_b, rows, n, batch_size, metric, debiased, same) -> Tensor:
    """Row by row: one layer of A against all layers of B, streaming token batches."""

    def stream(xs: list[Tensor], ys: list[Tensor]) -> _CrossMoments:
        m = _CrossMoments()
        for s in _batches(n, batch_size):
            m.update(rows(xs, s), rows(ys, s), owned=True)
        return m

    out = torch.zeros(len(acts_a), len(acts_b), dtype=torch.float64)
    self_a = self_b = None
    if metric == "linear_cka":
        # ‖X_cᵀX_c‖ for each layer on its own (d² memory per layer, not per pair)
        self_a = torch.stack([stream([a], [a]).hsic(debiased)[0, 0] for a in acts_a])
        self_b = self_a if same else torch.stack([stream([b], [b]).hsic(debiased)[0, 0] for b in acts_b])
    for i, a in enumerate(acts_a):
        cols = list(range(i, len(acts_b))) if same else list(range(len(acts_b)))
        m = stream([a], [acts_b[j] for j in cols])
        if metric == "linear_cka":
            vals = _cka_from(m.hsic(debiased)[0], self_a[i], self_b[cols].to(m.xty.device))
        else:
            vals = _procrustes_from(m)[0]
        out[i, cols] = vals.cpu()
        if same:
            out[cols, i] = vals.cpu()
        del m  # free this row's statistics before the next row allocates its own
    return out
