"""Shared fixtures: tiny randomly initialised HF models saved locally, loaded offline.

Three architectures cover the norm and position variants the methods must handle:
GPT-2 (LayerNorm, learned position table), Llama (RMSNorm, rotary) and GPT-NeoX
(LayerNorm, rotary: no position embedding table).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import mechnorm

WORDS = (
    "<pad> <bos> <unk> the a key keys to of cabinet cabinets table tables is are was were "
    "old wooden red big small near on by dog dogs cat cats runs run and b c d = 1 2 3 4 5 6 7"
).split()
ARCHITECTURES = ("gpt2", "llama", "neox")
# only the model kinds the installed transformer-lens offers: 4.x removed HookedTransformer
KINDS = ("hooked", "bridge") if mechnorm.models.hooked_available() else ("bridge",)
TEXTS = ["the keys to the old cabinet", "the key", "a dog near the red tables runs and"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS``."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<bos>", unk_token="<unk>"
    )


def build_hf_model(arch: str, seed: int = 0):
    """A 2-block randomly initialised causal LM; weights scaled up so logits are not ~0."""
    common = dict(vocab_size=len(WORDS), bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2, **common)
        cls = GPT2LMHeadModel
    elif arch == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.2,
            tie_word_embeddings=False, **common,
        )
        cls = LlamaForCausalLM
    elif arch == "neox":
        config = GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rotary_pct=0.5, initializer_range=0.2, tie_word_embeddings=False, **common,
        )
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial norm affines, so a wrong norm shows up in the numbers
        for name, param in model.named_parameters():
            if "norm" in name or name.split(".")[-2].startswith(("ln", "layernorm", "final_layer_norm")):
                param.add_(0.3 * torch.randn_like(param))
    return model


def random_hooked_transformer(n_layers=2, d_model=16, act_fn="gelu", seed=0, n_ctx=16, d_vocab=23):
    """A small randomly initialised GPT-2-like model (LayerNorm): a HookedTransformer built directly
    in TL where the installed transformer-lens has one, else (4.x) the same shape through the bridge."""
    if "hooked" not in KINDS:
        return _random_bridge(n_layers, d_model, act_fn, seed, n_ctx, d_vocab)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=4, n_heads=d_model // 4, d_mlp=2 * d_model,
        n_ctx=n_ctx, d_vocab=d_vocab, act_fn=act_fn, normalization_type="LN", seed=seed,
    )
    return HookedTransformer(cfg).eval()


def _random_bridge(n_layers, d_model, act_fn, seed, n_ctx, d_vocab):
    """A random HF GPT-2 of the HookedTransformerConfig's shape, through mechnorm's bridge loader.

    TL's default init (std 0.8/sqrt(d_model)) is kept so activations are of the same scale;
    SoLU has no HF counterpart, so ``"solu_ln"`` (used only to make two models differ) becomes ReLU.
    """
    import tempfile

    config = GPT2Config(
        n_embd=d_model, n_layer=n_layers, n_head=d_model // 4, n_inner=2 * d_model, n_positions=n_ctx,
        vocab_size=d_vocab, activation_function={"solu_ln": "relu"}.get(act_fn, act_fn),
        initializer_range=0.8 / d_model**0.5,
    )
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="mechnorm-test-") as tmp:
        GPT2LMHeadModel(config).save_pretrained(tmp)
        return mechnorm.load_model(tmp, kind="bridge")


def assert_padding_matches_alone(model, method: str, padding_side: str) -> None:
    """The registered ``method`` (a ``(cache, head, target)`` function) on ``TEXTS`` padded on
    ``padding_side`` gives each sequence the scores it gets alone, and NaN at its padding."""
    function = mechnorm.get_method(method).function
    head = mechnorm.UnembedHead(model)
    batch = mechnorm.tokenize(model, TEXTS, padding_side=padding_side)
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for(method))
    batched = function(cache, head, mechnorm.predicted(logits, batch.attention_mask), attention_mask=batch.attention_mask)
    for i, text in enumerate(TEXTS):
        alone = mechnorm.tokenize(model, text)
        logits_1, cache_1 = mechnorm.run_with_cache(model, alone, mechnorm.hooks_for(method))
        single = function(cache_1, head, mechnorm.predicted(logits_1))
        real = batched.mask[i]
        assert real.sum() == alone.tokens.shape[1]
        assert torch.isnan(batched.scores[:, i, ~real]).all()
        torch.testing.assert_close(batched.scores[:, i, real], single.scores[:, 0], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """Each tiny architecture saved in HF format (config.json, model.safetensors, tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCHITECTURES:
        path = root / f"tiny-{arch}"
        build_hf_model(arch).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_LOADED: dict = {}


@pytest.fixture
def load(model_dirs):
    """``load(arch, kind)``: the tiny model through mechnorm.load_model, memoised per session."""

    def _load(arch: str, kind: str = KINDS[0]):
        key = (arch, kind)
        if key not in _LOADED:
            _LOADED[key] = mechnorm.load_model(model_dirs[arch], kind=kind)
        return _LOADED[key]

    return _load


@pytest.fixture
def hf_model(model_dirs):
    """``hf_model(arch)``: the plain transformers model read back from disk."""
    from transformers import AutoModelForCausalLM

    return lambda arch: AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
