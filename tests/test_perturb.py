"""In silico perturbation: variant construction, scores, batching, statistics, RELIABILITY 19."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from transformers import BertConfig, BertModel

from mixgeneformer.errors import ConfigError, GeneIdError, InputDataError
from mixgeneformer.genes import gene_table
from mixgeneformer.perturb import (
    PerturbConfig,
    benjamini_hochberg,
    merge_shards,
    perturb_cells,
    perturbation_indices,
    perturbation_statistics,
    resolve_genes,
    write_results,
)
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]
CLS, EOS, HUMAN = 2, 3, 4


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    table = gene_table("human")
    ids = table.query("biotype == 'protein_coding'")["ensembl_id"].tolist()[:59]
    ids.append(table.loc[table["symbol"] == "INS", "ensembl_id"].iloc[0])
    return Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)})


@pytest.fixture(scope="module")
def bert(vocab) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def cells() -> list[np.ndarray]:
    """V2-style cells (<cls> <human> genes… <eos>) of varied lengths."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(10):
        genes = rng.choice(np.arange(6, 66), rng.integers(6, 25), replace=False)
        out.append(np.concatenate([[CLS, HUMAN], genes, [EOS]]).astype(np.int64))
    return out


STATES = ["a"] * 5 + ["b"] * 5


def _embedding(bert, vocab, tokens, layer=-2) -> np.ndarray:
    """Independent reference: full forward with output_hidden_states, mean over gene tokens."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        hidden = bert(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[layer][0]
    genes = ~np.isin(tokens, vocab.special_ids)
    return hidden[torch.as_tensor(genes)].double().mean(0).numpy()


def _cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- variants --------------------------------------------------------------------------------
def test_delete_every_gene_singly(vocab, cells):
    tokens = cells[0]
    genes = np.flatnonzero(~np.isin(tokens, vocab.special_ids))
    src = perturbation_indices(tokens, genes[:, None], "delete", vocab.special_ids)
    assert src.shape == (len(genes), len(tokens) - 1)
    for row, pos in zip(src, genes, strict=True):
        assert tokens[row].tolist() == np.delete(tokens, pos).tolist()


def test_overexpress_puts_gene_first_after_special_tokens(vocab, cells):
    tokens = cells[1]
    pos = 7
    (row,) = perturbation_indices(tokens, np.array([[pos]]), "overexpress", vocab.special_ids)
    out = tokens[row]
    assert out[:3].tolist() == [CLS, HUMAN, tokens[pos]]
    assert out[3:].tolist() == np.delete(tokens, pos)[2:].tolist()  # others keep their order


def test_activate_and_inhibit_move_to_rank_only_in_their_direction(vocab, cells):
    tokens = cells[2]
    special = vocab.special_ids
    genes = tokens[2:-1]
    # inhibit gene of rank 1 to the last rank: it ends just before <eos>
    (row,) = perturbation_indices(tokens, np.array([[3]]), "inhibit", special, target_rank=-1)
    assert tokens[row][-2] == genes[1] and tokens[row][-1] == EOS
    # activate the gene of rank 5 to rank 2
    (row,) = perturbation_indices(tokens, np.array([[7]]), "activate", special, target_rank=2)
    assert tokens[row][2:-1].tolist().index(genes[5]) == 2
    # activation never lowers a gene: rank 1 activated "to" rank 4 stays -> identity
    (row,) = perturbation_indices(tokens, np.array([[3]]), "activate", special, target_rank=4)
    assert row.tolist() == list(range(len(tokens)))


def test_set_overexpression_keeps_the_given_order(vocab, cells):
    tokens = cells[3]
    (row,) = perturbation_indices(tokens, np.array([[9, 5]]), "overexpress", vocab.special_ids)
    assert tokens[row][2:4].tolist() == [tokens[9], tokens[5]]
    assert sorted(tokens[row].tolist()) == sorted(tokens.tolist())


def test_deleting_every_gene_is_an_error(vocab, bert):
    tokens = np.array([CLS, HUMAN, 10, 11, EOS])
    with pytest.raises(InputDataError, match="no gene"):
        perturbation_indices(tokens, np.array([[2, 3]]), "delete", vocab.special_ids)
    config = PerturbConfig(genes=[vocab.tokens[10], vocab.tokens[11]], combine=True)
    with pytest.raises(InputDataError, match="no gene"):
        perturb_cells(bert, [tokens], vocab, config, progress=False)


# -- genes -----------------------------------------------------------------------------------
def test_gene_outside_vocabulary_is_an_error(vocab, bert, cells):
    with pytest.raises(GeneIdError, match="not in the model's vocabulary"):
        resolve_genes(["GCG"], vocab)  # a real gene the tiny vocabulary lacks
    with pytest.raises(GeneIdError, match="neither an Ensembl ID nor"):
        resolve_genes(["NOT_A_GENE_XYZ"], vocab)
    with pytest.raises(GeneIdError):
        perturb_cells(bert, cells, vocab, PerturbConfig(genes=["ENSG00000999999"]), progress=False)


def test_symbols_and_versioned_ids_resolve(vocab):
    ins = vocab.gene_to_id[vocab.tokens[-1]]
    assert resolve_genes(["INS", vocab.tokens[6].lower()], vocab).tolist() == [ins, 6]
    assert resolve_genes([vocab.tokens[-1] + ".7"], vocab).tolist() == [ins]


def test_gene_absent_from_a_cell_is_skipped_not_scored(vocab, bert, cells):
    target = int(cells[0][5])
    holders = [i for i, c in enumerate(cells) if target in c]
    assert 0 < len(holders) < len(cells)
    result = perturb_cells(bert, cells, vocab, PerturbConfig(genes=[vocab.tokens[target]]), progress=False)
    assert sorted(result.cells["cell"].tolist()) == holders
    assert result.summary["cells_skipped_gene_absent"] == len(cells) - len(holders)


# -- scores ----------------------------------------------------------------------------------
def test_scores_match_an_independent_forward(vocab, bert, cells):
    config = PerturbConfig(state_column="s", start="a", goal="b", batch_size=5)
    result = perturb_cells(bert, cells, vocab, config, states=STATES, progress=False)
    goal = np.mean([_embedding(bert, vocab, c) for c in cells[5:]], axis=0)
    table = result.cells
    assert set(table["cell"]) == set(range(5)) and (table["state"] == "a").all()
    for _, row in table.sample(8, random_state=0).iterrows():
        tokens = cells[row["cell"]]
        original = _embedding(bert, vocab, tokens)
        perturbed = _embedding(bert, vocab, tokens[tokens != row["gene_token"]])
        assert row["shift"] == pytest.approx(1 - _cos(original, perturbed), abs=1e-6)
        assert row["goal_shift"] == pytest.approx(_cos(perturbed, goal) - _cos(original, goal), abs=1e-6)
        assert row["n_genes"] == len(tokens) - 3


def test_batched_equals_one_variant_per_forward(vocab, bert, cells):
    base = dict(state_column="s", goal="b", alternatives=["a"], cells_per_state=2)
    batched = perturb_cells(bert, cells, vocab, PerturbConfig(batch_size=13, **base), states=STATES, progress=False)
    single = perturb_cells(bert, cells, vocab, PerturbConfig(batch_size=1, **base), states=STATES, progress=False)
    assert batched.cells["cell"].nunique() == 4
    cols = ["shift", "goal_shift", "alt_shift:a"]
    assert batched.cells[["cell", "perturbed"]].equals(single.cells[["cell", "perturbed"]])
    assert np.abs(batched.cells[cols].to_numpy() - single.cells[cols].to_numpy()).max() <= 1e-5


def test_results_are_deterministic_and_shards_merge_to_the_full_run(vocab, bert, cells):
    cells = cells[:6]
    config = PerturbConfig(perturb="overexpress", batch_size=8)
    first = perturb_cells(bert, cells, vocab, config, progress=False).cells
    again = perturb_cells(bert, cells, vocab, config, progress=False).cells
    pd.testing.assert_frame_equal(first, again)
    shards = [
        perturb_cells(bert, cells, vocab, PerturbConfig(perturb="overexpress", batch_size=8, shard_index=i, num_shards=3), progress=False).cells
        for i in range(3)
    ]
    merged = merge_shards(shards)
    assert merged[["cell", "perturbed"]].equals(first[["cell", "perturbed"]])
    assert np.abs(merged["shift"].to_numpy() - first["shift"].to_numpy()).max() <= 1e-5
    with pytest.raises(InputDataError, match="overlap"):
        merge_shards([shards[0], shards[0]])


def test_a_perturbation_of_nothing_has_zero_shift(vocab, bert, cells):
    result = perturb_cells(bert, cells, vocab, PerturbConfig(perturb="overexpress"), progress=False).cells
    top = result[result["gene_rank"] == 0]  # overexpressing the top gene changes nothing
    assert len(top) == len(cells) and (top["shift"] == 0.0).all()
    assert (result.loc[result["gene_rank"] > 0, "shift"] > 0).all()


def test_anchor_combinations(vocab, bert, cells):
    anchor = int(cells[0][4])
    result = perturb_cells(bert, cells, vocab, PerturbConfig(anchor=vocab.tokens[anchor]), progress=False).cells
    holders = {i for i, c in enumerate(cells) if anchor in c}
    assert set(result["cell"]) == holders
    alone = result[result["perturbed"] == vocab.tokens[anchor]]
    assert len(alone) == len(holders) and (alone["anchor_shift"].abs() < 1e-12).all()
    pair = result[result["perturbed"] != vocab.tokens[anchor]].iloc[0]
    tokens = cells[pair["cell"]]
    kept = tokens[(tokens != anchor) & (tokens != pair["gene_token"])]
    expected = 1 - _cos(_embedding(bert, vocab, tokens), _embedding(bert, vocab, kept))
    assert pair["shift"] == pytest.approx(expected, abs=1e-6)


def test_gene_shifts_cover_the_remaining_genes(vocab, bert, cells):
    gene = int(cells[0][3])
    result = perturb_cells(bert, cells, vocab, PerturbConfig(genes=[vocab.tokens[gene]], gene_shifts=True), progress=False)
    table = result.gene_shifts
    assert gene not in set(table["affected_token"])
    assert (table["mean_gene_shift"] >= -1e-9).all() and (table["n_cells"] >= 1).all()
    assert set(table["affected_token"]) <= set(np.concatenate(cells).tolist()) - set(vocab.special_ids.tolist())


def test_screen_mode_rescores_top_genes_exactly(vocab, bert, cells):
    base = dict(state_column="s", start="a", goal="b")
    exact = perturb_cells(bert, cells, vocab, PerturbConfig(**base), states=STATES, progress=False).cells
    screen = perturb_cells(bert, cells, vocab, PerturbConfig(mode="screen", screen_top_k=3, **base), states=STATES, progress=False).cells
    assert screen[["cell", "gene_token"]].equals(exact[["cell", "gene_token"]])  # every gene estimated
    assert (screen.groupby("cell")["exact"].sum() == 3).all()
    rescored = screen["exact"].to_numpy()
    assert np.abs(screen.loc[rescored, "goal_shift"].to_numpy() - exact.loc[rescored, "goal_shift"].to_numpy()).max() <= 1e-5
    assert np.isfinite(screen["shift_estimate"]).all() and np.isfinite(screen["goal_shift_estimate"]).all()
    # The first-order shift estimate carries real signal even on this tiny random model.
    rho = scipy.stats.spearmanr(screen["shift_estimate"], exact["shift"])[0]
    assert rho > 0.3


# -- statistics ------------------------------------------------------------------------------
def _toy_table(rng, genes=6, cells=40) -> pd.DataFrame:
    rows = []
    for g in range(genes):
        n = rng.integers(5, cells)
        values = rng.normal(0.01 * g, 0.02, n).round(3)  # rounding makes ties
        rows.append(pd.DataFrame({"cell": np.arange(n), "perturbed": f"G{g}", "gene_token": g, "gene_rank": 0, "shift": values}))
    return pd.concat(rows, ignore_index=True)


def test_rank_sum_vs_all_matches_scipy():
    table = _toy_table(np.random.default_rng(1))
    stats = perturbation_statistics(table).set_index("perturbed")
    everything = table["shift"].to_numpy()
    for gene, group in table.groupby("perturbed"):
        expected = scipy.stats.mannwhitneyu(group["shift"], everything, method="asymptotic").pvalue
        assert stats.loc[gene, "p_value"] == pytest.approx(expected, rel=1e-9)
        assert stats.loc[gene, "n_cells"] == len(group)
        assert stats.loc[gene, "mean_shift"] == pytest.approx(group["shift"].mean())
    assert np.allclose(stats["fdr"], scipy.stats.false_discovery_control(stats["p_value"]))


def test_rank_sum_vs_null_matches_scipy():
    rng = np.random.default_rng(2)
    test, null = _toy_table(rng), _toy_table(rng)
    null["shift"] = null["shift"] * 0.5
    stats = perturbation_statistics(test, mode="vs_null", null=null).set_index("perturbed")
    for gene, group in test.groupby("perturbed"):
        other = null.loc[null["perturbed"] == gene, "shift"]
        expected = scipy.stats.mannwhitneyu(group["shift"], other, method="asymptotic").pvalue
        assert stats.loc[gene, "p_value"] == pytest.approx(expected, rel=1e-9)


def test_aggregate_mode_and_benjamini_hochberg():
    table = _toy_table(np.random.default_rng(3))
    stats = perturbation_statistics(table, mode="aggregate")
    assert "p_value" not in stats and stats["mean_shift"].is_monotonic_decreasing
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.5])
    q = benjamini_hochberg(p)
    assert np.isnan(q[1])
    assert np.allclose(q[~np.isnan(p)], scipy.stats.false_discovery_control(p[~np.isnan(p)]))


def test_results_folder(tmp_path, vocab, bert, cells):
    config = PerturbConfig(state_column="s", start="a", goal="b")
    result = perturb_cells(bert, cells, vocab, config, states=STATES, progress=False)
    stats = perturbation_statistics(result.cells, vocab)
    assert stats.columns[:6].tolist() == ["perturbed", "gene_token", "ensembl_id", "symbol", "n_cells", "mean_shift"]
    assert {"mean_goal_shift", "p_value", "fdr"} <= set(stats.columns)
    assert (stats["ensembl_id"] == stats["perturbed"]).all()
    out = write_results(tmp_path / "run", result, stats, config, vocab)
    for name in ("cells.parquet", "genes.parquet", "genes.csv", "ranking.png", "config.yaml", "summary.json"):
        assert (out / name).stat().st_size > 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cells.parquet"), result.cells)


def bundle_and_cells(folder, vocab, seed: int = 0) -> list[str]:
    """A tiny model bundle (folder/bundle) and 12 cells of two states 'x' / 'y' (folder/in.h5ad); returns the genes."""
    import anndata as ad
    import scipy.sparse as sp

    from mixgeneformer.bundle import save_bundle
    from mixgeneformer.medians import GeneMedians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config

    genes = list(vocab.gene_to_id)
    torch.manual_seed(seed)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=64))
    save_bundle(model, folder / "bundle", vocab, GeneMedians({g: 1.0 for g in genes}))
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(0.3, (12, len(genes))) * rng.integers(1, 5, (12, len(genes))))
    adata = ad.AnnData(counts.astype(np.int32), obs=pd.DataFrame({"kind": ["x", "y"] * 6}, index=[f"c{i}" for i in range(12)]))
    adata.var_names = genes
    adata.write_h5ad(folder / "in.h5ad")
    return genes


def test_cli_perturb_h5ad_end_to_end(tmp_path, vocab):
    from mixgeneformer.cli import main

    genes = bundle_and_cells(tmp_path, vocab)
    out = tmp_path / "out"
    main([
        "perturb", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "bundle"), "--out", str(out),
        "--genes", "INS," + genes[0], "--state-column", "kind", "--start", "x", "--goal", "y",
        "--device", "cpu", "--no-progress",
    ])
    cells = pd.read_parquet(out / "cells.parquet")
    assert set(cells["state"]) == {"x"} and set(cells["obs_name"]) <= {f"c{i}" for i in range(0, 12, 2)}
    stats = pd.read_csv(out / "genes.csv")
    assert set(stats["perturbed"]) <= {genes[0], vocab.tokens[-1]} and "fdr" in stats
    assert (out / "ranking.png").exists() and (out / "config.yaml").exists()
    with pytest.raises(SystemExit) as exit_info:  # a gene outside the vocabulary: exit 2, clear message
        main(["perturb", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "bundle"), "--out", str(tmp_path / "o2"), "--genes", "GCG"])
    assert exit_info.value.code == 2


# -- found by a scientist's audit of the results ----------------------------------------------
def test_combined_overexpression_puts_the_set_first_in_the_listed_order(vocab, bert, cells):
    tokens = np.arange(10, 20)
    specials = np.arange(6)
    assert tokens[perturbation_indices(tokens, np.array([[1, 0, 5]]), "overexpress", specials)[0]].tolist()[:4] == [11, 10, 15, 12]
    in_place = perturbation_indices(tokens, np.array([[0, 1]]), "overexpress", specials)[0]
    assert in_place.tolist() == list(range(10))  # a set already first, in that order, is unchanged
    cell = cells[0]  # <cls> <human> g0 g1 ...: overexpressing (g0, g1) together changes nothing
    config = PerturbConfig(genes=[vocab.tokens[cell[2]], vocab.tokens[cell[3]]], combine=True, perturb="overexpress")
    result = perturb_cells(bert, [cell], vocab, config, progress=False).cells
    assert len(result) == 1 and abs(result["shift"].iloc[0]) < 1e-6


def test_options_a_mode_would_ignore_are_refused():
    with pytest.raises(ConfigError, match="screens every gene"):
        PerturbConfig(mode="screen", genes=["INS"])
    with pytest.raises(ConfigError, match="target_rank"):
        PerturbConfig(perturb="delete", target_rank=3)


def test_statistics_rank_significant_genes_toward_the_goal_first():
    rng = np.random.default_rng(0)
    rows = []
    for gene, (centre, n) in {"toward": (0.02, 40), "away": (-0.05, 60), "big_but_rare": (0.2, 1), "null": (0.0, 200)}.items():
        rows += [{"cell": i, "perturbed": gene, "gene_token": 10, "goal_shift": centre + 0.001 * rng.standard_normal()} for i in range(n)]
    table = pd.DataFrame(rows)
    table["gene_token"] = pd.factorize(table["perturbed"])[0] + 10
    stats = perturbation_statistics(table)
    assert stats.set_index("perturbed").loc[["toward", "away"], "significant"].all()
    assert stats.set_index("perturbed").at["away", "fdr"] < stats.set_index("perturbed").at["toward", "fdr"]
    order = stats["perturbed"].tolist()
    assert order.index("toward") < order.index("away")  # away from the goal ranks below toward it
    assert not stats.set_index("perturbed").at["big_but_rare", "significant"] and order[-1] in ("big_but_rare", "null")
    with pytest.raises(ConfigError, match="aggregate"):
        perturbation_statistics(table[table["perturbed"] == "toward"])


def test_anchor_pairs_are_named_anchor_plus_partner(vocab, bert, cells):
    anchor = int(cells[0][4])
    result = perturb_cells(bert, cells, vocab, PerturbConfig(anchor=vocab.tokens[anchor]), progress=False)
    stats = perturbation_statistics(result.cells, vocab).set_index("perturbed")
    alone = stats.loc[vocab.tokens[anchor]]
    assert alone["ensembl_id"] == vocab.tokens[anchor]
    pairs = stats.drop(index=vocab.tokens[anchor])
    assert len(pairs) and (pairs["ensembl_id"] == vocab.tokens[anchor] + "+" + pairs.index.str.split("+").str[1]).all()


def test_genes_no_cell_expresses_and_symbols_of_the_other_species_say_why(vocab, bert, cells):
    gene = int(cells[0][5])
    without = [c[c != gene] for c in cells]
    with pytest.raises(InputDataError, match="none of the 10 selected cells expresses"):
        perturb_cells(bert, without, vocab, PerturbConfig(genes=[vocab.tokens[gene]]), progress=False)
    with pytest.raises(GeneIdError, match="species='mouse'"):
        resolve_genes(["Ins2"], vocab, "human")
