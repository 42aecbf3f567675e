"""The README's Python blocks run, in order, in one namespace (as a notebook would run them).

Only models available offline are used (the zoo, SmolLM2 and Gemma 3 in mechnorm's cache).
A block that cannot run here must say why in the README, on the line right before it:
``<!-- no-run: REASON -->``; the test counts and prints the skipped blocks.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!--\s*no-run:\s*(?P<reason>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """Every fenced ``python`` block: (line number, code, no-run reason or None)."""
    return [(text[: m.start("code")].count("\n") + 1, m.group("code"), m.group("reason")) for m in _BLOCK.finditer(text)]


def test_the_block_finder_sees_markers_and_every_block():
    text = "a\n```python\nx = 1\n```\n<!-- no-run: needs hub -->\n```python\nload('gpt2')\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", None), (7, "load('gpt2')\n", "needs hub")]
    assert len(python_blocks(README.read_text())) == README.read_text().count("```python")


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # figures, adapters and reports the examples write land here
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    blocks = python_blocks(README.read_text())
    namespace: dict = {"__name__": "__readme__"}
    skipped, timings = [], []
    for line, code, reason in blocks:
        if reason:
            skipped.append(f"README.md:{line} ({reason})")
            continue
        start = time.perf_counter()
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README block at line {line} failed: {type(error).__name__}: {error}")
        timings.append(f"README.md:{line} {time.perf_counter() - start:.1f} s")
    with capsys.disabled():
        print(f"\nREADME: {len(blocks) - len(skipped)} python blocks ran, {len(skipped)} skipped: {skipped}")
        print("  " + ", ".join(timings))
    assert len(blocks) - len(skipped) >= 10 and len(skipped) <= 2
