"""From text to one forward pass: tokenising a padded batch and caching only what is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .result import token_strings


@dataclass
class Batch:
    """Token ids of several sequences, padded, with their mask and token strings."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    strings: list[list[str]] | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]


def tokenize(
    model,
    texts: str | Sequence[str],
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] = "right",
) -> Batch:
    """Tokenise texts one by one and pad them into a batch with an explicit mask.

    Tokenising each text alone and building the mask here (rather than inferring it from
    pad ids) keeps the mask right even when the pad token equals BOS, as in GPT-2.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer.
        texts: one string or several.
        prepend_bos: prepend the BOS token; defaults to ``model.cfg.default_prepend_bos``.
        padding_side: ``"right"`` or ``"left"``.

    Example:
        >>> batch = mechnorm.tokenize(model, ["The keys to the cabinet", "The key"])  # doctest: +SKIP
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("No texts given.")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("The model has no tokenizer; pass token ids and an attention mask instead of text.")
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer.encode(text, add_special_tokens=False) for text in texts]
    warn_unknown(tokenizer, texts)
    empty = [i for i, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"Text(s) {empty} tokenise to no tokens; give non-empty text or prepend_bos=True.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens, mask = pad(rows, pad_id, padding_side)
    return Batch(tokens, mask, token_strings(tokenizer, tokens))


def unknown_words(tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` turns into its unknown token (``[UNK]``).

    Example:
        >>> unknown_words(model.tokenizer, "the wooden xylophone")     # doctest: +SKIP
        ['xylophone']
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [text[a:b] for i, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"]) if i == unk]
    return [tokenizer.unk_token] * tokenizer.encode(text, add_special_tokens=False).count(unk)


def warn_unknown(tokenizer, texts: Sequence[str]) -> None:
    """One warning naming the words of ``texts`` that became the unknown token, if any."""
    found = {i: words for i, text in enumerate(texts) if (words := unknown_words(tokenizer, text))}
    if found:
        from .warn import warn

        shown = "; ".join(f"text {i}: {', '.join(map(repr, words))}" for i, words in list(found.items())[:5])
        warn(f"Out-of-vocabulary words became the unknown token {tokenizer.unk_token!r}, which the model reads as "
             f"one meaningless token and which changes its prediction ({shown}). Rephrase with in-vocabulary words.")


def infer_mask(tokens: Int[Tensor, "batch pos"], tokenizer) -> Bool[Tensor, "batch pos"] | None:
    """The attention mask of a padded batch (``model.to_tokens([...])``), read from the pad id.

    Padding is a run of the tokenizer's pad id at the end (right padding) or the start (left
    padding) of a sequence. Where the pad id is also BOS or EOS (GPT-2, SmolLM2), only the
    run on the tokenizer's ``padding_side`` counts, less the run the longest sequence has
    there too (its own BOS/EOS: TransformerLens's rule for a BOS equal to the pad). Returns
    None when nothing is padding (one sequence, no pad id, none in the tokens).

    Raises:
        ValueError: the pad id occurs inside a sequence, or there are several sequences and
            the tokenizer has no pad id: the mask cannot be read, pass ``attention_mask=``.

    Example:
        >>> tok = type("T", (), {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1, "padding_side": "right"})()
        >>> infer_mask(torch.tensor([[1, 5, 6], [1, 5, 0]]), tok).int()
        tensor([[1, 1, 1],
                [1, 1, 0]], dtype=torch.int32)
    """
    tokens = torch.as_tensor(tokens)
    fix = ("pass attention_mask= the mask of the forward pass, e.g. batch = mechnorm.tokenize(model, texts) "
           "and attention_mask=batch.attention_mask")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if tokens.ndim != 2 or tokens.shape[0] == 1:
        return None
    if pad_id is None:
        if tokenizer is None:
            raise ValueError(f"Cannot tell padding in these {tokens.shape[0]} sequences without the tokenizer: "
                             f"pass tokenizer=model.tokenizer, or {fix}.")
        return None
    is_pad = tokens == pad_id
    if not is_pad.any():
        return None
    special = pad_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
    leading = is_pad.long().cumprod(-1).sum(-1)  # [batch] length of the run of pad ids at the start
    trailing = is_pad.flip(-1).long().cumprod(-1).sum(-1)
    length = tokens.shape[1]
    if special:  # pad is also BOS/EOS: only the padding side's run is padding, less the longest row's own
        side = getattr(tokenizer, "padding_side", "right")
        run = trailing if side == "right" else leading
        padding = run - run.min()
    else:
        padding = torch.maximum(leading, trailing)
        inside = is_pad.sum(-1) != padding
        if inside.any():
            raise ValueError(f"The pad id {pad_id} occurs inside sequence(s) {inside.nonzero().flatten().tolist()}, not "
                             f"only at one end, so the padding cannot be read from the tokens: {fix}.")
        side = None
    if (padding >= length).any():
        raise ValueError(f"Sequence(s) {(padding >= length).nonzero().flatten().tolist()} are all padding: {fix}.")
    positions = torch.arange(length, device=tokens.device)
    at_end = positions >= length - padding[:, None]
    at_start = positions < padding[:, None]
    # which end each row's padding is at: the tokenizer's side, or (pad not special) the longer run
    right = trailing >= leading if side is None else torch.full_like(padding, side == "right", dtype=torch.bool)
    return ~torch.where(right[:, None], at_end, at_start)


def pad(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> tuple[Tensor, Tensor]:
    """Pad lists of ids into ``[batch, max_len]`` ids and a boolean mask."""
    length = max(len(row) for row in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        tokens[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = True
    return tokens, mask


@torch.inference_mode()
def run_with_cache(model, batch: Batch, names_filter: Callable[[str], bool] | None = None):
    """One forward pass over a padded batch, caching only the hooks ``names_filter`` keeps.

    Works for ``HookedTransformer`` and ``TransformerBridge``: both take the attention mask
    and derive position ids from it, so left padding does not shift positions.

    Returns:
        ``(logits [batch, pos, vocab], ActivationCache)``.
    """
    device = model_device(model)
    return model.run_with_cache(batch.tokens.to(device), names_filter=names_filter, **mask_kwargs(model, batch.attention_mask))


def mask_kwargs(model, mask: Tensor) -> dict[str, Tensor]:
    """The attention-mask keyword a forward call takes (HookedEncoder names it differently)."""
    name = "one_zero_attention_mask" if type(model).__name__ == "HookedEncoder" else "attention_mask"
    return {name: mask.long().to(model_device(model))}


UNEMBED_IN_HOOK = "unembed.hook_in"


class _Stopped(Exception):
    """Raised by :func:`run_until`'s hook: nothing after that activation is needed."""


def run_until(model, tokens: Tensor, stop_at: str | None, mask: Tensor, fwd_hooks: Sequence = ()) -> tuple[Tensor, bool]:
    """Run ``model`` with ``fwd_hooks`` and stop the pass at the hook ``stop_at``.

    Returns ``(activation at stop_at, True)``; where the model has no such hook (or
    ``stop_at`` is None) it runs to the end and returns ``(its output, False)``. Stopping at
    ``unembed.hook_in`` skips the ``[batch, pos, vocab]`` unembedding when only a few rows of it
    are needed.

    Example:
        >>> final, stopped = run_until(model, tokens, UNEMBED_IN_HOOK, mask)   # doctest: +SKIP
    """
    captured = {}

    def stop(act, hook):
        captured["act"] = act
        raise _Stopped

    can_stop = stop_at is not None and stop_at in model.hook_dict
    hooks = list(fwd_hooks) + ([(stop_at, stop)] if can_stop else [])
    try:
        return model.run_with_hooks(tokens, fwd_hooks=hooks, **mask_kwargs(model, mask)), False
    except _Stopped:
        return captured["act"], True


def finite_padded_rows(scores: Tensor, hook) -> Tensor:
    """Give fully masked query rows (padding before any real token) finite scores.

    Their softmax is 0/0; TransformerBridge zeroes the forward pattern but the backward pass
    still turns the NaN into NaN gradients for the whole sequence. Those rows only feed
    padded positions, which real tokens never attend to, so any finite value is harmless.
    Used as a forward hook on every ``attn.hook_attn_scores`` of a padded batch.

    Example:
        >>> finite_padded_rows(torch.full((1, 1, 2), float("-inf")), None).tolist()
        [[[0.0, 0.0]]]
    """
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.where(dead, torch.zeros_like(scores), scores)


_ENCODER_FAMILIES = ("Bert", "Roberta", "Deberta", "Electra", "Albert", "DistilBert", "XLMRoberta")


def is_encoder(model) -> bool:
    """True for a bidirectional encoder (BERT-like), whose prediction is read at ``[CLS]``.

    A ``TransformerBridge`` around BERT reports ``attention_dir="causal"``, so the HF
    architecture name is consulted too.

    Example:
        >>> is_encoder(model)                                               # doctest: +SKIP
        False
    """
    if getattr(model.cfg, "attention_dir", "causal") == "bidirectional":
        return True
    arch = str(getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", None) or "")
    return arch.startswith(_ENCODER_FAMILIES) or arch.endswith(("ForMaskedLM", "ForSequenceClassification"))


def require_head_for_encoder(model, head) -> None:
    """Raise when an encoder comes without the head-on-top its prediction is read through."""
    if head is None and is_encoder(model):
        raise ValueError("This is a bidirectional (encoder) model: pass its classifier head, e.g. "
                         "head=mechnorm.zoo.classifier_head('bert-lexicon') or a mechnorm.LinearHead.")


def prediction_positions(model, mask: Tensor) -> Tensor:
    """Where ``model`` makes its prediction by default: ``[CLS]`` (first real token) in an
    encoder, the last real token in a causal LM."""
    from .targets import first_positions, last_positions

    return first_positions(mask) if is_encoder(model) else last_positions(mask)


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters, where its inputs go.

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    return next(model.parameters()).device


_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "hidden_dropout_prob",
                   "attention_probs_dropout_prob", "dropout", "activation_dropout")


def active_dropout(model) -> list[str]:
    """Where dropout would fire in a forward pass now: ``nn.Dropout`` modules in training mode
    with ``p > 0``, and a wrapped HF model in training mode whose config sets a dropout rate
    (HF attention applies its dropout functionally, with no module to find).

    A ``HookedTransformer`` has no dropout at all, so its training flag alone changes nothing.

    Example:
        >>> active_dropout(torch.nn.Sequential(torch.nn.Dropout(0.1)).train())
        ['0']
    """
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Dropout) and module.training and module.p > 0]
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if module.training and hasattr(config, "to_dict"):  # an HF PreTrainedModel
            rates = {f: getattr(config, f) for f in _DROPOUT_FIELDS if isinstance(getattr(config, f, None), (int, float))}
            found += [f"{name or 'model'}.config.{field}" for field, rate in rates.items() if rate > 0]
    return found


def require_no_dropout(model, what: str) -> None:
    """Raise when dropout is active, naming where, since it makes ``what`` random."""
    active = active_dropout(model)
    if active:
        shown = ", ".join(active[:3]) + (f" and {len(active) - 3} more" if len(active) > 3 else "")
        raise ValueError(f"Dropout is active ({shown}), which makes {what} random; call model.eval() first.")
