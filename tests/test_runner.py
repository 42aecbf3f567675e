"""mechnorm.run_dataset: shards equal one whole-dataset attribute() call, two processes (torchrun,
gloo) write exactly the rows of one, an interrupted run resumes without duplicates or rewrites,
every input format reads the same rows, and malformed rows are named by file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import mechnorm
from mechnorm import evaluate, runner
from mechnorm.cli import main
from mechnorm.dataset_io import DatasetRowError, read_rows

from conftest import KINDS

TEXTS = [
    "the keys to the old cabinet", "the key", "a dog near the red tables runs and", "the cats near the table",
    "a small dog runs", "the old wooden cabinet is", "keys on the table are", "a cat by the big dogs",
    "the red key", "dogs and cats run",
]
ROWS = [{"text": t, "target": "cabinet", "foil": "table", "cue_positions": [1, len(t.split())]} for t in TEXTS]
METHODS = ["normxlogit", "saliency"]


def write_jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def modification_times(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").glob("shard-*.parquet"))}


@pytest.mark.parametrize("kind", KINDS)
def test_shards_equal_one_attribute_call_over_the_whole_dataset(tmp_path, model_dirs, load, kind):
    model = load("gpt2", kind)
    report = mechnorm.run_dataset(model, write_jsonl(tmp_path / "d.jsonl"), METHODS, tmp_path / "out", shard_size=3,
                                  batch_size=2, progress=False)
    assert (report.n_rows, report.n_shards, report.computed) == (10, 4, [0, 1, 2, 3])
    frame = runner.read(tmp_path / "out")
    target = mechnorm.contrast("cabinet", "table", model)
    whole = mechnorm.attribute(model, TEXTS, METHODS, target=target).to_frame()  # one batch, padded to the longest text
    whole = whole.rename(columns={"batch": "row"})
    merged = frame.merge(whole, on=["row", "method", "layer", "pos"], suffixes=("", "_whole"), validate="one_to_one")
    assert len(merged) == len(frame) == len(whole)  # every token of every row, nothing else
    assert (merged.token == merged.token_whole).all()
    torch.testing.assert_close(torch.tensor(merged.score.values), torch.tensor(merged.score_whole.values),
                               rtol=1e-4, atol=1e-5)
    assert set(frame.target) == {"cabinet − table"}
    lengths = frame.groupby("row").pos.max() + 1  # BOS + words
    assert lengths.tolist() == [len(t.split()) + 1 for t in TEXTS]
    cues = frame[frame.cue & (frame.method == "normxlogit") & (frame.layer == 0)]
    assert cues.groupby("row").pos.apply(list).tolist() == [r["cue_positions"] for r in ROWS]


def test_left_padding_gives_the_same_rows(tmp_path, load):
    data = write_jsonl(tmp_path / "d.jsonl")
    right = mechnorm.run_dataset(load("gpt2"), data, ["normxlogit"], tmp_path / "r", shard_size=4, progress=False).read()
    left = mechnorm.run_dataset(load("gpt2"), data, ["normxlogit"], tmp_path / "l", shard_size=4, padding_side="left",
                                progress=False).read()
    pd.testing.assert_frame_equal(right.drop(columns="score"), left.drop(columns="score"))  # pos counts from each text
    torch.testing.assert_close(torch.tensor(right.score.values), torch.tensor(left.score.values), rtol=1e-4, atol=1e-5)


def test_two_processes_under_torchrun_write_exactly_the_rows_of_one(tmp_path, model_dirs):
    data = write_jsonl(tmp_path / "d.jsonl")
    args = ["run", "--model", model_dirs["gpt2"], "--kind", KINDS[0], "--data", str(data), "--methods", *METHODS,
            "--shard-size", "3", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--out-dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mechnorm.cli", *args,
                           "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "computed by 2 process(es)" in done.stdout
    import pyarrow.parquet as pq

    writers = {json.loads(pq.read_schema(p).metadata[b"mechnorm"])["process_index"]
               for p in (tmp_path / "two" / "shards").glob("*.parquet")}
    assert writers == {0, 1}  # both processes computed shards
    pd.testing.assert_frame_equal(runner.read(tmp_path / "one"), runner.read(tmp_path / "two"), check_exact=True)


def test_an_interrupted_run_resumes_without_rewriting_duplicating_or_missing_rows(tmp_path, load):
    model, data = load("gpt2"), write_jsonl(tmp_path / "d.jsonl")

    def stop_after_shard_1(shard):
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mechnorm.run_dataset(model, data, METHODS, tmp_path / "out", shard_size=3, progress=False, on_shard=stop_after_shard_1)
    before = modification_times(tmp_path / "out")
    assert list(before) == ["shard-000000.parquet", "shard-000001.parquet"]
    with pytest.raises(ValueError, match="unfinished: 2 of 4 shards missing"):
        runner.read(tmp_path / "out")
    assert set(runner.read(tmp_path / "out", partial=True).row) == set(range(6))
    report = mechnorm.run_dataset(model, data, METHODS, tmp_path / "out", shard_size=3, progress=False)
    assert (report.skipped, report.computed) == ([0, 1], [2, 3])
    after = modification_times(tmp_path / "out")
    assert {k: after[k] for k in before} == before  # finished shards were not rewritten
    resumed = runner.read(tmp_path / "out")
    whole = mechnorm.run_dataset(model, data, METHODS, tmp_path / "whole", shard_size=3, progress=False).read()
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)
    assert not resumed.duplicated(["row", "method", "layer", "pos"]).any()
    again = mechnorm.run_dataset(model, data, METHODS, tmp_path / "out", shard_size=3, progress=False)
    assert (again.computed, modification_times(tmp_path / "out")) == ([], after)  # a finished run does nothing


def test_a_malformed_line_is_named_and_finished_shards_are_kept(tmp_path, load):
    model = load("gpt2")
    rows = [dict(r) for r in ROWS]
    rows[7]["cue_positions"] = [99]  # line 8: beyond the text, found when its shard (2) is tokenised
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetRowError, match=rf"d\.jsonl:8: cue position\(s\) \[99\]"):
        mechnorm.run_dataset(model, data, METHODS, tmp_path / "out", shard_size=3, progress=False)
    kept = modification_times(tmp_path / "out")
    assert list(kept) == ["shard-000000.parquet", "shard-000001.parquet"]
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:4] + ['{"text": "the key", "target": "cabinet"'] + lines[5:]) + "\n")
    with pytest.raises(DatasetRowError, match=r"d\.jsonl:5: not valid JSON"):
        mechnorm.run_dataset(model, data, METHODS, tmp_path / "out", shard_size=3, progress=False)
    write_jsonl(data)  # fixed: the run resumes, keeps shards 0 and 1, and equals a clean run
    mechnorm.run_dataset(model, data, METHODS, tmp_path / "out", shard_size=3, progress=False)
    assert {k: v for k, v in modification_times(tmp_path / "out").items() if k in kept} == kept
    clean = mechnorm.run_dataset(model, data, METHODS, tmp_path / "clean", shard_size=3, progress=False).read()
    pd.testing.assert_frame_equal(runner.read(tmp_path / "out"), clean, check_exact=True)


@pytest.mark.parametrize("bad, message", [
    ({"txt": "the key"}, r"d\.jsonl:3: the text column 'text' is missing"),
    ({"text": "the key", "target": "the key"}, r"d\.jsonl:3: target 'the key' is 2 tokens"),
    ({"text": "the key", "target": 999}, r"d\.jsonl:3: target id 999 is outside"),
    ({"text": "the key", "cue_positions": "2"}, r"d\.jsonl:3: cue_positions '2' must be a list"),
])
def test_bad_rows_name_their_line(tmp_path, load, bad, message):
    rows = [{"text": "the key", "target": "cabinet"}] * 2 + [{"target": "cabinet", **bad}]
    with pytest.raises(DatasetRowError, match=message):
        mechnorm.run_dataset(load("gpt2"), write_jsonl(tmp_path / "d.jsonl", rows), ["normxlogit"], tmp_path / "o",
                             progress=False)


def test_csv_parquet_datasets_folder_and_dataframe_read_the_same_rows(tmp_path, load):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = pd.DataFrame(ROWS)
    csv = frame.assign(cue_positions=frame.cue_positions.map(json.dumps))
    csv.loc[2, "text"] = "a dog near the red\ntables runs and"  # a quoted field over two lines
    csv.to_csv(tmp_path / "d.csv", index=False)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "folder"))
    strip = lambda rows: [(r.text.replace("\n", " "), r.target, r.foil, r.cue_positions) for r in rows]  # noqa: E731
    expected = [(r["text"], "cabinet", "table", tuple(r["cue_positions"])) for r in ROWS]
    for source in (write_jsonl(tmp_path / "d.jsonl"), tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "folder", frame):
        assert strip(read_rows(source)) == expected
    assert [r.where for r in read_rows(tmp_path / "d.csv")][1:5] == [f"{tmp_path / 'd.csv'}:{n}" for n in (3, 4, 6, 7)]
    csv.loc[5, "cue_positions"] = "[1,"  # record 6 starts on line 8 (the header and a two-line record before it)
    csv.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DatasetRowError, match=r"bad\.csv:8: cue_positions '\[1,' is not a JSON list"):
        read_rows(tmp_path / "bad.csv")
    model = load("gpt2")
    runs = [mechnorm.run_dataset(model, s, ["normxlogit"], tmp_path / f"o{i}", shard_size=4, progress=False).read()
            for i, s in enumerate((tmp_path / "d.jsonl", tmp_path / "d.parquet", tmp_path / "folder"))]
    for other in runs[1:]:
        pd.testing.assert_frame_equal(runs[0], other, check_exact=True)


def test_a_different_model_methods_or_shard_size_is_refused(tmp_path, load):
    data = write_jsonl(tmp_path / "d.jsonl")
    mechnorm.run_dataset(load("gpt2"), data, ["normxlogit"], tmp_path / "o", shard_size=5, progress=False)
    for change, message in [({"methods": ["logat"]}, r"methods: \['normxlogit'\] there, \['logat'\] now"),
                            ({"shard_size": 4}, "shard_size: 5 there, 4 now"),
                            ({"model": load("llama")}, "model: 'Hooked|model: 'TransformerBridge")]:
        kwargs = {"model": load("gpt2"), "methods": ["normxlogit"], "shard_size": 5, **change}
        with pytest.raises(ValueError, match=message):
            mechnorm.run_dataset(kwargs.pop("model"), data, out=tmp_path / "o", progress=False, **kwargs)
    changed = [dict(r) for r in ROWS]
    changed[1]["text"] = "the keys"  # a finished shard's input changed: refused, not mixed
    with pytest.raises(ValueError, match=r"shard-000000.parquet was computed from other rows"):
        mechnorm.run_dataset(load("gpt2"), write_jsonl(data, changed), ["normxlogit"], tmp_path / "o", shard_size=5,
                             progress=False)


def test_evaluation_shards_combine_to_the_whole_dataset_figures(tmp_path, model_dirs, load):
    model = load("gpt2")
    rows = [{"text": r["text"], "target": "cabinet", "cue_positions": r["cue_positions"]} for r in ROWS]
    for row in rows[1::3]:  # only the prediction position is a cue: no cue left to score, cue_mass skips them
        row["cue_positions"] = row["cue_positions"][-1:]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    metrics = ("comprehensiveness", "sufficiency", "cue_mass")
    mechnorm.run_dataset(model, data, ["normxlogit", "embedding_norm"], tmp_path / "ev", evaluate=True, metrics=metrics,
                         ks=(0.2, 0.5), shard_size=4, progress=False)  # shards of 4, 4 and 2 examples
    combined = runner.read_evaluation(tmp_path / "ev")
    batch = mechnorm.tokenize(model, TEXTS)
    whole = evaluate.run(model, {"tokens": batch.tokens, "attention_mask": batch.attention_mask,
                                 "labels": torch.full((10,), mechnorm.token_target("cabinet", model).ids.item()),
                                 "cue_positions": [r["cue_positions"] for r in rows]},
                         ["normxlogit", "embedding_norm"], metrics, ks=(0.2, 0.5), progress=False)
    assert list(combined.columns) == list(whole.columns)
    merged = combined.merge(whole, on=["method", "layer", "metric", "k"], suffixes=("", "_whole"), validate="one_to_one")
    assert len(merged) == len(whole) == len(combined)
    assert merged.value.tolist() == pytest.approx(merged.value_whole.tolist(), rel=1e-4, abs=1e-6)
    code = main(["evaluate", "--model", model_dirs["gpt2"], "--data", str(data), "--out-dir",
                 str(tmp_path / "cli"), "--methods", "normxlogit", "--shard-size", "3", "--no-progress"])
    assert code == 0
    table = pd.read_csv(tmp_path / "cli" / "faithfulness.csv")
    assert set(table.method) == {"normxlogit"} and (tmp_path / "cli" / "faithfulness.html").exists()


def test_evaluate_on_a_task_through_the_runner_equals_the_harness(tmp_path):
    from mechnorm import tasks

    args = ["evaluate", "--model", "zoo:gpt2-agree-recall", "--task", "agreement", "--n", "6", "--methods", "normxlogit",
            "--out-dir", str(tmp_path / "o"), "--shard-size", "4", "--no-progress"]
    assert main(args) == 0
    frame = pd.read_csv(tmp_path / "o" / "faithfulness.csv")
    model = mechnorm.load_model("zoo:gpt2-agree-recall")
    whole = evaluate.run(model, tasks.get_task("agreement").test(6), ["normxlogit"],
                         ("comprehensiveness", "sufficiency", "average_precision", "cue_mass", "hit_at_1"), progress=False)
    merged = frame.merge(whole, on=["method", "layer", "metric", "k"], suffixes=("", "_whole"), validate="one_to_one")
    assert len(merged) == len(whole)
    assert merged.value.tolist() == pytest.approx(merged.value_whole.tolist(), rel=1e-4, abs=1e-6)
    assert main(["evaluate", "--model", "zoo:gpt2-agree-recall"]) == 2  # neither --task nor --data
