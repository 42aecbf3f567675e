"""Tests for mechnorm.stitching on tiny random HookedTransformers."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_hooked_transformer

from mechnorm.stitching import StitchData, stitch, stitched_loss



def tiny_model(n_layers=2, d_model=16, act_fn="gelu", seed=0):
    return random_hooked_transformer(n_layers, d_model, act_fn, seed, n_ctx=12, d_vocab=19)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def data(n=24, pos=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 19, (n, pos), generator=g)
    mask = torch.ones(n, pos, dtype=torch.bool)
    mask[::3, 5:] = False  # some right padding
    return StitchData(tokens, attention_mask=mask)


def own_loss(model, d: StitchData) -> float:
    """B's next-token loss on the scored positions, computed directly."""
    with torch.no_grad():
        logits = model(d.tokens, attention_mask=d.attention_mask)
    sel = d.loss_mask[:, :-1]
    return F.cross_entropy(logits[:, :-1][sel], d.tokens[:, 1:][sel]).item()


def test_layer_range(model):
    with pytest.raises(ValueError, match="0..2"):
        stitch(model, 3, model, 1, data(), steps=0)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_identity_stitch_reproduces_own_loss(model, layer):
    d = data()
    r = stitch(model, layer, model, layer, d, steps=0, init="identity")
    assert r.loss_b == pytest.approx(own_loss(model, d), abs=1e-5)
    assert r.loss == pytest.approx(r.loss_b, abs=1e-5)
    assert r.accuracy == pytest.approx(r.accuracy_b)


def test_stitch_actually_injects(model):
    # identity from layer 0 into layer 2 skips both blocks: B's loss must change
    r = stitch(model, 0, model, 2, data(), steps=0, init="identity")
    assert abs(r.loss - r.loss_b) > 1e-3


def test_lstsq_init_of_same_layer_is_nearly_identity(model):
    r = stitch(model, 1, model, 1, data(), steps=0, init="lstsq")
    assert r.loss_init == pytest.approx(r.loss_b, abs=1e-3)
    assert torch.allclose(r.stitch.weight, torch.eye(16), atol=1e-3)


def test_training_improves_on_random_init():
    a, b = tiny_model(2, 16, "gelu", seed=0), tiny_model(2, 8, "solu_ln", seed=1)  # widths differ
    r = stitch(a, 1, b, 1, data(), steps=60, lr=1e-2, init="random", seed=0)
    assert r.loss < r.loss_init - 0.05
    assert len(r.train_losses) == 60
    assert sum(r.train_losses[-10:]) < sum(r.train_losses[:10])
    assert r.stitch.weight.shape == (8, 16)


def test_models_stay_frozen_and_unchanged():
    a, b = tiny_model(seed=0), tiny_model(act_fn="solu_ln", seed=1)
    before = [p.clone() for p in b.parameters()]
    stitch(a, 1, b, 1, data(), steps=5, init="random")
    assert all(torch.equal(p, q) for p, q in zip(before, b.parameters()))
    assert all(p.requires_grad and p.grad is None for p in b.parameters())
    assert all(p.requires_grad and p.grad is None for p in a.parameters())


def test_deterministic_for_a_seed(model):
    b = tiny_model(act_fn="solu_ln", seed=1)
    r1 = stitch(model, 1, b, 1, data(), steps=10, init="random", seed=3)
    r2 = stitch(model, 1, b, 1, data(), steps=10, init="random", seed=3)
    assert r1.train_losses == r2.train_losses and r1.loss == r2.loss


def test_loss_mask_and_eval_data(model):
    d = data()
    only = torch.zeros_like(d.loss_mask)
    only[:, 3] = True
    scored = StitchData(d.tokens, d.attention_mask, only)
    r = stitch(model, 1, model, 1, d, eval_dataset=scored, steps=0, init="identity")
    assert r.loss_b == pytest.approx(own_loss(model, scored), abs=1e-5)
    assert r.loss_b != pytest.approx(own_loss(model, d), abs=1e-3)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="d_model"):
        stitch(model, 1, tiny_model(d_model=8), 1, data(), steps=0, init="identity")
    with pytest.raises(ValueError, match="last position"):
        StitchData(torch.zeros(2, 4, dtype=torch.long), loss_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_vocab"):
        stitch(model, 1, model, 1, torch.full((2, 4), 50), steps=0)


def test_stitched_loss_reevaluates_a_trained_stitch(model):
    b = tiny_model(act_fn="solu_ln", seed=1)
    d, other = data(), data(seed=1)
    r = stitch(model, 1, b, 1, d, steps=5, init="random")
    assert stitched_loss(model, 1, b, 1, r.stitch, d) == pytest.approx((r.loss, r.accuracy))
    assert stitched_loss(model, 1, b, 1, None, other)[0] == pytest.approx(own_loss(b, other), abs=1e-5)
