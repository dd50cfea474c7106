"""Cross-species mechanics against reconstructions written from the raw tables in ../shared/data:
the ortholog vocabulary, tokenizing both species with it, label matching for transfer, the count /
token baselines' gene space, cross_species_scores and the model's ortholog map."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from mixgeneformer import classify as C
from mixgeneformer.classify.baselines import align_genes, ortholog_counts
from mixgeneformer.errors import ConfigError
from mixgeneformer.medians import GeneMedians
from mixgeneformer.model import MixGeneformerForPretraining, make_config
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata
from mixgeneformer.vocab import build_vocabulary

GENE_COLUMNS = ["ensembl_id", "symbol", "version", "length", "biotype"]
GENCODE = {"human": "gencode_v48_homo_sapiens", "mouse": "gencode_vM37_mus_musculus"}
# symbol pairs of well-known pancreas genes: (human, mouse, BioMart homology type)
MARKERS = [("GCG", "Gcg", "one2one"), ("SST", "Sst", "one2one"), ("PPY", "Ppy", "one2one"),
           ("KRT19", "Krt19", "one2one"), ("INS", "Ins1", "one2many"), ("INS", "Ins2", "one2many")]


@pytest.fixture(scope="module")
def raw(shared_data):
    """The raw BioMart one2one pairs and GENCODE tables, read here without the package."""
    orth = pd.read_csv(shared_data / "orthologs" / "ensembl_biomart_human_to_mouse.csv.gz")
    orth.columns = ["human_id", "human_symbol", "mouse_symbol", "mouse_id", "type", "confidence", "goc"]
    tables = {s: pd.read_csv(shared_data / "genes" / f"{name}.csv.gz", header=None, names=GENE_COLUMNS)
              for s, name in GENCODE.items()}
    return orth, tables


def _tied_pairs(raw):
    """Documented rule: each one2one pair with a protein-coding gene on either side shares a token."""
    orth, tables = raw
    coding = {s: set(t.loc[t["biotype"] == "protein_coding", "ensembl_id"]) for s, t in tables.items()}
    pairs = orth[orth["type"] == "ortholog_one2one"]
    tied = pairs[pairs["human_id"].isin(coding["human"]) | pairs["mouse_id"].isin(coding["mouse"])]
    return coding, dict(zip(tied["human_id"], tied["mouse_id"], strict=True))


def _ids(tables, species, symbol):
    return tables[species].loc[tables[species]["symbol"] == symbol, "ensembl_id"].tolist()


def test_ortholog_vocabulary_equals_the_one_to_one_rule_on_the_raw_tables(raw):
    vocab = build_vocabulary("ortholog")
    coding, tied = _tied_pairs(raw)
    genes = coding["human"] | coding["mouse"] | set(tied) | set(tied.values())
    assert set(vocab.gene_to_id) == genes
    assert len(vocab) == 6 + len(genes) - len(tied) == 25_647  # the demo report's count
    shared = [i for i, t in enumerate(vocab.tokens) if "|" in t]
    assert len(shared) == len(tied) == 16_289
    assert {vocab.tokens[vocab.gene_to_id[h]] for h in tied} == {f"{h}|{m}" for h, m in tied.items()}
    per_token = pd.Series(list(vocab.gene_to_id.values())).value_counts()
    assert per_token.max() == 2 and (per_token == 2).sum() == len(tied)  # only the tied pairs share
    orth, tables = raw
    for human, mouse, kind in MARKERS:
        (h,), (m,) = _ids(tables, "human", human), _ids(tables, "mouse", mouse)
        rows = orth[(orth["human_id"] == h) & (orth["mouse_id"] == m)]
        assert rows["type"].tolist() == [f"ortholog_{kind}"]
        same = vocab.gene_to_id[h] == vocab.gene_to_id[m]
        assert same == (kind == "one2one"), (human, mouse)


def _resolve_symbols(tables, species, names):
    """Symbol -> Ensembl ID: exact (protein-coding first, then the smallest ID), else case-folded
    (mouse; human only for upper-case names), else R's make.names '.' read as '-'."""
    def index(key):
        t = tables[species].dropna(subset=["symbol"]).assign(key=key, rank=lambda d: (d["biotype"] != "protein_coding").astype(int))
        t = t.sort_values(["key", "rank", "ensembl_id"]).drop_duplicates("key")
        return dict(zip(t["key"], t["ensembl_id"], strict=True))

    exact, folded = index(tables[species]["symbol"]), index(tables[species]["symbol"].str.upper())
    present, out = set(names), []
    for name in names:
        found = exact.get(name) or (folded.get(name.upper()) if species == "mouse" or name == name.upper() else None)
        dashed = name.replace(".", "-")
        if not found and "." in name and dashed not in present:
            found = exact.get(dashed) or folded.get(dashed.upper())
        out.append(found or "")
    return np.asarray(out, dtype=object)


@pytest.mark.parametrize("species", ["human", "mouse"])
def test_baron_tokens_equal_the_reconstruction_gene_for_gene(raw, shared_data, species):
    vocab = build_vocabulary("ortholog")
    _, tables = raw
    rng = np.random.default_rng(0)
    medians = dict(zip(sorted(vocab.gene_to_id), rng.uniform(0.5, 5.0, len(vocab.gene_to_id)), strict=True))
    adata = ad.read_h5ad(shared_data / f"baron_pancreas_{species}.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        corpus = tokenize_anndata(adata, vocab, GeneMedians(medians), TokenizeConfig(species=species))
    counts = sp.csr_matrix(adata.X)
    ensembl = _resolve_symbols(tables, species, list(adata.var_names))
    token = np.asarray([vocab.gene_to_id.get(g, -1) for g in ensembl])
    median = np.asarray([medians.get(g, np.nan) for g in ensembl])
    column_total = np.asarray(counts.sum(axis=0)).ravel()
    fraction = column_total[token >= 0].sum() / column_total.sum()
    assert fraction > 0.95
    reported = float(re.search(r"([\d.]+)% of counts on vocabulary genes", corpus.info.description).group(1))
    assert reported == pytest.approx(100 * fraction, abs=0.051)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert len(corpus) == adata.n_obs
    for row in rng.choice(adata.n_obs, 20, replace=False):
        cell = counts[row]
        keep = token[cell.indices] >= 0
        values = cell.data[keep] / totals[row] * 10_000 / median[cell.indices[keep]]
        ids = token[cell.indices[keep]]
        expected = ids[np.lexsort((ids, -values))][:2048]
        assert corpus[int(row)]["cell_index"] == row
        assert list(corpus[int(row)]["input_ids"]) == expected.tolist()


def test_baron_transfer_matches_hand_built_classes_and_scores_only_them(shared_data):
    data = {s: ad.read_h5ad(shared_data / f"baron_pancreas_{s}.h5ad", backed="r") for s in ("human", "mouse")}
    # by hand from the README's counts: 0.5% of 2,142 human / 1,886 mouse cells is 10.7 / 9.4 cells
    shared = ["activated_stellate", "alpha", "beta", "delta", "ductal", "endothelial", "gamma", "macrophage",
              "quiescent_stellate"]  # schwann and T cells are below it on both sides
    unseen = {("mouse", "human"): ("acinar", 231), ("human", "mouse"): ("b_cell", 10)}
    for (src, tgt), (name, n) in unseen.items():
        task = C.transfer_task(data[src], data[tgt], C.LabelConfig())
        labels = data[tgt].obs["cell_type1"].astype(str).str.lower().to_numpy()
        assert task.classes == shared and sorted(set(task.test_labels)) == shared
        assert np.array_equal(task.test_rows, np.flatnonzero(np.isin(labels, shared)))
        assert f"dropped from target: {{'{name}': {n}}}" in task.notes[-1]
        wrong = np.where(np.arange(task.test_labels.size) % 3 == 0, "zz_never_a_class", task.test_labels)
        f1 = [2 * ((task.test_labels == c) & (wrong == c)).sum() / ((task.test_labels == c).sum() + (wrong == c).sum())
              for c in shared]  # over the shared classes only: the never-a-class predictions add no class
        assert C.classification_metrics(task.test_labels, wrong)["macro_f1"] == pytest.approx(np.mean(f1))


def _labelled(counts: dict[str, int]) -> ad.AnnData:
    labels = [name for name, n in counts.items() for _ in range(n)]
    adata = ad.AnnData(np.ones((len(labels), 3), dtype=np.float32))
    adata.obs["cell_type1"] = labels
    return adata


def test_a_user_synonym_after_a_built_in_one_keeps_every_spelling_of_the_class():
    # "T cells" -> t_cells -> t_cell (built in) -> immune (the user's): the old lookup stopped at t_cell, and
    # transfer_task silently dropped those 6 training cells though its notes said nothing was dropped.
    assert C.canonical_label("T cells", {"t_cell": "immune"}) == C.canonical_label("T_cell", {"t_cell": "immune"}) == "immune"
    source = _labelled({"alpha": 20, "beta": 20, "T cells": 6, "T_cell": 6})
    target = _labelled({"alpha": 20, "beta": 20, "immune": 8})
    task = C.transfer_task(source, target, C.LabelConfig(min_class_count=5, min_class_fraction=0), synonyms={"t_cell": "immune"})
    assert (task.train_labels == "immune").sum() == 12 and task.train_rows.size == 52
    with pytest.raises(ConfigError, match="cycle"):
        C.canonical_label("a", {"a": "b", "b": "a"})


def test_count_baselines_align_baron_genes_by_one_to_one_ortholog(raw, shared_data):
    orth, tables = raw
    one2one = orth[orth["type"] == "ortholog_one2one"]
    to_human = {"human": dict(zip(one2one["human_id"], one2one["human_id"], strict=True)),
                "mouse": dict(zip(one2one["mouse_id"], one2one["human_id"], strict=True))}
    data, columns = {}, {}
    for s in ("human", "mouse"):
        data[s] = ad.read_h5ad(shared_data / f"baron_pancreas_{s}.h5ad")
        human = [to_human[s].get(g, "") for g in _resolve_symbols(tables, s, list(data[s].var_names))]
        columns[s] = {g: j for j, g in enumerate(human) if g}
    expected = sorted(set(columns["human"]) & set(columns["mouse"]))
    counts = {s: ortholog_counts(data[s], s) for s in data}
    mouse, human, genes = align_genes(*counts["mouse"], *counts["human"])
    assert genes.tolist() == expected
    for s, matrix in (("mouse", mouse), ("human", human)):
        source = sp.csc_matrix(data[s].X)[:, [columns[s][g] for g in expected]]
        assert abs(matrix - source.astype(np.float32)).sum() == 0  # column by column: the ortholog's counts


def test_transfer_species_are_read_from_the_gene_column_the_tokenizer_reads(baron_data):
    # var_names are not genes here; the old code detected species from them (GeneIdError telling the
    # user to set the gene_column they had set), so count baselines could not run across species.
    data = {}
    for s in ("human", "mouse"):
        adata = ad.read_h5ad(baron_data / f"baron_pancreas_{s}.h5ad")
        adata.var["symbol"] = np.asarray(adata.var_names)
        adata.var_names = [f"column{i}" for i in range(adata.n_vars)]
        data[s] = adata
    run = C.run_classification(data["mouse"], test=data["human"], methods=(), baseline_methods=("knn_pca",),
                               tokenize_config=TokenizeConfig(gene_column="symbol"))
    assert run.task.setting == "mouse->human" and run.table()["macro_f1"].iloc[0] > 0.5


def test_token_baseline_matches_a_separate_vocabularys_tokens_by_ortholog(baron_data):
    # With a separate vocabulary every human test cell was an empty bag of mouse-trained columns: one class
    # predicted for all (macro-F1 0.05). Through the ortholog map it reads as the ortholog vocabulary does.
    data = {s: ad.read_h5ad(baron_data / f"baron_pancreas_{s}.h5ad")[::2].copy() for s in ("human", "mouse")}
    vocab = build_vocabulary("separate")
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=32, hidden_size=16,
                                                    num_attention_heads=2, intermediate_size=32))
    run = C.run_classification(data["mouse"], model, vocab, GeneMedians(dict.fromkeys(vocab.gene_to_id, 1.0)),
                               test=data["human"], methods=(), baseline_methods=("logreg_tokens",),
                               config=C.ClassifyConfig(labels=C.LabelConfig(min_class_count=5)),
                               tokenize_config=TokenizeConfig(max_len=32))
    (result,) = run.results
    assert len(set(result.y_pred)) >= len(run.task.classes) - 2 and result.metrics["macro_f1"] > 0.5
    gcg = [vocab.gene_to_id[g] for g in ("ENSG00000115263", "ENSMUSG00000000394")]
    columns = C.ortholog_columns(vocab.ortholog_map, vocab.special_ids)
    assert columns[gcg[0]] == columns[gcg[1]] and columns[vocab.special_ids].tolist() == vocab.special_ids.tolist()


def test_cross_species_scores_score_the_shared_types_as_a_reconstruction(baron_data, monkeypatch):
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier

    from mixgeneformer import integration

    monkeypatch.setattr(integration, "scib_available", lambda: False)  # the batch ASW is ours; iLISI (jax) is scib's

    data = {s: ad.read_h5ad(baron_data / f"baron_pancreas_{s}.h5ad") for s in ("human", "mouse")}
    label = {s: data[s].obs["cell_type1"].astype(str).str.lower().to_numpy() for s in data}
    rng = np.random.default_rng(0)
    centre = {t: rng.normal(size=8) for t in sorted(set(label["human"]) | set(label["mouse"]))}
    rows = {s: np.sort(rng.choice(data[s].n_obs, data[s].n_obs - 50, replace=False)) for s in data}
    emb = {s: np.stack([centre[t] for t in label[s][rows[s]]]) + rng.normal(size=(rows[s].size, 8)) for s in data}
    emb["human"][:4] = np.nan
    scores = integration.cross_species_scores(data, emb, rows, "cell_type1", baseline=False)
    finite = {s: np.isfinite(emb[s]).all(axis=1) for s in data}
    kept = {}
    for s in data:  # classes of at least 0.5% of the species' labelled cells (and 2)
        counts = pd.Series(label[s]).value_counts()
        kept[s] = set(counts[counts >= max(2, 0.005 * data[s].n_obs)].index)
    shared = sorted(kept["human"] & kept["mouse"])
    for src, tgt in (("mouse", "human"), ("human", "mouse")):
        train = np.isin(label[src][rows[src]], shared) & finite[src]
        test = np.isin(label[tgt][rows[tgt]], shared) & finite[tgt]
        knn = KNeighborsClassifier(5, metric="cosine", algorithm="brute").fit(emb[src][train], label[src][rows[src]][train])
        truth = label[tgt][rows[tgt]][test]
        expected = f1_score(truth, knn.predict(emb[tgt][test]), average="macro", labels=np.unique(truth))
        assert scores[f"transfer_f1_{src}->{tgt}"] == pytest.approx(expected)
    from sklearn.metrics import silhouette_samples
    mixed = {s: np.isin(label[s][rows[s]], shared) & finite[s] for s in data}
    x = np.concatenate([emb[s][mixed[s]] for s in data])
    species = np.concatenate([[s] * int(mixed[s].sum()) for s in data])
    types = np.concatenate([label[s][rows[s]][mixed[s]] for s in data])
    asw = np.mean([np.mean(1 - np.abs(silhouette_samples(x[types == t], species[types == t]))) for t in shared])
    assert scores["species_asw"] == pytest.approx(asw, abs=1e-6)


@pytest.mark.parametrize("mode", ["separate", "ortholog"])
def test_model_ortholog_map_sends_named_orthologs_to_one_slot(raw, mode):
    vocab = build_vocabulary(mode)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=16, hidden_size=16,
                                                    num_attention_heads=2, intermediate_size=32, cross_species_weight=0.5))
    model.attach_vocabulary(vocab)
    _, tables = raw
    tok = {name: vocab.gene_to_id[_ids(tables, s, name)[0]] for h, m, _ in MARKERS for s, name in (("human", h), ("mouse", m))}
    for human, mouse, kind in MARKERS:
        h, m = tok[human], tok[mouse]
        if kind == "one2one":  # each side's token goes to the other's; one ortholog class for both
            assert model.ortholog_lookup[h] == m and model.ortholog_lookup[m] == h
            assert model.ortholog_class[h] == model.ortholog_class[m] >= 0
        else:  # one-to-many: no 1:1 ortholog, dropped from the projection, no class
            assert model.ortholog_lookup[h] == model.ortholog_lookup[m] == -1 == model.ortholog_class[h]
    human_token, mouse_token = vocab.species_token_id("human"), vocab.species_token_id("mouse")
    ids = torch.tensor([[human_token, tok["INS"], tok["GCG"], tok["SST"], 0]])
    projected, mask, valid = model.project_to_orthologs(ids, (ids != 0).long())
    assert projected[0, :3].tolist() == [mouse_token, tok["Gcg"], tok["Sst"]] and mask[0].tolist() == [1, 1, 1, 0, 0]
    assert valid.tolist() == [True]
    paired = int((model.ortholog_class >= 0).sum())
    assert paired == (16_289 if mode == "ortholog" else 2 * 16_286)  # separate: both genes protein-coding
