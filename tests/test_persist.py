"""Results saved to safetensors + JSON and loaded back are equal field by field, and the files
follow the documented format (read here without mechnorm)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

import mechnorm
from mechnorm import persist

from conftest import TEXTS


@pytest.fixture(scope="module")
def comparison(model_dirs):
    model = mechnorm.load_model(model_dirs["gpt2"])
    return mechnorm.attribute(model, TEXTS, methods=("normxlogit", "rollout", "integrated_gradients"),
                              padding_side="left", options={"integrated_gradients": {"n_steps": 4}})


def assert_same(a, b):
    """Every init field equal: tensors bit for bit (NaN where NaN), with their dtypes; the rest by ==."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f.name
            for key in x:
                if isinstance(x[key], torch.Tensor):
                    torch.testing.assert_close(x[key], y[key], rtol=0, atol=0, equal_nan=True)
                elif dataclasses.is_dataclass(x[key]):
                    assert_same(x[key], y[key])
                else:
                    assert type(x[key]) is type(y[key]) and x[key] == y[key], f"{f.name}.{key}"
        elif dataclasses.is_dataclass(x):
            assert_same(x, y)
        else:
            assert type(x) is type(y) and x == y, f.name


def test_attribution_round_trip(tmp_path, comparison):
    for method in comparison.methods:
        attr = comparison[method]
        path = attr.save(tmp_path / method)
        again = mechnorm.Attribution.load(path)
        assert_same(attr, again)
        pd.testing.assert_frame_equal(attr.to_frame(), again.to_frame())
        pd.testing.assert_frame_equal(attr.top_k(3), again.top_k(3))
    assert isinstance(again.target_labels, tuple) and isinstance(again.layers, tuple)
    assert again.metadata["convergence_delta"].shape == (len(TEXTS),)  # IG's per-sequence tensor metadata


def test_comparison_round_trip(tmp_path, comparison):
    comparison.save(tmp_path / "comp")
    again = mechnorm.Comparison.load(tmp_path / "comp")
    assert again.methods == comparison.methods and again.seconds == comparison.seconds
    for method in comparison.methods:
        assert_same(comparison[method], again[method])
    assert_same(comparison.batch, again.batch)
    pd.testing.assert_frame_equal(comparison.to_frame(), again.to_frame())
    pd.testing.assert_frame_equal(comparison.agreement(), again.agreement())


def test_lens_result_round_trip_keeps_the_integer_keyed_vocabulary(tmp_path, model_dirs):
    model = mechnorm.load_model(model_dirs["llama"])
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens"))
    lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", tokens=batch.tokens,
                               attention_mask=batch.attention_mask)
    lens.save(tmp_path / "lens")
    again = mechnorm.LensResult.load(tmp_path / "lens")
    assert_same(lens, again)
    assert all(isinstance(k, int) for k in again.vocab)
    pd.testing.assert_frame_equal(lens.to_frame(), again.to_frame())


def test_files_follow_the_documented_format(tmp_path, comparison):
    attr = comparison["rollout"]
    attr.save(tmp_path / "r")
    document = json.loads((tmp_path / "r" / "result.json").read_text())
    assert document["format"] == "mechnorm.result" and document["format_version"] == 1
    assert document["class"] == "mechnorm.result:Attribution" and document["dropped"] == []
    fields = document["fields"]
    assert fields["method"] == "rollout" and fields["signed"] is False
    assert fields["layers"] == {"__tuple__": list(attr.layers)}
    assert fields["tokens"] == attr.tokens
    assert fields["metadata"]["head_fusion"] == attr.metadata["head_fusion"]
    with safe_open(str(tmp_path / "r" / "tensors.safetensors"), "pt") as f:
        assert fields["scores"] == {"__tensor__": "scores"}
        torch.testing.assert_close(f.get_tensor("scores"), attr.scores, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(f.get_tensor("metadata.positions"), attr.metadata["positions"])


def test_metadata_types_round_trip_and_unserialisable_entries_are_dropped_with_a_warning(tmp_path):
    metadata = {"array": np.arange(3.0), "by_id": {3: "a", 7: "b"}, "pair": (1, "x"), "nested": {"t": torch.ones(2)},
                "scalar": np.float32(0.5), "object": object(), "nan": float("nan")}
    attr = mechnorm.Attribution(torch.zeros(1, 1, 2), layers=(0,), mask=torch.ones(1, 2, dtype=torch.bool),
                                method="logat", metadata=metadata)
    with pytest.warns(UserWarning, match=r"metadata\.object"):
        attr.save(tmp_path / "m")
    again = mechnorm.Attribution.load(tmp_path / "m")
    assert "object" not in again.metadata
    np.testing.assert_array_equal(again.metadata["array"], metadata["array"])
    assert again.metadata["by_id"] == {3: "a", 7: "b"} and again.metadata["pair"] == (1, "x")
    assert torch.equal(again.metadata["nested"]["t"], torch.ones(2)) and again.metadata["scalar"] == 0.5
    assert np.isnan(again.metadata["nan"])
    assert json.loads((tmp_path / "m" / "result.json").read_text())["dropped"] == ["metadata.object"]


def test_errors_name_the_fix(tmp_path, comparison):
    attr = comparison["normxlogit"]
    attr.save(tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        attr.save(tmp_path / "a")
    attr.save(tmp_path / "a", overwrite=True)
    with pytest.raises(TypeError, match="Attribution.load"):
        mechnorm.Comparison.load(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="result.json"):
        mechnorm.Attribution.load(tmp_path / "missing")
    with pytest.raises(TypeError, match="dataclasses"):
        persist.save({"scores": 1}, tmp_path / "d")
    assert isinstance(persist.load(tmp_path / "a" / "result.json"), mechnorm.Attribution)
