"""Heads, targets, the Attribution result and model loading, each against an independent reference."""

import pandas as pd
import pytest
import torch

import mechnorm
from conftest import KINDS, TEXTS


def test_linear_head_equals_torch_linear_after_norm():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 3)
    norm = torch.nn.LayerNorm(16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    head = mechnorm.LinearHead(linear.weight, linear.bias, norm=mechnorm.FinalNorm("layernorm", norm.weight, norm.bias, norm.eps))
    resid = torch.randn(4, 2, 5, 16)  # [layer, batch, pos, d_model]
    expected = linear(norm(resid)).detach()
    torch.testing.assert_close(head(resid), expected, rtol=1e-5, atol=1e-5)
    columns = torch.tensor([[2], [0]])  # one class per sequence
    picked = head(resid, columns)
    torch.testing.assert_close(picked[:, 0, :, 0], expected[:, 0, :, 2])
    torch.testing.assert_close(picked[:, 1, :, 0], expected[:, 1, :, 0])


def test_rmsnorm_matches_a_reference_rmsnorm():
    torch.manual_seed(1)
    weight = torch.randn(8)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(mechnorm.FinalNorm("rmsnorm", weight, None, 1e-6)(x), expected)


def test_module_head_gathers_columns_of_the_module_output():
    torch.manual_seed(2)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    head = mechnorm.ModuleHead(module, n_outputs=3)
    resid = torch.randn(2, 2, 4, 8)
    out = head(resid, torch.tensor([[1], [2]]))
    full = module(resid).detach()
    torch.testing.assert_close(out[:, 0, :, 0], full[:, 0, :, 1])
    torch.testing.assert_close(out[:, 1, :, 0], full[:, 1, :, 2])
    with pytest.raises(ValueError, match="out of range"):
        head(resid, torch.tensor([[3], [0]]))


def test_linear_head_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[n_classes, d_model\]"):
        mechnorm.LinearHead(torch.randn(4))
    with pytest.raises(ValueError, match="bias must be"):
        mechnorm.LinearHead(torch.randn(2, 4), torch.randn(3))


def test_predicted_reads_the_last_real_token_under_either_padding():
    logits = torch.zeros(2, 4, 5)
    logits[0, 3, 1] = 1  # right-padded row 0 ends at position 1; position 3 is padding
    logits[0, 1, 4] = 1
    logits[1, 3, 2] = 1  # left-padded row 1 ends at position 3
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    target = mechnorm.predicted(logits, mask)
    assert target.positions.tolist() == [1, 3]
    assert target.ids.tolist() == [4, 2]
    assert mechnorm.predicted(logits, position=0).positions.tolist() == [0, 0]
    with pytest.raises(ValueError, match="outside the sequence"):
        mechnorm.predicted(logits, position=4)
    with pytest.raises(ValueError, match=r"\[batch, pos, vocab\]"):
        mechnorm.predicted(logits[0])


def test_contrast_columns_and_reduce():
    target = mechnorm.contrast(3, 5)
    assert target.columns(2).tolist() == [[3, 5], [3, 5]]
    assert target.reduce(torch.tensor([[2.0, 0.5]])).tolist() == [1.5]
    with pytest.raises(ValueError, match="cannot itself be a contrast"):
        mechnorm.contrast(1, target)


def make_attribution():
    scores = torch.tensor([[[1.0, 3.0, 2.0], [5.0, -1.0, 9.0]], [[0.0, -2.0, 4.0], [1.0, 7.0, 9.0]]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    tokens = [["<bos>", "the", "key"], ["<pad>", "a", "dog"]]
    return mechnorm.Attribution(scores, layers=(0, 2), mask=mask, method="demo", tokens=tokens, target_labels=(" is", " runs"))


def test_attribution_masks_padding_and_ranks_signed_scores():
    attr = make_attribution()
    assert torch.isnan(attr.scores[:, 1, 0]).all()
    top = attr.top_k(2)  # last layer: row 0 -> [0, -2, 4], row 1 -> [pad, 7, 9]
    assert top[top.batch == 0].token.tolist() == ["key", "<bos>"]
    assert top[top.batch == 1].token.tolist() == ["dog", "a"]
    assert attr.top_k(1, layer=0).token.tolist() == ["the", "dog"]
    with pytest.raises(ValueError, match="not computed"):
        attr.row(1)


def test_attribution_to_frame_is_tidy_and_drops_padding():
    frame = make_attribution().to_frame()
    assert list(frame.columns) == ["method", "layer", "batch", "pos", "token", "score", "protected"]
    assert not frame.protected.any()  # nothing marked: make_attribution gives no protected positions
    assert len(frame) == 2 * 5  # two layers × five real positions
    row = frame[(frame.layer == 2) & (frame.batch == 1) & (frame.pos == 1)]
    assert row.token.item() == "a" and row.score.item() == 7.0
    assert not frame.score.isna().any()


def test_attribution_html_shows_tokens_and_target():
    page = make_attribution()._repr_html_()
    for piece in ("key", "dog", "runs", "demo"):
        assert piece in page
    assert "&lt;bos&gt;" in page


def test_attribution_checks_shapes():
    with pytest.raises(ValueError, match="layer labels"):
        mechnorm.Attribution(torch.zeros(2, 1, 3), layers=(0,), mask=torch.ones(1, 3, dtype=torch.bool), method="x")
    with pytest.raises(ValueError, match="mask shape"):
        mechnorm.Attribution(torch.zeros(1, 1, 3), layers=(0,), mask=torch.ones(1, 2, dtype=torch.bool), method="x")


def test_registry_lists_core_methods():
    table = mechnorm.list_methods()
    assert isinstance(table, pd.DataFrame)
    core = table.set_index("name").loc[["normxlogit", "logat", "embedding_norm"]]
    assert not core.needs_gradients.any()
    assert mechnorm.get_method("normxlogit").function is mechnorm.normxlogit


def test_tokenize_pads_with_an_explicit_mask_even_when_pad_equals_bos(load):
    model = load("gpt2")
    model.tokenizer.pad_token = model.tokenizer.bos_token  # the GPT-2 situation
    try:
        batch = mechnorm.tokenize(model, TEXTS[:2], padding_side="left")
    finally:
        model.tokenizer.pad_token = "<pad>"
    lengths = [len(t.split()) + 1 for t in TEXTS[:2]]  # words + BOS
    assert batch.attention_mask.sum(-1).tolist() == lengths
    assert batch.attention_mask[1, -1] and not batch.attention_mask[1, 0]
    assert batch.strings[0][0] == "<bos>"


def test_load_model_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="kind must be"):
        mechnorm.load_model(str(tmp_path), kind="encoder")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mechnorm.load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No model directory"):
        mechnorm.load_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_models_are_unprocessed_and_in_eval_mode(load, model_dirs, kind):
    from safetensors.torch import load_file

    model = load("gpt2", kind)
    assert not model.training
    assert not any(mechnorm.weight_processing(model).values())
    saved = load_file(f"{model_dirs['gpt2']}/model.safetensors")
    torch.testing.assert_close(model.W_E.detach(), saved["transformer.wte.weight"])
