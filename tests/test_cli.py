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
                 "--methods", "normxlogit", "grad_x_input", "--out", str(tmp_path / "bert-explain.html")])
    assert code == 0 and "not" in capsys.readouterr().out


# --- the CLI contract: every error one line and exit code 2, outputs checked before computing ---

ZOO = "zoo:gpt2-agree-recall"


def _one_line_exit_2(capsys, argv, *needles):
    """``mechnorm argv`` fails with exit code 2 and exactly one stderr line containing ``needles``."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    err = "\n".join(line for line in err.splitlines() if "Loading weights" not in line)  # transformers' load bar
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command loads a model: errors must come before any computation."""
    import mechnorm

    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking its output")

    monkeypatch.setattr(mechnorm, "load_model", refuse)


def test_explain_logit_lens_prints_the_lens_and_writes_its_figure(tmp_path, capsys):
    import mechnorm
    import torch

    out = tmp_path / "lens.html"
    assert main(["explain", "--model", ZOO, "--text", "the keys to the old cabinet", "--methods", "logit_lens",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Plotly.newPlot" in out.read_text()
    # the last layer's probability of the prediction, computed independently from the model's logits
    model = mechnorm.load_model(ZOO)
    batch = mechnorm.tokenize(model, "the keys to the old cabinet")
    logits, _ = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    probs = torch.softmax(logits[0, -1].double(), -1)
    top = model.tokenizer.decode([int(probs.argmax())])
    assert f"logit lens of {top!r}" in printed
    last = [line.split() for line in printed.splitlines() if line.strip().startswith(f"{model.cfg.n_layers} ")]
    assert last and abs(float(last[0][1]) - float(probs.max())) < 1e-3 and last[0][2] == "1"


def test_explain_prints_the_predicted_token_and_its_probability(tmp_path, capsys):
    import mechnorm
    import torch

    text = "the keys to the old cabinet"
    assert main(["explain", "--model", ZOO, "--text", text, "--methods", "normxlogit", "--out", str(tmp_path / "r.html")]) == 0
    printed = capsys.readouterr().out
    model = mechnorm.load_model(ZOO)
    batch = mechnorm.tokenize(model, text)
    logits, _ = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    probs = torch.softmax(logits[0, -1].double(), -1)
    expected = f"{model.tokenizer.decode([int(probs.argmax())])!r} (p = {float(probs.max()):.2f})"
    assert expected in printed, printed


def test_list_methods_fits_100_columns_and_names_every_method(capsys):
    import mechnorm

    assert main(["list-methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    firsts = {line.split()[0] for line in lines[1:] if not line.startswith(" ")}
    assert firsts == set(mechnorm.list_methods().name)


def test_an_existing_output_is_refused_without_force_before_computing(tmp_path, capsys, no_model):
    out = tmp_path / "report.html"
    out.write_text("keep me")
    _one_line_exit_2(capsys, ["explain", "--model", ZOO, "--text", "the key", "--out", str(out)], "--force")
    _one_line_exit_2(capsys, ["demo", "--model", ZOO, "--out", str(out)], "--force")
    (tmp_path / "faith.csv").write_text("keep me")
    _one_line_exit_2(capsys, ["evaluate", "--model", ZOO, "--task", "agreement", "--out", str(tmp_path / "faith")], "--force")
    assert out.read_text() == "keep me" and (tmp_path / "faith.csv").read_text() == "keep me"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("keep me")
    _one_line_exit_2(capsys, ["repmatch", "train", "--model", ZOO, "--task", "agreement", "--out", str(adapter)], "--force")
    _one_line_exit_2(capsys, ["repmatch", "instances", "--model", ZOO, "--task", "agreement", "--reference", str(adapter),
                              "--out", str(out)], "--force")
    _one_line_exit_2(capsys, ["repmatch", "compare", str(adapter), "--html", str(out)], "--force")
    assert (adapter / "adapter_config.json").read_text() == "keep me" and out.read_text() == "keep me"


def test_force_overwrites_an_existing_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    out.write_text("old")
    assert main(["explain", "--model", ZOO, "--text", "the key", "--methods", "normxlogit", "--out", str(out), "--force"]) == 0
    assert "Plotly.newPlot" in out.read_text()


def test_an_unwritable_output_fails_in_one_line_before_computing(tmp_path, capsys, no_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = str(blocker / "report.html")  # a folder that is a file: no user can write there
    _one_line_exit_2(capsys, ["explain", "--model", ZOO, "--text", "the key", "--out", out], "cannot write")
    _one_line_exit_2(capsys, ["demo", "--model", ZOO, "--out", out], "cannot write")
    _one_line_exit_2(capsys, ["evaluate", "--model", ZOO, "--task", "agreement", "--out", out], "cannot write")
    _one_line_exit_2(capsys, ["repmatch", "instances", "--model", ZOO, "--task", "agreement", "--reference", "x",
                              "--out", out], "cannot write")
    _one_line_exit_2(capsys, ["explain", "--model", ZOO, "--text", "the key", "--out", str(tmp_path)], "is a folder")


def test_every_command_reports_bad_input_in_one_line_with_exit_2(tmp_path, capsys):
    _one_line_exit_2(capsys, ["demo", "--model", "zoo:nope", "--out", str(tmp_path / "d.html")], "gpt2-agree-recall")
    _one_line_exit_2(capsys, ["demo", "--frobnicate"], "unrecognized")
    _one_line_exit_2(capsys, ["explain", "--model", ZOO, "--text", "the key", "--methods", "nope",
                              "--out", str(tmp_path / "e.html")], "normxlogit")  # lists the known methods
    _one_line_exit_2(capsys, ["explain", "--model", ZOO], "--text")
    _one_line_exit_2(capsys, ["list-methods", "--wide"], "unrecognized")
    _one_line_exit_2(capsys, ["evaluate", "--model", ZOO, "--task", "nope", "--out", str(tmp_path / "f")], "nope")
    _one_line_exit_2(capsys, ["evaluate", "--model", ZOO, "--task", "agreement", "--n", "0"], "at least 1")
    _one_line_exit_2(capsys, ["bench", "--batch", "0"], "at least 1")
    _one_line_exit_2(capsys, ["bench", "--pos", "many"], "whole number")
    _one_line_exit_2(capsys, ["bench", "--also", "everything"], "invalid choice")
    _one_line_exit_2(capsys, ["repmatch", "compare", str(tmp_path / "no-adapter")])
    _one_line_exit_2(capsys, ["repmatch", "train", "--model", ZOO, "--task", "agreement", "--n", "0",
                              "--out", str(tmp_path / "ad")], "--n")
    _one_line_exit_2(capsys, ["fetch", "no-such-model"], "smollm2-135m")


def test_an_unexpected_library_error_is_one_line_naming_its_type(tmp_path, capsys, monkeypatch):
    import mechnorm

    def broken(*args, **kwargs):
        raise RuntimeError("the model broke\nacross two lines")

    monkeypatch.setattr(mechnorm, "load_model", broken)
    err = _one_line_exit_2(capsys, ["explain", "--model", ZOO, "--text", "the key", "--out", str(tmp_path / "r.html")])
    assert "RuntimeError: the model broke across two lines" in err and "MECHNORM_TRACEBACK=1" in err


def test_demo_prints_a_readable_summary_and_says_what_it_skipped(tmp_path, capsys):
    import mechnorm
    import torch
    from mechnorm.demo import CASES

    out = tmp_path / "demo.html"
    assert main(["demo", "--model", ZOO, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "mechnorm demo --full" in printed and "Skipped: integrated_gradients" in printed
    assert "methods: 100%" in captured.err  # the progress bar over the methods
    model = mechnorm.load_model(ZOO)
    for case in CASES:  # the prediction and its probability, computed independently
        batch = mechnorm.tokenize(model, case.text)
        logits, _ = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
        probs = torch.softmax(logits[0, -1].double(), -1)
        token = model.tokenizer.decode([int(probs.argmax())])
        assert f"{case.text!r} -> {token!r} (p = {float(probs.max()):.2f})" in printed
    block = printed.split(f"[{CASES[0].name}]")[1].split("\n\n")[0]
    normxlogit = next(line for line in block.splitlines() if line.strip().startswith("normxlogit"))
    last = repr(model.tokenizer.decode(mechnorm.tokenize(model, CASES[0].text).tokens[0, -1:].tolist()))
    assert normxlogit.count("|") == 2 and last not in normxlogit  # 3 tokens with scores, never the prediction position
    assert "Plotly.newPlot" in out.read_text()


def test_demo_full_runs_integrated_gradients_with_a_progress_bar_and_its_completeness_gap(tmp_path, capsys):
    from mechnorm.demo import IG_STEPS, _IG_STEPS_PER_PASS

    assert main(["demo", "--model", ZOO, "--out", str(tmp_path / "demo.html"), "--full"]) == 0
    captured = capsys.readouterr()
    batches = IG_STEPS // _IG_STEPS_PER_PASS
    assert f"integrated_gradients: 100%" in captured.err and f"{batches}/{batches}" in captured.err
    line = next(l for l in captured.out.splitlines() if "completeness gap per sentence" in l)
    gaps = [float(g.rstrip("%,")) for g in line.split(":")[1].split("->")[0].split()]
    assert len(gaps) == 3 and max(gaps) < 5 and "converged" in line
    assert "Skipped" not in captured.out


def test_explain_a_classifier_with_a_method_and_the_lens_writes_both_outputs(tmp_path, capsys):
    import mechnorm
    import torch

    out = tmp_path / "bert.html"
    assert main(["explain", "--model", "zoo:bert-lexicon", "--text", "the film was not good",
                 "--methods", "normxlogit", "logit_lens", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and (tmp_path / "bert_logit_lens.html").exists()
    # the class the head predicts at [CLS], computed here from the final residual
    model, head = mechnorm.load_model("zoo:bert-lexicon"), mechnorm.zoo.classifier_head("bert-lexicon")
    batch = mechnorm.tokenize(model, "the film was not good")
    hook = mechnorm.residual.final_resid_hook(model)
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.HookFilter(frozenset({hook})))
    logits = head(cache[hook][:, :1], cache=cache)[0, 0]
    label = head.labels[int(logits.argmax())]
    assert f"logit lens of {label!r}" in printed
    final = [l.split() for l in printed.splitlines() if l.strip().startswith(f"{model.cfg.n_layers} ")][-1]
    assert final[3] == label and abs(float(final[1]) - float(torch.softmax(logits.double(), -1).max())) < 1e-3


def test_every_extra_benchmark_names_a_script_with_a_main():
    import ast
    from pathlib import Path

    from mechnorm.cli import _EXTRA_BENCHES

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    for module, _ in _EXTRA_BENCHES.values():
        tree = ast.parse((experiments / f"{module}.py").read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), module
