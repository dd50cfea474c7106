"""Audit of embedding extraction and the species-integration scores.

Expected values are computed independently of the code under test: hidden states from a plain
``transformers`` forward pass of each cell alone (no padding, no batch), pooled with numpy; gene
means and kNN transfer by brute force; scib-metrics scores on the neighbour graphs scib's own
``Benchmarker`` builds (every cell's 90 nearest neighbours, the cell itself first; kBET on the
first 50).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _tokenize_helpers import SPECIALS, partly_outside_files
from transformers import BertConfig, BertModel

from mixgeneformer import integration
from mixgeneformer.embed import embed_anndata, embed_corpus, gene_table
from mixgeneformer.errors import ConfigError, InputDataError
from mixgeneformer.vocab import Vocabulary

N_GENES = 120


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    tokens = SPECIALS + [f"ENSG{i:011d}" for i in range(N_GENES)]
    return Vocabulary(tokens, {t: i for i, t in enumerate(tokens) if t.startswith("ENSG")})


@pytest.fixture(scope="module")
def bert(vocab) -> BertModel:
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=96, pad_token_id=vocab.pad_id,
                        attn_implementation="eager")
    return BertModel(config).eval()


def _cells(n: int, seed: int, special: bool) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(1, 80, size=n):
        genes = rng.choice(np.arange(len(SPECIALS), len(SPECIALS) + N_GENES), size=length, replace=False).tolist()
        out.append([2, 4, *genes, 3] if special else genes)
    return out


def _reference(bert: BertModel, cells: list[list[int]], hidden_state: int, pooling: str) -> np.ndarray:
    """Each cell alone through transformers, ``hidden_states[hidden_state]`` pooled with numpy."""
    rows = []
    with torch.no_grad():
        for cell in cells:
            states = bert(input_ids=torch.tensor([cell]), output_hidden_states=True).hidden_states[hidden_state][0].numpy()
            genes = np.asarray(cell) >= len(SPECIALS)
            rows.append(states[0] if pooling == "cls" else states[genes].mean(axis=0))
    return np.stack(rows)


# ---------------------------------------------------------------------------- cell embeddings
@pytest.mark.parametrize(("layer", "hidden_state"), [(None, 2), (-1, 3), (0, 0), (1, 1)])
@pytest.mark.parametrize(("pooling", "special"), [("mean", False), ("mean", True), ("cls", True)])
def test_cell_embeddings_equal_each_cell_alone_through_transformers(bert, vocab, layer, hidden_state, pooling, special):
    """Default layer = hidden_states[num_layers - 1] (Geneformer's emb_layer=-1); mean over gene tokens
    only (no <cls>, species, <eos>, padding) or the <cls> state; any batch size and cell order."""
    cells = _cells(14, seed=3, special=special)
    want = _reference(bert, cells, hidden_state, pooling)
    kwargs = {} if layer is None else {"layer": layer}
    for batch_size in (1, 4, 14):
        got = embed_corpus(bert, cells, vocab, pooling=pooling, batch_size=batch_size, progress=False, **kwargs)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    order = np.random.default_rng(0).permutation(len(cells))
    got = embed_corpus(bert, [cells[i] for i in order], vocab, pooling=pooling, batch_size=5, progress=False, **kwargs)
    np.testing.assert_allclose(got, want[order], rtol=0, atol=2e-5)


def test_mean_pooling_of_a_cell_without_gene_tokens_is_an_error_not_zeros(bert, vocab):
    cells = _cells(4, seed=4, special=True)
    cells.insert(2, [2, 4, 3])  # <cls> <human> <eos>: nothing to average
    with pytest.raises(InputDataError, match="row 2"):
        embed_corpus(bert, cells, vocab, progress=False)
    got = embed_corpus(bert, cells, vocab, pooling="cls", progress=False)  # its <cls> state exists
    np.testing.assert_allclose(got, _reference(bert, cells, 2, "cls"), rtol=0, atol=2e-5)


def test_cls_pooling_is_refused_for_a_vocabulary_without_cls(bert):
    """Without a <cls> token a cell cannot start with one: the species token's state is no <cls> state."""
    tokens = [t for t in SPECIALS if t != "<cls>"] + [f"ENSG{i:011d}" for i in range(N_GENES + 1)]
    no_cls = Vocabulary(tokens, {t: i for i, t in enumerate(tokens) if t.startswith("ENSG")})
    human = no_cls.id_of("<human>")
    cells = [[human, *cell] for cell in _cells(3, seed=5, special=False)]
    with pytest.raises(ConfigError, match="<cls>"):
        embed_corpus(bert, cells, no_cls, pooling="cls", progress=False)


def test_gene_embeddings_are_brute_force_means_and_shards_merge_count_weighted(bert, vocab):
    from mixgeneformer.sharding import _merge_gene_tables

    cells = _cells(12, seed=6, special=True)
    sums: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for cell in cells:
            states = bert(input_ids=torch.tensor([cell]), output_hidden_states=True).hidden_states[2][0].numpy()
            for position, token in enumerate(cell):
                if token >= len(SPECIALS):
                    sums.setdefault(token, []).append(states[position])
    whole = gene_table(embed_corpus(bert, cells, vocab, gene_embeddings=True, batch_size=5, progress=False))
    assert list(whole.index) == [vocab.tokens[t] for t in sorted(sums)]
    for token, rows in sums.items():
        assert whole.at[vocab.tokens[token], "n_cells"] == len(rows)
        np.testing.assert_allclose(whole.loc[vocab.tokens[token]].to_numpy()[1:], np.mean(rows, axis=0), atol=2e-5)
    shards = []
    for part in (cells[:3], cells[3:]):  # unequal shards: an unweighted mean of means would differ
        table = gene_table(embed_corpus(bert, part, vocab, gene_embeddings=True, progress=False))
        shards.append({"gene_ids": np.asarray([vocab.id_of(g) for g in table.index]), "gene_names": np.asarray(table.index),
                       "gene_counts": table["n_cells"].to_numpy(), "gene_means": table.drop(columns="n_cells").to_numpy()})
    merged = _merge_gene_tables(shards)
    assert list(merged.index) == list(whole.index)
    np.testing.assert_array_equal(merged["n_cells"], whole["n_cells"])
    np.testing.assert_allclose(merged.to_numpy(), whole.to_numpy(), atol=2e-5)


# ---------------------------------------------------------------------------- AnnData and the CLI
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random bundle; 30 cells, of which cells 0-19 hold counts only outside the vocabulary."""
    root = tmp_path_factory.mktemp("audit_embed")
    made, path = partly_outside_files(root)
    return {"root": root, "folder": made.folder, "h5ad": path}


@pytest.mark.parametrize("option", [{"precision": "fp16"}, {"batch_size": 0}, {"gene_embeddings": "all"}]
                         + ([{"device": "cuda"}] if not torch.cuda.is_available() else []))
def test_embed_anndata_refuses_bad_options_before_tokenizing(bundle, monkeypatch, option):
    import anndata as ad

    import mixgeneformer.embed.cells as cells_module

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized before the options were checked")

    monkeypatch.setattr(cells_module, "tokenize_for_model", tokenize)
    with pytest.raises(ConfigError):
        embed_anndata(ad.read_h5ad(bundle["h5ad"]), bundle["folder"], progress=False, **option)


def _cli(*args) -> None:
    from mixgeneformer.cli import main

    main(["embed", *map(str, args), "--no-progress", "--device", "cpu", "--batch-size", "4"])


def test_a_shard_whose_cells_all_lack_vocabulary_genes_gives_nan_rows_like_one_process(bundle, tmp_path):
    import anndata as ad

    one, sharded = tmp_path / "one.h5ad", tmp_path / "sharded.h5ad"
    with pytest.warns(UserWarning, match="dropped"):
        _cli(bundle["h5ad"], "--model", bundle["folder"], "--out", one)
    for index in range(3):  # cells 0-19 are long (many genes outside the vocabulary): shard 0 holds only them
        _cli(bundle["h5ad"], "--model", bundle["folder"], "--out", sharded, "--shard-index", index, "--num-shards", 3)
    import json

    from mixgeneformer.cli import main
    from mixgeneformer.sharding import shard_folder

    assert 0 < json.loads((shard_folder(sharded) / "manifest.json").read_text())["bounds"][1] <= 20
    main(["embed-merge", str(sharded)])
    want, got = ad.read_h5ad(one), ad.read_h5ad(sharded)
    assert np.isnan(want.obsm["X_mixgeneformer"][:20]).all() and np.isnan(want.obsm["X_mixgeneformer"][24]).all()
    np.testing.assert_allclose(got.obsm["X_mixgeneformer"], want.obsm["X_mixgeneformer"], rtol=0, atol=1e-5, equal_nan=True)
    for field in ("layer", "pooling", "n_cells", "n_dropped", "vocab_hash"):
        assert got.uns["X_mixgeneformer_params"][field] == want.uns["X_mixgeneformer_params"][field]


def test_a_sharded_run_without_any_tokenizable_cell_fails_like_one_process(bundle, tmp_path):
    import anndata as ad

    from mixgeneformer.cli import main

    empty = tmp_path / "empty.h5ad"
    ad.read_h5ad(bundle["h5ad"])[:20].copy().write_h5ad(empty)
    with pytest.raises(SystemExit) as one:
        _cli(empty, "--model", bundle["folder"], "--out", tmp_path / "one.h5ad")
    assert one.value.code == 2
    out = tmp_path / "sharded.h5ad"
    for index in range(2):
        _cli(empty, "--model", bundle["folder"], "--out", out, "--shard-index", index, "--num-shards", 2)
    with pytest.raises(SystemExit) as merged:
        main(["embed-merge", str(out)])
    assert merged.value.code == 2 and not out.exists()


@pytest.mark.parametrize("option", [("--species", "mouse"), ("--gene-column", "symbol"), ("--tokenize-config", "T")])
def test_tokenize_options_with_a_corpus_folder_are_refused(bundle, tmp_path, option, capsys):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    model, vocab, medians = load_bundle(bundle["folder"])
    corpus = tokenize_files([bundle["h5ad"]], tmp_path / "corpus", vocab, medians, TokenizeConfig(max_len=64))
    value = option[1]
    if value == "T":
        value = tmp_path / "t.yaml"
        value.write_text("layer: counts\n")
    with pytest.raises(SystemExit) as exit_:
        _cli(corpus, "--model", bundle["folder"], "--out", tmp_path / "o.h5ad", option[0], value)
    assert exit_.value.code == 2 and option[0] in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_precision_auto_uses_bf16_only_where_the_gpu_computes_it(monkeypatch):
    from mixgeneformer.devices import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    from test_devices import StandInGPUs

    gpu = StandInGPUs(monkeypatch, ["emulated"])
    assert autocast_dtype(torch.device("cuda"), "auto") is None  # e.g. a T4: bf16 only emulated -> fp32
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    gpu.bf16 = ["native"]
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    with pytest.raises(ConfigError, match="precision"):
        autocast_dtype(torch.device("cpu"), "fp16")


# ---------------------------------------------------------------------------- integration scores
def _mixing_data(n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    types = rng.choice(["a", "b", "c"], n)
    species = np.where(rng.random(n) < 0.35, "mouse", "human")
    x = rng.normal(size=(n, 6)).astype(np.float32)
    x[:, 0] += 6.0 * (types == "b") + 12.0 * (types == "c")
    x[:, 1] += 1.0 * (species == "mouse")
    return x, species, types


scib = pytest.mark.skipif(not integration.scib_available(), reason="scib-metrics not installed (extra 'metrics')")


@scib
def test_ilisi_and_kbet_are_scibs_on_scibs_neighbour_graphs():
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    x, species, types = _mixing_data()
    distances, indices = NearestNeighbors(n_neighbors=90).fit(x).kneighbors(x)  # the cell itself first
    assert (indices[:, 0] == np.arange(len(x))).all()
    graph = NeighborsResults(indices=indices, distances=distances)
    out = integration.species_mixing(x, species, types, kbet=True)
    assert out["ilisi"] == pytest.approx(float(scib_metrics.ilisi_knn(graph, species, scale=True)), abs=1e-6)
    want_kbet = float(scib_metrics.kbet_per_label(graph.subset_neighbors(50), species, types))
    assert out["kbet"] == pytest.approx(want_kbet, abs=1e-6)
    assert out["species_asw"] == pytest.approx(float(scib_metrics.silhouette_batch(x, types, species)), abs=1e-6)


@pytest.mark.parametrize("backend", ["sklearn", pytest.param("scib", marks=scib)])
def test_species_mixing_of_one_species_or_no_shared_type(backend, monkeypatch):
    if backend == "sklearn":
        monkeypatch.setattr(integration, "scib_available", lambda: False)
    x, species, types = _mixing_data(60)
    with pytest.raises(InputDataError, match="two species"):
        integration.species_mixing(x, np.full(60, "human"), types)
    apart = np.where(species == "human", "h_type", "m_type")  # no type holds both species
    out = integration.species_mixing(x, species, apart)
    assert np.isnan(out["species_asw"]) and np.isnan(out["species_asw_shuffled"])


@pytest.mark.parametrize("backend", ["sklearn", pytest.param("scib", marks=scib)])
def test_cells_without_a_cell_type_are_not_a_shared_type(backend, monkeypatch):
    if backend == "sklearn":
        monkeypatch.setattr(integration, "scib_available", lambda: False)
    x, species, types = _mixing_data()
    labels = types.astype(object)
    unlabelled = np.arange(len(x)) % 4 == 0
    labels[unlabelled] = None if backend == "sklearn" else "nan"  # as pandas' astype(str) writes NaN
    emb = {s: x[species == s] for s in ("human", "mouse")}
    got, n_cells, shared = integration.shared_type_mixing(emb, {s: labels[species == s] for s in ("human", "mouse")})
    assert shared == ["a", "b", "c"] and n_cells == int((~unlabelled).sum())
    want = integration.species_mixing(np.concatenate([x[(species == s) & ~unlabelled] for s in ("human", "mouse")]),
                                      np.concatenate([species[(species == s) & ~unlabelled] for s in ("human", "mouse")]),
                                      np.concatenate([types[(species == s) & ~unlabelled] for s in ("human", "mouse")]))
    assert got == pytest.approx(want)
    direct = integration.species_mixing(x, species, labels)  # the lower-level call leaves them out too
    assert direct["species_asw"] == pytest.approx(
        integration.species_mixing(x[~unlabelled], species[~unlabelled], types[~unlabelled])["species_asw"])


def _planted():
    from mixgeneformer.simulate import PlantedConfig, simulate_planted

    data = simulate_planted(PlantedConfig(n_types=3, cells_per_type=20, n_shared_genes=60, n_specific_genes=10,
                                          program_size=10, specific_program_size=3))
    return {"human": data.human, "mouse": data.mouse}


def test_knn_transfer_is_brute_force_knn_on_the_source_species_only(monkeypatch):
    monkeypatch.setattr(integration, "scib_available", lambda: False)
    data = _planted()
    rng = np.random.default_rng(1)
    emb = {s: rng.normal(size=(data[s].n_obs, 5)) for s in data}
    emb["human"][:, 0] += 50.0  # target cells are each other's nearest neighbours: only a source-only vote is honest
    rows = {s: np.arange(data[s].n_obs) for s in data}
    out = integration.cross_species_scores(data, emb, rows, "cell_type", baseline=False)
    src, tgt = emb["mouse"], emb["human"]
    cos = (tgt / np.linalg.norm(tgt, axis=1, keepdims=True)) @ (src / np.linalg.norm(src, axis=1, keepdims=True)).T
    src_labels = data["mouse"].obs["cell_type"].astype(str).to_numpy()
    votes = np.argsort(-cos, axis=1)[:, :5]
    predicted = [pd.Series(src_labels[v]).value_counts().sort_index().idxmax() for v in votes]
    truth = data["human"].obs["cell_type"].astype(str).to_numpy()
    assert out["transfer_acc_mouse->human"] == pytest.approx(np.mean(np.asarray(predicted) == truth))


def test_cross_species_scores_leave_out_cells_without_an_embedding(monkeypatch):
    monkeypatch.setattr(integration, "scib_available", lambda: False)
    data = _planted()
    rng = np.random.default_rng(2)
    emb = {s: rng.normal(size=(data[s].n_obs, 5)) for s in data}
    rows = {s: np.arange(data[s].n_obs) for s in data}
    nan_rows = {s: np.array([0, 7]) for s in data}  # cells the tokenizer dropped: NaN rows of obsm
    with_nan = {s: emb[s].copy() for s in data}
    for s in data:
        with_nan[s][nan_rows[s]] = np.nan
    got = integration.cross_species_scores(data, with_nan, rows, "cell_type", baseline=False)
    keep = {s: np.setdiff1d(rows[s], nan_rows[s]) for s in data}
    want = integration.cross_species_scores(data, {s: emb[s][keep[s]] for s in data}, keep, "cell_type", baseline=False)
    assert got == pytest.approx(want)
    with pytest.raises(InputDataError, match="rows"):
        integration.cross_species_scores(data, {s: emb[s][1:] for s in data}, rows, "cell_type", baseline=False)


def test_fp32_asked_of_a_half_precision_model_is_refused(vocab, bert):
    """precision='fp32' ran a model held in float16 / bfloat16 in that precision without a word."""
    import copy

    half = copy.deepcopy(bert).to(torch.bfloat16)
    cells = [list(range(len(SPECIALS), len(SPECIALS) + n)) for n in (5, 30, 60)]
    with pytest.raises(ConfigError, match=r"precision='fp32'.*torch.bfloat16.*model.float\(\)"):
        embed_corpus(half, cells, vocab, precision="fp32", progress=False)
    auto = embed_corpus(half, cells, vocab, precision="auto", progress=False)  # asked for nothing in particular
    assert np.isfinite(auto).all()
