"""One sentence saying what an Attribution's score is: method, layer, target, units and sign.

:meth:`mechnorm.Attribution.describe` calls :func:`describe`; reports and the demo print it
above every ranking, so a number is never shown without its meaning. Paper names come from
:data:`mechnorm.names.DISPLAY_NAMES`.

Example:
    >>> import torch, mechnorm
    >>> attr = mechnorm.Attribution(torch.ones(3, 1, 3), layers=(0, 1, 2), mask=torch.ones(1, 3, dtype=torch.bool),
    ...                             method="normxlogit", target_labels=(" are",))
    >>> describe(attr)[:69]
    "NormXLogit at layer 2 (final, blocks applied), explaining ' are': the"
"""

from __future__ import annotations

import math

from .names import display_name

#: what each method's score measures; ``{t}`` is the target (e.g. "' are'") and ``{l}`` the layer
_MEANINGS: dict[str, str] = {
    "normxlogit": "the input-embedding norm × the logit of {t} read from each token's own layer-{l} residual "
                  "through the head; signed (logit × norm); larger = more evidence for {t}",
    "logat": "the logit of {t} read from each token's own layer-{l} residual through the head; signed "
             "(logit); larger = more evidence for {t}",
    "embedding_norm": "the L2 norm of each token's input representation; unsigned; the same for every prediction",
    "rollout": "the share of the prediction position's attention flow (attention rollout through layer {l}) "
               "that comes from each token; unsigned, sums to 1; attention mass, not specific to {t}",
    "attention": "the prediction position's attention weight on each token in layer {l}'s block; unsigned, sums "
                 "to 1; attention mass, not specific to {t}",
    "globenc": "each token's share of the prediction position's representation (norm-based mixing, rolled out "
               "through layer {l}); unsigned; not specific to {t}",
    "alti": "each token's share of the prediction position's representation (ALTI contributions, rolled out "
            "through layer {l}); unsigned; not specific to {t}",
    "value_zeroing": "how much the prediction position's representation changes (cosine distance, through "
                     "layer {l}) when each token's values are zeroed; unsigned; not specific to {t}",
    "decompx": "each token's part of the logit of {t} at layer {l} (the parts sum to the logit); signed "
               "(logit); larger = more evidence for {t}",
    "alti_logit": "each token's contribution to the logit of {t} through layer {l} (attention updates sent back "
                  "by ALTI rollout); signed (logit); larger = more evidence for {t}",
    "random": "random scores (a baseline); meaningless by design",
}
_GRADIENT = {
    "saliency": "the gradient of the {o} of {t} with respect to each token's word embedding",
    "grad_x_input": "gradient × input (word embedding) for the {o} of {t}",
    "integrated_gradients": "integrated gradients (from a zero embedding) of the {o} of {t}",
}
_REDUCED = {"l1": "L1 norm per token; unsigned; larger = more influence on {t}, in either direction",
            "l2": "L2 norm per token; unsigned; larger = more influence on {t}, in either direction",
            "sum": "summed per token; signed; larger = more evidence for {t}"}


def describe(attribution, batch: int = 0, layer: int = -1) -> str:
    """One readable sentence: paper name, layer (and "final"), target, units and sign.

    Args:
        attribution: a :class:`mechnorm.Attribution`.
        batch: whose target label and probability to name.
        layer: the row described: -1 for the last, or a layer index.

    Example:
        >>> attr.describe()                                                # doctest: +SKIP
        "NormXLogit at layer 30 (final, blocks applied): the input-embedding norm × the logit of ' are' ..."
    """
    a = attribution
    layer = a.layers[-1] if layer == -1 else layer
    a.row(layer)  # a clear error for a layer that was not computed
    target, chance = _target(a, batch)
    meta = a.metadata
    name = display_name(a.method)
    if a.method in _GRADIENT:
        output = "probability" if meta.get("output") == "prob" else "logit"
        reduce = meta.get("reduce", "l1")
        meaning = f"{_GRADIENT[a.method]}, {_REDUCED.get(reduce, reduce)}".format(o=output, t=target)
        return f"{name} on the input embeddings{chance}: {meaning}."
    meaning = _MEANINGS.get(a.method)
    if meaning is None:
        meaning = _registry_description(a.method) or "scores of an unregistered method"
    meaning = meaning.format(t=target, l=layer)
    if meta.get("space") == "logprob":
        meaning = meaning.replace("the logit of", "the log-probability of").replace("(logit", "(log-probability")
    if a.method == "embedding_norm":
        hook = meta.get("hook", "blocks.0.hook_resid_pre")
        return f"{name} ({hook}, layer 0): {meaning}."
    return f"{name} at {_layer_words(a, layer)}{chance}: {meaning}."


def _target(a, batch: int) -> tuple[str, str]:
    """The quoted target (``"' are'"``) and ``", explaining ' are' (p = 0.62)"`` for the sentence's head."""
    labels = a.target_labels
    label = repr(labels[batch]) if labels and batch < len(labels) else "the prediction"
    probs = getattr(a, "target_probs", None)
    chance = ""
    if probs is not None and batch < len(probs) and not math.isnan(float(probs[batch])):
        chance = f" (p = {float(probs[batch]):.2f})"
    return label, f", explaining {label}{chance}"


def _layer_words(a, layer: int) -> str:
    """``layer 30 (final, blocks applied)`` when every layer 0…L was computed, else ``layer 3 (blocks applied)``."""
    final = len(a.layers) > 1 and a.layers[0] == 0 and list(a.layers) == list(range(len(a.layers))) and layer == a.layers[-1]
    final = final or a.metadata.get("n_layers") == layer
    return f"layer {layer} ({'final, ' if final else ''}blocks applied)"


def _registry_description(method: str) -> str | None:
    try:  # the registry sits above results; read lazily for methods this module does not know
        from .methods.registry import get_method

        return get_method(method).description.replace("{", "(").replace("}", ")")
    except (KeyError, ImportError):
        return None
