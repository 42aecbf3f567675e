"""``HookedTransformerConfig`` for local Gemma folders, built from their HF ``config.json``.

transformer-lens 3.9 knows the Gemma family only by hub name: its config table
(``loading_from_pretrained.convert_hf_model_config``) is keyed on strings such as
``"google/gemma-3-270m"`` and never reads a local config for Gemma. This module builds the
same config from the folder's own ``config.json``, so any local Gemma 1/2/3 text model
(the fetched ``gemma3-270m``, a randomly initialised test model) loads as a
``HookedTransformer``; the weights then go through TransformerLens's own
``convert_gemma_weights``, which scales ``W_E`` by √d_model and stores every RMSNorm
weight as ``1 + w``.

What the Gemma architecture needs, field by field:

* RMSNorm everywhere, scaling by ``(1 + w)`` (the converter adds the 1);
* Gemma 2/3: a norm before *and* after attention and MLP (``use_normalization_before_and_after``);
* Gemma 3: RMSNorm on queries and keys (``use_qk_norm``);
* attention scale ``1/√query_pre_attn_scalar`` (TL divides by ``attn_scale``);
* sliding-window ("local") and full ("global") layers from ``layer_types``, window
  ``sliding_window``; Gemma 3 has a rotary base per layer type (``rope_parameters`` keyed
  by attention type -> ``rotary_base`` for global, ``rotary_base_local`` for local layers);
* soft-capping of attention scores and final logits (Gemma 2) where the config sets it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["GEMMA_MODEL_TYPES", "is_gemma", "gemma_config_dict", "hooked_gemma_config"]

#: HF ``model_type`` -> the architecture name TransformerLens's Gemma converter expects
GEMMA_MODEL_TYPES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_ATTN_TYPES = {"sliding_attention": "local", "full_attention": "global"}
#: TransformerLens's Gemma 3 default: a longer context only costs rotary tables
DEFAULT_MAX_CTX = 8192


def is_gemma(config: dict) -> bool:
    """Whether an HF config (``config.json`` as a dict) is a Gemma text model built here.

    Example:
        >>> is_gemma({"model_type": "gemma3_text"}), is_gemma({"model_type": "llama"})
        (True, False)
    """
    return config.get("model_type") in GEMMA_MODEL_TYPES


def gemma_config_dict(config: dict, max_ctx: int = DEFAULT_MAX_CTX) -> dict:
    """The ``HookedTransformerConfig`` fields of a Gemma 1/2/3 text model's HF config.

    Args:
        config: the HF ``config.json`` as a dict.
        max_ctx: cap on ``n_ctx`` (TransformerLens builds rotary tables of that length).

    Raises:
        ValueError: a model type or rotary scaling TransformerLens cannot reproduce.

    Example:
        >>> cfg = gemma_config_dict(json.loads(Path("gemma3-270m/config.json").read_text()))  # doctest: +SKIP
        >>> cfg["rotary_base"], cfg["rotary_base_local"], cfg["window_size"]  # doctest: +SKIP
        (1000000.0, 10000.0, 512)
    """
    model_type = config.get("model_type")
    if model_type not in GEMMA_MODEL_TYPES:
        raise ValueError(f"Not a Gemma text config (model_type={model_type!r}); expected one of {sorted(GEMMA_MODEL_TYPES)}.")
    if config.get("use_bidirectional_attention"):
        raise ValueError("This Gemma config uses bidirectional attention, which HookedTransformer does not implement; load it with kind='bridge'.")
    n_layers = config["num_hidden_layers"]
    d_head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    cfg = {
        "d_model": config["hidden_size"],
        "d_head": d_head,
        "n_heads": config["num_attention_heads"],
        "n_key_value_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
        "d_mlp": config["intermediate_size"],
        "n_layers": n_layers,
        "n_ctx": min(config.get("max_position_embeddings", max_ctx), max_ctx),
        "eps": config.get("rms_norm_eps", 1e-6),
        "d_vocab": config["vocab_size"],
        "act_fn": config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh",
        "initializer_range": config.get("initializer_range", 0.02),
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "use_attn_scale": True,
        "attn_scale": float(config.get("query_pre_attn_scalar", d_head)) ** 0.5,
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": GEMMA_MODEL_TYPES[model_type],
        "use_normalization_before_and_after": model_type != "gemma",
        "use_qk_norm": model_type == "gemma3_text",
    }
    global_rope, local_rope = _rope(config)
    cfg["rotary_base"] = global_rope
    layer_types = config.get("layer_types")
    if model_type != "gemma" and layer_types:
        unknown = sorted(set(layer_types) - set(_ATTN_TYPES))
        if unknown:
            raise ValueError(f"Unknown Gemma layer types {unknown}; HookedTransformer knows {sorted(_ATTN_TYPES)}.")
        cfg["attn_types"] = [_ATTN_TYPES[t] for t in layer_types]
        if "local" in cfg["attn_types"]:
            cfg.update(use_local_attn=True, window_size=int(config["sliding_window"]))
            if local_rope != global_rope:
                cfg["rotary_base_local"] = local_rope
    for hf_name, tl_name in (("attn_logit_softcapping", "attn_scores_soft_cap"), ("final_logit_softcapping", "output_logits_soft_cap")):
        if config.get(hf_name):
            cfg[tl_name] = float(config[hf_name])
    return cfg


def hooked_gemma_config(path: Path, *, device, dtype: torch.dtype = torch.float32, fold_ln: bool = False):
    """A ``HookedTransformerConfig`` for the Gemma model in the local folder ``path``.

    Example:
        >>> cfg = hooked_gemma_config(Path("gemma3-270m"), device="cpu")  # doctest: +SKIP
        >>> model = HookedTransformer(cfg, tokenizer=tokenizer)  # doctest: +SKIP
    """
    from transformer_lens import HookedTransformerConfig

    fields = gemma_config_dict(json.loads((Path(path) / "config.json").read_text()))
    fields.update(
        model_name=Path(path).name,
        tokenizer_name=str(path),
        init_weights=False,
        device=device,
        dtype=dtype,
        default_prepend_bos=True,  # Gemma is trained with its BOS token first
    )
    if fold_ln:
        fields["normalization_type"] = "RMSPre"
    return HookedTransformerConfig.from_dict(fields)


def _rope(config: dict) -> tuple[float, float]:
    """(global, local) rotary bases; transformers 5 nests them in ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    per_type = {k: v for k, v in params.items() if k in _ATTN_TYPES}
    if not per_type:  # one set for every layer (Gemma 1/2, or transformers 4's flat keys)
        per_type = {"full_attention": params or {}, "sliding_attention": params or {}}
    bases = {}
    for layer_type, entry in per_type.items():
        rope_type = (entry or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(
                f"This Gemma config scales its rotary embedding ({layer_type}: rope_type={rope_type!r}), which "
                "HookedTransformer does not reproduce; load it with kind='bridge'."
            )
        theta = (entry or {}).get("rope_theta", config.get("rope_theta"))
        if theta is None:
            theta = config.get("rope_local_base_freq", 10000.0) if layer_type == "sliding_attention" else 10000.0
        bases[layer_type] = float(theta)
    global_base = bases.get("full_attention", bases.get("sliding_attention"))
    return global_base, bases.get("sliding_attention", global_base)
