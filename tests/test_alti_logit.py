"""ALTI-Logit and Logit against a hand computation from plain transformers, and their contract.

The reference follows Ferrando et al. (ACL 2023) with plain loops over positions and heads,
from the HF weights and HF's attention weights, at the last position t:

    T_i(x_j)  = Σ_h α^h_ij (LN1(x_j) W_V^h + b_V^h) W_O^h + δ_ij x_j,   y_i = Σ_j T_i(x_j) + b_O
    C_ij      = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁) / Σ_j' (same)           (ALTI, per block)
    R^0 = I,  R^l = C^l R^{l−1}
    Δ^l_j     = LN_f,lin( Σ_h α^h_tj (LN1(x_j) W_V^h + b_V^h) W_O^h ) · W_U[:, w]
                (LN_f,lin(u) = γ ⊙ (u − mean(u)) / σ(x^L_t): the final norm frozen at its scale)
    Logit_j      = Σ_l Δ^l_j
    ALTI-Logit_j = Σ_l Σ_k Δ^l_k R^{l−1}_kj
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechnorm
from conftest import ARCHITECTURES, KINDS, TEXTS, assert_padding_matches_alone, build_hf_model, word_tokenizer
from mechnorm.residual import MissingHooksError


@pytest.fixture(scope="module")
def biased_gpt2(tmp_path_factory):
    """The tiny GPT-2 with non-zero biases (HF initialises them to zero)."""
    path = tmp_path_factory.mktemp("biased") / "gpt2"
    hf = build_hf_model("gpt2", seed=2)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.add_(0.5 * torch.randn_like(param))
    hf.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def reference(hf, tokens, target: int):
    """``(logit, alti_logit)`` per layer ``[layer, src]`` for the last position, by loops."""
    base = hf.transformer
    captured = {}
    hook = base.ln_f.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    with torch.no_grad():
        out = hf(tokens[None], output_attentions=True, output_hidden_states=True)
    hook.remove()
    n, d = len(tokens), base.wte.weight.shape[1]
    final = captured["x"][0, -1]
    sigma = torch.sqrt(final.var(unbiased=False) + base.ln_f.eps)
    direction = base.ln_f.weight * hf.lm_head.weight[target]

    def logit_of(u):
        return ((u - u.mean()) / sigma) @ direction

    rollout = torch.eye(n)
    logit_rows, alti_rows = [torch.zeros(n)], [torch.zeros(n)]
    with torch.no_grad():
        for layer, block in enumerate(base.h):
            x = out.hidden_states[layer][0]
            alpha = out.attentions[layer][0]
            n_heads = alpha.shape[0]
            d_head = d // n_heads
            W_V, b_V = block.attn.c_attn.weight[:, 2 * d :], block.attn.c_attn.bias[2 * d :]
            W_O, b_O = block.attn.c_proj.weight, block.attn.c_proj.bias
            values = block.ln_1(x) @ W_V + b_V  # [src, d]
            T = torch.zeros(n, n, d)
            for i in range(n):
                for j in range(n):
                    for h in range(n_heads):
                        cols = slice(h * d_head, (h + 1) * d_head)
                        T[i, j] += alpha[h, i, j] * (values[j, cols] @ W_O[cols])
            delta = torch.stack([logit_of(T[-1, j]) for j in range(n)])
            for i in range(n):
                T[i, i] += x[i]
            C = torch.zeros(n, n)
            for i in range(n):
                y = T[i].sum(0) + b_O
                for j in range(n):
                    C[i, j] = max(0.0, float(y.abs().sum() - (y - T[i, j]).abs().sum()))
                C[i] /= C[i].sum()
            logit_rows.append(logit_rows[-1] + delta)
            alti_rows.append(alti_rows[-1] + delta @ rollout)
            rollout = C @ rollout
    return torch.stack(logit_rows), torch.stack(alti_rows)


@pytest.mark.parametrize("kind", KINDS)
def test_alti_logit_and_logit_equal_the_papers_loops(biased_gpt2, kind):
    model = mechnorm.load_model(biased_gpt2, kind=kind)
    hf = AutoModelForCausalLM.from_pretrained(biased_gpt2, attn_implementation="eager").eval()
    batch = mechnorm.tokenize(model, TEXTS[2])
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("alti_logit"))
    target = mechnorm.predicted(logits)
    head = mechnorm.UnembedHead(model)
    expected_logit, expected_alti = reference(hf, batch.tokens[0], int(target.ids[0]))
    for mixing, expected in (("alti", expected_alti), ("none", expected_logit)):
        attr = mechnorm.alti_logit(cache, head, target, mixing=mixing)
        assert attr.layers == (0, 1, 2)
        torch.testing.assert_close(attr.scores[:, 0], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rows_sum_to_the_attention_logit_updates(load, arch, kind):
    """ALTI rows sum to 1, so mixing moves the updates between tokens but keeps their sum:
    the direct logit of the attention outputs (minus b_O), read through the frozen final norm."""
    model = load(arch, kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    attn_out = lambda name: name.endswith("hook_attn_out")  # noqa: E731
    logits, cache = mechnorm.run_with_cache(model, batch, lambda n: mechnorm.hooks_for("alti_logit")(n) or attn_out(n))
    target = mechnorm.predicted(logits, batch.attention_mask)
    frozen = mechnorm.UnembedHead(model, ln="frozen")
    mixed = mechnorm.alti_logit(cache, mechnorm.UnembedHead(model), target, attention_mask=batch.attention_mask)
    plain = mechnorm.alti_logit(cache, mechnorm.UnembedHead(model), target, attention_mask=batch.attention_mask, mixing="none")
    rows = torch.arange(len(TEXTS))
    columns = target.ids[:, None]
    expected = [torch.zeros(len(TEXTS))]
    for block in range(model.cfg.n_layers):
        _, b_O = mechnorm.circuits.attention_output_weights(model, block)
        update = cache[f"blocks.{block}.hook_attn_out"][rows, target.positions] - (0 if b_O is None else b_O)
        # the frozen head is affine: subtract its value at 0 to keep the linear part only
        linear = frozen(update[:, None], columns, cache=_at_prediction(cache, target.positions))
        offset = frozen(torch.zeros_like(update)[:, None], columns, cache=_at_prediction(cache, target.positions))
        expected.append(expected[-1] + (linear - offset)[:, 0, 0])
    expected = torch.stack(expected)
    torch.testing.assert_close(mixed.scores.nansum(-1), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain.scores.nansum(-1), expected, rtol=1e-4, atol=1e-4)


def _at_prediction(cache, positions):
    """A stand-in cache holding only the final norm's scale at the prediction positions."""
    scale = cache["ln_final.hook_scale"][torch.arange(len(positions)), positions][:, None]
    return {"ln_final.hook_scale": scale}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_gives_each_sequence_its_own_scores(load, arch, kind, padding_side):
    assert_padding_matches_alone(load(arch, kind), "alti_logit", padding_side)


def test_deterministic_leaves_the_cache_untouched_and_names_bad_input(load):
    model = load("llama", KINDS[0])
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("alti_logit"))
    before = {name: cache[name].clone() for name in cache.keys()}
    head, target = mechnorm.UnembedHead(model), mechnorm.predicted(logits, batch.attention_mask)
    first = mechnorm.alti_logit(cache, head, target, attention_mask=batch.attention_mask, return_matrices=True)
    second = mechnorm.alti_logit(cache, head, target, attention_mask=batch.attention_mask)
    torch.testing.assert_close(first.scores, second.scores, rtol=0, atol=0, equal_nan=True)
    for name, value in before.items():
        assert torch.equal(cache[name].nan_to_num(), value.nan_to_num()), name
    assert first.metadata["updates"].shape == (3, 3, batch.tokens.shape[1])
    assert first.metadata["matrices"].shape == (3, 3, batch.tokens.shape[1], batch.tokens.shape[1])
    with pytest.raises(ValueError, match="mixing"):
        mechnorm.alti_logit(cache, head, target, attention_mask=batch.attention_mask, mixing="rollout")
    _, small = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    with pytest.raises(MissingHooksError, match="hook_pattern"):
        mechnorm.alti_logit(small, head, target, attention_mask=batch.attention_mask)


@pytest.mark.parametrize("kind", KINDS)
def test_post_ln_encoders_are_refused_with_the_alternative(kind):
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    batch = mechnorm.tokenize(model, ["good film"])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("decompx"))
    head = mechnorm.zoo.classifier_head("bert-lexicon")
    with pytest.raises(ValueError, match="decompx"):
        mechnorm.alti_logit(cache, head, mechnorm.token_target(0))
