"""load_model never surprises: the kind follows the installed TransformerLens, a model gives the
same tokens by name and by folder, folders without a tokenizer load, and what cannot be loaded
fails in one sentence that names the fix."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import KINDS, build_hf_model, word_tokenizer

import mechnorm
from mechnorm import fetch, models
from mechnorm.models import HookedUnavailableError, ModelLoadError, ModelNotFoundError, ModelUnreachableError

IDS = torch.tensor([[1, 3, 5, 7, 9], [1, 4, 6, 8, 3]])


def hf_logits(path, ids=IDS):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


def tl_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- which kind


def test_default_kind_follows_the_installed_transformer_lens(model_dirs):
    has_hooked = importlib.util.find_spec("transformer_lens.HookedTransformer") is not None
    assert models.hooked_available() is has_hooked
    assert KINDS == (("hooked", "bridge") if has_hooked else ("bridge",))
    model = mechnorm.load_model(model_dirs["gpt2"])
    assert type(model).__name__ == ("HookedTransformer" if has_hooked else "TransformerBridge")


def test_hooked_without_hooked_transformer_says_both_fixes(model_dirs, monkeypatch):
    monkeypatch.setattr(models, "hooked_available", lambda: False)  # as on transformer-lens 4.x
    with pytest.raises(HookedUnavailableError) as caught:
        mechnorm.load_model(model_dirs["gpt2"], kind="hooked")
    message = one_line(caught.value)
    assert "kind='bridge'" in message and 'pip install "transformer-lens<4"' in message
    assert isinstance(caught.value, ImportError)
    assert type(mechnorm.load_model(model_dirs["gpt2"])).__name__ == "TransformerBridge"  # the default follows


def test_cli_reports_an_unavailable_kind_in_one_line(model_dirs, monkeypatch, capsys):
    from mechnorm.cli import main

    monkeypatch.setattr(models, "hooked_available", lambda: False)
    assert main(["explain", "--model", model_dirs["gpt2"], "--kind", "hooked", "--text", "the key"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mechnorm: error: kind='hooked'") and "\n" not in err


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def untokenized(tmp_path_factory):
    """The tiny Llama saved without any tokenizer file."""
    path = tmp_path_factory.mktemp("no-tokenizer")
    build_hf_model("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_folder_without_tokenizer_loads_for_token_ids(untokenized, kind):
    model = mechnorm.load_model(untokenized, kind=kind)
    assert model.tokenizer is None
    torch.testing.assert_close(tl_logits(model), hf_logits(untokenized), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no tokenizer; pass token ids"):
        mechnorm.tokenize(model, "the key")
    batch = mechnorm.Batch(IDS, torch.ones_like(IDS, dtype=torch.bool))
    scores = mechnorm.attribute(model, batch, methods=("normxlogit",))["normxlogit"].scores
    assert scores.shape == (3, 2, 5) and torch.isfinite(scores).all()


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_can_be_given(untokenized, model_dirs, kind):
    expected = word_tokenizer()("the key", add_special_tokens=False).input_ids
    for tokenizer in (word_tokenizer(), model_dirs["llama"]):  # an object, or a folder to read one from
        model = mechnorm.load_model(untokenized, kind=kind, tokenizer=tokenizer)
        assert model.to_tokens("the key", prepend_bos=False)[0].tolist() == expected
        assert mechnorm.tokenize(model, "the key", prepend_bos=False).tokens[0].tolist() == expected


# --------------------------------------------------------------------------- one model, one answer


def copy_with_marker(source, target, marker: dict | None):
    shutil.copytree(source, target)
    if marker is not None:
        (target / fetch.MARKER).write_text(json.dumps(marker))
    return target


@pytest.mark.parametrize("kind", KINDS)
def test_fetch_marker_decides_bos_by_name_and_by_path(model_dirs, tmp_path, monkeypatch, kind):
    words = word_tokenizer()("the keys to the old cabinet", add_special_tokens=False).input_ids
    plain = copy_with_marker(model_dirs["llama"], tmp_path / "plain", None)
    recorded = copy_with_marker(model_dirs["llama"], tmp_path / "recorded", {"name": "tiny-named", "prepend_bos": False})
    by_name = copy_with_marker(model_dirs["llama"], tmp_path / "by-name", {"name": "smollm2-135m"})  # older markers

    assert mechnorm.load_model(plain, kind=kind).cfg.default_prepend_bos is True  # TransformerLens's default
    for folder in (recorded, by_name):
        model = mechnorm.load_model(folder, kind=kind)
        assert model.cfg.default_prepend_bos is False
        assert model.to_tokens("the keys to the old cabinet")[0].tolist() == words
        assert mechnorm.tokenize(model, "the keys to the old cabinet").tokens[0].tolist() == words

    # the name route reads the same marker: same tokens, same logits
    monkeypatch.setitem(fetch.NAMED_MODELS, "tiny-named", fetch.NamedModel("p", "0", "g", None, "", "", "", prepend_bos=False))
    monkeypatch.setattr(fetch, "local_path", lambda name: recorded)
    named, pathed = mechnorm.load_model("tiny-named", kind=kind), mechnorm.load_model(recorded, kind=kind)
    a, b = mechnorm.tokenize(named, "the key"), mechnorm.tokenize(pathed, "the key")
    assert a.tokens.tolist() == b.tokens.tolist() == [words[:1] + [5]]
    torch.testing.assert_close(tl_logits(named, a.tokens), tl_logits(pathed, b.tokens))


REAL = "smollm2-135m"


@pytest.mark.skipif(not fetch.is_fetched(REAL), reason=f"{REAL} is not fetched; run `mechnorm fetch {REAL}`")
def test_real_smollm2_by_name_and_by_path_agree():
    from transformers import AutoTokenizer

    path = fetch.local_path(REAL)
    text = "The keys to the old wooden cabinet"
    plain = AutoTokenizer.from_pretrained(path)(text).input_ids  # SmolLM2's own tokenizer adds no BOS
    by_name, by_path = mechnorm.load_model(REAL), mechnorm.load_model(path)
    for model in (by_name, by_path):
        assert model.cfg.default_prepend_bos is False
        assert model.to_tokens(text)[0].tolist() == plain
        assert mechnorm.tokenize(model, text).tokens[0].tolist() == plain
    ids = torch.tensor([plain])
    torch.testing.assert_close(tl_logits(by_name, ids)[0, -1], tl_logits(by_path, ids)[0, -1])


# --------------------------------------------------------------------------- failures in one line


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_hub_name_fails_in_one_line_with_the_offline_options(monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnreachableError) as caught:
        mechnorm.load_model("mechnorm-test/never-cached-model", kind=kind)
    message = one_line(caught.value)
    assert "HF_HUB_OFFLINE" in message and "zoo:gpt2-agree-recall" in message and "mechnorm fetch" in message
    assert "local" in message and isinstance(caught.value, OSError)
    with pytest.raises(ModelUnreachableError):  # a tokenizer named by hub id likewise
        mechnorm.load_model("zoo:gpt2-agree-recall", kind=kind, tokenizer="mechnorm-test/never-cached-model")


def test_failed_download_becomes_one_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files ... (80 lines)")

    monkeypatch.setattr(models, "_load_bridge", no_network)
    with pytest.raises(ModelUnreachableError, match="cannot be reached") as caught:
        mechnorm.load_model("mechnorm-test/never-cached-model", kind="bridge")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # raised `from None`


def test_missing_local_path_fails_in_one_line(tmp_path):
    for missing in (tmp_path / "missing", "./no/such/model", "no/such/model"):
        with pytest.raises(ModelNotFoundError, match="No model directory") as caught:
            mechnorm.load_model(missing)
        assert "zoo:" in one_line(caught.value) and isinstance(caught.value, (FileNotFoundError, ModelLoadError))
