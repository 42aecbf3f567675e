"""Tests for mechnorm.similarity (CKA, Procrustes, layer_similarity) and the heatmap.

Reference values come from direct numpy implementations of the published formulas:
HSIC = tr(KHLH)/(n-1)² with the centring matrix H (Gretton et al. 2005; Kornblith et al.
2019), the unbiased HSIC of Song et al. (2012), Kornblith's U-centred Gram form of debiased
CKA, and Ding et al.'s (2021) Procrustes distance min_R ‖B − AR‖²_F.
"""

import numpy as np
import plotly.graph_objects as go
import pytest
import scipy.linalg
import torch
from conftest import random_hooked_transformer

from mechnorm.plot import similarity_heatmap
from mechnorm.residual import MissingHooksError
from mechnorm.similarity import (
    layer_similarity,
    linear_cka,
    procrustes_distance,
    rbf_cka,
    similarity_hooks,
)



# ---------------------------------------------------------------- numpy references


def np_hsic(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def np_hsic_unbiased(K, L):
    """Song et al. (2012), eq. 5."""
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ Kt @ Lt @ one
    ) / (n * (n - 3))


def np_u_centre(G):
    """Kornblith et al.'s center_gram(unbiased=True) (Székely & Rizzo U-centring)."""
    G = G.copy()
    n = G.shape[0]
    np.fill_diagonal(G, 0)
    means = G.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    G -= means[:, None]
    G -= means[None, :]
    np.fill_diagonal(G, 0)
    return G


def np_cka(K, L, hsic):
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def np_linear_cka(X, Y, debiased=False):
    X, Y = np.asarray(X, float), np.asarray(Y, float)
    return np_cka(X @ X.T, Y @ Y.T, np_hsic_unbiased if debiased else np_hsic)


def np_rbf(X, frac):
    sq = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    med = np.median(sq[np.triu_indices(len(X), 1)])
    return np.exp(-sq / (2 * frac**2 * med))


def np_procrustes(X, Y):
    A = X - X.mean(0)
    B = Y - Y.mean(0)
    A, B = A / np.linalg.norm(A), B / np.linalg.norm(B)
    R, _ = scipy.linalg.orthogonal_procrustes(A, B)  # min_R ‖AR − B‖_F, R orthogonal
    return np.linalg.norm(A @ R - B) ** 2


def related(n=200, d1=12, d2=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g)
    Y = torch.tanh(X[:, :6] @ torch.randn(6, d2, generator=g)) + 0.3 * torch.randn(n, d2, generator=g) + 4.0
    return X, Y


def rotation(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


# ---------------------------------------------------------------- metric values


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_matches_numpy_formulas(debiased):
    X, Y = related()
    ref = np_linear_cka(X.numpy(), Y.numpy(), debiased)
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(ref, abs=1e-10)
    assert 0.2 < ref < 0.95  # a non-trivial case


def test_debiased_hsic_equals_kornblith_u_centring():
    # two published forms of the same estimator agree, so the reference itself is right
    X, Y = (a.double().numpy() for a in related())
    K, L = X @ X.T, Y @ Y.T
    n = len(X)
    u = (np_u_centre(K) * np_u_centre(L)).sum() / (n * (n - 3))
    assert u == pytest.approx(np_hsic_unbiased(K, L), rel=1e-9)
    ref = np_cka(K, L, lambda a, b: (np_u_centre(a) * np_u_centre(b)).sum())
    assert linear_cka(torch.tensor(X), torch.tensor(Y), debiased=True) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("frac", [0.5, 1.0])
def test_rbf_cka_matches_numpy(debiased, frac):
    X, Y = related(n=120)
    hsic = np_hsic_unbiased if debiased else np_hsic
    ref = np_cka(np_rbf(X.double().numpy(), frac), np_rbf(Y.double().numpy(), frac), hsic)
    assert rbf_cka(X, Y, bandwidth=frac, debiased=debiased) == pytest.approx(ref, abs=1e-10)


def test_bandwidth_changes_rbf_cka():
    X, Y = related(n=120)
    assert abs(rbf_cka(X, Y, bandwidth=0.2) - rbf_cka(X, Y, bandwidth=2.0)) > 1e-3


@pytest.mark.parametrize("d2", [12, 9])
def test_procrustes_matches_numpy(d2):
    X, Y = related(d2=d2)
    Xn, Yn = X.double().numpy(), Y.double().numpy()
    if d2 < 12:  # orthogonal Procrustes between widths: zero-pad the narrower matrix
        Yn = np.hstack([Yn, np.zeros((len(Yn), 12 - d2))])
    assert procrustes_distance(X, Y) == pytest.approx(np_procrustes(Xn, Yn), abs=1e-10)


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_itself_is_one(debiased):
    X, _ = related()
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_rotation_scale_and_shift():
    X, Y = (a.double() for a in related())  # float64 so the transform itself is exact enough
    Yt = 7.5 * Y @ rotation(Y.shape[1]) - 3.0
    for deb in (False, True):
        assert linear_cka(X, Yt, debiased=deb) == pytest.approx(linear_cka(X, Y, debiased=deb), abs=1e-10)
        assert rbf_cka(X, Yt, debiased=deb) == pytest.approx(rbf_cka(X, Y, debiased=deb), abs=1e-10)
    assert procrustes_distance(X, Yt) == pytest.approx(procrustes_distance(X, Y), abs=1e-10)
    # but not to an arbitrary (non-orthogonal) linear map
    A = torch.randn(Y.shape[1], Y.shape[1], generator=torch.Generator().manual_seed(3)).double()
    assert abs(linear_cka(X, Y @ A) - linear_cka(X, Y)) > 1e-3


def test_procrustes_zero_for_rotated_copy_and_positive_otherwise():
    X, Y = related()
    assert procrustes_distance(X, 0.1 * X.double() @ rotation(12) + 5) == pytest.approx(0.0, abs=1e-10)
    # a rotated copy living in a wider space
    wide = torch.cat([X, torch.zeros(len(X), 4)], 1).double() @ rotation(16)
    assert procrustes_distance(X, wide) == pytest.approx(0.0, abs=1e-10)
    assert 0.1 < procrustes_distance(X, Y) <= 2.0


def test_debiased_cka_near_zero_for_independent_data():
    g = torch.Generator().manual_seed(0)
    biased, debiased = [], []
    for n in (100, 400, 1600):
        X, Y = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
        biased.append(linear_cka(X, Y))
        debiased.append(abs(linear_cka(X, Y, debiased=True)))
    assert all(d < b for d, b in zip(debiased, biased))
    assert biased[-1] > 0.01  # biased CKA stays visibly above 0 at this n
    assert debiased[-1] < 0.005
    assert biased[0] > biased[1] > biased[2]


def test_batched_accumulation_equals_one_shot():
    X, Y = related(n=257)
    for deb in (False, True):
        one = linear_cka(X, Y, debiased=deb, batch_size=None)
        assert linear_cka(X, Y, debiased=deb, batch_size=7) == pytest.approx(one, abs=1e-12)
    assert procrustes_distance(X, Y, batch_size=10) == pytest.approx(
        procrustes_distance(X, Y, batch_size=None), abs=1e-12
    )


def test_bad_inputs():
    X, Y = related()
    with pytest.raises(ValueError, match="same n"):
        linear_cka(X, Y[:-1])
    with pytest.raises(ValueError, match="max_tokens"):
        rbf_cka(X, Y, max_tokens=100)


# ---------------------------------------------------------------- layer_similarity


def tiny_model(n_layers=2, d_model=16, act_fn="gelu", seed=0):
    return random_hooked_transformer(n_layers, d_model, act_fn, seed, n_ctx=16, d_vocab=23)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(model, tokens, mask=None):
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens, attention_mask=mask, names_filter=similarity_hooks(model.cfg.n_layers)
        )
    return cache


TOKENS = torch.randint(0, 23, (6, 10), generator=torch.Generator().manual_seed(0))


def test_layer_similarity_with_itself(model):
    sim = layer_similarity(run(model, TOKENS))
    L = model.cfg.n_layers
    assert sim.matrix.shape == (L + 1, L + 1)
    assert torch.allclose(sim.diagonal(), torch.ones(L + 1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sim.matrix, sim.matrix.T)
    assert sim.labels_a == ["0", "1", "2"] and sim.n_tokens == 60
    assert sim.hooks_a == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    frame = sim.to_frame()
    assert list(frame.index) == sim.labels_a and list(frame.columns) == sim.labels_b
    assert "<table" in sim._repr_html_() and "linear CKA" in repr(sim)


def test_layer_similarity_accepts_a_plain_dict(model):
    cache = run(model, TOKENS)
    as_dict = {name: cache[name] for name in cache.keys()}  # no .model: layers read from the keys
    assert torch.allclose(layer_similarity(as_dict).matrix, layer_similarity(cache).matrix)


@pytest.mark.parametrize("metric", ["linear_cka", "procrustes", "rbf_cka"])
def test_layer_similarity_entries_match_pairwise_metric(metric):
    a, b = tiny_model(2, 16), tiny_model(3, 8, act_fn="solu_ln", seed=1)  # depth and width differ
    ca, cb = run(a, TOKENS), run(b, TOKENS)
    sim = layer_similarity(ca, cb, metric=metric, batch_size=13)
    assert sim.matrix.shape == (3, 4)
    fn = {"linear_cka": linear_cka, "procrustes": procrustes_distance, "rbf_cka": rbf_cka}[metric]
    for i, ha in enumerate(sim.hooks_a):
        for j, hb in enumerate(sim.hooks_b):
            ref = fn(ca[ha].reshape(-1, 16), cb[hb].reshape(-1, 8))
            assert sim.matrix[i, j].item() == pytest.approx(ref, abs=1e-9)


def test_layer_similarity_batched_equals_one_shot(model):
    cache = run(model, TOKENS)
    for deb in (False, True):
        one = layer_similarity(cache, debiased=deb, batch_size=10**6).matrix
        assert torch.allclose(layer_similarity(cache, debiased=deb, batch_size=7).matrix, one, atol=1e-12)


def padded_batch(lengths, side):
    seqs = [TOKENS[i, :n] for i, n in enumerate(lengths)]
    pos = max(lengths)
    toks = torch.full((len(seqs), pos), 5)  # a real token id: padding must be masked, not inert
    mask = torch.zeros(len(seqs), pos, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(pos - len(s), pos)
        toks[i, sl], mask[i, sl] = s, True
    return seqs, toks, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("tokens", ["all", "last"])
def test_padding_is_excluded(model, side, tokens):
    lengths = [10, 4, 7, 3, 9, 6]
    seqs, toks, mask = padded_batch(lengths, side)
    sim = layer_similarity(run(model, toks, mask), attention_mask=mask, tokens=tokens)
    # reference: each sequence run on its own, unpadded, rows gathered by hand
    hooks = similarity_hooks(model.cfg.n_layers)
    caches = [run(model, s[None]) for s in seqs]
    take = (lambda a: a[0]) if tokens == "all" else (lambda a: a[0, -1:])
    acts = {h: torch.cat([take(c[h]) for c in caches]) for h in hooks}
    assert sim.n_tokens == (sum(lengths) if tokens == "all" else len(seqs))
    for i, hi in enumerate(hooks):
        for j, hj in enumerate(hooks):
            assert sim.matrix[i, j].item() == pytest.approx(linear_cka(acts[hi], acts[hj]), abs=1e-6)
    if tokens == "last" and side == "left":
        return  # the last position is always real under left padding
    # and the mask matters: without it the padding positions change the matrix
    unmasked = layer_similarity(run(model, toks, mask), tokens=tokens)
    assert not torch.allclose(unmasked.matrix, sim.matrix, atol=1e-4)


def test_missing_hooks_error_lists_names_filter(model):
    with torch.inference_mode():
        _, cache = model.run_with_cache(TOKENS, names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(MissingHooksError, match=r"blocks\.1\.hook_resid_post") as err:
        layer_similarity(cache)
    assert "names_filter" in str(err.value)


def test_layer_similarity_errors(model):
    cache = run(model, TOKENS)
    with pytest.raises(ValueError, match="different token batches"):
        layer_similarity(cache, run(model, TOKENS[:3]))
    with pytest.raises(ValueError, match="max_tokens"):
        layer_similarity(cache, metric="rbf_cka", max_tokens=10)
    with pytest.raises(ValueError, match="unknown metric"):
        layer_similarity(cache, metric="svcca")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        layer_similarity(cache, attention_mask=torch.ones(6, 9, dtype=torch.bool))


def test_other_hooks(model):
    with torch.inference_mode():
        _, cache = model.run_with_cache(TOKENS, names_filter=similarity_hooks(2, "mlp_out"))
    sim = layer_similarity(cache, hook="mlp_out")
    assert sim.matrix.shape == (2, 2) and sim.hooks_a == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


# ---------------------------------------------------------------- heatmap


def test_similarity_heatmap_from_result(model):
    sim = layer_similarity(run(model, TOKENS))
    fig = sim.plot(title="self")
    assert isinstance(fig, go.Figure)
    heat = fig.data[0]
    assert list(heat.x) == sim.labels_b and list(heat.y) == sim.labels_a
    assert np.allclose(np.asarray(heat.z, dtype=float), sim.matrix.numpy())
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert fig.layout.title.text == "self"
    assert "layer of A" in fig.layout.yaxis.title.text and "layer of B" in fig.layout.xaxis.title.text
    assert fig.layout.template.layout.paper_bgcolor == "white"

    dist = similarity_heatmap(layer_similarity(run(model, TOKENS), metric="procrustes"))
    assert dist.data[0].zmax == 2.0 and dist.data[0].reversescale
    assert "Procrustes" in dist.layout.title.text


def test_similarity_heatmap_from_frame_and_tensor(model):
    frame = layer_similarity(run(model, TOKENS)).to_frame()
    fig = similarity_heatmap(frame)
    assert list(fig.data[0].x) == ["0", "1", "2"]
    fig = similarity_heatmap(torch.eye(2), labels_x=["a", "b"], labels_y=["c", "d"])
    assert list(fig.data[0].y) == ["c", "d"]
    with pytest.raises(ValueError, match="labels"):
        similarity_heatmap(torch.eye(2), labels_x=["a"])
