"""Rank-value tokenization: Geneformer parity, format invariance, invariants (hypothesis), resume, atomicity."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _tokenize_helpers import human_ids, make_adata, make_medians, make_vocab
from hypothesis import given, settings
from hypothesis import strategies as st
from test_readers import all_formats

from mixgeneformer.errors import ArtifactError, ConfigError, GeneIdError, InputDataError
from mixgeneformer.fileio import write_json
from mixgeneformer.tokenize import (
    TokenizeConfig,
    add_special_tokens,
    rank_value_encode,
    run_manifest,
    tokenize_anndata,
    tokenize_files,
)
from mixgeneformer.vocab import Vocabulary


def reference_cell(values: np.ndarray, tokens: np.ndarray, max_len: int) -> list[int]:
    """Straightforward per-cell V1 algorithm: nonzero, sort descending (ties by token), truncate."""
    nz = np.flatnonzero(values > 0)
    order = np.lexsort((tokens[nz], -values[nz]))
    return tokens[nz][order][:max_len].tolist()


def split(flat, lengths):
    return [x.tolist() for x in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) else []


@pytest.mark.realdata
def test_geneformer_v1_parity_on_baron(shared_data):
    import anndata as ad

    from mixgeneformer.genes import map_gene_ids
    from mixgeneformer.vocab import import_geneformer

    vocab, medians = import_geneformer(shared_data / "geneformer_v1/token_dictionary.pkl", shared_data / "geneformer_v1/gene_median_dictionary.pkl")
    adata = ad.read_h5ad(shared_data / "baron_pancreas_human.h5ad")
    corpus = tokenize_anndata(adata, vocab, medians, TokenizeConfig(chunk_size=1000))
    assert len(corpus) == adata.n_obs
    ensembl = map_gene_ids(np.asarray(adata.var_names), species="human").ensembl_ids
    tokens, meds = vocab.encode_genes(ensembl).astype(np.int64), medians.lookup(ensembl)
    ok = (tokens >= 0) & np.isfinite(meds)
    dense = adata.X.toarray().astype(np.float64)
    n_counts = dense.sum(axis=1)  # over ALL genes
    mismatched = 0
    for i in range(0, adata.n_obs, 7):  # every 7th cell keeps the test fast
        values = np.zeros(len(tokens))
        values[ok] = dense[i, ok] / n_counts[i] * 10_000 / meds[ok]
        argsorted = np.flatnonzero(values)[np.argsort(-values[np.flatnonzero(values)], kind="stable")][:2048]
        expected = tokens[argsorted]
        got = np.array(corpus[i]["input_ids"])
        if not np.array_equal(got, expected):
            # Allowed only among exactly tied values: same multiset per value.
            lookup = dict(zip(tokens[ok].tolist(), values[ok].tolist(), strict=True))
            assert np.array_equal(np.array([lookup[t] for t in got]), values[argsorted])
            mismatched += 1
    assert corpus[0]["length"] == len(corpus[0]["input_ids"]) <= 2048
    assert mismatched < adata.n_obs // 7  # ties are the exception


@pytest.mark.realdata
def test_defining_formula_on_real_data(baron_data):
    """The first token is the gene with the largest count/n_counts/median; values are non-increasing."""
    import anndata as ad

    adata = ad.read_h5ad(baron_data / "baron_pancreas_mouse.h5ad")[:200].copy()
    from mixgeneformer.medians import compute_medians

    medians = compute_medians(adata)
    from mixgeneformer.vocab import build_vocabulary

    vocab = build_vocabulary("separate", "protein_coding", medians, ("human", "mouse"))
    corpus = tokenize_anndata(adata, vocab, medians, TokenizeConfig(style="v2", add_species_token=True, max_len=300))
    genes = np.array(vocab.tokens, dtype=object)
    counts = sp.csr_matrix(adata.X)
    from mixgeneformer.genes import map_gene_ids

    ensembl = map_gene_ids(np.asarray(adata.var_names), species="mouse").ensembl_ids
    column_of = {g: j for j, g in enumerate(ensembl) if g}
    for row in corpus.select(range(20)):
        ids = row["input_ids"]
        assert ids[0] == vocab.cls_id and ids[1] == vocab.species_token_id("mouse") and ids[-1] == vocab.eos_id
        assert len(ids) <= 300
        cell = counts[row["cell_index"]].toarray().ravel()
        values = [cell[column_of[genes[t]]] / cell.sum() * 1e4 / medians.values[genes[t]] for t in ids[2:-1]]
        assert all(v > 0 for v in values) and all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_every_input_format_gives_identical_tokens(tmp_path):
    adata = make_adata(23, 60)
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    config = TokenizeConfig(chunk_size=5, min_coverage=0.0)
    expected = tokenize_anndata(adata, vocab, medians, config)["input_ids"]
    for name, item in all_formats(adata, tmp_path).items():
        if hasattr(item, "obs"):
            got = tokenize_anndata(item, vocab, medians, config)["input_ids"]
        else:
            out = tokenize_files([item], tmp_path / f"corpus_{name}", vocab, medians, config)
            got = datasets.load_from_disk(str(out))["input_ids"]
        assert got == expected, name


def test_chunk_size_does_not_change_result_and_input_untouched():
    adata = make_adata(50, 60, seed=3)
    before = adata.X.copy()
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    small = tokenize_anndata(adata, vocab, medians, TokenizeConfig(chunk_size=7), obs_columns=["cell_type"])
    large = tokenize_anndata(adata, vocab, medians, TokenizeConfig(chunk_size=10000), obs_columns=["cell_type"])
    assert small["input_ids"] == large["input_ids"] and small["cell_type"] == large["cell_type"]
    assert (adata.X != before).nnz == 0


@st.composite
def count_matrices(draw):
    n_cells = draw(st.integers(1, 12))
    n_genes = draw(st.integers(1, 25))
    dense = np.array(draw(st.lists(st.integers(0, 5), min_size=n_cells * n_genes, max_size=n_cells * n_genes))).reshape(n_cells, n_genes)
    medians = np.array(draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=n_genes, max_size=n_genes)))
    return dense, medians


@settings(max_examples=60, deadline=None)
@given(data=count_matrices(), max_len=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_rank_value_invariants(data, max_len, seed):
    dense, medians = data
    tokens = np.arange(10, 10 + dense.shape[1])
    totals = dense.sum(axis=1).astype(float)
    flat, lengths = rank_value_encode(sp.csr_matrix(dense), tokens, medians, totals, max_len)
    cells = split(flat, lengths)
    assert len(cells) == dense.shape[0]  # cell order kept, one entry per cell
    for i, cell in enumerate(cells):
        values = np.where(totals[i] > 0, dense[i] / max(totals[i], 1) * 1e4 / medians, 0.0)
        assert cell == reference_cell(values, tokens, max_len)  # order by value, ties by token, zeros out, truncation
    # Independence from gene column order (shuffled columns carry their IDs and medians along).
    perm = np.random.default_rng(seed).permutation(dense.shape[1])
    flat2, lengths2 = rank_value_encode(sp.csr_matrix(dense[:, perm]), tokens[perm], medians[perm], totals, max_len)
    assert np.array_equal(flat, flat2) and np.array_equal(lengths, lengths2)
    # Special tokens wrap every sequence.
    wrapped, wrapped_lengths = add_special_tokens(flat, lengths, [2, 4], [3])
    for cell, new in zip(cells, split(wrapped, wrapped_lengths), strict=True):
        assert new == [2, 4, *cell, 3]


def test_columns_of_one_token_are_each_normalised_by_their_own_median():
    # Columns 0 and 1 share token 10 (a human gene and its mouse ortholog), with medians 1 and 8:
    # the token's value is 8/1 + 8/8 = 9 (not (8 + 8) / one median: 16 or 2); token 11's is 5.
    counts = sp.csr_matrix(np.array([[8, 8, 5]]))
    medians = np.array([1.0, 8.0, 1.0])
    for order in ([0, 1, 2], [1, 0, 2]):  # the column order does not matter
        flat, _ = rank_value_encode(counts[:, order], np.array([10, 10, 11])[order], medians[order], np.array([21.0]), 5)
        assert flat.tolist() == [10, 11]
    flat, _ = rank_value_encode(sp.csr_matrix(np.array([[8, 0, 5]])), np.array([10, 10, 11]), medians, np.array([13.0]), 5)
    assert flat.tolist() == [10, 11]
    flat, _ = rank_value_encode(sp.csr_matrix(np.array([[0, 8, 5]])), np.array([10, 10, 11]), medians, np.array([13.0]), 5)
    assert flat.tolist() == [11, 10]  # 8/8 = 1 < 5


def test_duplicate_gene_ids_summed_or_refused():
    import anndata as ad

    adata = make_adata(10, 30)
    names = np.asarray(adata.var_names).copy()
    names[1] = names[0]
    dup = ad.AnnData(adata.X, adata.obs, ad.AnnData(var=None).var if False else adata.var.set_axis(names))
    vocab, medians = make_vocab(np.asarray(adata.var_names), drop_every=1000), make_medians(np.asarray(adata.var_names))
    summed = tokenize_anndata(dup, vocab, medians, TokenizeConfig())
    merged = adata.X.toarray().astype(float)
    merged[:, 0] += merged[:, 1]
    merged[:, 1] = 0
    expected = tokenize_anndata(ad.AnnData(sp.csr_matrix(merged), adata.obs, adata.var), vocab, medians, TokenizeConfig())
    assert summed["input_ids"] == expected["input_ids"]
    with pytest.raises(GeneIdError, match="several columns"):
        tokenize_anndata(dup, vocab, medians, TokenizeConfig(duplicate_genes="error"))


def test_empty_cells_dropped_and_all_empty_is_an_error():
    import anndata as ad

    adata = make_adata(12, 30)
    x = adata.X.toarray()
    x[3] = 0  # zero counts
    x[5] = 0
    x[5, 6] = 4  # only an out-of-vocabulary gene (every 7th is dropped from the vocabulary)
    data = ad.AnnData(sp.csr_matrix(x), adata.obs, adata.var)
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    corpus = tokenize_anndata(data, vocab, medians)
    assert corpus["cell_index"] == [i for i in range(12) if i not in (3, 5)]
    assert min(corpus["length"]) > 0
    assert "1 with zero counts, 1 without a vocabulary gene" in corpus.info.description
    data.X = sp.csr_matrix(np.zeros_like(x))
    with pytest.raises(InputDataError, match="no cell could be tokenized"):
        tokenize_anndata(data, vocab, medians)


def test_filter_pass_and_config_errors():
    adata = make_adata(9, 30)
    adata.obs["filter_pass"] = [1, 0, 1, 1, 1, 1, 1, 1, 0]
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    assert tokenize_anndata(adata, vocab, medians)["cell_index"] == [0, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ConfigError, match="4096"):
        TokenizeConfig(style="v2", max_len=5000)
    with pytest.raises(ConfigError, match="unknown option"):
        from mixgeneformer.tokenize import load_tokenize_config

        load_tokenize_config({"max_length": 10})


def test_multi_file_corpus_resume_and_atomicity(tmp_path):
    a, b = make_adata(30, 60, seed=1), make_adata(25, 60, seed=2)
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    genes = np.asarray(a.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    config = TokenizeConfig(task_cells=10, chunk_size=4)
    files = [tmp_path / "a.h5ad", tmp_path / "b.h5ad"]
    straight = tokenize_files(files, tmp_path / "straight", vocab, medians, config, obs_columns=["cell_type"], workers=2)
    reference = datasets.load_from_disk(str(straight))
    assert len(reference) == 55 and reference["cell_type"][:3] == ["a", "b", "c"]
    meta = json.loads((straight / "mixgf_corpus.json").read_text())
    assert meta["vocab_hash"] == vocab.hash and meta["medians_hash"] == medians.hash and meta["cells_in"] == 55
    assert (straight / "config.yaml").exists()

    # A fault while writing the 4th task: no output folder, finished shards kept in the partial folder.
    out = tmp_path / "corpus"
    partial = tmp_path / ".corpus.partial"
    partial.mkdir()
    write_json(partial / "manifest.json", run_manifest([str(f) for f in files], vocab.hash, medians.hash, config, ["cell_type"]))
    (partial / "shard-00001-000000000000.arrow").mkdir()  # makes the rename of that shard fail
    with pytest.raises(OSError):
        tokenize_files(files, out, vocab, medians, config, obs_columns=["cell_type"])
    assert not out.exists()
    done = sorted(p.name for p in partial.glob("*.arrow") if p.is_file())
    assert done == ["shard-00000-000000000000.arrow", "shard-00000-000000000010.arrow", "shard-00000-000000000020.arrow"]
    stamps = {p: (partial / p).stat().st_mtime_ns for p in done}
    (partial / "shard-00001-000000000000.arrow").rmdir()
    tokenize_files(files, out, vocab, medians, config, obs_columns=["cell_type"])
    assert not partial.exists()
    resumed = datasets.load_from_disk(str(out))
    assert resumed["input_ids"] == reference["input_ids"] and resumed["cell_type"] == reference["cell_type"]
    # The three finished shards were not redone: the corpus files are those very files (same mtime).
    data_files = sorted(out.glob("data-*.arrow"))
    assert len(data_files) == 6
    assert [f.stat().st_mtime_ns for f in data_files[:3]] == [stamps[p] for p in done]
    with pytest.raises(ArtifactError, match="already exists"):
        tokenize_files(files, out, vocab, medians, config)


def test_mixed_species_files_make_one_corpus(tmp_path):
    import anndata as ad

    from mixgeneformer.genes import gene_table

    mouse_genes = gene_table("mouse").query("biotype == 'protein_coding'")["ensembl_id"].to_numpy(dtype=object)[:60]
    human = make_adata(10, 60, seed=4)
    mouse = ad.AnnData(make_adata(8, 60, seed=5).X, make_adata(8, 60).obs, ad.AnnData(np.zeros((1, 60))).var.set_axis(mouse_genes))
    human.write_h5ad(tmp_path / "h.h5ad")
    mouse.write_h5ad(tmp_path / "m.h5ad")
    all_genes = np.concatenate([np.asarray(human.var_names), mouse_genes])
    vocab, medians = make_vocab(all_genes, drop_every=1000), make_medians(all_genes)
    out = tokenize_files([tmp_path / "h.h5ad", tmp_path / "m.h5ad"], tmp_path / "c", vocab, medians, TokenizeConfig(style="v2", add_species_token=True))
    corpus = datasets.load_from_disk(str(out))
    assert corpus["species"] == ["human"] * 10 + ["mouse"] * 8
    assert {row[1] for row in corpus["input_ids"]} == {vocab.species_token_id("human"), vocab.species_token_id("mouse")}


def test_a_barnyard_file_gives_each_cell_the_species_of_most_of_its_counts(tmp_path):
    # One matrix over human + mouse genes (a mixed-reference experiment): cells 0-5 express the
    # human genes, cells 6-9 the mouse genes (with a little of the other, as ambient RNA does).
    import anndata as ad

    from mixgeneformer.genes import gene_table

    mouse_genes = gene_table("mouse").query("biotype == 'protein_coding'")["ensembl_id"].to_numpy(dtype=object)[:30]
    genes = np.concatenate([human_ids(30), mouse_genes])
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 2, (10, 60)).astype(np.int32)
    dense[:6, :30] += rng.integers(1, 20, (6, 30))
    dense[6:, 30:] += rng.integers(1, 20, (4, 30))
    adata = ad.AnnData(sp.csr_matrix(dense), var=pd.DataFrame(index=genes))
    adata.write_h5ad(tmp_path / "barnyard.h5ad")
    vocab, medians = make_vocab(genes, drop_every=1000), make_medians(genes)
    config = TokenizeConfig(style="v2", add_species_token=True, allow_mixed_species=True)
    out = tokenize_files([tmp_path / "barnyard.h5ad"], tmp_path / "c", vocab, medians, config)
    corpus = datasets.load_from_disk(str(out))
    assert corpus["species"] == ["human"] * 6 + ["mouse"] * 4
    assert [row[1] for row in corpus["input_ids"]] == [vocab.species_token_id("human")] * 6 + [vocab.species_token_id("mouse")] * 4
    report = json.loads((out / "mixgf_corpus.json").read_text())
    assert (report["inputs"][0]["cells_human"], report["inputs"][0]["cells_mouse"]) == (6, 4)
    assert "each cell is given the species" in report["inputs"][0]["coverage"]
    dataset = tokenize_anndata(adata, vocab, medians, config)  # the in-memory path agrees
    assert dataset["species"] == corpus["species"] and dataset["input_ids"] == corpus["input_ids"]
    tokens = [token for token in vocab.tokens if token != "<mouse>"]
    without = Vocabulary(tokens, {g: i for i, g in enumerate(tokens) if g.startswith("ENS")}, "separate")
    with pytest.raises(ConfigError, match="mouse cells, and the vocabulary has no species token"):
        tokenize_anndata(adata, without, medians, config)


def test_counts_on_unknown_genes_are_reported_and_warned(caplog):
    # 60% of the gene IDs resolve (min_coverage 0.5 passes), but the 40% that do not hold ~97% of the counts.
    import anndata as ad

    genes = human_ids(20)
    dense = np.ones((6, 20), dtype=np.int32)
    dense[:, :8] = 50
    from mixgeneformer.genes import symbols_of

    names = symbols_of(genes).astype(object)
    names[:8] = [f"LOC{i}" for i in range(8)]
    adata = ad.AnnData(sp.csr_matrix(dense), var=pd.DataFrame(index=names))
    vocab, medians = make_vocab(genes, drop_every=1000), make_medians(genes)
    with caplog.at_level("WARNING", logger="mixgeneformer.tokenize.encode"):
        corpus = tokenize_anndata(adata, vocab, medians, TokenizeConfig())
    assert "2.9% of counts on vocabulary genes" in corpus.info.description
    assert "only 2.9% of its counts" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mixgeneformer.tokenize.encode"):
        corpus = tokenize_anndata(ad.AnnData(sp.csr_matrix(dense), var=pd.DataFrame(index=genes)), vocab, medians)
    assert "100.0% of counts on vocabulary genes" in corpus.info.description and "only" not in caplog.text
