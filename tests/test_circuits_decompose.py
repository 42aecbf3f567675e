"""The residual decomposition: components sum to the cached residual, attention splits by source.

Every check compares with what the model itself cached (``hook_resid_*``, ``hook_attn_out``,
``hook_z``) or with a plain loop written here, on GPT-2 (learned positions, biases), Llama
(rotary, RMSNorm, no biases), GPT-NeoX (parallel attention + MLP) and a grouped-query Llama.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import KINDS, WORDS, build_hf_model, word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

import mechnorm
from mechnorm.circuits import attention_by_source, attention_output_weights, components
from mechnorm.residual import MissingHooksError

CIRCUIT_ARCHS = ("gpt2", "llama", "neox", "gqa")
TOKENS = [[1, 3, 5, 7, 3, 9, 11], [1, 4, 6, 8], [1, 17, 21, 3, 10]]


def build_circuit_model(arch: str, seed: int = 0):
    """The conftest tiny models, with non-zero biases (HF initialises them to 0, which would hide
    a lost bias), plus ``"gqa"``: a Llama with 2 key-value heads for 4 query heads."""
    if arch == "gqa":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
            vocab_size=len(WORDS), bos_token_id=1, eos_token_id=1, pad_token_id=0,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))
        return model
    model = build_hf_model(arch, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


_DIRS: dict = {}
_MODELS: dict = {}


@pytest.fixture(scope="session")
def circuit_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuit-models")
    for arch in CIRCUIT_ARCHS:
        path = root / arch
        build_circuit_model(arch).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        _DIRS[arch] = str(path)
    return _DIRS


@pytest.fixture
def circuit_model(circuit_dirs):
    """``circuit_model(arch, kind)``: loaded once per session."""

    def _load(arch, kind):
        if (arch, kind) not in _MODELS:
            _MODELS[(arch, kind)] = mechnorm.load_model(circuit_dirs[arch], kind=kind)
        return _MODELS[(arch, kind)]

    return _load


def padded(side: str, rows=TOKENS):
    return mechnorm.pad(rows, 0, side)


def run(model, tokens, mask, names_filter=None):
    with torch.inference_mode():
        return model.run_with_cache(tokens, attention_mask=mask.long(), names_filter=names_filter)


def resid(cache, layer):
    return cache["blocks.0.hook_resid_pre"] if layer == 0 else cache[f"blocks.{layer - 1}.hook_resid_post"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", CIRCUIT_ARCHS)
def test_components_sum_to_every_layer_residual(circuit_model, arch, kind):
    model = circuit_model(arch, kind)
    tokens, mask = padded("right")
    _, cache = run(model, tokens, mask)
    n_layers = model.cfg.n_layers
    for layer in range(n_layers + 1):
        for split in (True, False):
            stack = components(cache, layer=layer, positions="all", split_heads=split)
            assert stack.vectors.shape[1:] == (*tokens.shape, model.cfg.d_model)
            torch.testing.assert_close(stack.vectors.sum(0), resid(cache, layer).float(), atol=2e-6, rtol=1e-5)
    stack = components(cache)
    heads = [f"L{i}H{h}" for i in range(n_layers) for h in range(model.cfg.n_heads)]
    assert [lab for lab in stack.labels if "H" in lab] == heads
    assert stack.layer == n_layers
    assert ("pos_embed" in stack.labels) == (arch == "gpt2")
    assert ("L0.attn_bias" in stack.labels) == (arch in ("gpt2", "neox"))  # Llama has no output bias


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "gqa"])
def test_each_head_equals_its_slice_of_the_output_projection(circuit_model, arch, kind):
    """Head h's vector is z^h · W_O^h, written out here as a loop over heads."""
    model = circuit_model(arch, kind)
    tokens, mask = padded("right")
    _, cache = run(model, tokens, mask)
    stack = components(cache, layer=1, positions="prediction", attention_mask=mask)
    last = mask.long().sum(-1) - 1
    w_o = model.blocks[0].attn.W_O.detach()
    for h in range(model.cfg.n_heads):
        expected = torch.stack([cache["blocks.0.attn.hook_z"][b, last[b], h] @ w_o[h] for b in range(len(last))])
        torch.testing.assert_close(stack.vectors[stack.index(f"L0H{h}"), :, 0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_each_sequence_what_it_gets_alone(circuit_model, kind, side):
    model = circuit_model("gpt2", kind)
    tokens, mask = padded(side)
    _, cache = run(model, tokens, mask)
    stack = components(cache, positions="prediction", attention_mask=mask)
    for b, row in enumerate(TOKENS):
        alone_tokens, alone_mask = padded(side, [row])
        _, alone = run(model, alone_tokens, alone_mask)
        single = components(alone)
        assert single.labels == stack.labels
        torch.testing.assert_close(stack.vectors[:, b], single.vectors[:, 0], atol=2e-5, rtol=1e-4)
        parts = attention_by_source(cache, 1, positions=stack.positions, split_heads=True)[b, 0]  # [head, src, d]
        real = mask[b].nonzero().flatten()
        alone_parts = attention_by_source(alone, 1, positions=single.positions)[0, 0]
        torch.testing.assert_close(parts.sum(0)[real], alone_parts, atol=2e-5, rtol=1e-4)
        padding = (~mask[b]).nonzero().flatten()
        assert torch.all(parts[:, padding] == 0)  # padding keys get no attention


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", CIRCUIT_ARCHS)
def test_attention_by_source_sums_to_the_attention_output(circuit_model, arch, kind):
    model = circuit_model(arch, kind)
    tokens, mask = padded("right")
    _, cache = run(model, tokens, mask)
    for block in range(model.cfg.n_layers):
        w_o, b_o = attention_output_weights(model, block)
        bias = 0.0 if b_o is None else b_o
        parts = attention_by_source(cache, block, split_heads=True)  # [batch, q, head, src, d_model]
        assert parts.shape == (*tokens.shape, model.cfg.n_heads, tokens.shape[1], model.cfg.d_model)
        torch.testing.assert_close(parts.sum((2, 3)) + bias, cache[f"blocks.{block}.hook_attn_out"], atol=2e-6, rtol=1e-5)
        by_head = parts.sum(3)  # each head's output: z^h W_O^h, from the model's own hook_z
        torch.testing.assert_close(
            by_head, torch.einsum("bqhe,hem->bqhm", cache[f"blocks.{block}.attn.hook_z"], w_o), atol=2e-6, rtol=1e-5
        )
        summed = attention_by_source(cache, block, positions=torch.tensor([[2], [3], [4]]))
        torch.testing.assert_close(summed[:, 0], parts[[0, 1, 2], [2, 3, 4]].sum(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_by_source_matches_a_loop_with_shared_kv_heads(circuit_model, kind):
    """GQA: query head h reads key-value head h // (n_heads / n_kv_heads), checked one term at a time."""
    model = circuit_model("gqa", kind)
    tokens, mask = padded("right")
    _, cache = run(model, tokens, mask)
    parts = attention_by_source(cache, 1, split_heads=True)
    pattern, v = cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_v"]
    w_o = model.blocks[1].attn.W_O.detach()
    group = model.cfg.n_heads // v.shape[2]
    assert group == 2
    for b, q, h, j in [(0, 6, 0, 2), (0, 6, 3, 5), (2, 4, 1, 0), (1, 3, 2, 3)]:
        expected = pattern[b, h, q, j] * (v[b, j, h // group] @ w_o[h])
        torch.testing.assert_close(parts[b, q, h, j], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_mutates_the_cache_and_missing_hooks_are_named(circuit_model, kind):
    model = circuit_model("gpt2", kind)
    tokens, mask = padded("left")
    _, cache = run(model, tokens, mask, names_filter=mechnorm.hooks_for("components", "attention_by_source"))
    before = {k: v.clone() for k, v in cache.items()}
    components(cache, positions="all")
    components(cache, split_heads=False, attention_mask=mask)
    attention_by_source(cache, 0, split_heads=True)
    for name, value in before.items():
        assert torch.equal(cache[name], value), name
    assert "blocks.0.hook_resid_post" not in cache  # the filter keeps only what the decomposition reads
    _, partial = run(model, tokens, mask, names_filter=lambda n: n in ("hook_embed", "hook_pos_embed"))
    with pytest.raises(MissingHooksError, match=r"blocks\.0\.attn\.hook_z"):
        components(partial)
    with pytest.raises(MissingHooksError, match=r"blocks\.1\.attn\.hook_pattern"):
        attention_by_source(partial, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_say_what_to_pass(circuit_model, kind):
    model = circuit_model("llama", kind)
    tokens, mask = padded("right")
    _, cache = run(model, tokens, mask)
    with pytest.raises(ValueError, match="out of range"):
        components(cache, layer=3)
    with pytest.raises(ValueError, match=r"\[batch=3, k\]"):
        components(cache, positions=torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the sequence length"):
        components(cache, positions=torch.tensor([[9], [0], [0]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        components(cache, attention_mask=mask[:2])
    with pytest.raises(ValueError, match="blocks 0…1"):
        attention_output_weights(model, 2)
    # negative layers count from L, like every other layer argument in mechnorm
    torch.testing.assert_close(components(cache, layer=-1).vectors, components(cache, layer=2).vectors)


@pytest.mark.parametrize("kind", KINDS)
def test_post_norm_encoders_are_refused_with_the_reason(kind):
    bert = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    with torch.inference_mode():
        _, cache = bert.run_with_cache(torch.tensor([[1, 5, 6, 2]]))
    with pytest.raises(ValueError, match="post-LN encoder"):
        components(cache)
    with pytest.raises(ValueError, match="post-LN encoder"):
        mechnorm.direct_logit_attribution(cache, mechnorm.zoo.classifier_head("bert-lexicon"), mechnorm.token_target([0]))


@pytest.mark.parametrize("kind", KINDS)
def test_a_residual_the_components_do_not_explain_is_reported(circuit_model, kind):
    """An architecture writing to the residual in ways the decomposition does not model shows up as a sum mismatch."""
    from transformer_lens import ActivationCache

    model = circuit_model("gpt2", kind)
    tokens, mask = padded("right")
    _, cache = run(model, tokens, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        components(cache, layer=2)  # the true residual: no warning
    altered = {name: value for name, value in cache.items()}
    altered["blocks.1.hook_resid_post"] = 1.5 * cache["blocks.1.hook_resid_post"]  # a post-block scaling
    with pytest.warns(UserWarning, match=r"do not sum to the cached residual blocks\.1\.hook_resid_post"):
        components(ActivationCache(altered, model), layer=2)
