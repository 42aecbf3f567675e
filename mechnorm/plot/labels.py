"""Token and title labels for figures: whitespace made visible, the papers' method names."""

from __future__ import annotations

import html

from ..names import display_name

#: how whitespace is drawn in tick labels and cells: space, newline, carriage return, tab
WHITESPACE_SYMBOLS = {" ": "␣", "\n": "↵", "\r": "↵", "\t": "⇥"}
PROTECTED_COLOUR = "#9a9a9a"


def visible(token: str) -> str:
    """A token string as a readable label: a whitespace-only token shows its characters as
    symbols (``" "`` -> ``"␣"``, ``"\\n"`` -> ``"↵"``, tab -> ``"⇥"``), line breaks and tabs inside a
    token always do (they would break the label), and the empty string shows as ``"∅"``.

    Example:
        >>> [visible(t) for t in [" ", "\\n\\n", " Paris", "a\\tb", ""]]
        ['␣', '↵↵', ' Paris', 'a⇥b', '∅']
    """
    if token == "":
        return "∅"
    if token.isspace():
        return "".join(WHITESPACE_SYMBOLS.get(c, "␣") for c in token)
    return "".join(WHITESPACE_SYMBOLS[c] if c in "\n\r\t" else c for c in token)


def _real_positions(mask, batch: int) -> list[int]:
    return mask[batch].nonzero().flatten().tolist()


def _token_labels(tokens, batch: int, positions: list[int]) -> list[str]:
    if tokens is None:
        return [str(p) for p in positions]
    return [visible(tokens[batch][p]) for p in positions]


def _protected(result, batch: int, positions: list[int]) -> list[bool]:
    """Whether each position is protected (``result.protected``, when the result has it)."""
    protected = getattr(result, "protected", None)
    if protected is None:
        return [False] * len(positions)
    return [bool(protected[batch, p]) for p in positions]


def _ticks(labels: list[str], protected: list[bool] | None = None) -> list[str]:
    """Tick labels for plotly's pseudo-HTML: escaped (so ``<s>`` is not a strike-through tag),
    protected positions in grey."""
    protected = protected or [False] * len(labels)
    escaped = [html.escape(label, quote=False) for label in labels]
    return [f"<span style='color:{PROTECTED_COLOUR}'>{label}</span>" if p else label for label, p in zip(escaped, protected)]


def target_text(result, batch: int) -> str:
    """``" ' Paris'"``-style quoted target of one sequence, or ``""`` when unknown."""
    labels = getattr(result, "target_labels", None)
    return html.escape(repr(labels[batch]), quote=False) if labels else ""


def method_title(result, batch: int) -> str:
    """``"NormXLogit — target ' Paris'"``: the method's paper name and what it explains.

    Example:
        >>> from types import SimpleNamespace
        >>> method_title(SimpleNamespace(method="normxlogit", target_labels=(" Paris",)), 0)
        "NormXLogit — target ' Paris'"
    """
    target = target_text(result, batch)
    name = display_name(result.method)
    return f"{name} — target {target}" if target else name
