"""Rank agreement between methods and the cascading model-randomisation check."""

from __future__ import annotations

import itertools

import pytest
import torch

import mechnorm
from mechnorm import evaluate
from mechnorm.evaluate import randomization_check, randomize_blocks, rank_agreement, rank_correlation



def spearman_by_formula(x: list[float], y: list[float]) -> float:
    """1 − 6 Σ d² / (n (n² − 1)) on tie-free data."""
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}  # noqa: E731
    rx, ry, n = rank(x), rank(y), len(x)
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def kendall_by_pairs(x: list[float], y: list[float]) -> float:
    """(concordant − discordant) / number of pairs, on tie-free data."""
    signs = [(x[i] - x[j]) * (y[i] - y[j]) for i, j in itertools.combinations(range(len(x)), 2)]
    return (sum(s > 0 for s in signs) - sum(s < 0 for s in signs)) / len(signs)


def test_correlations_match_their_formulas():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    valid = torch.ones(6, 8, dtype=torch.bool)
    valid[3, 5:] = False
    spearman, kendall = rank_correlation(a, b, valid)
    for i in range(6):
        x, y = a[i, valid[i]].tolist(), b[i, valid[i]].tolist()
        assert spearman[i] == pytest.approx(spearman_by_formula(x, y))
        assert kendall[i] == pytest.approx(kendall_by_pairs(x, y))
    constant = rank_correlation(torch.ones(1, 4), torch.randn(1, 4), torch.ones(1, 4, dtype=torch.bool))[0]
    assert torch.isnan(torch.tensor(constant)).all()


def test_rank_agreement_pairs_layers_and_excludes_positions():
    scores = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.bool)
    layered = mechnorm.Attribution(scores, (0, 1, 2), mask, "normxlogit")
    flipped = mechnorm.Attribution(-scores, (0, 1, 2), mask, "negated")
    single = mechnorm.Attribution(scores[2:], (0,), mask, "single")
    frame = rank_agreement({"normxlogit": layered, "negated": flipped, "single": single}, exclude=torch.tensor([5, 5]))
    pair = frame[(frame.method_a == "normxlogit") & (frame.method_b == "negated")]
    assert pair.layer_a.tolist() == [0, 1, 2] == pair.layer_b.tolist()
    assert pair.spearman.tolist() == pytest.approx([-1.0] * 3) and pair.kendall.tolist() == pytest.approx([-1.0] * 3)
    with_single = frame[(frame.method_a == "normxlogit") & (frame.method_b == "single")]
    assert with_single.layer_a.tolist() == [0, 1, 2] and with_single.layer_b.tolist() == [0, 0, 0]
    assert with_single.spearman.iloc[2] == pytest.approx(1.0)  # layer 2 row is the same scores
    # excluding position 5 changes the numbers exactly as dropping it does
    expected = rank_correlation(scores[0, :, :5], scores[2, :, :5], torch.ones(2, 5, dtype=torch.bool))[0].mean()
    assert with_single.spearman.iloc[0] == pytest.approx(expected)
    assert set(frame.n) == {2}


def test_randomization_cascade_on_a_copy(load):
    model = load("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scrambled = randomize_blocks(model, 1, seed=0)
    changed = [k for k, v in scrambled.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("blocks.1.") for k in changed)  # only the top block
    batch = mechnorm.tokenize(model, ["the keys to the old cabinet", "a dog near the red tables runs and", "the key is"])
    frame = randomization_check(model, batch, ["normxlogit", "embedding_norm", "random"], seed=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # caller's model untouched
    by = frame.set_index(["method", "n_randomized"]).spearman
    assert by[("normxlogit", 0)] == pytest.approx(1.0)  # nothing randomised: identical
    assert by[("normxlogit", 2)] < 0.99  # all blocks randomised: the explanation moves
    # the input-embedding norm never reads the blocks: it cannot notice (the check's point)
    assert [by[("embedding_norm", n)] for n in (0, 1, 2)] == pytest.approx([1.0] * 3)
    assert abs(by[("random", 0)]) < 0.9  # a fresh seed each step
    with pytest.raises(ValueError, match="n_blocks must be in 0…2"):
        randomize_blocks(model, 3)


def test_unknown_method_names_the_registry():
    with pytest.raises(KeyError, match="Known methods.*'random'"):
        evaluate.attributions(None, None, ["normxlogitt"], None)
