"""Audit of the perturbation statistics and screening tables (perturb/stats.py, screen.py,
results.py and what engine.py / cli/perturb.py feed them).

Each test computes its expectation independently (scipy.stats.mannwhitneyu, scipy's
Benjamini-Hochberg) and fails on a fault the audit found.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from _tokenize_helpers import cli_exit_code
from test_perturb import STATES, bert, bundle_and_cells, cells, vocab  # noqa: F401  (fixtures)

import mixgeneformer.perturb as pt
from mixgeneformer.errors import ConfigError, InputDataError
from mixgeneformer.perturb import (
    PerturbConfig,
    merge_shards,
    perturb_cells,
    perturbation_statistics,
)

SCREEN = dict(state_column="s", start="a", goal="b", mode="screen", screen_top_k=3)


def _table(groups: dict[str, list[float]], column: str = "shift") -> pd.DataFrame:
    rows = [{"cell": c, "perturbed": gene, "gene_token": 10 + int(gene[1:]), "gene_rank": 0, column: v}
            for gene, values in groups.items() for c, v in enumerate(values)]
    return pd.DataFrame(rows)


# -- a test whose values are all tied is p = 1 (scipy), and counts in the FDR ---------------------
def test_all_tied_scores_are_p_one_and_count_in_the_fdr():
    # G0 changes nothing in either run (every score exactly 0): a test made, with no evidence.
    test = _table({"G0": [0.0, 0.0, 0.0], "G1": [0.30, 0.32, 0.35, 0.31], "G2": [0.05, 0.20, 0.11]})
    null = _table({"G0": [0.0, 0.0], "G1": [0.01, 0.02, 0.00, 0.03], "G2": [0.04, 0.21, 0.10]})
    stats = perturbation_statistics(test, mode="vs_null", null=null).set_index("perturbed")
    expected = {}
    for gene in ("G0", "G1", "G2"):
        x = test.loc[test["perturbed"] == gene, "shift"]
        y = null.loc[null["perturbed"] == gene, "shift"]
        expected[gene] = scipy.stats.mannwhitneyu(x, y, method="asymptotic").pvalue
    assert expected["G0"] == 1.0
    for gene, p in expected.items():
        assert stats.at[gene, "p_value"] == pytest.approx(p, rel=1e-9)
    genes = list(expected)
    fdr = scipy.stats.false_discovery_control([expected[g] for g in genes])
    assert stats.loc[genes, "fdr"].to_numpy() == pytest.approx(fdr, rel=1e-9)


# -- screen mode: exact re-scored values and first-order estimates are never mixed -----------------
@pytest.fixture(scope="module")
def screen(bert, vocab, cells):  # noqa: F811
    return perturb_cells(bert, cells, vocab, PerturbConfig(**SCREEN), states=STATES, progress=False).cells


def test_screen_table_keeps_exact_scores_and_estimates_in_separate_columns(screen):
    exact = screen["exact"].to_numpy()
    assert 0 < exact.sum() < len(screen)
    for column in ("shift", "goal_shift"):
        # the exact column holds exact values only; an estimated row has its value in *_estimate
        assert np.isfinite(screen.loc[exact, column]).all()
        assert screen.loc[~exact, column].isna().all()
        assert np.isfinite(screen[f"{column}_estimate"]).all()


def test_screen_statistics_test_the_estimates_and_name_exact_means(screen, vocab):  # noqa: F811
    stats = perturbation_statistics(screen, vocab)
    assert stats.attrs["score"] == "goal_shift_estimate"
    assert "mean_goal_shift" not in stats.columns and "mean_shift" not in stats.columns  # a mix's mean
    everything = screen["goal_shift_estimate"].to_numpy()
    by_gene = stats.set_index("perturbed")
    for gene, group in screen.groupby("perturbed"):
        expected = scipy.stats.mannwhitneyu(group["goal_shift_estimate"], everything, method="asymptotic").pvalue
        assert by_gene.at[gene, "p_value"] == pytest.approx(expected, rel=1e-9)
        rescored = group.loc[group["exact"], "goal_shift"]
        assert by_gene.at[gene, "n_exact"] == len(rescored)
        if len(rescored):
            assert by_gene.at[gene, "mean_goal_shift_exact"] == pytest.approx(rescored.mean())
        else:
            assert np.isnan(by_gene.at[gene, "mean_goal_shift_exact"])
        assert by_gene.at[gene, "mean_goal_shift_estimate"] == pytest.approx(group["goal_shift_estimate"].mean())


def test_a_screen_table_written_with_mixed_columns_is_read_without_the_mix(screen):
    # cells.parquet of a screen written before kept the estimate in goal_shift where exact is False
    old = screen.copy()
    for column in ("shift", "goal_shift"):
        old[column] = old[column].where(old["exact"], old[f"{column}_estimate"])
    stats = perturbation_statistics(old, score="goal_shift").set_index("perturbed")
    assert stats.index.name == "perturbed" and "mean_goal_shift_exact" in stats.columns
    rescored = old[old["exact"]]
    for gene, group in rescored.groupby("perturbed"):
        expected = scipy.stats.mannwhitneyu(group["goal_shift"], rescored["goal_shift"], method="asymptotic").pvalue
        assert stats.at[gene, "p_value"] == pytest.approx(expected, rel=1e-9, nan_ok=True)
        assert stats.at[gene, "n_scored"] == len(group)
        assert stats.at[gene, "mean_goal_shift_exact"] == pytest.approx(group["goal_shift"].mean())


def test_vs_null_refuses_a_null_of_the_other_mode(screen, bert, vocab, cells):  # noqa: F811
    base = {k: v for k, v in SCREEN.items() if not k.startswith("screen") and k != "mode"}
    exact = perturb_cells(bert, cells, vocab, PerturbConfig(**base), states=STATES, progress=False).cells
    with pytest.raises(ConfigError, match="same mode"):
        perturbation_statistics(screen, mode="vs_null", null=exact)
    with pytest.raises(ConfigError, match="same mode"):
        perturbation_statistics(exact, mode="vs_null", null=screen)


def test_a_screen_shard_with_no_cells_has_the_screen_columns(bert, vocab, cells):  # noqa: F811
    config = PerturbConfig(**SCREEN, shard_index=5, num_shards=6)  # 5 start cells: shard 5 gets none
    empty = perturb_cells(bert, cells, vocab, config, states=STATES, progress=False).cells
    full = perturb_cells(bert, cells, vocab, PerturbConfig(**SCREEN), states=STATES, progress=False).cells
    assert empty.empty and list(empty.columns) == list(full.columns)
    merged = merge_shards([full, empty])
    assert merged["exact"].dtype == bool
    assert perturbation_statistics(merged).attrs["score"] == "goal_shift_estimate"


def test_cli_null_of_the_other_mode_is_refused_before_work(tmp_path, vocab, monkeypatch, capsys):  # noqa: F811
    def refuse(*_args, **_kwargs):
        raise AssertionError("the perturbation ran before the options were checked")

    monkeypatch.setattr(pt, "perturb_file", refuse)
    genes = bundle_and_cells(tmp_path, vocab)
    null = tmp_path / "null"
    null.mkdir()
    pd.DataFrame({"cell": [0], "perturbed": [genes[0]], "gene_token": [6], "gene_rank": [0], "shift": [0.1],
                  "goal_shift": [0.1]}).to_parquet(null / "cells.parquet")  # an exact run's table
    out = tmp_path / "out"
    args = ["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--out", out, "--mode", "screen",
            "--state-column", "kind", "--start", "x", "--goal", "y", "--stats", "vs_null", "--null", null,
            "--device", "cpu", "--no-progress"]
    assert cli_exit_code(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--mode exact" in err and "--mode screen" in err and "Traceback" not in err


# -- bad tables: a clear error, not a KeyError or an infinite mean -----------------------------------
def test_a_table_without_the_key_columns_or_with_infinite_scores_is_refused():
    table = _table({"G0": [0.1, 0.2], "G1": [0.3, 0.4]})
    with pytest.raises(InputDataError, match="gene_token"):
        perturbation_statistics(table.drop(columns="gene_token"))
    table.loc[2, "shift"] = np.inf
    with pytest.raises(InputDataError, match="infinite.*G1"):
        perturbation_statistics(table)


def test_the_results_folder_says_which_score_its_statistics_tested(screen, vocab, tmp_path):  # noqa: F811
    import json

    result = pt.PerturbationResult(screen, None, {"cells_perturbed": int(screen["cell"].nunique())})
    stats = perturbation_statistics(screen, vocab)
    out = pt.write_results(tmp_path / "run", result, stats, PerturbConfig(**SCREEN), vocab, figure=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["statistics"] == {"mode": "vs_all", "score": "goal_shift_estimate"}


# -- a finished run whose table holds one perturbation is written, not lost to vs_all ---------------
def test_a_run_that_scored_one_perturbation_is_written_with_aggregate_statistics(vocab, tmp_path):  # noqa: F811
    import json

    # e.g. --genes A,B where no cell expresses B: known only after the run, which must not be lost
    table = _table({"G0": [0.1, 0.2, 0.3]})
    result = pt.PerturbationResult(table, None, {"cells_perturbed": 3})
    config = PerturbConfig(genes=["A", "B"])
    stats = pt.finish_run(tmp_path / "run", result, config, vocab, stats_mode="vs_all")
    assert stats.attrs["mode"] == "aggregate" and "p_value" not in stats.columns
    assert stats["mean_shift"].tolist() == pytest.approx([0.2])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["statistics"]["requested"] == "vs_all" and "scored one" in summary["statistics"]["note"]
    with pytest.raises(ConfigError, match="has one"):  # asked directly, the test is still refused
        perturbation_statistics(table, mode="vs_all")


# -- Benjamini-Hochberg: what scipy computes, and what it refuses ----------------------------------------
def test_benjamini_hochberg_matches_scipy_and_refuses_values_that_are_not_p_values():
    p = np.array([0.01, 0.01, 0.0, 0.2, 1.0, np.nan, 0.03])
    finite = ~np.isnan(p)
    q = pt.benjamini_hochberg(p)
    assert np.isnan(q[~finite]).all()
    assert q[finite] == pytest.approx(scipy.stats.false_discovery_control(p[finite]), rel=1e-12)
    for bad in (1.5, -0.1, np.inf):
        with pytest.raises(InputDataError, match=r"outside \[0, 1\]"):
            pt.benjamini_hochberg(np.array([0.2, bad]))


# -- perturb-merge never replaces one of its own inputs -------------------------------------------------
def test_merge_refuses_an_input_inside_the_folder_it_replaces(tmp_path, vocab, capsys):  # noqa: F811
    bundle_and_cells(tmp_path, vocab)
    out = tmp_path / "run"
    config = PerturbConfig(shard_index=0, num_shards=1)
    table = _table({"G0": [0.1, 0.2], "G1": [0.3, 0.4]})
    pt.write_shard(out, pt.PerturbationResult(table, None, {"cells_perturbed": 2, "variants": 4}), config)
    args = ["perturb-merge", out, "--model", tmp_path / "bundle"]
    assert cli_exit_code(args) == 0
    null = out / "merged"  # e.g. a null run merged into this folder earlier, or its config.yaml
    before = (null / "cells.parquet").read_bytes()
    assert cli_exit_code([*args, "--stats", "vs_null", "--null", null]) == 2
    err = capsys.readouterr().err
    assert "--null" in err and "replaces" in err and "Traceback" not in err
    assert (null / "cells.parquet").read_bytes() == before
    assert cli_exit_code([*args, "--config", null / "config.yaml"]) == 2
