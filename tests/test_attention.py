"""Attention rollout and raw attention against a plain loop-and-numpy implementation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, KINDS, TEXTS

import mechnorm

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")


def _run(model, texts=TEXTS, side="right", names_filter=None):
    batch = mechnorm.tokenize(model, texts, padding_side=side)
    _, cache = mechnorm.run_with_cache(model, batch, names_filter=names_filter or mechnorm.hooks_for("rollout"))
    return batch, cache


def _numpy_rollout(cache, mask, fusion="mean", residual=0.5, discard_ratio=0.0, encoder=False):
    """Abnar & Zuidema's recursion, one sequence at a time, on its real tokens only.

    Returns ``[layer 0…L, batch, pos]`` rows of the last real token, or of the first with
    ``encoder`` (bidirectional attention, read at [CLS]); NaN at padding.
    """
    n_blocks = cache.model.cfg.n_layers
    batch, pos = mask.shape
    out = np.full((n_blocks + 1, batch, pos), np.nan)
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    for b in range(batch):
        real = np.flatnonzero(mask[b].numpy())
        n = len(real)
        rollout = np.eye(n)
        row = 0 if encoder else -1
        visible = np.ones((n, n)) if encoder else np.tril(np.ones((n, n)))
        out[0, b, real] = rollout[row]
        for block in range(n_blocks):
            pattern = cache[f"blocks.{block}.attn.hook_pattern"][b].numpy().astype(np.float64)
            att = fuse(pattern, axis=0)[np.ix_(real, real)] * visible
            for q in range(n):
                seen = n if encoder else q + 1  # causal: row q sees keys 0…q
                drop = int(np.floor(discard_ratio * seen))
                if drop:
                    smallest = np.argsort(att[q, :seen], kind="stable")[:drop]
                    att[q, smallest] = 0.0
            mixed = residual * np.eye(n) + (1 - residual) * att
            mixed = mixed / mixed.sum(axis=1, keepdims=True)
            rollout = mixed @ rollout
            out[block + 1, b, real] = rollout[row]
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("arch,kind", list(itertools.product(ARCHITECTURES, KINDS)))
@pytest.mark.parametrize("side", ["left", "right"])
def test_rollout_matches_the_papers_recursion(load, arch, kind, side):
    model = load(arch, kind)
    batch, cache = _run(model, side=side)
    attr = mechnorm.attention_rollout(cache, attention_mask=batch.attention_mask)
    expected = _numpy_rollout(cache, batch.attention_mask)
    torch.testing.assert_close(attr.scores, expected, atol=1e-5, rtol=0, equal_nan=True)
    assert attr.layers == tuple(range(model.cfg.n_layers + 1)) and not attr.signed


@pytest.mark.parametrize(
    "fusion,residual,discard", [("max", 0.5, 0.0), ("min", 0.3, 0.0), ("mean", 0.0, 0.0), ("mean", 0.5, 0.4), ("max", 0.2, 0.6)]
)
def test_rollout_options_match_the_reference(load, fusion, residual, discard):
    model = load("gpt2", "bridge")
    batch, cache = _run(model, side="left")
    attr = mechnorm.attention_rollout(cache, fusion, residual, discard, attention_mask=batch.attention_mask)
    expected = _numpy_rollout(cache, batch.attention_mask, fusion, residual, discard)
    torch.testing.assert_close(attr.scores, expected, atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_rollout_is_bidirectional_and_read_at_cls(kind):
    # a TransformerBridge around BERT reports attention_dir="causal"; rollout must not believe it
    from mechnorm import tasks

    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    data = tasks.collate(tasks.get_task("lexicon").test(4))
    batch = mechnorm.Batch(data.tokens, data.attention_mask)
    _, cache = mechnorm.run_with_cache(model, batch, names_filter=mechnorm.hooks_for("rollout"))
    attr = mechnorm.attention_rollout(cache, discard_ratio=0.3, attention_mask=batch.attention_mask)
    expected = _numpy_rollout(cache, batch.attention_mask, discard_ratio=0.3, encoder=True)
    torch.testing.assert_close(attr.scores, expected, atol=1e-5, rtol=0, equal_nan=True)


def test_rollout_properties(load):
    model = load("llama")
    batch, cache = _run(model, side="left")
    mask = batch.attention_mask
    attr = mechnorm.attention_rollout(cache, attention_mask=mask)
    # each row is a distribution over the real tokens; layer 0 is all mass on the prediction position
    torch.testing.assert_close(attr.scores.nansum(-1), torch.ones(attr.scores.shape[:2]))
    last = mechnorm.targets.last_positions(mask)
    assert torch.equal(attr.scores[0].nan_to_num(0), torch.nn.functional.one_hot(last, mask.shape[1]).float())
    # residual = 1: attention is ignored, every layer is the identity row
    identity = mechnorm.attention_rollout(cache, residual=1.0, attention_mask=mask)
    torch.testing.assert_close(identity.scores[-1], attr.scores[0], equal_nan=True)
    # residual = 0 over one block: rollout is the raw (mean) attention of that block
    no_skip = mechnorm.attention_rollout(cache, residual=0.0, attention_mask=mask, layers=1)
    raw = mechnorm.attention_weights(cache, layer=1, attention_mask=mask)
    torch.testing.assert_close(no_skip.scores, raw.scores, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_sequences_scores(load, kind, side):
    model = load("gpt2", kind)
    batch, cache = _run(model, side=side)
    together = mechnorm.attention_rollout(cache, attention_mask=batch.attention_mask, head_fusion="max")
    raw = mechnorm.attention_weights(cache, attention_mask=batch.attention_mask, heads=2)
    for i, text in enumerate(TEXTS):
        _, alone_cache = _run(model, texts=[text])
        real = batch.attention_mask[i]
        alone = mechnorm.attention_rollout(alone_cache, head_fusion="max")
        torch.testing.assert_close(together.scores[:, i, real], alone.scores[:, 0], atol=1e-5, rtol=0)
        alone_raw = mechnorm.attention_weights(alone_cache, heads=2)
        torch.testing.assert_close(raw.scores[:, i, real], alone_raw.scores[:, 0], atol=1e-5, rtol=0)


def test_explicit_position_and_target_positions(load):
    model = load("neox")
    batch, cache = _run(model, texts=[TEXTS[0]])
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # [head, query, key]
    at_three = mechnorm.attention_weights(cache, layer=2, heads=1, positions=3)
    torch.testing.assert_close(at_three.scores[0, 0], pattern[1, 3])
    target = mechnorm.Target(ids=torch.tensor([5]), positions=torch.tensor([3]))
    via_target = mechnorm.attention_rollout(cache, target=target)
    via_position = mechnorm.attention_rollout(cache, positions=3)
    torch.testing.assert_close(via_target.scores, via_position.scores)
    assert (via_position.scores[:, 0, 4:] == 0).all()  # causal: later tokens get nothing


def test_attention_weights_read_the_pattern(load):
    model = load("llama", "bridge")
    batch, cache = _run(model, side="left")
    mask = batch.attention_mask
    last = mechnorm.targets.last_positions(mask)
    rows = torch.arange(len(TEXTS))
    pattern = cache["blocks.0.attn.hook_pattern"][rows, :, last]  # [batch, head, key]
    cases = [("mean", pattern.mean(1)), ("max", pattern.amax(1)), ("min", pattern.amin(1)), (3, pattern[:, 3]), (-1, pattern[:, -1])]
    for heads, expected in cases:
        attr = mechnorm.attention_weights(cache, layer=1, heads=heads, attention_mask=mask)
        torch.testing.assert_close(attr.scores[0], expected.masked_fill(~mask, float("nan")), equal_nan=True)
        assert attr.layers == (1,)
    assert mechnorm.attention_weights(cache, attention_mask=mask).layers == (model.cfg.n_layers,)


def test_deterministic_and_cache_untouched(load):
    model = load("gpt2")
    batch, cache = _run(model, side="left")
    before = {name: cache[name].clone() for name in cache.keys()}
    first = mechnorm.attention_rollout(cache, discard_ratio=0.3, attention_mask=batch.attention_mask)
    second = mechnorm.attention_rollout(cache, discard_ratio=0.3, attention_mask=batch.attention_mask)
    torch.testing.assert_close(first.scores, second.scores, atol=0, rtol=0, equal_nan=True)
    assert all(torch.equal(cache[name], value) for name, value in before.items())


def test_registry_names_and_hooks():
    names = mechnorm.list_methods().set_index("name")
    assert {"rollout", "attention"} <= set(names.index)
    hooks = mechnorm.hooks_for("rollout", "attention")
    assert hooks("blocks.3.attn.hook_pattern") and not hooks("blocks.0.hook_resid_pre")


def test_errors_name_the_fix(load):
    model = load("gpt2")
    batch, cache = _run(model)
    with pytest.raises(ValueError, match="head_fusion must be 'mean', 'max' or 'min'"):
        mechnorm.attention_rollout(cache, head_fusion="sum")
    with pytest.raises(ValueError, match=r"residual must be in \[0, 1\]"):
        mechnorm.attention_rollout(cache, residual=1.5)
    with pytest.raises(ValueError, match="discard_ratio"):
        mechnorm.attention_rollout(cache, discard_ratio=1.0)
    with pytest.raises(ValueError, match="padding token"):
        mechnorm.attention_rollout(cache, attention_mask=batch.attention_mask, positions=8)
    with pytest.raises(ValueError, match="Layer 0 is the input"):
        mechnorm.attention_weights(cache, layer=0)
    with pytest.raises(ValueError, match="out of range"):
        mechnorm.attention_weights(cache, layer=7)
    with pytest.raises(ValueError, match="Attention head 9 is out of range"):
        mechnorm.attention_weights(cache, heads=9)
    with pytest.raises(ValueError, match="heads must be"):
        mechnorm.attention_weights(cache, heads="sum")
    _, partial = _run(model, names_filter=lambda name: name == "blocks.0.attn.hook_pattern")
    with pytest.raises(mechnorm.MissingHooksError, match=r"blocks\.1\.attn\.hook_pattern"):
        mechnorm.attention_rollout(partial)
