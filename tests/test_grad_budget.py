"""Gradient methods under a memory budget: checkpointed blocks, IG's internal batch from
max_memory, and its run-time estimate."""

import pytest
import torch
from conftest import KINDS, TEXTS

import mechnorm
from mechnorm.methods import grad_budget
from mechnorm.methods.gradient_setup import gradient_setup


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointed_blocks_give_the_same_gradients(load, kind, arch):
    model = load(arch, kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    for method in (mechnorm.saliency, mechnorm.grad_x_input):
        plain = method(model, batch, checkpoint=False)
        recomputed = method(model, batch, checkpoint=True)
        torch.testing.assert_close(recomputed.scores, plain.scores, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert torch.isfinite(plain.scores[0][batch.attention_mask]).all()
    assert all("forward" not in vars(block) for block in model.blocks)  # the class's forward is back


def test_checkpointing_saves_only_the_block_inputs(load):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, TEXTS)
    setup = gradient_setup(model, batch, None, None, "logit")
    plain = grad_budget.saved_bytes(setup.forward, setup.embeds, model)
    setup.checkpoint = True
    recomputed = grad_budget.saved_bytes(setup.forward, setup.embeds, model)
    n, pos = batch.tokens.shape
    one_block_input = n * pos * model.cfg.d_model * 4
    # a block keeps far more than its input (q, k, v, patterns, MLP hidden); checkpointed, only inputs remain
    assert plain > 4 * model.cfg.n_layers * one_block_input
    assert recomputed < plain / 3


def test_saved_bytes_counts_what_autograd_keeps():
    lin = torch.nn.Linear(6, 5)
    x = torch.ones(7, 6, requires_grad=True)
    # linear keeps its input (7x6), relu its output (7x5), tanh its output (7x5); the weight is a parameter
    assert grad_budget.saved_bytes(lambda v: lin(v).relu().tanh().sum(), x, lin) == 4 * (7 * 6 + 7 * 5 + 7 * 5)


@pytest.mark.parametrize("kind", KINDS)
def test_max_memory_sets_steps_per_pass_from_one_measured_step(load, kind):
    model = load("gpt2", kind)
    batch = mechnorm.tokenize(model, TEXTS[:2])
    setup = gradient_setup(model, batch, None, None, "logit")
    per_step = grad_budget.saved_bytes(setup.forward, setup.embeds, model)
    budgeted = mechnorm.integrated_gradients(model, batch, n_steps=8, max_memory=3 * per_step + 1)
    assert budgeted.metadata["internal_batch_size"] == 2 * 3
    by_hand = mechnorm.integrated_gradients(model, batch, n_steps=8, internal_batch_size=2 * 3)
    one_pass = mechnorm.integrated_gradients(model, batch, n_steps=8, internal_batch_size=2 * 8)
    torch.testing.assert_close(budgeted.scores, by_hand.scores, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(budgeted.scores, one_pass.scores, rtol=1e-4, atol=1e-6, equal_nan=True)
    with pytest.warns(UserWarning, match="more than max_memory"):
        tight = mechnorm.integrated_gradients(model, batch, n_steps=4, max_memory=per_step // 2)
    assert tight.metadata["internal_batch_size"] == 2
    with pytest.raises(ValueError, match="not both"):
        mechnorm.integrated_gradients(model, batch, max_memory="1GB", internal_batch_size=4)


def test_integrated_gradients_estimates_its_time_after_the_first_pass(load, monkeypatch):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, TEXTS[:1])
    monkeypatch.setattr(grad_budget, "SLOW_SECONDS", 0.0)
    with pytest.warns(UserWarning, match=r"will take about \d+ s: 5 passes of"):
        attr = mechnorm.integrated_gradients(model, batch, n_steps=5, internal_batch_size=1)
    assert attr.metadata["seconds_estimate"] > 0
    monkeypatch.setattr(grad_budget, "SLOW_SECONDS", 1e9)
    quiet = mechnorm.integrated_gradients(model, batch, n_steps=5, internal_batch_size=5)
    assert quiet.metadata["seconds_estimate"] is None  # one pass: nothing left to estimate


def test_budget_helpers():
    assert grad_budget.parse_bytes("2GB") == 2 * 10**9 and grad_budget.parse_bytes("512 MiB") == 512 * 2**20
    for bad in ("lots", "2 XB", 0, "-1GB"):
        with pytest.raises(ValueError, match="max_memory"):
            grad_budget.parse_bytes(bad)
    assert grad_budget.n_passes(50, 2, 8) == 13 and grad_budget.n_passes(5, 1, 100) == 1
    assert grad_budget.steps_for_budget(10, 35, 50) == 3 and grad_budget.steps_for_budget(10, 10**6, 50) == 50
