"""Logit lens: every number against a direct full-vocabulary computation."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ARCHITECTURES, KINDS, TEXTS

import mechnorm
from mechnorm.residual import resid_hook

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")


def _run(model, texts=TEXTS, side="right", names_filter=None):
    batch = mechnorm.tokenize(model, texts, padding_side=side)
    logits, cache = mechnorm.run_with_cache(model, batch, names_filter=names_filter or mechnorm.hooks_for("logit_lens"))
    return batch, logits, cache


def _reference(model, cache):
    """[layer, batch, pos, vocab] logits through the model's own final norm and unembedding."""
    with torch.no_grad():
        return torch.stack(
            [model.unembed(model.ln_final(cache[resid_hook(layer)])) for layer in range(model.cfg.n_layers + 1)]
        ).float()


def _head_reference(model, cache, head):
    """[layer, batch, pos, outputs] of ``head`` on every layer's residual, in full."""
    return torch.stack([head(cache[resid_hook(layer)]) for layer in range(model.cfg.n_layers + 1)]).float()


def _assert_same_lens(a, b, mask):
    """Two lenses of the same rounded logits: equal ranks and top ids, sums equal to float32 reordering."""
    real = mask.bool()
    assert torch.equal(a.target_ids, b.target_ids)
    assert torch.equal(a.target_rank[:, real], b.target_rank[:, real])
    assert torch.equal(a.top_ids[:, real], b.top_ids[:, real])
    for name in ("target_logit", "target_prob", "top_probs", "entropy", "kl"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, equal_nan=True)


def _check_against(lens, ref, targets, mask, atol=1e-4):
    """Compare every metric of ``lens`` (positions="all") with full-vocabulary logits ``ref``."""
    logp = ref.log_softmax(-1)
    target_logit = ref.gather(-1, targets.expand(ref.shape[0], -1, -1)[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    real = mask.bool()
    torch.testing.assert_close(lens.target_logit[:, real], target_logit[:, real], atol=atol, rtol=0)
    prob = (target_logit - ref.logsumexp(-1)).exp()
    torch.testing.assert_close(lens.target_prob[:, real], prob[:, real], atol=atol, rtol=0)
    torch.testing.assert_close(lens.entropy[:, real], entropy[:, real], atol=atol, rtol=0)
    torch.testing.assert_close(lens.kl[:, real], kl[:, real], atol=atol, rtol=0)
    top = logp.exp().topk(lens.k, dim=-1).values
    torch.testing.assert_close(lens.top_probs[:, real], top[:, real], atol=atol, rtol=0)
    # the ids must be tokens with exactly those probabilities (ties may swap ids)
    probs_of_ids = logp.exp().gather(-1, lens.top_ids.clamp_min(0))
    torch.testing.assert_close(probs_of_ids[:, real], top[:, real], atol=atol, rtol=0)
    # rank: 1 + tokens strictly above the target; near-ties (float rounding) may go either way
    others = ref.clone()
    others.scatter_(-1, targets.expand(ref.shape[0], -1, -1)[..., None], float("-inf"))
    low = 1 + (others > target_logit[..., None] + 1e-5).sum(-1)
    high = 1 + (others > target_logit[..., None] - 1e-5).sum(-1)
    rank = lens.target_rank
    assert ((rank >= low) & (rank <= high))[:, real].all()
    # padding is marked, never a number
    assert lens.target_logit[:, ~real].isnan().all() and (lens.target_rank[:, ~real] == -1).all()


@pytest.mark.parametrize("arch,kind", list(itertools.product(ARCHITECTURES, KINDS)))
@pytest.mark.parametrize("side", ["left", "right"])
def test_all_positions_match_full_vocabulary(load, arch, kind, side):
    model = load(arch, kind)
    batch, logits, cache = _run(model, side=side)
    head = mechnorm.UnembedHead(model)
    # a chunk that does not divide the vocabulary exercises the streaming merge
    lens = mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask, chunk_size=7)
    ref = _reference(model, cache)
    torch.testing.assert_close(ref[-1], logits.float(), atol=1e-4, rtol=0)  # the reference is the model's own head
    _check_against(lens, ref, ref[-1].argmax(-1)[None], batch.attention_mask)
    assert lens.layers == tuple(range(model.cfg.n_layers + 1))
    kl_final = lens.kl[-1][batch.attention_mask]
    assert kl_final.abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_final_layer_is_the_hf_models_logits(load, hf_model, arch):
    model, hf = load(arch), hf_model(arch)
    batch, _, cache = _run(model, texts=[TEXTS[0]])
    lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", top_k=3)
    with torch.no_grad():
        hf_logits = hf(batch.tokens).logits[0].float()  # [pos, vocab]
    logp = hf_logits.log_softmax(-1)
    torch.testing.assert_close(lens.target_logit[-1, 0], hf_logits.amax(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(lens.top_probs[-1, 0], logp.exp().topk(3, -1).values, atol=1e-4, rtol=0)
    assert torch.equal(lens.top_ids[-1, 0, :, 0], hf_logits.argmax(-1))
    torch.testing.assert_close(lens.entropy[-1, 0], -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=0)
    assert (lens.target_rank[-1] == 1).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_sequences_numbers(load, kind, side):
    model = load("llama", kind)
    batch, _, cache = _run(model, side=side)
    head = mechnorm.UnembedHead(model)
    together = mechnorm.logit_lens(cache, head, attention_mask=batch.attention_mask, chunk_size=10)
    for i, text in enumerate(TEXTS):
        alone_batch, _, alone_cache = _run(model, texts=[text])
        alone = mechnorm.logit_lens(alone_cache, head, chunk_size=10)
        for name in ("target_logit", "target_prob", "entropy", "kl", "top_probs"):
            torch.testing.assert_close(getattr(together, name)[:, i], getattr(alone, name)[:, 0], atol=1e-4, rtol=0)
        assert torch.equal(together.target_rank[:, i], alone.target_rank[:, 0])
        assert torch.equal(together.target_ids[i], alone.target_ids[0])


def test_prediction_positions_equal_the_all_positions_columns(load):
    model = load("gpt2")
    batch, _, cache = _run(model, side="left")
    head = mechnorm.UnembedHead(model)
    full = mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask)
    pred = mechnorm.logit_lens(cache, head, attention_mask=batch.attention_mask)
    last = mechnorm.targets.last_positions(batch.attention_mask)
    assert torch.equal(pred.positions[:, 0], last)
    rows = torch.arange(len(TEXTS))
    for name in ("target_logit", "entropy", "kl", "top_probs"):
        torch.testing.assert_close(getattr(pred, name)[:, :, 0], getattr(full, name)[:, rows, last])
    assert torch.equal(pred.top_ids[:, :, 0], full.top_ids[:, rows, last])


def test_given_target_and_layer_subset(load):
    model = load("neox", "bridge")
    batch, _, cache = _run(model)
    target = mechnorm.token_target(" cabinet", model)
    lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), target=target, positions="all", layers=[0, -1],
                               attention_mask=batch.attention_mask)
    ref = _reference(model, cache)
    assert lens.layers == (0, model.cfg.n_layers)
    ids = torch.full(batch.tokens.shape, int(target.ids[0]))[None]
    # KL is still taken against the final layer even though only layers 0 and L are asked for
    _check_against(lens, ref[[0, -1]], ids, batch.attention_mask)
    assert (lens.target_ids[batch.attention_mask] == int(target.ids[0])).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bfloat16_matmul_stays_close_to_the_full_vocabulary(load, arch):
    model = load(arch)
    batch, _, cache = _run(model)
    mask = batch.attention_mask.bool()
    fast = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", attention_mask=mask, dtype=torch.bfloat16)
    ref = _reference(model, cache)
    logp = ref.log_softmax(-1)
    # the bf16 argmax may differ from the exact one only where the top two logits nearly tie
    top2 = ref[-1].topk(2, -1).values
    clear = mask & (top2[..., 0] - top2[..., 1] > 0.05)
    assert clear.sum() > 0 and torch.equal(fast.target_ids[clear], ref[-1].argmax(-1)[clear])
    target_logit = ref.gather(-1, fast.target_ids.clamp_min(0).expand(ref.shape[0], -1, -1)[..., None])[..., 0]
    torch.testing.assert_close(fast.target_logit[:, mask], target_logit[:, mask], atol=1e-4, rtol=0)  # read in float32
    torch.testing.assert_close(fast.entropy[:, mask], -(logp.exp() * logp).sum(-1)[:, mask], atol=2e-2, rtol=0)
    kl = (logp[-1].exp() * (logp[-1] - logp)).sum(-1)
    torch.testing.assert_close(fast.kl[:, mask], kl[:, mask], atol=2e-2, rtol=0)
    torch.testing.assert_close(fast.top_probs[:, mask], logp.exp().topk(fast.k, -1).values[:, mask], atol=1e-2, rtol=0)
    # a head with a bias: the bias is added to the bf16 products too
    torch.manual_seed(0)
    head = mechnorm.LinearHead(0.1 * torch.randn(300, model.cfg.d_model), 3 * torch.randn(300), norm=mechnorm.FinalNorm.from_model(model))
    exact = mechnorm.logit_lens(cache, head, positions="all", attention_mask=mask)
    fast = mechnorm.logit_lens(cache, head, positions="all", attention_mask=mask, dtype=torch.bfloat16)
    for name in ("entropy", "kl"):
        torch.testing.assert_close(getattr(fast, name)[:, mask], getattr(exact, name)[:, mask], atol=2e-2, rtol=0)


def test_chunking_never_builds_the_full_vocabulary_tensor(load):
    model = load("gpt2")
    batch, _, cache = _run(model)
    torch.manual_seed(0)
    d_model, vocab = model.cfg.d_model, 20_000
    head = mechnorm.LinearHead(torch.randn(vocab, d_model), torch.randn(vocab), norm=mechnorm.FinalNorm.from_model(model))
    full_bytes = (model.cfg.n_layers + 1) * batch.tokens.numel() * vocab * 4  # a [layer, batch, pos, vocab] float32
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        lens = mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask, chunk_size=500)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = max(itertools.accumulate(n for _, n in events))
    # the default target's argmax pass keeps the final layer's logits (the size of the model's own
    # output) and the head's weight blocks for the main pass; nothing near the
    # [layer, batch, pos, vocab] tensor is made
    kept_bytes = full_bytes / (model.cfg.n_layers + 1) + head.weight_out.numel() * 4
    assert peak < kept_bytes + full_bytes / 10
    ref = torch.stack([head(cache[resid_hook(layer)]) for layer in range(model.cfg.n_layers + 1)])
    _check_against(lens, ref, ref[-1].argmax(-1)[None], batch.attention_mask)


def test_chunk_size_and_reruns_do_not_change_results(load):
    model = load("llama")
    batch, _, cache = _run(model)
    head = mechnorm.UnembedHead(model)
    before = {name: cache[name].clone() for name in cache.keys()}
    mask = batch.attention_mask
    runs = [mechnorm.logit_lens(cache, head, positions="all", attention_mask=mask, chunk_size=c) for c in (1, 7, None, None)]
    for other in runs[1:]:
        for name in ("target_logit", "entropy", "kl", "top_probs"):
            torch.testing.assert_close(getattr(other, name), getattr(runs[0], name), atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(runs[2].kl, runs[3].kl, atol=0, rtol=0, equal_nan=True)  # deterministic
    assert all(torch.equal(cache[name], value) for name, value in before.items())


def test_frozen_head_equals_recomputed_at_the_final_layer(load):
    model = load("gpt2", "bridge")
    batch, _, cache = _run(model)
    mask = batch.attention_mask
    recompute = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", attention_mask=mask)
    frozen = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model, ln="frozen"), positions="all", attention_mask=mask)
    torch.testing.assert_close(frozen.target_logit[-1], recompute.target_logit[-1], atol=1e-4, rtol=0, equal_nan=True)
    # earlier layers differ: the frozen head divides by the final layer's scale
    assert not torch.allclose(frozen.target_logit[0], recompute.target_logit[0], equal_nan=True)


def test_module_head_matches_linear_head(load):
    model = load("gpt2")
    batch, _, cache = _run(model)
    torch.manual_seed(1)
    linear = torch.nn.Linear(model.cfg.d_model, 6)
    mask = batch.attention_mask
    as_module = mechnorm.logit_lens(cache, mechnorm.ModuleHead(linear, 6), positions="all", top_k=2, attention_mask=mask)
    as_linear = mechnorm.logit_lens(cache, mechnorm.LinearHead(linear.weight, linear.bias), positions="all", top_k=2,
                                    attention_mask=mask, chunk_size=4)
    for name in ("target_logit", "entropy", "kl", "top_probs"):
        torch.testing.assert_close(getattr(as_module, name), getattr(as_linear, name), atol=1e-5, rtol=0, equal_nan=True)


def test_to_frame_is_tidy_and_labelled(load):
    model = load("gpt2")
    batch, _, cache = _run(model, side="left")
    lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", top_k=2,
                               attention_mask=batch.attention_mask, tokens=batch.tokens)
    frame = lens.to_frame()
    n_real = int(batch.attention_mask.sum())
    assert len(frame) == len(lens.layers) * n_real
    assert list(frame.columns[:6]) == ["method", "layer", "batch", "pos", "token", "target"]
    metrics = {"target_logit", "target_prob", "target_rank", "entropy", "kl", "top1", "top2", "top1_prob", "top2_prob"}
    assert metrics <= set(frame.columns)
    first = frame[(frame.layer == 1) & (frame.batch == 1)].iloc[0]
    pos = int(first.pos)
    assert first.token == batch.strings[1][pos] and batch.attention_mask[1, pos]
    assert first.kl == pytest.approx(float(lens.kl[1, 1, pos]))
    assert first.top1 == model.tokenizer.decode([int(lens.top_ids[1, 1, pos, 0])])
    assert frame.target_prob.notna().all()


def test_registry_and_hooks(load):
    model = load("gpt2")
    names = mechnorm.list_methods().set_index("name")
    assert "logit_lens" in names.index and not names.loc["logit_lens", "needs_gradients"]
    hooks = mechnorm.hooks_for("logit_lens")
    assert hooks("blocks.1.hook_resid_post") and hooks("blocks.0.hook_resid_pre")
    assert not hooks("blocks.0.attn.hook_pattern") and not hooks("blocks.0.hook_mlp_out")


def test_errors_name_the_fix(load):
    model = load("gpt2")
    batch, _, cache = _run(model, names_filter=lambda name: name == "blocks.0.hook_resid_pre")
    head = mechnorm.UnembedHead(model)
    with pytest.raises(mechnorm.MissingHooksError, match=r"blocks\.1\.hook_resid_post"):
        mechnorm.logit_lens(cache, head)
    _, _, cache = _run(model)
    with pytest.raises(ValueError, match="'prediction' or 'all'"):
        mechnorm.logit_lens(cache, head, positions="last")
    with pytest.raises(ValueError, match="contrast"):
        mechnorm.logit_lens(cache, head, target=mechnorm.contrast(" key", " keys", model))
    with pytest.raises(ValueError, match="top_k"):
        mechnorm.logit_lens(cache, head, top_k=0)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mechnorm.logit_lens(cache, head, attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="outside the head"):
        mechnorm.logit_lens(cache, head, target=mechnorm.token_target(10_000))


def test_result_checks_its_shapes():
    ones = torch.ones(2, 1, 3)
    kwargs = dict(
        target_logit=ones, target_prob=ones, target_rank=ones.long(), top_ids=ones[..., None].long(),
        top_probs=ones[..., None], entropy=ones, kl=ones, layers=(0, 1), positions=torch.zeros(1, 3).long(),
        mask=torch.ones(1, 3), target_ids=torch.zeros(1, 3).long(),
    )
    assert mechnorm.LensResult(**kwargs).k == 1
    with pytest.raises(ValueError, match="kl must be"):
        mechnorm.LensResult(**{**kwargs, "kl": torch.ones(2, 1, 4)})
    with pytest.raises(ValueError, match="top_ids must be"):
        mechnorm.LensResult(**{**kwargs, "top_ids": torch.ones(2, 1, 3).long()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fused", [False, True])  # True: chunks stay in the matmul dtype (bf16 kept as it is)
def test_default_target_reuses_the_final_layers_logits_with_the_same_results(load, monkeypatch, dtype, bias, fused):
    from mechnorm.methods import lens_stream

    model = load("llama")
    batch, _, cache = _run(model)
    head = mechnorm.UnembedHead(model)
    if bias:  # a bias makes each chunk a converted copy, not the matmul's own output
        generator = torch.Generator().manual_seed(0)
        head = mechnorm.LinearHead(torch.randn(300, model.cfg.d_model, generator=generator),
                                   torch.randn(300, generator=generator), norm=mechnorm.FinalNorm.from_model(model))
    kept_chunks = []
    argmax = lens_stream.Readout.argmax

    def spying(self, chunks, raw=False):
        ids = argmax(self, chunks, raw)
        kept_chunks.append(len(self._final))
        return ids

    monkeypatch.setattr(lens_stream.Readout, "argmax", spying)
    runs = []
    for budget in (lens_stream.KEEP_FINAL_BYTES, 0):  # kept for the main pass, then computed again
        monkeypatch.setattr(lens_stream, "KEEP_FINAL_BYTES", budget)
        runs.append(mechnorm.logit_lens(cache, head, positions="all", attention_mask=batch.attention_mask, dtype=dtype,
                                        chunk_size=32, fused=fused))
    assert kept_chunks[0] > 1 and kept_chunks[1] == 0
    _assert_same_lens(*runs, batch.attention_mask)
    if dtype == torch.float32:  # and both against the full-vocabulary reference
        ref = _head_reference(model, cache, head)
        _check_against(runs[0], ref, ref[-1].argmax(-1)[None], batch.attention_mask)
