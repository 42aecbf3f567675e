"""Evidence alignment: average precision, cue mass and hit@k against hand and brute-force computation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import mechnorm
from mechnorm.evaluate import average_precision, cue_mass, expected_random_ap, hit_at_k, random_attribution


def reference_ap(scores: list[float], cues: set[int]) -> float:
    """Textbook AP for tie-free scores: mean over cues of precision at the cue's rank."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, index in enumerate(order, start=1):
        if index in cues:
            hits += 1
            total += hits / rank
    return total / len(cues)


def test_hand_computed_cases():
    assert average_precision(torch.tensor([[0.9, 0.1, 0.5]]), [[0, 1]]).tolist() == pytest.approx([(1 + 2 / 3) / 2])
    # every cue ranked above every other token: AP = 1, whatever the number of cues
    scores = torch.tensor([[0.1, 5.0, 0.3, 4.0, 0.2]])
    assert average_precision(scores, [[1, 3]]).tolist() == [1.0]
    assert average_precision(scores, [[0]]).tolist() == pytest.approx([1 / 5])  # ranked last
    assert cue_mass(torch.tensor([[3.0, 1.0, 0.0]]), [[0]]).tolist() == [0.75]
    assert cue_mass(torch.tensor([[-1.0, 3.0]]), [[0]]).tolist() == [-0.25]  # signed share of |mass|


def test_matches_an_independent_implementation():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 9, generator=generator)
    cues = [sorted(torch.randperm(9, generator=generator)[: 1 + i % 4].tolist()) for i in range(50)]
    expected = [reference_ap(row.tolist(), set(c)) for row, c in zip(scores, cues)]
    assert average_precision(scores, cues).tolist() == pytest.approx(expected, abs=1e-6)


def test_ties_give_no_credit_for_position_order():
    """A constant score is one threshold: precision = cue share for every cue."""
    assert average_precision(torch.zeros(1, 8), [[0, 1]]).tolist() == pytest.approx([2 / 8])
    assert average_precision(torch.zeros(1, 8), [[6, 7]]).tolist() == pytest.approx([2 / 8])


def test_expected_random_ap_by_enumeration_and_sampling():
    for n, r in ((5, 2), (6, 1), (4, 4)):
        brute = [reference_ap([-p for p in perm], set(range(r))) for perm in itertools.permutations(range(n))]
        assert expected_random_ap(n, r) == pytest.approx(sum(brute) / len(brute))
    # random rankings averaged over many seeds approach it
    mask = torch.ones(2000, 10, dtype=torch.bool)
    ap = average_precision(random_attribution(mask, seed=7), [[2, 5]] * 2000, mask)
    tolerance = 4 * float(ap.std()) / math.sqrt(2000)
    assert abs(float(ap.mean()) - expected_random_ap(10, 2)) < tolerance
    # above the cue share R/N on short sequences (0.37 vs 0.2 here), close to it on long ones
    assert expected_random_ap(10, 2) > 2 / 10 and expected_random_ap(1000, 100) == pytest.approx(0.1, abs=0.01)


def test_hit_at_k_matches_sorting_by_hand():
    """Tie-free scores: a hit iff some cue is among the k largest, found here by argsort."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(200, 7, generator=generator)
    cues = [sorted(torch.randperm(7, generator=generator)[: 1 + i % 3].tolist()) for i in range(200)]
    for k in (1, 2, 4):
        top = scores.argsort(-1, descending=True)[:, :k].tolist()
        expected = [float(bool(set(t) & set(c))) for t, c in zip(top, cues)]
        assert hit_at_k(scores, cues, k=k).tolist() == expected
    assert hit_at_k(scores, cues, k=7).tolist() == [1.0] * 200  # every token is in the top 7


def test_hit_at_k_ties_exclusion_and_layers():
    # ties rank pessimistically: a constant score finds no cue, whatever the cue's position
    assert hit_at_k(torch.zeros(2, 4), [[0], [3]]).tolist() == [0.0, 0.0]
    assert hit_at_k(torch.tensor([[1.0, 1.0, 0.0]]), [[0]], k=2).tolist() == [1.0]
    # the excluded prediction position cannot take the top place, and a sequence without cues is NaN
    scores = torch.tensor([[0.1, 0.7, 0.3, 5.0]])
    assert hit_at_k(scores, [[1]]).tolist() == [0.0]
    assert hit_at_k(scores, [[1]], exclude=torch.tensor([3])).tolist() == [1.0]
    assert math.isnan(hit_at_k(scores, [[3]], exclude=3).item())
    # left padding and layers: each layer as for that row alone
    layered = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[False, True, True, True, True], [True] * 5])
    attr = mechnorm.Attribution(layered, (0, 1, 2), mask, "demo")
    per_layer = hit_at_k(attr, [[2], [0, 4]])
    for row in range(3):
        assert torch.equal(per_layer[row], hit_at_k(layered[row], [[2], [0, 4]], mask))
    with pytest.raises(ValueError, match="positive whole number"):
        hit_at_k(scores, [[1]], k=0)


def test_exclusion_layers_and_padding():
    scores = torch.tensor([[9.0, 0.2, 0.8, 0.1]])
    assert average_precision(scores, [[2]]).tolist() == pytest.approx([0.5])
    assert average_precision(scores, [[2]], exclude=torch.tensor([0])).tolist() == [1.0]  # predicted position out
    assert math.isnan(average_precision(scores, [[0]], exclude=0).item())  # no cue left
    # an Attribution with several layers gives one row per layer, each as for that row alone
    layered = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    attr = mechnorm.Attribution(layered, (0, 1, 2), mask, "demo")
    per_layer = average_precision(attr, [[1, 3], [0]], exclude=torch.tensor([4, 2]))
    assert per_layer.shape == (3, 2)
    for row in range(3):
        alone = average_precision(layered[row], [[1, 3], [0]], mask, exclude=torch.tensor([4, 2]))
        assert torch.allclose(per_layer[row], alone)
    # the same sequence padded on the left scores the same
    right = average_precision(torch.tensor([[0.3, 0.9, 0.1, 0.0]]), [[1]], torch.tensor([[True, True, True, False]]))
    left = average_precision(torch.tensor([[0.0, 0.3, 0.9, 0.1]]), [[2]], torch.tensor([[False, True, True, True]]))
    assert torch.equal(right, left)
    assert torch.equal(cue_mass(attr, [[1, 3], [0]]).isnan(), torch.zeros(3, 2, dtype=torch.bool))


def test_bad_cues_error_clearly():
    with pytest.raises(ValueError, match="beyond its 3 positions"):
        average_precision(torch.zeros(1, 3), [[5]])
    with pytest.raises(ValueError, match="fall on padding"):
        average_precision(torch.zeros(1, 3), [[2]], torch.tensor([[True, True, False]]))
    with pytest.raises(ValueError, match="one list per sequence"):
        cue_mass(torch.zeros(2, 3), [[1]])
    with pytest.raises(ValueError, match="n_cues"):
        expected_random_ap(3, 4)
