"""Audit of in silico perturbation against SPEC §5 and Geneformer's InSilicoPerturber(Stats).

Each test computes what it expects independently (plain ``transformers`` forward passes, scipy, a
brute-force list construction) and fails on a fault the audit found: NaN scores ranked as the
largest values by the rank-sum tests; Geneformer's overexpression of listed genes a cell lacks
(inserted first, cell truncated to the model's length, ``<eos>`` kept) missing; option typos that
silently became another setting; statistics a run cannot compute refused only after the run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from _tokenize_helpers import cli_exit_code
from test_perturb import bundle_and_cells, vocab  # noqa: F401  (fixture)
from transformers import BertConfig, BertModel

import mixgeneformer.perturb as pt
from mixgeneformer.errors import ConfigError
from mixgeneformer.perturb import (
    PerturbConfig,
    perturb_cells,
    perturbation_indices,
    perturbation_statistics,
    variants,
)

CLS, EOS, HUMAN = 2, 3, 4
MAX_LEN = 12  # model positions: a cell of 12 tokens overflows when a gene is inserted


@pytest.fixture(scope="module")
def short_bert(vocab) -> BertModel:  # noqa: F811
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LEN, attn_implementation="sdpa")
    return BertModel(config, add_pooling_layer=False).eval()


def _states(bert, tokens) -> np.ndarray:
    """Independent reference: hidden_states[-2] of one unpadded forward pass."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        return bert(ids, output_hidden_states=True).hidden_states[-2][0].double().numpy()


def _cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _geneformer_overexpress(tokens, genes, max_len) -> np.ndarray:
    """Geneformer's overexpress_tokens, written out: remove the genes, put them right after the
    leading special tokens in the listed order, cut to max_len keeping the trailing <eos>."""
    tokens = list(tokens)
    lead = 2 if tokens[:2] == [CLS, HUMAN] else (1 if tokens[:1] == [CLS] else 0)
    tail = [EOS] if tokens[-1] == EOS else []
    body = [t for t in tokens[lead : len(tokens) - len(tail)] if t not in genes]
    out = tokens[:lead] + list(genes) + body
    out = out[: max_len - len(tail)] + tail
    return np.asarray(out, dtype=np.int64)


# -- statistics: a NaN score is left out, not ranked as the largest value ---------------------
def _table_with_nan(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"cell": c, "perturbed": f"G{g}", "gene_token": 10 + g, "gene_rank": 0, "shift": rng.normal(0.01 * g, 0.01)}
            for g in range(4) for c in range(12)]
    table = pd.DataFrame(rows)
    table.loc[[3, 5, 30], "shift"] = np.nan  # e.g. cell_emb of a variant with no unperturbed gene left
    return table


def test_rank_sum_tests_leave_nan_scores_out():
    table = _table_with_nan(0)
    finite = table.dropna(subset=["shift"])
    stats = perturbation_statistics(table).set_index("perturbed")
    for gene, group in finite.groupby("perturbed"):
        expected = scipy.stats.mannwhitneyu(group["shift"], finite["shift"], method="asymptotic").pvalue
        assert stats.loc[gene, "p_value"] == pytest.approx(expected, rel=1e-9)
        assert stats.loc[gene, "mean_shift"] == pytest.approx(group["shift"].mean())
    null = _table_with_nan(1)
    stats = perturbation_statistics(table, mode="vs_null", null=null).set_index("perturbed")
    for gene, group in finite.groupby("perturbed"):
        other = null.loc[(null["perturbed"] == gene), "shift"].dropna()
        expected = scipy.stats.mannwhitneyu(group["shift"], other, method="asymptotic").pvalue
        assert stats.loc[gene, "p_value"] == pytest.approx(expected, rel=1e-9)
        assert stats.loc[gene, "n_null"] == len(other)


def test_any_numeric_score_column_can_be_tested_and_ranks_the_table():
    # A screen's *_estimate columns are one homogeneous measurement for every gene (the exact
    # column mixes exact values for each cell's top genes with estimates for the others).
    table = _table_with_nan(2).dropna()
    table["goal_shift_estimate"] = np.random.default_rng(3).normal(size=len(table)) + 0.2 * table["gene_token"]
    stats = perturbation_statistics(table, score="goal_shift_estimate")
    means = table.groupby("perturbed")["goal_shift_estimate"].mean()
    assert stats.set_index("perturbed")["mean_goal_shift_estimate"].to_dict() == pytest.approx(means.to_dict())
    expected = scipy.stats.mannwhitneyu(table.loc[table["perturbed"] == "G0", "goal_shift_estimate"],
                                        table["goal_shift_estimate"], method="asymptotic").pvalue
    assert stats.set_index("perturbed").at["G0", "p_value"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ConfigError, match="numeric"):
        perturbation_statistics(table, score="perturbed")


# -- overexpression of genes a cell lacks: Geneformer's insertion and truncation ---------------
def test_insert_first_is_geneformers_overexpression_with_truncation():
    specials = np.arange(6)
    rng = np.random.default_rng(0)
    for style in ("v1", "v2", "v2+species"):
        for n_genes in (3, 9, 10, 11):
            genes = rng.choice(np.arange(6, 60), n_genes, replace=False)
            lead = {"v1": [], "v2": [CLS], "v2+species": [CLS, HUMAN]}[style]
            tokens = np.asarray([*lead, *genes, *([EOS] if style != "v1" else [])], dtype=np.int64)
            absent = [t for t in range(60, 66)][:2]
            listed = [int(genes[2]), absent[0], int(genes[0]), absent[1]]
            extra = np.asarray(absent)
            items = [int(np.flatnonzero(tokens == t)[0]) if t in tokens else len(tokens) + absent.index(t) for t in listed]
            src = variants.insert_first(tokens, items, specials, MAX_LEN)
            expected = _geneformer_overexpress(tokens, listed, MAX_LEN)
            assert np.concatenate([tokens, extra])[src].tolist() == expected.tolist(), (style, n_genes)
    # without insertion it is the existing overexpression of genes the cell has
    tokens = np.asarray([CLS, HUMAN, 10, 11, 12, 13, EOS])
    assert variants.insert_first(tokens, [4, 3], specials, None).tolist() == perturbation_indices(tokens, np.array([[4, 3]]), "overexpress", specials)[0].tolist()


def test_overexpressing_absent_genes_inserts_them_like_geneformer(vocab, short_bert):  # noqa: F811
    a, b = 60, 61  # genes no cell below holds before the last one
    cells = [
        np.asarray([CLS, HUMAN, *range(10, 19), EOS]),  # 12 tokens: full, an insertion drops gene 18
        np.asarray([CLS, HUMAN, 20, 21, 22, EOS]),
        np.asarray([CLS, HUMAN, a, 23, 24, 25, EOS]),  # holds a, at the top already
    ]
    names = [vocab.tokens[a], vocab.tokens[b]]
    config = PerturbConfig(perturb="overexpress", genes=names, overexpress_absent="insert", score="cell_emb", batch_size=3)
    result = perturb_cells(short_bert, cells, vocab, config, progress=False)
    table = result.cells
    assert len(table) == 6 and result.summary["variants_inserting_absent_genes"] == 5
    assert result.summary["cells_skipped_gene_absent"] == 0
    for row in table.itertuples():
        tokens = cells[row.cell]
        after = _geneformer_overexpress(tokens, [row.gene_token], MAX_LEN)
        assert row.gene_rank == (0 if row.gene_token in tokens else -1)
        h0, h1 = _states(short_bert, tokens), _states(short_bert, after)
        genes0, genes1 = ~np.isin(tokens, vocab.special_ids), ~np.isin(after, vocab.special_ids)
        assert row.shift == pytest.approx(1 - _cos(h0[genes0].mean(0), h1[genes1].mean(0)), abs=1e-6)
        kept = [j for j, t in enumerate(after) if genes1[j] and t != row.gene_token]
        expected = np.mean([_cos(h0[int(np.flatnonzero(tokens == after[j])[0])], h1[j]) for j in kept])
        assert row.cell_emb == pytest.approx(expected, abs=1e-6)
    top = table[(table["cell"] == 2) & (table["gene_token"] == a)]
    assert top["shift"].tolist() == [0.0]  # already first: a perturbation of nothing, exactly 0
    # The set, together, in the listed order
    together = perturb_cells(short_bert, cells, vocab, PerturbConfig(perturb="overexpress", genes=names, combine=True,
                             overexpress_absent="insert"), progress=False).cells
    for row in together.itertuples():
        tokens = cells[row.cell]
        after = _geneformer_overexpress(tokens, [a, b], MAX_LEN)
        g0, g1 = ~np.isin(tokens, vocab.special_ids), ~np.isin(after, vocab.special_ids)
        expected = 1 - _cos(_states(short_bert, tokens)[g0].mean(0), _states(short_bert, after)[g1].mean(0))
        assert row.shift == pytest.approx(expected, abs=1e-6)
    # Batching does not change the numbers; the default still skips genes a cell lacks (RELIABILITY 19).
    one = perturb_cells(short_bert, cells, vocab, PerturbConfig(**{**config.__dict__, "batch_size": 1}), progress=False).cells
    assert np.abs(one[["shift", "cell_emb"]].to_numpy() - table[["shift", "cell_emb"]].to_numpy()).max() <= 1e-6
    skipped = perturb_cells(short_bert, cells, vocab, PerturbConfig(perturb="overexpress", genes=names), progress=False)
    assert skipped.cells["cell"].tolist() == [2] and skipped.summary["cells_skipped_gene_absent"] == 2


def test_a_cell_gathered_unchanged_is_recognised_in_a_padded_index():
    from mixgeneformer.perturb.engine import _identity_rows

    # Rows of one cell padded to the width of an insertion row: the first is the cell unchanged
    # (scored exactly 0, its embedding the original's), the others are not.
    src = np.array([[0, 1, 2, -1], [0, 2, 1, -1], [0, 1, 3, 2], [0, 1, 2, 3]])
    assert _identity_rows(src, 3).tolist() == [True, False, False, False]
    assert _identity_rows(src[:, :3], 3).tolist() == [True, False, False, True]
    assert _identity_rows(src[:, :2], 3).tolist() == [False] * 4


def test_inserting_absent_genes_is_for_overexpression_without_anchor():
    with pytest.raises(ConfigError, match="overexpress_absent='insert'"):
        PerturbConfig(perturb="delete", genes=["INS"], overexpress_absent="insert")
    with pytest.raises(ConfigError, match="overexpress_absent='insert'"):
        PerturbConfig(perturb="overexpress", anchor="INS", overexpress_absent="insert")
    with pytest.raises(ConfigError, match="overexpress_absent"):
        PerturbConfig(perturb="overexpress", overexpress_absent="yes")


# -- semantics of moves, brute force ----------------------------------------------------------
def test_moves_match_a_brute_force_list_construction():
    specials = np.arange(6)
    rng = np.random.default_rng(1)
    for _ in range(400):
        n = int(rng.integers(2, 12))
        genes = rng.choice(np.arange(6, 100), n, replace=False)
        lead = [[], [CLS], [CLS, HUMAN]][int(rng.integers(3))]
        tokens = np.asarray([*lead, *genes, *([EOS] if lead else [])])
        k = int(rng.integers(1, n))
        picked = rng.choice(n, k, replace=False)
        kind = str(rng.choice(["overexpress", "activate", "inhibit"]))
        target = int(rng.integers(-n - 2, n + 2))
        src = perturbation_indices(tokens, (picked + len(lead))[None], kind, specials, None if kind == "overexpress" else target)[0]
        rank = 0 if kind == "overexpress" else (target if target >= 0 else n - k + 1 + target)
        rank = min(max(rank, 0), n - k)
        chosen = [int(genes[i]) for i in picked]
        moving = [g for g, i in zip(chosen, picked, strict=True)
                  if kind == "overexpress" or (i > rank if kind == "activate" else i < rank)]
        others = [int(g) for g in genes if g not in moving]
        body = others[:rank] + moving + others[rank:]
        assert tokens[src].tolist() == [*lead, *body, *([EOS] if lead else [])], (kind, target, tokens, picked)


# -- options: typos are errors, not another setting --------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("screen_method", "shfit"), ("species", "rat"), ("pooling", "max"),
                                              ("precision", "fp16")])
def test_option_typos_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        PerturbConfig(**{field: value})


# -- statistics a run cannot compute are refused before the run --------------------------------

@pytest.fixture
def no_run(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the perturbation ran before the options were checked")

    monkeypatch.setattr(pt, "perturb_file", refuse)


def test_cli_one_gene_with_vs_all_is_refused_before_work(tmp_path, vocab, no_run, capsys):  # noqa: F811
    genes = bundle_and_cells(tmp_path, vocab)
    out = tmp_path / "out"
    args = ["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--out", out, "--genes", genes[0],
            "--device", "cpu", "--no-progress"]
    assert cli_exit_code(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "one gene" in err and "--stats aggregate" in err and "Traceback" not in err


def test_cli_null_run_without_the_tested_score_is_refused_before_work(tmp_path, vocab, no_run, capsys):  # noqa: F811
    genes = bundle_and_cells(tmp_path, vocab)
    null = tmp_path / "null"
    null.mkdir()
    pd.DataFrame({"cell": [0], "perturbed": [genes[0]], "gene_token": [6], "gene_rank": [0], "shift": [0.1]}).to_parquet(
        null / "cells.parquet")
    out = tmp_path / "out"
    args = ["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--out", out, "--genes", ",".join(genes[:3]),
            "--state-column", "kind", "--start", "x", "--goal", "y", "--stats", "vs_null", "--null", null,
            "--device", "cpu", "--no-progress"]
    assert cli_exit_code(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "goal_shift" in err and "--null" in err


def test_cli_gene_outside_the_vocabulary_names_it(tmp_path, vocab, capsys):  # noqa: F811
    bundle_and_cells(tmp_path, vocab)
    out = tmp_path / "out"
    assert cli_exit_code(["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--out", out, "--genes", "GCG",
                 "--stats", "aggregate", "--device", "cpu", "--no-progress"]) == 2
    assert "'GCG'" in capsys.readouterr().err and not out.exists()


def test_perturb_anndata_refuses_statistics_it_cannot_compute_before_loading():
    import anndata as ad

    adata = ad.AnnData(np.ones((2, 2), dtype=np.int32))
    with pytest.raises(ConfigError, match="vs_null"):
        pt.perturb_anndata(adata, "/nonexistent/model", PerturbConfig(), stats_mode="vs_null")
    with pytest.raises(ConfigError, match="single perturbation"):
        pt.perturb_anndata(adata, "/nonexistent/model", PerturbConfig(genes=["INS"]), stats_mode="vs_all")


@pytest.mark.parametrize("field", ["genes", "alternatives"])
def test_a_bare_string_for_a_list_option_is_refused(field):
    extra = {"state_column": "s"} if field == "alternatives" else {}
    with pytest.raises(ConfigError, match=f"{field} must be a list"):
        PerturbConfig(**{field: "INS"}, **extra)  # read letter by letter it was genes 'I', 'N', 'S'


def test_vs_null_ranks_by_the_shift_beyond_the_null():
    """A gene that moves cells as far in the null run is not ranked above one that moves them only
    in the test run, although its raw mean is larger."""
    rng = np.random.default_rng(5)

    def rows(gene, token, centre, n=30):
        return pd.DataFrame({"cell": np.arange(n), "perturbed": gene, "gene_token": token, "gene_rank": 0,
                             "shift": rng.normal(centre, 0.001, n)})

    test = pd.concat([rows("both", 1, 1.0), rows("test_only", 2, 0.5)], ignore_index=True)
    null = pd.concat([rows("both", 1, 0.95), rows("test_only", 2, 0.0)], ignore_index=True)
    stats = perturbation_statistics(test, mode="vs_null", null=null)
    assert stats["significant"].all()
    assert stats["perturbed"].tolist() == ["test_only", "both"]
    assert stats.set_index("perturbed")["mean_shift_vs_null"].to_dict() == pytest.approx({"test_only": 0.5, "both": 0.05}, abs=0.01)


def test_states_spelled_with_the_same_letters_sample_different_cells():
    """Each state's cell sample is seeded per state name; the seed was the sum of the name's bytes,
    so anagram states ('ab' / 'ba') drew the same relative rows."""
    from mixgeneformer.perturb.cells import _select_cells

    labels = np.array(["ab"] * 40 + ["ba"] * 40, dtype=object)
    config = PerturbConfig(genes=["ENSG00000254647"], state_column="s", goal="ab", alternatives=["ba"], cells_per_state=5)
    _, rows = _select_cells(labels, config, labels.size)
    assert len(rows["ab"]) == len(rows["ba"]) == 5
    assert not np.array_equal(rows["ab"], rows["ba"] - 40)
    again = _select_cells(labels, config, labels.size)[1]
    assert all(np.array_equal(rows[s], again[s]) for s in rows)  # still deterministic
