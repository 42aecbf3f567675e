"""Gemma 2 and Gemma 3 through mechnorm: both model kinds, and heads that match the real head.

Small randomly initialised Gemma 2 (final-logit and attention soft-capping) and Gemma 3
(QK-norm, two rotary bases, sliding-window and global layers) models are saved to a tmp
folder and loaded with ``load_model``; every number is compared with plain transformers on
the same ids, with sequences longer than the sliding window. The real Gemma 3 270M runs when
``mechnorm fetch gemma3-270m`` has filled the cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS, WORDS, word_tokenizer

import mechnorm
from mechnorm import fetch
from mechnorm.heads import UNIT_OFFSET_NORMS, UnembedHead

WINDOW = 4
GEMMAS = ("gemma2", "gemma3")
# longer than the sliding window (4), so local and global layers see different keys
TEXT = "the keys to the old wooden cabinet near the red tables of the big dog are"


def build_gemma(arch: str, seed: int = 0):
    """A 4-block random Gemma; norm weights (the w of 1 + w) and softcaps made to matter."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    common = dict(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2,
        sliding_window=WINDOW, query_pre_attn_scalar=12, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    if arch == "gemma2":
        config = Gemma2Config(final_logit_softcapping=2.0, attn_logit_softcapping=3.0, **common)
        cls = Gemma2ForCausalLM
    else:
        rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}
        config = Gemma3TextConfig(rope_parameters=rope, **common)
        cls = Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    dirs = {}
    for arch in GEMMAS:
        build_gemma(arch).save_pretrained(root / arch)
        word_tokenizer().save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


_MODELS: dict = {}


@pytest.fixture
def gemma(gemma_dirs):
    """``gemma(arch, kind)`` -> (mechnorm model, the plain transformers model), memoised."""
    from transformers import AutoModelForCausalLM

    def get(arch, kind):
        if (arch, kind) not in _MODELS:
            hf = AutoModelForCausalLM.from_pretrained(gemma_dirs[arch]).eval()
            _MODELS[arch, kind] = (mechnorm.load_model(gemma_dirs[arch], kind=kind), hf)
        return _MODELS[arch, kind]

    return get


def _final_resid_and_logits(hf, ids):
    """The residual entering HF's final norm (captured by a hook) and HF's logits."""
    seen = []
    handle = hf.model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True)
    finally:
        handle.remove()
    return seen[0], out


def _by_hand(hf, resid):
    """Final norm with (1 + w), unembedding, and the config's soft-cap, written out."""
    norm = hf.model.norm
    x = resid.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight.float())
    logits = x @ hf.lm_head.weight.float().T
    cap = hf.config.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _rel_close(actual, expected, rtol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", GEMMAS)
def test_logits_equal_transformers_beyond_the_sliding_window(gemma, arch, kind):
    model, hf = gemma(arch, kind)
    ids = model.to_tokens(TEXT)
    assert ids.shape[1] > 3 * WINDOW and ids[0, 0] == 1, "BOS prepended, sequence longer than the window"
    with torch.no_grad():
        expected = hf(ids).logits
        # the window matters: a model without it would give other logits
        assert (hf(ids[:, -WINDOW:]).logits[0, -1] - expected[0, -1]).abs().max() > 1e-3
    _rel_close(model(ids), expected, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", GEMMAS)
def test_head_equals_transformers_logits_from_the_final_residual(gemma, arch, kind):
    model, hf = gemma(arch, kind)
    ids = model.to_tokens(TEXT)
    resid, out = _final_resid_and_logits(hf, ids)
    head = UnembedHead(model)
    assert head.softcap == hf.config.final_logit_softcapping
    if arch == "gemma2":  # the cap is active: logits reach into tanh's curved part
        assert out.logits.abs().max() > 0.8 * head.softcap
    # every path of the head: all columns, picked columns (folded norm), streamed normaliser
    _rel_close(head(resid), out.logits, rtol=1e-5)
    _rel_close(_by_hand(hf, resid), out.logits, rtol=1e-5)
    cols = torch.tensor([[3, 17, 40]])
    _rel_close(head(resid, cols), out.logits[..., cols[0]], rtol=1e-5)
    _rel_close(head.log_normalizer(resid, chunk_size=7), out.logits.logsumexp(-1), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", GEMMAS)
def test_logat_and_logit_lens_at_every_layer_equal_hand_computation(gemma, arch, kind):
    model, hf = gemma(arch, kind)
    batch = mechnorm.tokenize(model, TEXT)
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    resid, out = _final_resid_and_logits(hf, batch.tokens)
    states = list(out.hidden_states[:-1]) + [resid]  # HF's last state is after the final norm
    per_layer = torch.stack([_by_hand(hf, h) for h in states])  # [layer, batch, pos, vocab]
    target = mechnorm.predicted(logits)
    assert target.ids.tolist() == out.logits[:, -1].argmax(-1).tolist()
    head = UnembedHead(model)
    nxl = mechnorm.normxlogit(cache, head, target)
    norms = out.hidden_states[0].norm(dim=-1)  # includes Gemma's sqrt(d_model) embedding scale
    _rel_close(nxl.scores, norms[None] * per_layer[..., target.ids[0]])
    lens = mechnorm.logit_lens(cache, head, positions="all", chunk_size=7)
    final_argmax = per_layer[-1].argmax(-1, keepdim=True).expand(len(states), -1, -1, 1)
    _rel_close(lens.target_logit, per_layer.gather(-1, final_argmax)[..., 0])
    _rel_close(lens.entropy, torch.distributions.Categorical(logits=per_layer).entropy())


def test_unit_offset_comes_from_the_config_and_a_wrong_reading_is_refused(gemma, gemma_dirs, monkeypatch):
    model, _ = gemma("gemma3", "bridge")
    monkeypatch.setattr("mechnorm.heads.UNIT_OFFSET_NORMS", frozenset())
    with pytest.raises(ValueError, match="cannot reproduce the final norm.*UNIT_OFFSET_NORMS"):
        UnembedHead(model)


def test_head_with_unmodelled_logit_scaling_is_refused(gemma_dirs):
    model = mechnorm.load_model(gemma_dirs["gemma3"], kind="bridge")
    model.original_model.config.logit_scale = 0.25  # as Cohere's config sets it
    with pytest.raises(ValueError, match="logit_scale=0.25.*ModuleHead"):
        UnembedHead(model)


def test_gemma_model_types_have_unit_offset_norms():
    assert {"gemma", "gemma2", "gemma3_text"} <= UNIT_OFFSET_NORMS


def test_bridge_reports_both_rotary_bases(gemma):
    model, _ = gemma("gemma3", "bridge")
    assert (model.cfg.rotary_base, model.cfg.rotary_base_local) == (1e6, 10.0)


# --------------------------------------------------------------------------- the real Gemma 3 270M

REAL = "gemma3-270m"
needs_real = pytest.mark.skipif(
    not fetch.is_fetched(REAL), reason=f"{REAL} is not in mechnorm's cache ({fetch.cache_dir()}); run `mechnorm fetch {REAL}`"
)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch.local_path(REAL)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=KINDS)
def real_tl(request):
    if not fetch.is_fetched(REAL):
        pytest.skip(f"{REAL} is not in mechnorm's cache; run `mechnorm fetch {REAL}`")
    return mechnorm.load_model(REAL, kind=request.param)


@needs_real
def test_real_gemma_carries_its_licence_terms():
    path = fetch.local_path(REAL)
    assert "Gemma Terms of Use" in (path / "GEMMA_TERMS.html").read_text()
    assert (path / "NOTICE.md").is_file()
    assert "not open source" in fetch.NAMED_MODELS[REAL].licence


@needs_real
def test_real_gemma_logits_equal_transformers_beyond_the_window(real_hf, real_tl):
    hf, tokenizer = real_hf
    torch.manual_seed(0)
    long_ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), torch.randint(300, 20000, (1, 600))], 1)
    short_ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    for ids in (short_ids, long_ids):
        with torch.no_grad():
            expected = hf(ids).logits
        _rel_close(real_tl(ids), expected, rtol=1e-4)


@needs_real
def test_real_gemma_prepends_bos_and_knows_paris(real_hf, real_tl):
    hf, tokenizer = real_hf
    tokens = real_tl.to_tokens(PROMPT)
    assert tokens[0].tolist() == tokenizer(PROMPT).input_ids and tokens[0, 0] == tokenizer.bos_token_id
    assert real_tl.cfg.rotary_base == 1e6 and real_tl.cfg.rotary_base_local == 1e4
    with torch.no_grad():
        top = real_tl(tokens)[0, -1].topk(5).indices
        expected = hf(tokens).logits[0, -1].topk(5).indices
    # the 270M base model (Q4_K_M) ranks " the" (p=.19) and " a" above " Paris" (p=.08)
    assert top.tolist() == expected.tolist() and " Paris" in [real_tl.to_string(t) for t in top]


@needs_real
def test_real_gemma_logat_and_normxlogit_equal_hand_computation(real_hf, real_tl):
    hf, _ = real_hf
    batch = mechnorm.tokenize(real_tl, PROMPT)
    logits, cache = mechnorm.run_with_cache(real_tl, batch, mechnorm.hooks_for("normxlogit"))
    resid, out = _final_resid_and_logits(hf, batch.tokens)
    states = list(out.hidden_states[:-1]) + [resid]
    target = mechnorm.predicted(logits)
    column = hf.lm_head.weight[target.ids[0]].float()  # only the target's column: no full vocab per layer
    norm = hf.model.norm
    expected = torch.stack([
        (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)) @ column for h in states
    ])
    nxl = mechnorm.normxlogit(cache, UnembedHead(real_tl), target)
    assert nxl.scores.shape == (19, 1, batch.tokens.shape[1])
    _rel_close(nxl.scores, out.hidden_states[0].norm(dim=-1)[None] * expected)


@pytest.mark.parametrize("change", [
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    {"use_bidirectional_attention": True},
])
def test_hooked_config_refuses_what_it_cannot_reproduce(gemma_dirs, change):
    import json

    from mechnorm.hooked_configs import gemma_config_dict

    config = {**json.loads((gemma_dirs["gemma3"] / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match="kind='bridge'"):
        gemma_config_dict(config)


if "hooked" in KINDS:  # TL 3.x holds a Gemma 3 table; 4.x has no HookedTransformer

    @needs_real
    def test_real_gemma_hooked_config_equals_transformer_lens_table():
        import json

        import transformer_lens.loading_from_pretrained as loading

        from mechnorm.hooked_configs import gemma_config_dict

        table = loading.convert_hf_model_config("google/gemma-3-270m")  # by name: no hub access
        ours = gemma_config_dict(json.loads((fetch.local_path(REAL) / "config.json").read_text()))
        for key, value in table.items():
            if key in ("tokenizer_name", "quantization_method"):
                continue
            assert ours[key] == pytest.approx(value, rel=1e-6) if key == "eps" else ours[key] == value, key
        assert ours["attn_scale"] == table["d_head"] ** 0.5  # TL's default scale, here written out
