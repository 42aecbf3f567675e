"""``mechnorm repmatch``: train two adapters, compare them, score instances; one-line errors."""

from __future__ import annotations

import pandas as pd
import pytest

from mechnorm import repmatch
from mechnorm.cli import main


def test_train_compare_instances(tmp_path, capsys):
    common = ["--model", "zoo:bert-lexicon", "--task", "lexicon", "--n", "32", "--steps", "4"]
    assert main(["repmatch", "train", *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["repmatch", "train", *common, "--start", "32", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["repmatch", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--html", str(tmp_path / "p.html")]) == 0
    printed = capsys.readouterr().out
    expected = repmatch.subspace_similarity(tmp_path / "a", tmp_path / "b").mean
    assert f"{expected:.4f}" in printed and (tmp_path / "p.html").exists()
    out = tmp_path / "s.csv"
    assert main(["repmatch", "instances", "--model", "zoo:bert-lexicon", "--task", "lexicon", "--n", "6",
                 "--reference", str(tmp_path / "a"), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert len(frame) == 6 and ((frame["score"] - frame[["layer_0", "layer_1"]].mean(1)).abs() < 1e-9).all()


@pytest.mark.parametrize("argv, message", [
    (["repmatch", "compare", "no/such/folder"], "not a peft adapter folder"),
    (["repmatch", "train", "--model", "zoo:bert-lexicon", "--task", "nope", "--out", "x"], "Unknown task"),
    (["repmatch", "frob"], "invalid choice"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.strip().count("\n") == 0
