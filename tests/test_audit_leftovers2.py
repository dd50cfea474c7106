"""Leftovers of the benchmark audit: mnn_purity's test-cell exclusion, one seed-list pattern, results
records never replaced without --overwrite, and the obs text columns converted without a per-value lambda."""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from test_audit_benchmarks import BENCHMARKS, load_script

from mixgeneformer import classify as C
from mixgeneformer import integration
from mixgeneformer.errors import ArtifactError, InputDataError
from mixgeneformer.tokenize.obs import _obs_array

LABEL = "cell_type1"


def _labelled(n: int, seed: int) -> ad.AnnData:
    labels = np.random.default_rng(seed).choice(["alpha", "beta", "delta"], size=n).astype(object)
    return ad.AnnData(X=np.ones((n, 2), dtype=np.float32), obs=pd.DataFrame({LABEL: labels}, index=[f"c{i}" for i in range(n)]))


def _corpus_of(data: dict[str, ad.AnnData], dropped: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(species, cell_index, canonical types) of a corpus tokenized from ``data``: each file's rows but
    its first ``dropped`` (cells the tokenizer filtered out), the species interleaved."""
    species = np.concatenate([[s] * (a.n_obs - dropped) for s, a in data.items()]).astype(object)
    index = np.concatenate([np.arange(dropped, a.n_obs) for a in data.values()])
    order = np.random.default_rng(0).permutation(species.size)
    species, index = species[order], index[order]
    types = np.empty(species.size, dtype=object)
    for s, a in data.items():
        types[species == s] = C.canonical_labels(a.obs[LABEL].to_numpy()[index[species == s]])
    return species, index, types


# 1. mnn_purity.py draws no test cell of the demo's split seeds -------------------------------------


def test_mnn_purity_scores_only_cells_no_split_of_the_excluded_seeds_tests_on():
    mnn = load_script("mnn_purity")
    data = {"human": _labelled(120, 1), "mouse": _labelled(90, 2)}
    species, index, types = _corpus_of(data)
    assert mnn.parse_args(["--corpus", "c", "--model", "m"]).exclude_test_seeds == [0, 1, 2]
    assert mnn.parse_args(["--corpus", "c", "--model", "m", "--exclude-test-seeds"]).exclude_test_seeds == []

    cells = mnn.scored_cells(species, index, types, data, LABEL, [0, 1, 2])
    for s, adata in data.items():
        tested = C.tested_rows(adata, C.LabelConfig(key=LABEL), [0, 1, 2])
        mine = species[cells] == s
        assert not np.isin(index[cells][mine], tested).any()  # no test cell of any of the seeds
        expected = np.setdiff1d(index[species == s], tested)
        assert np.array_equal(np.sort(index[cells][mine]), expected)  # every other cell is kept
    assert np.array_equal(mnn.scored_cells(species, index, types, data, LABEL, []), np.arange(species.size))


def test_mnn_purity_refuses_a_corpus_not_tokenized_from_the_data():
    mnn = load_script("mnn_purity")
    data = {"human": _labelled(60, 1), "mouse": _labelled(60, 2)}
    data["human"].obs.loc["c5", LABEL] = np.nan  # a missing label: NaN in the file, None in the corpus
    species, index, types = _corpus_of(data)
    types[(species == "human") & (index == 5)] = C.canonical_labels([None])[0]
    assert mnn.scored_cells(species, index, types, data, LABEL, [0]).size > 0
    with pytest.raises(InputDataError, match="tokenized from other files.*Pass --data"):
        mnn.scored_cells(species, (index + 1) % 60, types, data, LABEL, [0])  # rows shifted by one
    with pytest.raises(InputDataError, match="do not match any file of --data"):
        mnn.scored_cells(species, index, types, {"human": data["human"]}, LABEL, [0])


def test_mnn_purity_batches_and_queues_hold_only_the_scored_cells(monkeypatch):
    mnn = load_script("mnn_purity")
    n, vocab_size = 60, 12
    rng = np.random.default_rng(3)
    lengths = np.full(n, 4)
    corpus = {"flat": rng.integers(3, vocab_size, size=4 * n), "starts": np.cumsum(lengths) - lengths, "lengths": lengths,
              "codes": np.tile([0, 1], n // 2), "types": np.array(["a", "b", "c"] * (n // 3), dtype=object)}
    drawn, pad_batch = [], mnn.pad_batch

    def recording_pad(flat, starts, lengths, pad_id):  # noqa: ANN001
        drawn.append(np.asarray(starts) // 4)  # each cell's start / 4 = its corpus position
        return pad_batch(flat, starts, lengths, pad_id)

    monkeypatch.setattr(mnn, "pad_batch", recording_pad)
    model = type("Model", (), {"ortholog_class": torch.arange(vocab_size), "config": type("Config", (), {"vocab_size": vocab_size})})()
    vocab = type("Vocab", (), {"pad_id": 0})()
    args = type("Args", (), {"cells": 32})()
    cells = np.arange(0, n, 3)  # 20 scored cells
    row, _ = mnn.setup_scores("4+8", cells, corpus, model, vocab, args, np.random.default_rng(0))
    assert len(drawn) == 8 and all(d.size == 12 for d in drawn)  # 32 // 4 batches of 4 cells + 8 queued
    assert np.isin(np.concatenate(drawn), cells).all()
    assert row["cells"] == 32


# 2. one seed-list pattern ---------------------------------------------------------------------------


def test_finetune_cv_and_split_seeds_take_seeds_as_argparse_int_lists():
    finetune_cv, split_seeds = load_script("finetune_cv"), load_script("split_seeds")
    assert not hasattr(finetune_cv, "parse_seeds") and not hasattr(split_seeds, "parse_seeds")
    args = finetune_cv.parse_args(["--bundle", "b", "--seeds", "3", "4"])
    assert args.seeds == [3, 4] and args.exclude_test_seeds == [3, 4]  # default: the seeds compared
    assert finetune_cv.parse_args(["--bundle", "b", "--exclude-test-seeds", "0", "9"]).exclude_test_seeds == [0, 9]
    assert split_seeds.parse_args(["--demo", "d"]).seeds == list(range(10))
    assert split_seeds.parse_args(["--demo", "d", "--seeds", "2", "5"]).seeds == [2, 5]
    with pytest.raises(SystemExit):  # the former "0-9" form is no seed
        split_seeds.parse_args(["--demo", "d", "--seeds", "0-9"])


# 3. a results record is replaced only with --overwrite ------------------------------------------------


def test_benchmark_files_are_refused_when_present_and_written_all_or_none(tmp_path):
    first, second = tmp_path / "r.txt", tmp_path / "r.csv"
    first.write_text("earlier run\n")
    integration.check_benchmark_out([None, "", tmp_path / "absent.txt"], overwrite=False)
    with pytest.raises(ArtifactError, match=r"r\.txt already exists.*Pass --overwrite to replace it, or choose another --out"):
        integration.check_benchmark_out([second, first], overwrite=False)
    with pytest.raises(ArtifactError, match="already exists"):
        integration.write_benchmark_files({second: "new csv", first: "new text"}, overwrite=False)
    assert first.read_text() == "earlier run\n" and not second.exists()  # nothing written: not even the new file

    (tmp_path / "folder").mkdir()
    with pytest.raises(ArtifactError, match="is a folder"):  # the second write fails: the first is not replaced
        integration.write_benchmark_files({first: "new text", tmp_path / "folder": "x"}, overwrite=True)
    assert first.read_text() == "earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "r.txt"]  # no temporary file left

    integration.write_benchmark_files({first: "new text", second: "new csv"}, overwrite=True)
    assert first.read_text() == "new text" and second.read_text() == "new csv"


# (script, required options, the file made to exist: "out" = --out itself, else a suffix / name beside it)
SCRIPTS = [
    ("classify", [], "out"),
    ("demo_budget", [], ".json"),
    ("finetune_cv", ["--bundle", "b"], "_per_class.csv"),
    ("finetune_diagnostics", ["--bundle", "b"], ".json"),
    ("input_bound", [], "out"),
    ("mlm_bound", [], "out"),
    ("mnn_purity", ["--corpus", "c", "--model", "m"], "out"),
    ("planted", [], "out"),
    ("species", [], "out"),
    ("split_seeds", ["--demo", "d"], ".csv"),
]


@pytest.mark.parametrize(("name", "required", "existing"), SCRIPTS)
def test_every_benchmark_refuses_an_existing_out_before_any_work(name, required, existing, tmp_path, monkeypatch):
    script = load_script(name)
    out = tmp_path / "result.txt"
    present = out if existing == "out" else out.with_name(out.stem + existing) if existing.startswith("_") else out.with_suffix(existing)
    present.write_text("an earlier run's record\n")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *required, "--out", str(out)])
    with pytest.raises(ArtifactError, match=f"{present.name} already exists.*--overwrite"):
        script.main()  # the required inputs (b, c, m, d) do not exist: refused before any is read
    assert present.read_text() == "an earlier run's record\n"


def test_every_script_with_an_out_option_has_the_shared_overwrite_option():
    with_out = sorted(p.stem for p in BENCHMARKS.glob("*.py") if '"--out"' in p.read_text() and "add_argument(" in p.read_text())
    with_out.remove("sharded_embed")  # passes --out to the mixgf commands it times; writes no record itself
    assert with_out == sorted(name for name, _, _ in SCRIPTS)
    for name in with_out:
        source = (BENCHMARKS / f"{name}.py").read_text()
        assert "add_overwrite_argument(parser)" in source and ".write_text(" not in source and ".to_csv(args" not in source


# 4. obs text columns, vectorized, same values ---------------------------------------------------------


def _obs_array_before(values: pd.Series) -> pa.Array:
    """The former conversion: ``str(v)`` per value through a Python lambda, None where missing."""
    text = values.astype(object).where(values.notna(), None)
    return pa.array(text.map(lambda v: v if v is None else str(v)).to_numpy(dtype=object), type=pa.string())


@pytest.mark.parametrize("values", [
    pd.Series(["alpha", 1, 2.5, np.nan, None, True, False, np.float32(0.1), 1e16, np.int64(3), pd.NA, "", "ü",
               b"raw", np.bool_(True), -0.0, float("inf"), 10**30], dtype=object),
    pd.Series(pd.Categorical(["beta", None, "alpha", "beta"])),
    pd.Series(pd.Categorical([1, None, 3])),
    pd.Series(pd.Categorical([0.5, 2.0, None, 0.5])),
    pd.Series([1.5, np.nan, 3.0]),
    pd.Series([True, False]),
    pd.Series(np.array([0.1, 7], dtype=np.float32)),
    pd.Series(pd.array([1, None], dtype="Int64")),
    pd.Series(pd.array(["x", None], dtype="string")),
    pd.Series([None, np.nan], dtype=object),
    pd.Series([], dtype=object),
], ids=["mixed", "categorical-str", "categorical-int", "categorical-float", "float", "bool", "float32", "Int64",
        "string", "all-missing", "empty"])
def test_obs_text_column_is_the_same_arrow_array_as_before(values):
    converted = _obs_array(values, pa.string())
    assert converted.type == pa.string()
    assert converted.equals(_obs_array_before(values)), (converted.to_pylist(), _obs_array_before(values).to_pylist())


def test_obs_text_column_calls_no_python_function_per_value(monkeypatch):
    values = pd.Series(pd.Categorical(np.random.default_rng(0).choice(["a", "b", "c"], 5000)).astype(object))
    calls = []
    original = pd.Series.map
    monkeypatch.setattr(pd.Series, "map", lambda self, *a, **k: calls.append(len(self)) or original(self, *a, **k))
    assert _obs_array(values, pa.string()).to_pylist() == values.tolist()
    assert calls == []  # only columns holding bytes look at each value's type
