"""The logit lens's compiled per-chunk kernel: the same numbers as the eager passes and the
full-vocabulary reference, used only where asked or worth it, and a clean fallback."""

from __future__ import annotations

import pytest
import torch
from test_lens import _assert_same_lens, _check_against, _head_reference, _run

import mechnorm
from mechnorm.methods import lens_fused

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")

CHUNK = 128  # 8 of the kernel's 16-column blocks (more than top_k's 5): several chunks of a 1,000-output head


def _wide_head(model, bias: bool = False) -> mechnorm.LinearHead:
    """A 1,000-output head on the model's final norm (the tiny models' vocabularies are too small to chunk)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, model.cfg.d_model, generator=generator)
    return mechnorm.LinearHead(weight, torch.randn(1000, generator=generator) if bias else None,
                               norm=mechnorm.FinalNorm.from_model(model))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the chunks the compiled kernel folded in (a None return is the eager fallback)."""
    calls = []
    real = lens_fused.fused_chunk_sums

    def counting(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("mechnorm.methods.lens_stream.fused_chunk_sums", counting)
    return calls


@pytest.mark.parametrize("arch,bias", [("gpt2", False), ("llama", True), ("neox", False)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_lens_matches_the_full_vocabulary(load, arch, bias, side, kernel_calls):
    model = load(arch)
    batch, _, cache = _run(model, side=side)
    head = _wide_head(model, bias)
    lens = mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask, chunk_size=CHUNK,
                               fused=True)
    assert kernel_calls and all(kernel_calls)  # every full chunk went through the compiled kernel
    ref = _head_reference(model, cache, head)
    _check_against(lens, ref, ref[-1].argmax(-1)[None], batch.attention_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_eager_agree_on_every_output(load, dtype, kernel_calls):
    model = load("llama")
    batch, _, cache = _run(model)
    target = mechnorm.token_target(" cabinet", model)
    results = [
        mechnorm.logit_lens(cache, _wide_head(model), target=target, positions="all", layers=[0, 1, -1],
                            attention_mask=batch.attention_mask, chunk_size=CHUNK, dtype=dtype, fused=fused)
        for fused in (False, True)
    ]
    assert kernel_calls and all(kernel_calls)
    _assert_same_lens(*results, batch.attention_mask)  # the same rounded logits feed both


def test_chunk_sums_by_hand():
    torch.manual_seed(0)
    groups, per_layer, width = 3, 4, 32
    chunks = [torch.randn(groups * per_layer, width) * 3 for _ in range(2)]
    target_logit = torch.randn(groups * per_layer)
    running = (torch.full((groups * per_layer,), float("-inf")),) + tuple(torch.zeros(groups * per_layer) for _ in range(3))
    above = 0
    for chunk in chunks:
        block_max, chunk_max, *running, count = lens_fused.chunk_sums(chunk, tuple(running), target_logit, groups)
        assert torch.equal(chunk_max, chunk.amax(-1))
        above = above + count
        assert torch.equal(block_max, torch.stack([chunk[:, j::width // 16].amax(-1) for j in range(width // 16)], -1))
    g = torch.cat(chunks, -1)  # every column seen, straight from the definitions
    m = g.amax(-1)
    f = g[-per_layer:].repeat(groups, 1)
    torch.testing.assert_close(running[0], m)
    torch.testing.assert_close(running[1], torch.exp(g - m[:, None]).sum(-1))
    torch.testing.assert_close(running[2], (torch.exp(g - m[:, None]) * g).sum(-1))
    torch.testing.assert_close(running[3], (torch.exp(f - f.amax(-1, keepdim=True)) * g).sum(-1))
    assert torch.equal(above, (g > target_logit[:, None]).sum(-1, dtype=torch.int32))


def test_small_lenses_stay_eager_and_large_ones_fuse(load, monkeypatch):
    def refuse(*args):
        raise AssertionError("the compiled kernel ran on a small lens")

    monkeypatch.setattr("mechnorm.methods.lens_stream.fused_chunk_sums", refuse)
    model = load("gpt2")
    batch, _, cache = _run(model)
    mechnorm.logit_lens(cache, _wide_head(model), positions="all", attention_mask=batch.attention_mask, chunk_size=CHUNK)
    assert lens_fused.use_fused(None, 13 * 1024, 50257)  # GPT-2-small's layers x 8 x 128 positions
    assert not lens_fused.use_fused(None, 13 * 20, 50257)
    assert not lens_fused.use_fused(None, 13 * 1024, 50257, "cuda") and lens_fused.use_fused(True, 10, 10, "cuda")


def test_a_kernel_that_cannot_be_built_warns_once_and_runs_eagerly(load, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found\nlong details")
        return call

    monkeypatch.setattr(lens_fused, "_compiled", None)
    monkeypatch.setattr(lens_fused, "_failure", None)
    monkeypatch.setattr(torch, "compile", broken)
    model = load("gpt2")
    batch, _, cache = _run(model)
    head = _wide_head(model)
    eager = mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask, chunk_size=CHUNK,
                                fused=False)
    with pytest.warns(UserWarning, match="could not build.*no C\\+\\+ compiler found.*fused=False"):
        fallback = mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask,
                                       chunk_size=CHUNK, fused=True)
    assert not lens_fused.use_fused(True, 10, 10)  # not tried again in this process
    for name in ("target_logit", "entropy", "kl", "top_probs", "target_rank"):
        torch.testing.assert_close(getattr(fallback, name), getattr(eager, name), atol=0, rtol=0, equal_nan=True)
