"""Streaming (cache-free) attribution equals the cached route; gradient methods within budgets."""

import warnings
import weakref
from dataclasses import replace

import pytest
import torch
from conftest import ARCHITECTURES, KINDS, TEXTS

import mechnorm
from mechnorm.methods import grad_budget
from mechnorm.methods.registry import _REGISTRY
from mechnorm.streaming import STREAMABLE

OPTIONS = {"rollout": {"head_fusion": "max", "discard_ratio": 0.2}, "attention": {"layer": 1, "heads": 2}}
METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "attention")


def _same(a: mechnorm.Attribution, b: mechnorm.Attribution) -> None:
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0, equal_nan=True)  # bit for bit
    assert torch.equal(a.mask, b.mask) and a.layers == b.layers and a.target_labels == b.target_labels


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_streamed_results_equal_the_cached_route(load, arch, kind, side):
    model = load(arch, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = mechnorm.attribute(model, TEXTS, methods=METHODS, padding_side=side, options=OPTIONS, stream=False)
        streamed = mechnorm.attribute(model, TEXTS, methods=METHODS, padding_side=side, options=OPTIONS, stream=True)
        # the default rollout options too, since the hooks key their work on the options
        plain = mechnorm.attribute(model, TEXTS, methods=("rollout",), padding_side=side, stream=True)
        plain_cached = mechnorm.attribute(model, TEXTS, methods=("rollout",), padding_side=side, stream=False)
    for method in METHODS:
        _same(streamed[method], cached[method])
    _same(plain["rollout"], plain_cached["rollout"])


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_padding_does_not_change_a_sequence(load, kind):
    model = load("gpt2", kind)
    together = mechnorm.attribute(model, TEXTS, methods=METHODS, padding_side="left", options=OPTIONS, stream=True)
    for i, text in enumerate(TEXTS):
        alone = mechnorm.attribute(model, text, methods=METHODS, options=OPTIONS, stream=True)
        for method in METHODS:
            real = together[method].mask[i]
            assert torch.isnan(together[method].scores[:, i, ~real]).all()
            torch.testing.assert_close(together[method].scores[:, i, real], alone[method].scores[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_prediction_is_the_models_argmax_and_a_given_target_is_used(load, kind):
    model = load("llama", kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    target, cache = mechnorm.run_streamed(model, batch, ["normxlogit"])
    with torch.inference_mode():
        logits = model(batch.tokens, attention_mask=batch.attention_mask.long())
    expected = mechnorm.predicted(logits, batch.attention_mask)
    assert torch.equal(target.ids.cpu(), expected.ids.cpu()) and torch.equal(target.positions.cpu(), expected.positions.cpu())
    given = mechnorm.token_target(["cabinet"] * len(TEXTS), model)
    cached = mechnorm.attribute(model, batch, methods=("logat",), target=given, stream=False)
    streamed = mechnorm.attribute(model, batch, methods=("logat",), target=given, stream=True)
    _same(streamed["logat"], cached["logat"])
    assert streamed["logat"].target_labels == cached["logat"].target_labels


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_keeps_no_attention_pattern_and_less_than_the_cache(load, kind):
    model = load("neox", kind)
    batch = mechnorm.tokenize(model, TEXTS)
    _, streamed = mechnorm.run_streamed(model, batch, ["normxlogit", "rollout"])
    _, cached = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit", "rollout"))
    assert not [name for name in streamed.keys() if "pattern" in name]
    (mixed,) = streamed.streamed.values()
    n_blocks, (n, pos) = model.cfg.n_layers, batch.tokens.shape
    assert len(mixed) == n_blocks and all(m.shape == (n, pos, pos) for m in mixed)
    for block, packed in enumerate(mixed.packed):  # only the lower triangle is stored, and it unpacks exactly
        assert packed.shape == (n, pos * (pos + 1) // 2) and torch.equal(mixed[block], mixed[block].tril())
    kept = sum(t.numel() * t.element_size() for t in streamed.cache_dict.values()) + sum(p.numel() * 4 for p in mixed.packed)
    held = sum(t.numel() * t.element_size() for t in cached.cache_dict.values())
    # every head's full pattern gives way to one lower triangle per block; the residual rows are the same in both
    patterns = n_blocks * n * model.cfg.n_heads * pos * pos * 4
    assert held - kept == patterns - n_blocks * n * pos * (pos + 1) // 2 * 4


def test_default_streams_only_when_every_cache_method_can(load, monkeypatch):
    model = load("gpt2")
    calls = []
    real = mechnorm.compare.run_streamed
    monkeypatch.setattr(mechnorm.compare, "run_streamed", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    forwards = []
    monkeypatch.setattr(model, "run_with_hooks", lambda *a, **k: forwards.append(1) or type(model).run_with_hooks(model, *a, **k))
    mechnorm.attribute(model, TEXTS, methods=("normxlogit", "rollout"), batch_size=2)
    assert calls == [["normxlogit", "rollout"]] * 2 and len(forwards) == 2  # one streamed pass per batch of 2
    mechnorm.attribute(model, TEXTS[:1], methods=("normxlogit", "globenc"))
    assert len(calls) == 2  # globenc reads a cache: not streamed
    with pytest.raises(ValueError, match=r"stream=True cannot compute \['globenc'\]"):
        mechnorm.attribute(model, TEXTS[:1], methods=("normxlogit", "globenc"), stream=True)
    assert mechnorm.can_stream(sorted(STREAMABLE)) and not mechnorm.can_stream(["decompx"])


@pytest.mark.parametrize("stream", [False, True])
def test_the_cache_is_released_before_gradient_methods_run(load, monkeypatch, stream):
    model = load("gpt2")
    caches = []
    route = "run_streamed" if stream else "run_with_cache"
    real_run = getattr(mechnorm.compare, route)

    def run(*args, **kwargs):
        out = real_run(*args, **kwargs)
        caches.append(weakref.ref(out[1]))
        return out

    alive_during_saliency = []
    spec = _REGISTRY["saliency"]

    def saliency(**kwargs):
        alive_during_saliency.append(caches[-1]() is not None)
        return spec.function(**kwargs)

    saliency.__signature__ = __import__("inspect").signature(spec.function)
    monkeypatch.setattr(mechnorm.compare, route, run)
    monkeypatch.setitem(_REGISTRY, "saliency", replace(spec, function=saliency))
    comp = mechnorm.attribute(model, TEXTS, methods=("saliency", "normxlogit"), batch_size=2, stream=stream)
    assert alive_during_saliency == [False, False] and comp.methods == ["saliency", "normxlogit"]
