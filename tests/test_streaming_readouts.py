"""The logit lens and DLA read from run_streamed's small cache equal the cached route bit for bit."""

import dataclasses
import warnings

import pytest
import torch
from conftest import ARCHITECTURES, KINDS, TEXTS

import mechnorm
from mechnorm.streaming_rows import PredictionRows

READOUTS = ["logit_lens", "direct_logit_attribution"]


def _equal(a, b, name: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True, name
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) if a.is_floating_point() else torch.equal(a, b), name
    else:
        assert a == b, name


def _same_fields(a, b) -> None:
    for field in dataclasses.fields(a):
        _equal(getattr(a, field.name), getattr(b, field.name), field.name)


def _routes(model, side: str, keep=None):
    batch = mechnorm.tokenize(model, TEXTS, padding_side=side)
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens", "dla"))
    target = mechnorm.predicted(logits, batch.attention_mask, tokenizer=model.tokenizer)
    streamed_target, small = mechnorm.run_streamed(model, batch, READOUTS, keep=keep)
    assert torch.equal(streamed_target.ids.cpu(), target.ids.cpu())
    assert torch.equal(streamed_target.positions.cpu(), target.positions.cpu())
    return batch, (target, cache), (streamed_target, small)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_streamed_lens_and_dla_equal_the_cached_route(load, arch, kind, side):
    model = load(arch, kind)
    batch, cached, streamed = _routes(model, side)
    mask = batch.attention_mask
    results = []
    for target, cache in (cached, streamed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lenses = [mechnorm.logit_lens(cache, model, target, attention_mask=mask, positions=p) for p in ("prediction", "all")]
            lenses.append(mechnorm.logit_lens(cache, model, attention_mask=mask, top_k=3, layers=[0, -1]))  # own argmax
            dlas = [mechnorm.direct_logit_attribution(cache, model, target, by=by, ln=ln, attention_mask=mask)
                    for by in ("component", "layer", "head") for ln in ("frozen", "recompute")]
        results.append(lenses + dlas)
    for a, b in zip(*results):
        _same_fields(a, b)  # every field: scores, ranks, top-k, KL, positions, labels, constants
    # the frozen DLA is exact: its components plus the constant sum to the model's logit of the target
    dla = results[1][3]
    with torch.inference_mode():
        logits = model(batch.tokens, attention_mask=mask.long())
    rows = torch.arange(len(TEXTS))
    expected = logits[rows, streamed[0].positions.to(logits.device), streamed[0].ids.to(logits.device)].float().cpu()
    torch.testing.assert_close(dla.scores.nansum(0).cpu() + dla.constant.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_dla_keeps_only_the_prediction_rows(load, kind):
    model = load("gpt2", kind)
    batch, (_, cache), (target, both) = _routes(model, "left")
    _, dla_only = mechnorm.run_streamed(model, batch, ["dla"])
    n, pos = batch.tokens.shape
    d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
    components = {"hook_pos_embed"} | {f"blocks.{i}.{h}" for i in range(n_layers) for h in ("attn.hook_z", "hook_mlp_out")}
    residuals = {f"blocks.{i}.hook_resid_post" for i in range(n_layers)} | {"blocks.0.hook_resid_pre"}
    # DLA keeps whole only the word embeddings and the final norm's [pos, 1] scale (a bridge also names
    # its word embeddings embed.hook_out); the lens reads every residual whole, the input one included
    for small, expected_rows, expected_whole in (
        (dla_only, components | {"blocks.0.hook_resid_pre"}, {"hook_embed", "ln_final.hook_scale"}),
        (both, components, {"hook_embed", "ln_final.hook_scale"} | residuals),
    ):
        assert not [name for name in small.keys() if "pattern" in name or "attn_out" in name]
        rows = {name: t for name, t in small.cache_dict.items() if isinstance(t, PredictionRows)}
        assert set(rows) == expected_rows and set(small.keys()) - expected_rows - {"embed.hook_out"} == expected_whole
        assert small["ln_final.hook_scale"].shape == (n, pos, 1)
        # shown as [batch, pos, ...], stored as one row per sequence: all in one buffer of batch x d_model per hook
        (storage,) = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in rows.values()}.values()
        assert storage.nbytes() == len(rows) * n * d_model * 4
        for name, t in rows.items():
            assert t.shape == cache[name].shape and t.stride(1) == 0
            index = target.positions[:, None].to(t.device)
            assert torch.equal(t[torch.arange(n)[:, None], index], cache[name][torch.arange(n)[:, None], index])


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_dla_refuses_other_positions_and_keep_makes_them_whole(load, kind):
    model = load("llama", kind)
    batch, (target, cache), (streamed_target, small) = _routes(model, "right")
    mask = batch.attention_mask
    with pytest.raises(ValueError, match=r"keep=mechnorm.hooks_for\('dla'\)"):
        mechnorm.direct_logit_attribution(small, model, streamed_target, positions="all", attention_mask=mask)
    _, whole = mechnorm.run_streamed(model, batch, READOUTS, keep=mechnorm.hooks_for("dla"))
    assert not [t for t in whole.cache_dict.values() if isinstance(t, PredictionRows)]
    a = mechnorm.direct_logit_attribution(cache, model, target, positions="all", attention_mask=mask)
    b = mechnorm.direct_logit_attribution(whole, model, streamed_target, positions="all", attention_mask=mask)
    _same_fields(a, b)
    assert mechnorm.can_stream(["logit_lens", "dla", "direct_logit_attribution"])


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_readouts_do_not_depend_on_padding(load, kind):
    model = load("neox", kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    target, small = mechnorm.run_streamed(model, batch, READOUTS)
    lens = mechnorm.logit_lens(small, model, target, attention_mask=batch.attention_mask)
    dla = mechnorm.direct_logit_attribution(small, model, target, attention_mask=batch.attention_mask)
    for i, text in enumerate(TEXTS):
        alone = mechnorm.tokenize(model, text)
        target_1, small_1 = mechnorm.run_streamed(model, alone, READOUTS)
        assert target_1.ids.item() == target.ids[i].item()
        lens_1 = mechnorm.logit_lens(small_1, model, target_1)
        dla_1 = mechnorm.direct_logit_attribution(small_1, model, target_1)
        torch.testing.assert_close(lens.target_logit[:, i], lens_1.target_logit[:, 0], rtol=1e-4, atol=1e-5)
        assert torch.equal(lens.top_ids[:, i], lens_1.top_ids[:, 0])
        torch.testing.assert_close(dla.scores[:, i], dla_1.scores[:, 0], rtol=1e-4, atol=1e-5)
