"""TileDB-SOMA input streamed by obs joinid: opening reads only obs's soma_joinid (and var); cell
names and obs columns are read per chunk, in joinid order; an experiment written from an h5ad
tokenizes to the same corpus and gives the same medians as the h5ad, on real Baron cells. An
obs_filter (SOMA only) reads just the cells it selects, and is recorded with the corpus."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io
import yaml
from _tokenize_helpers import cli_exit_code

from mixgeneformer.bundle import TOKENIZE_CONFIG_NAME, bundle_tokenize_config
from mixgeneformer.config import save_config
from mixgeneformer.errors import ConfigError, InputDataError
from mixgeneformer.medians import compute_medians
from mixgeneformer.readers import open_source
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata, tokenize_files
from mixgeneformer.tokenize.files import run_manifest
from mixgeneformer.vocab import build_vocabulary

SHARED_BARON = Path("/work/shared/data/baron_pancreas_human.h5ad")
OBS = ["cell_type1", "donor", "label", "rank", "weight", "flagged"]


@pytest.fixture(scope="module")
def baron(tmp_path_factory, baron_data):
    """300 real Baron human cells, their 2,500 most counted genes (HGNC symbols, mapped by the reader) with obs columns of every type,
    an ``n_counts`` that is not the row sum (so reading it per chunk shows in the medians), as an
    h5ad and as a SOMA experiment written from it."""
    path = SHARED_BARON if SHARED_BARON.exists() else baron_data / "baron_pancreas_human.h5ad"
    full = ad.read_h5ad(path)
    cells = full[np.linspace(0, full.n_obs - 1, 300).astype(int)]
    adata = cells[:, np.argsort(-np.asarray(cells.X.sum(axis=0)).ravel(), kind="stable")[:2500]].copy()  # fast gene mapping
    adata.var.index.name = None  # from_h5ad keeps an unnamed var index as var_id (a named one under its name)
    rng = np.random.default_rng(0)
    n = adata.n_obs
    adata.obs = adata.obs[["cell_type1", "donor"]].copy()
    adata.obs["label"] = [f"cell-{i:04d}-{'xyz'[i % 3]}" for i in range(n)]  # plain strings, not categorical
    adata.obs["rank"] = np.arange(n, dtype=np.int64)[::-1].copy()
    adata.obs["weight"] = rng.random(n)
    adata.obs["flagged"] = np.arange(n) % 4 == 0
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel() * rng.uniform(1.0, 3.0, n)
    root = tmp_path_factory.mktemp("soma_baron")
    adata.write_h5ad(root / "cells.h5ad")
    tiledbsoma.io.from_h5ad(str(root / "cells_soma"), str(root / "cells.h5ad"), measurement_name="RNA")
    return adata, root / "cells.h5ad", root / "cells_soma"


def write_experiment(uri: Path, counts: sp.csr_matrix, joinids: np.ndarray, obs: dict, write_order: np.ndarray) -> None:
    """A SOMA experiment by hand: cells at ``joinids`` (gaps allowed), obs rows written in ``write_order``."""
    n_genes = counts.shape[1]
    fields = [pa.field("obs_id", pa.large_string())] + [pa.field(k, pa.array(v).type) for k, v in obs.items()]
    with tiledbsoma.Experiment.create(str(uri)) as exp:
        frame = exp.add_new_dataframe("obs", schema=pa.schema(fields), domain=[(0, int(joinids.max()))])
        table = {"soma_joinid": joinids, "obs_id": [f"cell_{j}" for j in joinids], **obs}
        frame.write(pa.table({k: pa.array(np.asarray(v)[write_order]) for k, v in table.items()}))
        rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
        var = rna.add_new_dataframe("var", schema=pa.schema([pa.field("var_id", pa.large_string())]), domain=[(0, n_genes - 1)])
        var.write(pa.table({"soma_joinid": np.arange(n_genes, dtype=np.int64), "var_id": [f"g{i}" for i in range(n_genes)]}))
        x = rna.add_new_collection("X").add_new_sparse_ndarray("data", type=pa.float32(), shape=(int(joinids.max()) + 1, n_genes))
        coo = counts.tocoo()
        x.write(pa.table({"soma_dim_0": joinids[coo.row], "soma_dim_1": coo.col.astype(np.int64), "soma_data": coo.data.astype(np.float32)}))


def corpus(path, out, vocab, medians, workers):
    config = TokenizeConfig(max_len=64, chunk_size=37, task_cells=160)
    return datasets.load_from_disk(str(tokenize_files([str(path)], out, vocab, medians, config, obs_columns=OBS, workers=workers)))


@pytest.fixture(scope="module")
def tables(baron):
    _, h5ad, _ = baron
    medians = compute_medians([str(h5ad)], species="human", chunk_size=64)
    return medians, build_vocabulary(gene_set="medians", medians=medians, species=("human",))


def test_soma_medians_equal_the_h5ads(baron, tables):
    adata, _, soma = baron
    medians, _ = tables
    for workers in (1, 2):
        soma_medians = compute_medians([str(soma)], species="human", chunk_size=64, workers=workers)
        assert soma_medians.values == medians.values and soma_medians.hash == medians.hash, workers
    plain = adata.copy()
    del plain.obs["n_counts"]
    assert compute_medians([plain], species="human").values != medians.values  # n_counts read per chunk matters


def test_soma_corpus_equals_the_h5ads(baron, tables, tmp_path):
    _, h5ad, soma = baron
    medians, vocab = tables
    expected = corpus(h5ad, tmp_path / "h5ad_corpus", vocab, medians, 1)
    assert len(expected) > 250
    for workers in (1, 2):
        got = corpus(soma, tmp_path / f"soma_corpus_{workers}", vocab, medians, workers)
        assert got.features == expected.features, workers
        for column in ["input_ids", "length", "species", "cell_index", *OBS]:
            assert got[column] == expected[column], (workers, column)
    assert expected["label"][:2] == ["cell-0000-x", "cell-0001-y"] and expected["rank"][0] == 299
    assert str(expected.features["rank"].dtype) == "int64" and str(expected.features["flagged"].dtype) == "bool"


def test_soma_chunks_carry_the_h5ads_cell_names_and_obs(baron):
    adata, h5ad, soma = baron
    with open_source(str(h5ad)) as a, open_source(str(soma)) as b:
        assert b.obs_columns == [*OBS, "n_counts"] and sorted(a.obs_columns) == sorted(b.obs_columns)
        assert list(b.gene_ids) == list(a.gene_ids) and (b.n_cells, b.n_genes) == (a.n_cells, a.n_genes)
        for x, y in zip(a.iter_chunks(71, obs_columns=OBS), b.iter_chunks(71, obs_columns=OBS), strict=True):
            assert list(y.obs.index) == list(x.obs.index) and y.start == x.start
            pd.testing.assert_frame_equal(y.obs.astype(str), x.obs.astype(str))
            assert (y.counts != x.counts).nnz == 0
        assert list(b.obs([], 5, 8).index) == list(adata.obs_names[5:8])


def test_opening_reads_only_the_joinids_and_chunks_only_the_asked_columns(baron, monkeypatch):
    _, _, soma = baron
    calls = []
    original = tiledbsoma.DataFrame.read

    def spy(self, *args, **kwargs):
        if self.uri.rstrip("/").endswith("obs"):
            calls.append(kwargs.get("column_names"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tiledbsoma.DataFrame, "read", spy)
    with open_source(str(soma)) as source:
        assert calls == [["soma_joinid"]]
        assert source.obs_columns == [*OBS, "n_counts"]  # from the schema, nothing else read
        chunks = list(source.iter_chunks(100, obs_columns=["donor"]))
    assert len(chunks) == 3 and calls[1:] == [["soma_joinid", "obs_id", "donor"]] * 3


def test_gapped_joinids_written_out_of_order_come_back_in_joinid_order(tmp_path):
    rng = np.random.default_rng(1)
    joinids = np.sort(rng.choice(200, 40, replace=False)).astype(np.int64)
    counts = sp.csr_matrix(rng.integers(0, 4, (40, 12)) * (rng.random((40, 12)) < 0.5))
    obs = {"tissue": [f"t{j % 5}" for j in joinids], "score": joinids * 0.5}
    write_experiment(tmp_path / "exp", counts, joinids, obs, rng.permutation(40))
    with open_source(str(tmp_path / "exp")) as source:
        assert source.n_cells == 40 and source.obs_columns == ["tissue", "score"]
        chunks = list(source.iter_chunks(9, obs_columns=["score", "tissue"]))
    assert [c.start for c in chunks] == [0, 9, 18, 27, 36]
    assert list(np.concatenate([c.obs.index for c in chunks])) == [f"cell_{j}" for j in joinids]
    assert list(np.concatenate([c.obs["tissue"] for c in chunks])) == obs["tissue"]
    np.testing.assert_array_equal(np.concatenate([c.obs["score"] for c in chunks]), joinids * 0.5)
    np.testing.assert_array_equal(sp.vstack([c.counts for c in chunks]).toarray(), counts.toarray())


def test_soma_errors_keep_their_messages(baron):
    _, _, soma = baron
    with pytest.raises(InputDataError, match=r"measurement 'ATAC' not found. Available measurements: \['RNA'\]"):
        open_source(str(soma), measurement="ATAC")
    with pytest.raises(InputDataError, match=r"X layer 'raw' not found in measurement 'RNA'. Available layers: \['data'\]"):
        open_source(str(soma), layer="raw")
    with pytest.raises(InputDataError, match="gene_column 'feature_id' not found in var. Available var columns"):
        open_source(str(soma), gene_column="feature_id")
    with open_source(str(soma)) as source, pytest.raises(InputDataError, match=r"\['obs_id'\] not found. Available obs columns"):
        next(source.iter_chunks(10, obs_columns=["obs_id"]))


FILTER = "cell_type1 in ['alpha', 'beta'] and rank >= 100"


def test_obs_filter_reads_the_selected_cells_as_their_own_h5ad_would(baron, tables, tmp_path):
    adata, _, soma = baron
    keep = adata.obs["cell_type1"].isin(["alpha", "beta"]).to_numpy() & (adata.obs["rank"].to_numpy() >= 100)
    adata[keep].copy().write_h5ad(tmp_path / "subset.h5ad")
    with open_source(str(soma), obs_filter=FILTER) as source:
        assert 50 < source.n_cells == keep.sum() < 200
        names = np.concatenate([c.obs.index for c in source.iter_chunks(50)])
    assert list(names) == list(adata.obs_names[keep])
    subset_medians = compute_medians([str(tmp_path / "subset.h5ad")], species="human")
    filtered = compute_medians([str(soma)], species="human", obs_filter=FILTER, workers=2, chunk_size=40)
    assert filtered.values == subset_medians.values != tables[0].values
    medians, vocab = tables
    expected = corpus(tmp_path / "subset.h5ad", tmp_path / "subset_corpus", vocab, medians, 1)
    config = TokenizeConfig(max_len=64, chunk_size=37, task_cells=60, obs_filter=FILTER)
    out = tokenize_files([str(soma)], tmp_path / "filtered", vocab, medians, config, obs_columns=OBS, workers=2)
    got = datasets.load_from_disk(str(out))
    for column in ["input_ids", "length", "cell_index", *OBS]:  # cell_index: position among the selected cells
        assert got[column] == expected[column], column
    assert yaml.safe_load((out / "config.yaml").read_text())["obs_filter"] == FILTER
    resumable = run_manifest([str(soma)], vocab.hash, medians.hash, config, OBS)  # a partial run resumes when equal
    assert resumable != run_manifest([str(soma)], vocab.hash, medians.hash, TokenizeConfig(max_len=64, chunk_size=37, task_cells=60), OBS)


def test_obs_filter_is_refused_for_other_inputs_and_when_bad(baron, tables, tmp_path, capsys):
    adata, h5ad, soma = baron
    medians, vocab = tables
    only = "selects cells of a TileDB-SOMA experiment only"
    with pytest.raises(ConfigError, match=f"{only}, and .*cells.h5ad is not one"):
        open_source(str(h5ad), obs_filter=FILTER)
    with pytest.raises(ConfigError, match=f"{only}, and the AnnData input is not one"):
        compute_medians([adata], obs_filter=FILTER)
    with pytest.raises(ConfigError, match=only):
        tokenize_anndata(adata, vocab, medians, TokenizeConfig(obs_filter=FILTER))
    with pytest.raises(ConfigError, match="give a tiledbsoma value_filter"):
        open_source(str(soma), obs_filter=" ")
    with pytest.raises(ConfigError, match=r"obs_filter \"tissue == 'x'\" cannot be applied \(.*tissue.*\).*obs columns: \["):
        open_source(str(soma), obs_filter="tissue == 'x'")
    with pytest.raises(ConfigError, match="cannot be applied"):
        open_source(str(soma), obs_filter="rank >=")
    with pytest.raises(InputDataError, match="selects no cell"):
        open_source(str(soma), obs_filter="cell_type1 == 'no such type'")
    capsys.readouterr()
    assert cli_exit_code(["medians", h5ad, "--out", tmp_path / "m.tsv", "--obs-filter", FILTER]) == 2
    err = capsys.readouterr().err
    assert err.count(only) == 1 and "Traceback" not in err and not (tmp_path / "m.tsv").exists()


def test_cli_obs_filter_and_a_bundles_recorded_filter(baron, tables, tmp_path):
    _, _, soma = baron
    medians, vocab = tables
    medians.save(tmp_path / "medians.tsv")
    vocab.save(tmp_path / "vocab.json")
    out = tmp_path / "corpus"
    assert cli_exit_code(["tokenize", soma, "--vocab", tmp_path / "vocab.json", "--medians", tmp_path / "medians.tsv",
                          "--out", out, "--obs-filter", "flagged == True", "--max-len", "64"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["obs_filter"] == "flagged == True"
    assert len(datasets.load_from_disk(str(out))) == 75  # every 4th of 300 cells
    # A model pretrained on that corpus records its config; new cells (any format) are not filtered by it.
    save_config(TokenizeConfig(max_len=64, style="v2", obs_filter="flagged == True"), tmp_path, TOKENIZE_CONFIG_NAME)
    recorded = bundle_tokenize_config(tmp_path)
    assert recorded.obs_filter is None and recorded.style == "v2" and recorded.max_len == 64
