"""Value Zeroing: the layer-local re-run against full forward passes with the values zeroed by a hook."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, KINDS, TEXTS

import mechnorm
from mechnorm import tasks
from mechnorm.inputs import mask_kwargs, prediction_positions

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")


def _run(model, texts=TEXTS, side="right", names_filter=None):
    batch = mechnorm.tokenize(model, texts, padding_side=side)
    _, cache = mechnorm.run_with_cache(model, batch, names_filter=names_filter or mechnorm.hooks_for("value_zeroing"))
    return batch, cache


def _output_hook(model, block):
    post_ln = type(model).__name__ == "HookedEncoder"  # its hook_resid_post comes before the output LayerNorm
    return f"blocks.{block}.hook_normalized_resid_post" if post_ln else f"blocks.{block}.hook_resid_post"


@torch.no_grad()
def _full_rerun_matrices(model, tokens, mask, encoder):
    """C_l[b, i, j] = 1 − cos(out_i, out_i with v_j zeroed), each from a whole forward pass; rows normalised."""
    batch, pos = mask.shape
    matrices = []
    for block in range(model.cfg.n_layers):
        hook = _output_hook(model, block)
        outputs = {}
        model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: outputs.__setitem__("clean", x.clone()))],
                             **mask_kwargs(model, mask))
        matrix = torch.zeros(batch, pos, pos)
        for j in range(pos):
            def zero(v, hook, j=j):
                v = v.clone()
                v[:, j] = 0.0
                return v

            model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{block}.attn.hook_v", zero),
                                                    (hook, lambda x, hook: outputs.__setitem__("zeroed", x.clone()))],
                                 **mask_kwargs(model, mask))
            for b in range(batch):
                for i in range(pos):
                    if mask[b, i] and mask[b, j] and (encoder or j <= i):
                        cos = F.cosine_similarity(outputs["clean"][b, i], outputs["zeroed"][b, i], dim=0)
                        matrix[b, i, j] = 1.0 - cos
        matrices.append(matrix / matrix.sum(-1, keepdim=True).clamp_min(1e-30))
    return matrices


def _check(model, tokens, mask, encoder):
    _, cache = mechnorm.run_with_cache(model, mechnorm.Batch(tokens, mask), names_filter=mechnorm.hooks_for("value_zeroing"))
    expected = _full_rerun_matrices(model, tokens, mask, encoder)
    pred = prediction_positions(model, mask)
    rows = torch.arange(len(mask))
    eye = torch.eye(mask.shape[1]).expand(len(mask), -1, -1)
    for aggregate in ("none", "rollout"):
        attr = mechnorm.value_zeroing(model, cache, tokens, mask, aggregate=aggregate, return_matrices=True, chunk_size=7)
        layers, rolled = [eye], eye
        for matrix in expected:
            rolled = matrix @ rolled if aggregate == "rollout" else matrix
            layers.append(rolled)
        want = torch.stack([m[rows, pred] for m in layers]).masked_fill(~mask, float("nan"))
        torch.testing.assert_close(attr.scores, want, atol=1e-4, rtol=1e-3, equal_nan=True)
        real = (mask[:, :, None] & mask[:, None, :])[:, None]
        torch.testing.assert_close(attr.metadata["matrices"].masked_fill(~real, 0),
                                   torch.stack(layers, 1).masked_fill(~real, 0), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("arch,kind", list(itertools.product(ARCHITECTURES, KINDS)))
def test_layer_local_rerun_equals_full_reruns(load, arch, kind):
    model = load(arch, kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    _check(model, batch.tokens, batch.attention_mask, encoder=False)


@pytest.mark.parametrize("kind", KINDS)
def test_post_ln_encoder_layer_local_rerun_equals_full_reruns(kind):
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    tokens, mask = mechnorm.pad([e.tokens for e in tasks.get_task("lexicon").test(3)], 0, "right")
    _check(model, tokens, mask, encoder=True)


@pytest.mark.parametrize("arch,kind", list(itertools.product(("gpt2", "llama"), KINDS)))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_sequences_scores(load, arch, kind, side):
    model = load(arch, kind)
    batch, cache = _run(model, side=side)
    together = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask, aggregate="rollout")
    for i, text in enumerate(TEXTS):
        alone_batch, alone_cache = _run(model, texts=[text])
        alone = mechnorm.value_zeroing(model, alone_cache, alone_batch.tokens, aggregate="rollout")
        real = batch.attention_mask[i]
        torch.testing.assert_close(together.scores[:, i, real], alone.scores[:, 0], atol=1e-5, rtol=1e-4)


def test_chunking_deterministic_cache_and_model_untouched(load):
    model = load("llama")
    batch, cache = _run(model, side="left")
    before = {name: cache[name].clone() for name in cache.keys()}
    logits_before = model(batch.tokens, **mask_kwargs(model, batch.attention_mask))
    first = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask, chunk_size=1)
    second = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask, chunk_size=1)
    big = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask, chunk_size=1000)
    torch.testing.assert_close(first.scores, second.scores, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(first.scores, big.scores, atol=1e-5, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(first.scores.nansum(-1), torch.ones(first.scores.shape[:2]))
    assert all(torch.equal(cache[name], value) for name, value in before.items())
    # no hook left behind: the model computes what it computed before
    torch.testing.assert_close(model(batch.tokens, **mask_kwargs(model, batch.attention_mask)), logits_before)


def test_selected_layers_and_positions(load):
    model = load("gpt2")
    batch, cache = _run(model, side="left")
    full = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask)
    one = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask, layers=[2])
    torch.testing.assert_close(one.scores[0], full.scores[2], equal_nan=True)
    at_first = mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask, positions=7, layers=[0])
    assert at_first.scores[0, :, 7].tolist() == [1.0, 1.0, 1.0]  # layer 0: each token is all its own


def test_errors_name_the_fix(load):
    model = load("gpt2")
    batch, partial = _run(model, names_filter=lambda name: name == "blocks.0.hook_resid_pre")
    with pytest.raises(mechnorm.MissingHooksError, match=r"blocks\.0\.hook_resid_post.*hooks_for"):
        mechnorm.value_zeroing(model, partial, batch.tokens, batch.attention_mask)
    _, cache = _run(model)
    with pytest.raises(ValueError, match="tokens must be the"):
        mechnorm.value_zeroing(model, cache, batch.tokens[:, :3], batch.attention_mask)
    with pytest.raises(ValueError, match="aggregate must be"):
        mechnorm.value_zeroing(model, cache, batch.tokens, aggregate="max")
    with pytest.raises(ValueError, match="chunk_size"):
        mechnorm.value_zeroing(model, cache, batch.tokens, chunk_size=0)
