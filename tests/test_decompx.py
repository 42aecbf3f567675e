"""DecompX against a hand computation from plain transformers, its sum property, and its contract.

The reference below follows the paper (Modarressi et al., ACL 2023, §3) with plain loops over
positions i, sources k and keys j, from the HF weights and HF's own attention weights:

    x⁰_{i←k} = δ_ik x⁰_i
    LN(x)_{i←k} = γ ⊙ (x_{i←k} − mean(x_{i←k})) / σ(x_i)  + w_k β          (RMSNorm: γ ⊙ x_{i←k} / rms(x_i))
    Attn_{i←k}  = Σ_h Σ_j α^h_ij (LN1(x)_{j←k} W_V^h) W_O^h
    r_{i←k}     = x_{i←k} + Attn_{i←k} + w_k (b_V W_O + b_O)
    z_{i←k}     = LN2(r)_{i←k} W_in + w_k b_in;   h_{i←k} = (f(z_i)/z_i) ⊙ z_{i←k}
                  (gated: h_{i←k} = act(g_i) ⊙ (LN2(r)_{i←k} W_up), the gate g_i frozen)
    x'_{i←k}    = r_{i←k} + h_{i←k} W_out + w_k b_out
    score_k     = (LN_f(x_pred)_{←k}) · W_U[:, target]

with the "absdot" shares ``w_k = |v_k · b| / Σ_k' |v_k' · b|`` over the parts v the bias is added to.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import mechnorm
from conftest import ARCHITECTURES, KINDS, TEXTS, assert_padding_matches_alone, build_hf_model, word_tokenizer
from mechnorm.residual import MissingHooksError, resid_hook


def absdot(parts, bias):
    weights = torch.stack([(p @ bias).abs() for p in parts])
    if weights.sum() == 0:  # a zero bias (or nothing to share it with) adds nothing
        return parts
    weights = weights / weights.sum()
    return [p + w * bias for p, w in zip(parts, weights)]


def norm_parts(parts, module, rms: bool):
    x = sum(parts)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if rms:
        return [module.weight * p / torch.sqrt(x.pow(2).mean() + eps) for p in parts]
    sigma = torch.sqrt(x.var(unbiased=False) + eps)
    return absdot([module.weight * (p - p.mean()) / sigma for p in parts], module.bias)


def gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def reference_decompx(hf, arch, tokens, target: int):
    """Per-layer scores ``[layer, src]`` of the last position, by the loops of the module docstring."""
    with torch.no_grad():
        attentions = hf(tokens[None], output_attentions=True).attentions
        n, llama = len(tokens), arch == "llama"
        base = hf.base_model
        x0 = base.embed_tokens(tokens) if llama else base.wte(tokens) + base.wpe(torch.arange(n))
        d = x0.shape[-1]
        parts = [[x0[i] if k == i else torch.zeros(d) for k in range(n)] for i in range(n)]
        final = base.norm if llama else base.ln_f
        unembed = hf.lm_head.weight[target]

        def read(pred_parts):
            return torch.stack([p @ unembed for p in norm_parts(pred_parts, final, llama)])

        rows = [read(parts[-1])]
        for layer, block in enumerate(base.layers if llama else base.h):
            if llama:
                ln1, ln2, attn, mlp = block.input_layernorm, block.post_attention_layernorm, block.self_attn, block.mlp
                W_V, b_V = attn.v_proj.weight.T, torch.zeros(d)
                W_O, b_O = attn.o_proj.weight.T, torch.zeros(d)
            else:
                ln1, ln2, attn, mlp = block.ln_1, block.ln_2, block.attn, block.mlp
                W_V, b_V = attn.c_attn.weight[:, 2 * d :], attn.c_attn.bias[2 * d :]
                W_O, b_O = attn.c_proj.weight, attn.c_proj.bias
            alpha = attentions[layer][0]  # [head, query, key]
            n_heads = alpha.shape[0]
            d_head = d // n_heads
            normed = [norm_parts(parts[j], ln1, llama) for j in range(n)]
            new = []
            for i in range(n):
                resid = []
                for k in range(n):
                    mixed = torch.zeros(d)
                    for j in range(n):
                        v = normed[j][k] @ W_V
                        for h in range(n_heads):
                            cols = slice(h * d_head, (h + 1) * d_head)
                            mixed[cols] += alpha[h, i, j] * v[cols]
                    resid.append(parts[i][k] + mixed @ W_O)
                resid = absdot(resid, b_V @ W_O + b_O)
                m_in = norm_parts(resid, ln2, llama)
                if llama:
                    gate = F.silu(sum(m_in) @ mlp.gate_proj.weight.T)
                    hidden = [gate * (p @ mlp.up_proj.weight.T) for p in m_in]
                    out = [h_k @ mlp.down_proj.weight.T for h_k in hidden]
                else:
                    z = absdot([p @ mlp.c_fc.weight for p in m_in], mlp.c_fc.bias)
                    total = sum(z)
                    ratio = gelu_new(total) / total
                    out = absdot([(ratio * z_k) @ mlp.c_proj.weight for z_k in z], mlp.c_proj.bias)
                new.append([r + o for r, o in zip(resid, out)])
            parts = new
            rows.append(read(parts[-1]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def biased_dirs(tmp_path_factory):
    """The tiny GPT-2 and Llama with every bias set non-zero (HF initialises them to zero), so
    that the bias shares are exercised; Llama has no biases, only its norm weights."""
    root = tmp_path_factory.mktemp("biased")
    dirs = {}
    for arch in ("gpt2", "llama"):
        hf = build_hf_model(arch, seed=1)
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if name.endswith("bias"):
                    param.add_(0.5 * torch.randn_like(param))
        hf.save_pretrained(root / arch)
        word_tokenizer().save_pretrained(root / arch)
        dirs[arch] = str(root / arch)
    return dirs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decompx_equals_the_papers_loops_on_a_two_layer_model(biased_dirs, arch, kind):
    model = mechnorm.load_model(biased_dirs[arch], kind=kind)
    hf = AutoModelForCausalLM.from_pretrained(biased_dirs[arch], attn_implementation="eager").eval()
    batch = mechnorm.tokenize(model, TEXTS[0])
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("decompx"))
    target = mechnorm.predicted(logits)
    attr = mechnorm.decompx(cache, mechnorm.UnembedHead(model), target)
    expected = reference_decompx(hf, arch, batch.tokens[0], int(target.ids[0]))
    assert attr.layers == (0, 1, 2)
    torch.testing.assert_close(attr.scores[:, 0], expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_contributions_sum_to_the_logit_at_every_layer(load, arch, kind):
    model = load(arch, kind)
    head = mechnorm.UnembedHead(model)
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    names = mechnorm.hooks_for("decompx", "logat")
    logits, cache = mechnorm.run_with_cache(model, batch, names)
    target = mechnorm.predicted(logits, batch.attention_mask)
    attr = mechnorm.decompx(cache, head, target, attention_mask=batch.attention_mask, return_matrices=True)
    rows = torch.arange(len(TEXTS))
    model_logit = logits[rows, target.positions, target.ids]
    torch.testing.assert_close(attr.scores[-1].nansum(-1), model_logit, rtol=1e-4, atol=1e-4)
    logat = mechnorm.logat(cache, head, target, attention_mask=batch.attention_mask).scores[:, rows, target.positions]
    torch.testing.assert_close(attr.scores.nansum(-1), logat, rtol=1e-4, atol=1e-4)
    # the decomposition itself adds up to the residual stream the model computed, layer by layer
    parts = attr.metadata["prediction_parts"]  # [batch, layer, src, d_model]
    for layer in attr.layers:
        resid = cache[resid_hook(layer)][rows, target.positions]
        torch.testing.assert_close(parts[:, layer].sum(1), resid, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_contributions_sum_to_the_class_logit_on_post_ln_bert(kind):
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    head = mechnorm.zoo.classifier_head("bert-lexicon")
    batch = mechnorm.tokenize(model, ["good film but a bad ending", "terrible"])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("decompx", "logat"))
    rows = torch.arange(2)
    final = cache[resid_hook(model.cfg.n_layers, mechnorm.residual.model_is_post_norm(model))]
    class_logits = head(final)[:, 0]  # [batch, classes] at [CLS]
    target = mechnorm.Target(ids=class_logits.argmax(-1), positions=torch.zeros(2, dtype=torch.long))
    attr = mechnorm.decompx(cache, head, target, attention_mask=batch.attention_mask)
    assert attr.metadata["architecture"] == "post-LN encoder"
    torch.testing.assert_close(attr.scores[-1].nansum(-1), class_logits[rows, target.ids], rtol=1e-4, atol=1e-4)
    logat = mechnorm.logat(cache, head, target, attention_mask=batch.attention_mask).scores[:, rows, 0]
    torch.testing.assert_close(attr.scores.nansum(-1), logat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_attention_and_zero_mlp_leave_each_token_its_own(load, kind):
    """Analytic case: α = I and MLP = 0, so x^l_i depends on token i alone (no biases in Llama)."""
    model = load("llama", kind)
    batch = mechnorm.tokenize(model, TEXTS[0])
    n = batch.tokens.shape[1]

    def identity(pattern, hook):
        return torch.eye(n).expand_as(pattern).clone()

    def zero(post, hook):
        return torch.zeros_like(post)

    hooks = [(f"blocks.{i}.attn.hook_pattern", identity) for i in range(2)]
    hooks += [(f"blocks.{i}.mlp.hook_post", zero) for i in range(2)]
    for name, fn in hooks:
        model.add_hook(name, fn)
    try:
        logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("decompx"))
    finally:
        model.reset_hooks()
    head = mechnorm.UnembedHead(model)
    target = mechnorm.token_target(5)
    attr = mechnorm.decompx(cache, head, target, return_matrices=True)
    matrices = attr.metadata["matrices"][0]  # [layer, pos, src]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    assert matrices[:, off_diagonal].abs().max() == 0
    assert attr.scores[:, 0, :-1].abs().max() == 0
    # by hand: x^l = x^{l-1} + RMS1(x^{l-1}) W_V W_O, all on the last token itself
    x = cache["blocks.0.hook_resid_pre"][0, -1]
    expected = [head(x[None, None, None], torch.tensor([[5]]))[0, 0, 0, 0]]
    for block in range(2):
        norm = mechnorm.circuits.norm_split.block_norm(model, block, "ln1")
        ov = torch.einsum("hde,hem->dm", model.blocks[block].attn.W_V, model.blocks[block].attn.W_O)
        x = x + norm(x) @ ov
        expected.append(head(x[None, None, None], torch.tensor([[5]]))[0, 0, 0, 0])
    torch.testing.assert_close(attr.scores[:, 0, -1], torch.stack(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_gives_each_sequence_its_own_scores(load, arch, kind, padding_side):
    assert_padding_matches_alone(load(arch, kind), "decompx", padding_side)


def test_deterministic_and_leaves_the_cache_untouched(load):
    model = load("gpt2", KINDS[0])
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("decompx"))
    before = {name: cache[name].clone() for name in cache.keys()}
    head, target = mechnorm.UnembedHead(model), mechnorm.predicted(logits, batch.attention_mask)
    first = mechnorm.decompx(cache, head, target, attention_mask=batch.attention_mask)
    second = mechnorm.decompx(cache, head, target, attention_mask=batch.attention_mask)
    torch.testing.assert_close(first.scores, second.scores, rtol=0, atol=0, equal_nan=True)
    for name, value in before.items():
        assert torch.equal(cache[name].nan_to_num(), value.nan_to_num()), name


def test_missing_hooks_and_bad_heads_are_named(load):
    model = load("gpt2", KINDS[0])
    batch = mechnorm.tokenize(model, TEXTS[0])
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    target = mechnorm.predicted(logits)
    with pytest.raises(MissingHooksError, match="blocks.0.attn.hook_pattern"):
        mechnorm.decompx(cache, mechnorm.UnembedHead(model), target)
    assert mechnorm.hooks_for("decompx")("blocks.3.mlp.hook_pre")
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("decompx"))
    module_head = mechnorm.ModuleHead(torch.nn.Linear(model.cfg.d_model, 2), n_outputs=2)
    with pytest.raises(TypeError, match="LinearHead"):
        mechnorm.decompx(cache, module_head, mechnorm.token_target(1))


def test_runs_through_attribute_with_the_layer_rows(load):
    model = load("llama", KINDS[0])
    comp = mechnorm.attribute(model, TEXTS, methods=("decompx", "normxlogit"), batch_size=2)
    attr = comp["decompx"]
    assert attr.scores.shape == comp["normxlogit"].scores.shape
    assert attr.metadata["logit"].shape == (len(TEXTS), model.cfg.n_layers + 1)
