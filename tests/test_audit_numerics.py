"""Reference checks of the embedding and frozen-embedding classification numerics on real cells.

Every expected value is computed independently of the code under test, on ~160 real Baron human
pancreas cells (the demo subset) and a tiny random model saved as a bundle:

* cell / gene embeddings: ``transformers.BertModel.from_pretrained(bundle)`` (eager attention) on each
  cell's tokens alone (no batch, no padding), ``hidden_states[layer]``, pooled with numpy over the
  positions whose token is not a ``<...>`` special token (mean) or position 0 (``<cls>``);
* kNN / logistic regression: scikit-learn run directly on those reference embeddings and the split;
* count baselines: scanpy ``normalize_total`` + ``log1p``, scikit-learn ``StandardScaler`` (clip ±10),
  ``LogisticRegression``, ``PCA``, ``KNeighborsClassifier``; the token baseline from the token lists;
* metrics: scikit-learn's accuracy and macro precision / recall / F1 over the test cells' classes.

Two cells hold counts only on genes outside the vocabulary: the tokenizer drops them, and they must be
NaN rows at their own obs names.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from transformers import BertModel

from mixgeneformer.classify import ClassifyConfig, FinetuneConfig, run_classification, within_task
from mixgeneformer.classify.metrics import classification_metrics, per_class_report

pytestmark = pytest.mark.realdata

CLASSES = ["alpha", "beta", "ductal", "acinar"]
DROPPED = ["c7", "c90"]  # obs names of the cells holding no vocabulary gene


@pytest.fixture(scope="module")
def real(tmp_path_factory, baron_data):
    """Bundle (v2 tokens: <cls> <human> genes <eos>, max_len 40), its cells (h5ad + AnnData) and the
    reference hidden states of every tokenized cell, computed one cell at a time."""
    from mixgeneformer.bundle import TOKENIZE_CONFIG_NAME, save_bundle
    from mixgeneformer.config import save_config
    from mixgeneformer.genes import map_gene_ids
    from mixgeneformer.medians import compute_medians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata
    from mixgeneformer.vocab import build_vocabulary

    full = ad.read_h5ad(baron_data / "baron_pancreas_human.h5ad")
    labels = full.obs["cell_type1"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:40] for c in CLASSES]))
    adata = full[rows].copy()
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    medians = compute_medians([adata], species="human")
    vocab = build_vocabulary(gene_set="medians", medians=medians, species=("human",))
    ensembl = np.asarray(map_gene_ids(list(adata.var_names), species="human").ensembl_ids, dtype=object)
    in_vocab = np.asarray([isinstance(g, str) and g in vocab.gene_to_id for g in ensembl])
    counts = adata.X.toarray()
    for name in DROPPED:
        counts[adata.obs_names.get_loc(name), in_vocab] = 0
    for row in range(0, adata.n_obs, 5):  # every 5th cell keeps 1-40 of its vocabulary genes: cells of many lengths
        expressed = np.flatnonzero((counts[row] > 0) & in_vocab)
        if expressed.size:
            counts[row, rng.permutation(expressed)[rng.integers(1, 41):]] = 0
    adata.X = sp.csr_matrix(counts)
    assert all(counts[adata.obs_names.get_loc(n)].sum() > 0 for n in DROPPED)  # counts, none in the vocabulary

    config = TokenizeConfig(max_len=40, style="v2", add_species_token=True)
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, num_hidden_layers=3, hidden_size=32,
                                                    intermediate_size=64, max_position_embeddings=64))
    root = tmp_path_factory.mktemp("audit_numerics")
    folder = save_bundle(model, root / "model", vocab, medians,
                         extra_files=lambda tmp: save_config(config, tmp, TOKENIZE_CONFIG_NAME))
    path = root / "cells.h5ad"
    adata.write_h5ad(path)

    corpus = tokenize_anndata(adata, vocab, medians, config)
    tokens = [np.asarray(t, dtype=np.int64) for t in corpus["input_ids"]]
    obs_rows = np.asarray(corpus["cell_index"])
    reference = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        states = [torch.stack(reference(input_ids=torch.from_numpy(t)[None], output_hidden_states=True).hidden_states)[:, 0]
                  .numpy() for t in tokens]
    special = np.asarray([tok.startswith("<") for tok in vocab.tokens])
    return {"folder": folder, "path": path, "adata": adata, "vocab": vocab, "medians": medians, "config": config,
            "tokens": tokens, "obs_rows": obs_rows, "states": states, "special": special, "root": root}


def _reference_cells(real, layer: int, pooling: str) -> np.ndarray:
    """(n_obs, hidden) reference embeddings in obs order, NaN rows for the cells not tokenized."""
    out = np.full((real["adata"].n_obs, real["states"][0].shape[-1]), np.nan, dtype=np.float32)
    for row, tokens, states in zip(real["obs_rows"], real["tokens"], real["states"], strict=True):
        genes = ~real["special"][tokens]
        out[row] = states[layer][0] if pooling == "cls" else states[layer][genes].mean(axis=0)
    return out


def _assert_embeddings(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(got).all(axis=1), np.isnan(want).all(axis=1))
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)  # NaN rows compare equal


def test_the_reference_cells_hold_special_tokens_and_two_cells_are_dropped(real):
    """The premise of every test here: cells read <cls> <human> genes <eos> (so mean pooling must
    leave three special tokens out), and the two cells without a vocabulary gene are not tokenized."""
    vocab = real["vocab"]
    starts = {(vocab.tokens[t[0]], vocab.tokens[t[1]], vocab.tokens[t[-1]]) for t in real["tokens"]}
    assert starts == {("<cls>", "<human>", "<eos>")}
    assert all(real["special"][t].sum() == 3 for t in real["tokens"])
    lengths = np.asarray([t.size for t in real["tokens"]])
    assert lengths.max() == 40 and lengths.min() <= 10 and np.unique(lengths).size > 15  # padded batches
    dropped = np.setdiff1d(np.arange(real["adata"].n_obs), real["obs_rows"])
    assert list(real["adata"].obs_names[dropped]) == DROPPED


@pytest.mark.parametrize("layer", [-2, -1, 0, 1, 3, -4])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_cell_embeddings_equal_each_cell_alone_through_transformers(real, layer, pooling):
    """hidden_states[layer] of a plain BertModel forward pass of each cell alone; mean over the gene
    positions (<cls>, <human>, <eos> left out) or the <cls> state; padded batches of 7 cells."""
    from mixgeneformer.embed import embed_anndata

    adata = real["adata"].copy()
    with pytest.warns(UserWarning, match="2 of 160 cells were dropped"):
        embed_anndata(adata, real["folder"], layer=layer, pooling=pooling, batch_size=7, progress=False, device="cpu")
    got = adata.obsm["X_mixgeneformer"]
    _assert_embeddings(got, _reference_cells(real, layer, pooling))
    assert list(adata.obs_names[np.isnan(got).all(axis=1)]) == DROPPED
    assert adata.uns["X_mixgeneformer_params"]["n_dropped"] == 2


def test_embeddings_do_not_depend_on_batch_order_or_input_form(real, tmp_path):
    """h5ad path, backed AnnData, shuffled in-memory AnnData and a corpus folder, at batch sizes 1 to
    all cells, give the reference embedding of each cell (default layer -2, mean pooling)."""
    from mixgeneformer.embed import embed_anndata, embed_file
    from mixgeneformer.tokenize import tokenize_files

    want = _reference_cells(real, -2, "mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dropped-cells warning, checked above
        from_path, _ = embed_file(real["path"], real["folder"], batch_size=1, progress=False, device="cpu")
        backed = ad.read_h5ad(real["path"], backed="r")
        embed_anndata(backed, real["folder"], batch_size=200, progress=False, device="cpu")
        order = np.random.default_rng(3).permutation(real["adata"].n_obs)
        shuffled = real["adata"][order].copy()
        embed_anndata(shuffled, real["folder"], batch_size=16, progress=False, device="cpu")
    _assert_embeddings(from_path.obsm["X_mixgeneformer"], want)
    assert list(from_path.obs_names) == list(real["adata"].obs_names)
    _assert_embeddings(backed.obsm["X_mixgeneformer"], want)
    _assert_embeddings(shuffled.obsm["X_mixgeneformer"], want[order])

    corpus = tokenize_files([real["path"]], tmp_path / "corpus", real["vocab"], real["medians"], real["config"])
    from_corpus, _ = embed_file(corpus, real["folder"], batch_size=5, progress=False, device="cpu")
    rows = from_corpus.obs["cell_index"].to_numpy()
    np.testing.assert_array_equal(rows, real["obs_rows"])
    np.testing.assert_allclose(from_corpus.obsm["X_mixgeneformer"], want[rows], rtol=0, atol=3e-5)


def test_gene_embeddings_are_per_gene_means_over_the_cells_holding_the_gene(real):
    """uns[key_genes]: each gene's mean state (layer -2) over the cells whose tokens hold it;
    n_cells counts those cells (at most the cells expressing it)."""
    from mixgeneformer.embed import embed_file

    sums: dict[int, np.ndarray] = {}
    cells: dict[int, int] = {}
    for tokens, states in zip(real["tokens"], real["states"], strict=True):
        for position in np.flatnonzero(~real["special"][tokens]):
            token = int(tokens[position])
            sums[token] = sums.get(token, 0) + states[-2][position].astype(np.float64)
            cells[token] = cells.get(token, 0) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, table = embed_file(real["path"], real["folder"], gene_embeddings=True, batch_size=9, progress=False,
                              device="cpu")
    ids = sorted(sums)
    vocab = real["vocab"]
    assert list(table.index) == [vocab.tokens[t] for t in ids]
    np.testing.assert_array_equal(table["n_cells"].to_numpy(), [cells[t] for t in ids])
    means = np.stack([sums[t] / cells[t] for t in ids])
    np.testing.assert_allclose(table.drop(columns="n_cells").to_numpy(), means, rtol=0, atol=3e-5)
    assert int(table["n_cells"].max()) <= real["obs_rows"].size


def _split(real):
    """The task's split as run_classification makes it: stratified 80/20 (seed 42), cells the
    tokenizer dropped left out."""
    task = within_task(real["adata"])
    keep_train = np.isin(task.train_rows, real["obs_rows"])
    keep_test = np.isin(task.test_rows, real["obs_rows"])
    assert (~keep_train).sum() + (~keep_test).sum() == 2
    return (task.train_rows[keep_train], task.train_labels[keep_train],
            task.test_rows[keep_test], task.test_labels[keep_test])


def test_knn_logreg_and_baselines_equal_sklearn_and_scanpy_on_the_same_split(real):
    """run_classification's kNN (k=5, cosine) and logistic regression (standardised on the training
    cells, C=1, lbfgs) on the frozen embeddings, and its count / token baselines, equal the recipes
    run by hand on the same split; every metric equals sklearn's on the predictions."""
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    run = run_classification(real["adata"], real["folder"], methods=("knn", "logreg"), device="cpu",
                             baseline_methods=("logreg_tokens", "logreg_counts", "knn_pca"))
    train_rows, train_y, test_rows, test_y = _split(real)
    np.testing.assert_array_equal(run.task.train_rows, train_rows)
    np.testing.assert_array_equal(run.task.test_rows, test_rows)
    emb = _reference_cells(real, -2, "mean")

    def logreg(train_x, test_x, clip=np.inf):
        """StandardScaler on the training cells, values clipped at ±clip, L2 LogisticRegression."""
        scaler = StandardScaler().fit(train_x)
        fitted = LogisticRegression(C=1.0, max_iter=1000, random_state=0)
        fitted.fit(np.clip(scaler.transform(train_x), -clip, clip), train_y)
        test_z = np.clip(scaler.transform(test_x), -clip, clip)
        return fitted.predict(test_z), fitted.predict_proba(test_z)

    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(emb[train_rows], train_y)
    want = {"knn": (knn.predict(emb[test_rows]), knn.predict_proba(emb[test_rows])),
            "logreg": logreg(emb[train_rows], emb[test_rows])}

    # counts: scanpy's normalize_total(1e4) + log1p, genes expressed in a training cell, z-scored on them, clip ±10
    normalized = ad.AnnData(X=real["adata"].X.astype(np.float64))
    sc.pp.normalize_total(normalized, target_sum=1e4)
    sc.pp.log1p(normalized)
    logs = normalized.X.toarray()
    expressed = (logs[train_rows] > 0).any(axis=0)
    train_log, test_log = logs[train_rows][:, expressed], logs[test_rows][:, expressed]
    want["logreg_counts"] = logreg(train_log, test_log, clip=10)
    scaler = StandardScaler().fit(train_log)
    pca = PCA(n_components=50, svd_solver="randomized", random_state=0).fit(np.clip(scaler.transform(train_log), -10, 10))
    train_pcs, test_pcs = (pca.transform(np.clip(scaler.transform(x), -10, 10)) for x in (train_log, test_log))
    knn_pca = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(train_pcs, train_y)
    want["knn_pca"] = (knn_pca.predict(test_pcs), knn_pca.predict_proba(test_pcs))

    # tokens: which genes are among each cell's tokens (special tokens out), genes seen in training
    bag = np.zeros((real["adata"].n_obs, len(real["vocab"])))
    for row, tokens in zip(real["obs_rows"], real["tokens"], strict=True):
        bag[row, tokens[~real["special"][tokens]]] = 1
    seen = bag[train_rows].any(axis=0)
    want["logreg_tokens"] = logreg(bag[train_rows][:, seen], bag[test_rows][:, seen], clip=10)

    results = {r.method: r for r in run.results}
    assert sorted(results) == sorted(want)
    for method, (labels, proba) in want.items():
        result = results[method]
        np.testing.assert_array_equal(result.y_pred, labels, err_msg=method)
        np.testing.assert_allclose(result.probabilities, proba, rtol=0, atol=2e-3, err_msg=method)
        np.testing.assert_array_equal(result.y_true, test_y)
        assert result.metrics == pytest.approx(_sklearn_metrics(test_y, labels), abs=1e-12), method


def _sklearn_metrics(y_true, y_pred) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    labels = np.unique(y_true)  # macro over the test cells' classes (docs/USAGE.md, section 6)
    return {"accuracy": accuracy_score(y_true, y_pred),
            "macro_precision": precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
            "macro_recall": recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
            "macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)}


def test_metrics_equal_sklearn_with_classes_never_predicted_or_never_tested():
    """'d' is tested but never predicted (precision 0, not NaN); 'e' is predicted but never tested
    (costs recall, adds no class to the macro average); the per-class report lists both."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.array(["a", "a", "b", "b", "c", "c", "d"], dtype=object)
    y_pred = np.array(["a", "b", "b", "b", "a", "e", "a"], dtype=object)
    got = classification_metrics(y_true, y_pred)
    assert got == pytest.approx(_sklearn_metrics(y_true, y_pred), abs=1e-12)
    assert got["macro_precision"] == pytest.approx((1 / 3 + 2 / 3 + 0 + 0) / 4)
    assert got["macro_recall"] == pytest.approx((1 / 2 + 1 + 0 + 0) / 4)
    report = per_class_report(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=["a", "b", "c", "d", "e"], zero_division=0)
    assert list(report.index) == ["a", "b", "c", "d", "e"]
    np.testing.assert_allclose(report[["precision", "recall", "f1"]].to_numpy(), np.stack([precision, recall, f1], 1))
    np.testing.assert_array_equal(report["support"], support)


def test_predict_gives_reference_probabilities_and_nan_rows_at_the_dropped_cells(real, tmp_path):
    """A saved classifier (mean pooling, head untrained) predicts softmax(head(mean of the last
    layer over gene tokens)) of each cell alone; the dropped cells get NaN rows, no label, NaN prob."""
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.classify import FittedClassifier, build_classifier
    from mixgeneformer.classify.predict import predict_file

    model, vocab, medians = load_bundle(real["folder"])
    classifier = build_classifier(model, CLASSES, vocab, FinetuneConfig(pooling="mean"), seed=0)
    FittedClassifier(classifier, CLASSES, vocab, medians, ClassifyConfig(), [],
                     tokenize_config=real["config"]).save(tmp_path / "classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = predict_file(real["path"], tmp_path / "classifier", tmp_path / "out.h5ad", batch_size=6, device="cpu")
    head = classifier.classifier.eval()
    with torch.no_grad():
        logits = head(torch.from_numpy(_reference_cells(real, -1, "mean")))
    want = torch.softmax(logits, dim=-1).numpy()
    got = out.obsm["predicted_probabilities"]
    assert list(out.obs_names) == list(real["adata"].obs_names)
    _assert_embeddings(got, want)
    missing = out.obs["predicted_pred"].isna().to_numpy()
    assert list(out.obs_names[missing]) == DROPPED
    assert list(out.obs_names[np.isnan(out.obs["predicted_prob"].to_numpy())]) == DROPPED
    done = ~missing
    np.testing.assert_array_equal(out.obs["predicted_pred"].to_numpy()[done].astype(str),
                                  np.asarray(CLASSES)[want[done].argmax(axis=1)])
    assert out.uns["predicted_params"]["n_dropped"] == 2
