"""The mechnorm command: one-line errors with exit code 2, and an offline HTML report."""

import re

import pandas as pd

import pytest

from mechnorm.cli import main


def test_bad_arguments_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["frobnicate"])
    assert stop.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unknown_model_exits_2_naming_the_available_ones(capsys):
    assert main(["explain", "--model", "zoo:nope", "--text", "the key"]) == 2
    err = capsys.readouterr().err
    assert "gpt2-agree-recall" in err and len(err.strip().splitlines()) == 1


def test_explain_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    code = main(["explain", "--model", "zoo:gpt2-agree-recall", "--text", "the keys to the old cabinet",
                 "--methods", "normxlogit", "rollout", "--out", str(out)])
    assert code == 0
    page = out.read_text()
    assert re.search(r"<script[^>]*\bsrc=", page) is None  # nothing loaded from a CDN or elsewhere
    assert len(page) > 3_000_000 and "Plotly.newPlot" in page  # plotly.js itself is inline
    assert "keys" in page and "normxlogit" in page
    assert "cabinet" in capsys.readouterr().out  # the top-token table is printed


def test_list_methods_prints_the_registry(capsys):
    assert main(["list-methods"]) == 0
    assert "integrated_gradients" in capsys.readouterr().out


def test_a_zoo_classifier_is_explained_and_evaluated_through_its_head(tmp_path, capsys):
    out = tmp_path / "bert"
    code = main(["evaluate", "--model", "zoo:bert-lexicon", "--task", "lexicon", "--n", "16",
                 "--methods", "normxlogit", "saliency", "random", "--out", str(out)])
    assert code == 0
    frame = pd.read_csv(f"{out}.csv")
    saliency = frame[(frame.method == "saliency") & (frame.metric == "comprehensiveness")]
    assert len(saliency) and saliency.value.notna().all()  # gradient methods run through the [CLS] head
    code = main(["explain", "--model", "zoo:bert-lexicon", "--text", "the film was not good",
                 "--methods", "normxlogit", "grad_x_input", "--out", str(tmp_path / "bert.html")])
    assert code == 0 and "not" in capsys.readouterr().out
