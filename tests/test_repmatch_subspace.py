"""RepMatch's φ: analytic cases, properties, and a numpy recomputation per layer and matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig

from mechnorm.repmatch import Adapter, grassmann, left_singular_vectors, similarity_matrix, subspace_similarity

D_OUT, D_IN = 12, 9


def make_adapter(factors: dict, rank: int) -> Adapter:
    """An Adapter from ``{(layer, matrix): (B, A)}`` with peft's saved key names."""
    state = {}
    for (layer, matrix), (B, A) in factors.items():
        module = f"base_model.model.encoder.layer.{layer}.attention.self.{matrix}"
        state[f"{module}.lora_A.weight"] = A.float()
        state[f"{module}.lora_B.weight"] = B.float()
    return Adapter(LoraConfig(r=rank, target_modules=["query", "value"]), state)


def random_adapter(seed: int, rank: int = 3, layers: int = 2) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return make_adapter({(l, m): (torch.randn(D_OUT, rank, generator=g), torch.randn(rank, D_IN, generator=g))
                         for l in range(layers) for m in ("query", "value")}, rank)


def numpy_phi(Ba, Aa, Bb, Ab) -> float:
    """φ as the authors compute it: full SVD of ΔW, then a loop over (i, j)."""
    Ua = np.linalg.svd(Ba.double().numpy() @ Aa.double().numpy())[0]
    Ub = np.linalg.svd(Bb.double().numpy() @ Ab.double().numpy())[0]
    ra, rb = Ba.shape[1], Bb.shape[1]
    return max(np.linalg.norm(Ua[:, :i].T @ Ub[:, :j], "fro") ** 2 / min(i, j)
               for i in range(1, ra + 1) for j in range(1, rb + 1))


def test_left_singular_vectors_match_full_svd_subspaces():
    B, A = torch.randn(D_OUT, 3, dtype=torch.float64), torch.randn(3, D_IN, dtype=torch.float64)
    U = left_singular_vectors(B, A)
    U_full = torch.linalg.svd(B @ A)[0][:, :3]
    for k in range(1, 4):  # each top-k subspace (same projector), signs aside
        assert torch.allclose(U[:, :k] @ U[:, :k].T, U_full[:, :k] @ U_full[:, :k].T, atol=1e-10)


def test_phi_is_one_against_itself_and_a_rescaled_rotated_copy():
    a = random_adapter(0)
    assert subspace_similarity(a, a).frame["phi"].tolist() == pytest.approx([1.0] * 4, abs=1e-9)
    g = torch.Generator().manual_seed(5)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    copy = make_adapter({k: (7.5 * B @ rotation, torch.randn(3, D_IN, generator=g)) for k, (B, _) in a.factors().items()}, 3)
    # Same column space, different singular values and vectors: the full r-subspaces coincide.
    assert subspace_similarity(a, copy).frame["phi"].tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_phi_is_zero_for_orthogonal_subspaces():
    eye = torch.eye(D_OUT)
    A = torch.randn(2, D_IN)
    a = make_adapter({(0, "query"): (eye[:, :2], A)}, 2)
    b = make_adapter({(0, "query"): (eye[:, 2:4] * 3.0, A)}, 2)
    assert subspace_similarity(a, b).mean == pytest.approx(0.0, abs=1e-12)


def test_phi_symmetric_in_unit_interval_and_equal_to_numpy_per_layer():
    a, b = random_adapter(1, rank=3), random_adapter(2, rank=2)
    ab, ba = subspace_similarity(a, b), subspace_similarity(b, a)
    assert np.allclose(ab.frame["phi"], ba.frame["phi"], atol=1e-12)
    assert ((ab.frame["phi"] >= 0) & (ab.frame["phi"] <= 1)).all()
    fa, fb = a.factors(), b.factors()
    for row in ab.frame.itertuples():
        key = (row.layer, row.matrix)
        assert row.phi == pytest.approx(numpy_phi(*fa[key], *fb[key]), abs=1e-6)
    assert ab.mean == pytest.approx(ab.frame["phi"].mean())
    assert len(ab.by_layer()) == 2


def test_grassmann_partial_overlap_analytic():
    # U_a = (e1, e2), U_b = (e3, (e1+e4)/√2): (U_aᵀU_b)² = [[0, .5], [0, 0]], so
    # φ(1,1) = 0, φ(2,1) = 0, φ(1,2) = .5/1, φ(2,2) = .5/2 -> max 0.5.
    e = torch.eye(5, dtype=torch.float64)
    U_a = e[:, [0, 1]]
    U_b = torch.stack([e[:, 2], (e[:, 0] + e[:, 3]) / 2**0.5], 1)
    assert float(grassmann(U_a, U_b)) == pytest.approx(0.5)


def test_similarity_matrix_equals_pairwise_and_is_symmetric():
    adapters = {f"s{i}": random_adapter(i) for i in range(3)}
    sims = similarity_matrix(adapters)
    mean = sims.mean()
    assert np.allclose(np.diag(mean), 1.0, atol=1e-9)
    assert np.allclose(mean.to_numpy(), mean.to_numpy().T)
    assert mean.loc["s0", "s2"] == pytest.approx(subspace_similarity(adapters["s0"], adapters["s2"]).mean)
    assert sims.at(1, "value").loc["s1", "s2"] == pytest.approx(
        subspace_similarity(adapters["s1"], adapters["s2"]).frame.query("layer == 1 and matrix == 'value'")["phi"].item())
    assert sims.plot().data[0].type == "heatmap"


def test_bad_inputs_say_what_to_do():
    zero = make_adapter({(0, "query"): (torch.zeros(D_OUT, 2), torch.randn(2, D_IN))}, 2)
    with pytest.raises(ValueError, match="untrained"):
        subspace_similarity(zero, random_adapter(0))
    other = make_adapter({(5, "key"): (torch.randn(D_OUT, 2), torch.randn(2, D_IN))}, 2)
    with pytest.raises(ValueError, match="share no adapted matrix"):
        subspace_similarity(other, random_adapter(0))
    with pytest.raises(TypeError, match="peft adapter folder"):
        subspace_similarity(3, random_adapter(0))
