"""GlobEnc and ALTI against the papers' formulas written as plain loops over sequences, tokens and heads."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, KINDS, TEXTS

import mechnorm
from mechnorm import tasks
from mechnorm.circuits import attention_output_weights

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")
METHODS = {"globenc": mechnorm.globenc, "alti": mechnorm.alti}


def _run(model, texts=TEXTS, side="right", names_filter=None):
    batch = mechnorm.tokenize(model, texts, padding_side=side)
    _, cache = mechnorm.run_with_cache(model, batch, names_filter=names_filter)
    return batch, cache


def _bert(kind, n=3, side="right"):
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    rows = [e.tokens for e in tasks.get_task("lexicon").test(n)]
    tokens, mask = mechnorm.pad(rows, 0, side)
    batch = mechnorm.Batch(tokens, mask)
    _, cache = mechnorm.run_with_cache(model, batch)
    return model, batch, cache


def _ln_params(model, block, which):
    module = getattr(model.blocks[block], which)
    hf = getattr(module, "original_component", None)
    if hf is not None:
        return hf.weight.detach(), hf.bias.detach(), float(hf.eps)
    return module.w.detach(), module.b.detach(), float(model.cfg.eps)


def _reference_matrices(model, cache, mask, method, post_ln, encoder):
    """Per block, the paper's matrix by loops over sequence b, query i, source j and head h, rows normalised.

    z_ij = δ_ij x_j + Σ_h α^h_ij v^h_j W_O^h;  post-LN: T_i(x_j) = γ1 ⊙ (z_ij − mean z_ij) / σ(u_i) with
    u_i = x_i + attn_out_i, LN1's input; pre-LN: T_i(x_j) = z_ij.
    GlobEnc: ‖γ2 ⊙ (T − mean T) / σ(w_i)‖₂ with w_i LN2's input (post-LN), else ‖T‖₂.
    ALTI: max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁), y_i = LN1(u_i) (post-LN) or resid_mid_i (pre-LN).
    """
    batch, pos = mask.shape
    kind_is_bridge = "Bridge" in type(model).__name__
    matrices = []
    for block in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{block}.attn.hook_pattern"].double()
        values = cache[f"blocks.{block}.attn.hook_v"].double()
        x = cache[f"blocks.{block}.hook_resid_pre"].double()
        w_o = attention_output_weights(model, block)[0].double()
        n_heads, n_kv = pattern.shape[1], values.shape[2]
        matrix = torch.zeros(batch, pos, pos, dtype=torch.float64)
        for b in range(batch):
            for i in range(pos):
                if not mask[b, i]:
                    continue
                if post_ln:
                    g1, beta1, eps = _ln_params(model, block, "ln1")
                    # LN1's input; a BERT bridge's hook_attn_out is read after that LayerNorm, so take its hook_in
                    u = cache[f"blocks.{block}.ln1.hook_in"][b, i].double() if kind_is_bridge else (
                        x[b, i] + cache[f"blocks.{block}.hook_attn_out"][b, i].double())
                    sigma1 = (u.var(correction=0) + eps).sqrt()
                    y = F.layer_norm(u, u.shape, g1.double(), beta1.double(), eps)
                    g2, _, eps2 = _ln_params(model, block, "ln2")
                    w = cache[f"blocks.{block}.ln2.hook_in"][b, i].double() if kind_is_bridge else (
                        y + cache[f"blocks.{block}.hook_mlp_out"][b, i].double())
                    sigma2 = (w.var(correction=0) + eps2).sqrt()
                else:
                    # resid_mid; parallel attention+MLP blocks (NeoX) have none: the input plus attention
                    y = x[b, i] + cache[f"blocks.{block}.hook_attn_out"][b, i].double()
                for j in range(pos):
                    if not mask[b, j] or (not encoder and j > i):
                        continue
                    z = x[b, j].clone() if i == j else torch.zeros_like(x[b, j])
                    for h in range(n_heads):
                        z += pattern[b, h, i, j] * values[b, j, h // (n_heads // n_kv)] @ w_o[h]
                    t = g1.double() * (z - z.mean()) / sigma1 if post_ln else z
                    if method == "globenc":
                        t2 = g2.double() * (t - t.mean()) / sigma2 if post_ln else t
                        matrix[b, i, j] = t2.norm()
                    else:
                        matrix[b, i, j] = max(0.0, float(y.abs().sum() - (y - t).abs().sum()))
                matrix[b, i] /= matrix[b, i].sum()
        matrices.append(matrix)
    return matrices


def _expected_rows(matrices, pred, aggregate):
    batch, pos = matrices[0].shape[:2]
    rolled = torch.eye(pos, dtype=torch.float64).expand(batch, pos, pos)
    layers = [rolled]
    for matrix in matrices:
        rolled = matrix @ rolled if aggregate == "rollout" else matrix
        layers.append(rolled)
    rows = torch.arange(batch)
    return torch.stack(layers), torch.stack([m[rows, pred] for m in layers])


def _check_against_reference(model, cache, mask, post_ln, encoder):
    pred = mechnorm.inputs.prediction_positions(model, mask)
    for (name, fn), aggregate in itertools.product(METHODS.items(), ("none", "rollout")):
        attr = fn(cache, attention_mask=mask, aggregate=aggregate, return_matrices=True)
        matrices, rows = _expected_rows(_reference_matrices(model, cache, mask, name, post_ln, encoder), pred, aggregate)
        assert attr.layers == tuple(range(model.cfg.n_layers + 1))
        torch.testing.assert_close(attr.scores, rows.float().masked_fill(~mask, float("nan")), atol=2e-5, rtol=1e-4,
                                   equal_nan=True)
        real = (mask[:, :, None] & mask[:, None, :])[:, None]
        got = attr.metadata["matrices"].masked_fill(~real, 0)
        want = matrices.permute(1, 0, 2, 3).float().masked_fill(~real, 0)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,kind", list(itertools.product(ARCHITECTURES, KINDS)))
def test_decoders_match_the_papers_formulas(load, arch, kind):
    model = load(arch, kind)
    batch, cache = _run(model, side="left")
    _check_against_reference(model, cache, batch.attention_mask, post_ln=False, encoder=False)


@pytest.mark.parametrize("kind", KINDS)
def test_post_ln_encoder_matches_the_papers_formulas(kind):
    model, batch, cache = _bert(kind)
    _check_against_reference(model, cache, batch.attention_mask, post_ln=True, encoder=True)


@pytest.mark.parametrize("kind", KINDS)
def test_transformed_vectors_add_up_to_the_sublayer_output(load, kind):
    from mechnorm.methods.decomposition import transformed_vectors

    model = load("llama", kind)
    _, cache = _run(model)
    for block in range(model.cfg.n_layers):
        parts, y = transformed_vectors(cache, block)
        torch.testing.assert_close(y, cache[f"blocks.{block}.hook_resid_mid"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(parts.sum(2), y, atol=1e-5, rtol=1e-5)  # Llama: no b_O
    bert, _, bert_cache = _bert(kind)
    for block in range(bert.cfg.n_layers):
        _, y = transformed_vectors(bert_cache, block)
        g, beta, eps = _ln_params(bert, block, "ln1")
        u = bert_cache[f"blocks.{block}.hook_resid_pre"] + bert_cache[f"blocks.{block}.hook_attn_out"]
        if kind == "bridge":  # its hook_attn_out comes after the attention LayerNorm; LN1's input is ln1.hook_in
            u = bert_cache[f"blocks.{block}.ln1.hook_in"]
        torch.testing.assert_close(y, F.layer_norm(u, u.shape[-1:], g, beta, eps), atol=1e-5, rtol=1e-5)


def _identity_hooks(model):
    """Attention pattern = I and MLP output = 0 in every block (permanent hooks)."""

    def eye(pattern, hook):
        return torch.eye(pattern.shape[-1], dtype=pattern.dtype).expand_as(pattern).clone()

    for block in range(model.cfg.n_layers):
        model.add_hook(f"blocks.{block}.attn.hook_pattern", eye)
        model.add_hook(f"blocks.{block}.hook_mlp_out", lambda out, hook: torch.zeros_like(out))


@pytest.mark.parametrize("kind", KINDS)
def test_identity_attention_keeps_each_token_to_itself(model_dirs, kind):
    model = mechnorm.load_model(model_dirs["gpt2"], kind=kind)  # a private copy: hooks stay on it
    _identity_hooks(model)
    try:
        batch, cache = _run(model, side="left")
        mask = batch.attention_mask
        diagonal = torch.eye(mask.shape[1]).expand(len(mask), -1, -1) * mask[:, :, None]
        pred = mechnorm.targets.last_positions(mask)
        for fn, aggregate in itertools.product(
            (mechnorm.globenc, mechnorm.alti, lambda c, **kw: mechnorm.value_zeroing(model, c, batch.tokens, **kw)),
            ("none", "rollout"),
        ):
            attr = fn(cache, attention_mask=mask, aggregate=aggregate, return_matrices=True)
            for layer in range(1, model.cfg.n_layers + 1):
                torch.testing.assert_close(attr.metadata["matrices"][:, layer] * mask[:, :, None], diagonal, atol=1e-5, rtol=0)
            one_hot = F.one_hot(pred, mask.shape[1]).float().masked_fill(~mask, float("nan"))
            torch.testing.assert_close(attr.scores[-1], one_hot, atol=1e-5, rtol=0, equal_nan=True)
    finally:
        model.reset_hooks(including_permanent=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_sequences_scores(load, kind, side):
    model = load("llama", kind)
    batch, cache = _run(model, side=side)
    for name, fn in METHODS.items():
        together = fn(cache, attention_mask=batch.attention_mask, aggregate="rollout")
        for i, text in enumerate(TEXTS):
            _, alone_cache = _run(model, texts=[text])
            alone = fn(alone_cache)
            real = batch.attention_mask[i]
            torch.testing.assert_close(together.scores[:, i, real], alone.scores[:, 0], atol=1e-5, rtol=1e-4)


def test_encoder_right_padding_does_not_change_a_sequences_scores():
    model, batch, cache = _bert(KINDS[0], n=4)
    together = mechnorm.globenc(cache, attention_mask=batch.attention_mask)
    for i in range(4):
        real = batch.attention_mask[i]
        _, alone_cache = model.run_with_cache(batch.tokens[i : i + 1, real])
        alone = mechnorm.globenc(alone_cache)
        torch.testing.assert_close(together.scores[:, i, real], alone.scores[:, 0], atol=1e-5, rtol=1e-4)
        assert alone.metadata["positions"].item() == 0  # read at [CLS]


def test_deterministic_cache_untouched_and_minimal_hooks(load):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    _, cache = mechnorm.run_with_cache(model, batch, names_filter=mechnorm.hooks_for("globenc", "alti"))
    before = {name: cache[name].clone() for name in cache.keys()}
    for fn in METHODS.values():
        first = fn(cache, attention_mask=batch.attention_mask, aggregate="none")
        second = fn(cache, attention_mask=batch.attention_mask, aggregate="none")
        torch.testing.assert_close(first.scores, second.scores, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(first.scores.nansum(-1), torch.ones(first.scores.shape[:2]))
    assert all(torch.equal(cache[name], value) for name, value in before.items())


def test_errors_name_the_fix(load):
    model = load("gpt2")
    batch, cache = _run(model, names_filter=lambda name: name == "blocks.0.attn.hook_pattern" or name.endswith("resid_pre"))
    with pytest.raises(mechnorm.MissingHooksError, match=r"blocks\.0\.attn\.hook_v.*hooks_for"):
        mechnorm.alti(cache, attention_mask=batch.attention_mask)
    _, full = _run(model)
    with pytest.raises(ValueError, match="aggregate must be 'none'"):
        mechnorm.globenc(full, aggregate="sum")
    with pytest.raises(ValueError, match="padding token"):
        mechnorm.globenc(full, attention_mask=batch.attention_mask, positions=8)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mechnorm.alti(full, attention_mask=batch.attention_mask[:, :3])


def test_registry_and_attribute(load):
    names = set(mechnorm.list_methods()["name"])
    assert {"globenc", "alti", "value_zeroing"} <= names
    hooks = mechnorm.hooks_for("globenc")
    assert hooks("blocks.1.attn.hook_v") and hooks("blocks.0.ln2.hook_scale") and not hooks("blocks.0.hook_mlp_out")
    model = load("gpt2")
    comparison = mechnorm.attribute(model, TEXTS, methods=["globenc", "alti", "value_zeroing"],
                                    options={"alti": {"aggregate": "none"}})
    batch, cache = _run(model)
    direct = mechnorm.alti(cache, attention_mask=batch.attention_mask, aggregate="none")
    torch.testing.assert_close(comparison["alti"].scores, direct.scores, equal_nan=True)
    assert comparison["value_zeroing"].scores.shape == (model.cfg.n_layers + 1, len(TEXTS), batch.tokens.shape[1])
