"""Cell-type classification: labels (RELIABILITY 11), splits, metrics, outputs, methods, transfer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import accuracy_score, classification_report, precision_recall_fscore_support

from mixgeneformer import classify as C
from mixgeneformer.classify.recipe import PadCollator
from mixgeneformer.errors import ConfigError, InputDataError, TrainingDivergedError


def labelled_counts(
    sizes: dict[str, int], n_genes: int = 60, seed: int = 0, genes: list[str] | None = None, signal: float = 6.0
) -> ad.AnnData:
    """Poisson counts where each class raises its own block of marker genes."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[name] * n for name, n in sizes.items()])
    rng.shuffle(labels)
    rates = np.full((len(labels), n_genes), 1.0)
    for k, name in enumerate(sizes):
        block = slice((5 * k) % n_genes, (5 * k) % n_genes + 5)
        rates[labels == name, block] += signal
    counts = rng.poisson(rates).astype(np.int32)
    var = pd.DataFrame(index=genes or [f"g{i}" for i in range(n_genes)])
    obs = pd.DataFrame({"cell_type1": labels}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


# ---------------------------------------------------------------- labels (RELIABILITY 11)


def test_missing_label_column_lists_obs_columns():
    adata = labelled_counts({"a": 10, "b": 10})
    with pytest.raises(InputDataError, match=r"'celltype' not found.*cell_type1"):
        C.prepare_labels(adata, "celltype")


def test_nan_labels_are_dropped_and_counted():
    adata = labelled_counts({"a": 20, "b": 20})
    obs = adata.obs.copy()
    obs.loc[obs.index[:3], "cell_type1"] = np.nan
    selection = C.prepare_labels(obs, "cell_type1", min_class_fraction=0)
    assert selection.n_missing == 3
    assert len(selection.rows) == 37
    assert not np.isin(np.arange(3), selection.rows).any()
    assert "3 with missing labels" in selection.summary()


def test_one_class_is_an_error():
    adata = labelled_counts({"a": 20})
    with pytest.raises(InputDataError, match="1 class"):
        C.prepare_labels(adata, "cell_type1")
    # Two classes, but one is rare: after dropping it only one remains.
    adata = labelled_counts({"a": 300, "b": 1})
    with pytest.raises(InputDataError, match="two or more"):
        C.prepare_labels(adata, "cell_type1")


def test_all_labels_missing_is_an_error():
    adata = labelled_counts({"a": 5, "b": 5})
    adata.obs["cell_type1"] = np.nan
    with pytest.raises(InputDataError, match="no labels"):
        C.prepare_labels(adata, "cell_type1")


def test_rare_classes_dropped_by_fraction_and_count():
    adata = labelled_counts({"a": 500, "b": 400, "c": 4, "d": 6})
    selection = C.prepare_labels(adata, "cell_type1", min_class_fraction=0.005)  # threshold 4.55 cells
    assert selection.classes == ["a", "b", "d"]
    assert selection.dropped_classes == {"c": 4}
    selection = C.prepare_labels(adata, "cell_type1", min_class_fraction=0, min_class_count=10)
    assert selection.dropped_classes == {"c": 4, "d": 6}
    assert set(selection.labels) == {"a", "b"}
    assert np.all(np.diff(selection.rows) > 0), "rows stay in obs order"


def test_unseen_test_labels_error_or_drop():
    with pytest.raises(InputDataError, match=r"never seen in training: \{'z': 2\}"):
        C.check_unseen_labels(["a", "b"], ["a", "z", "b", "z"], policy="error")
    mask = C.check_unseen_labels(["a", "b"], ["a", "z", "b", "z"], policy="drop")
    assert mask.tolist() == [True, False, True, False]


def test_transfer_task_applies_unseen_policy():
    source = labelled_counts({"alpha": 30, "beta": 30, "gamma": 30}, seed=1)
    target = labelled_counts({"alpha": 30, "beta": 30, "acinar": 30}, seed=2)
    with pytest.raises(InputDataError, match="acinar"):
        C.transfer_task(source, target, C.LabelConfig(unseen_test_labels="error"))
    task = C.transfer_task(source, target, C.LabelConfig(unseen_test_labels="drop"))
    assert set(task.test_labels) == {"alpha", "beta"} and set(task.train_labels) == {"alpha", "beta"}


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="test_size"):
        C.LabelConfig(test_size=1.5)
    with pytest.raises(ConfigError, match="freeze_layers"):
        C.FinetuneConfig(freeze_layers=-1)


# ---------------------------------------------------------------- splits


def test_split_is_stratified_and_deterministic():
    labels = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20, dtype=object)
    train, test = C.stratified_split(labels, 0.2, seed=42)
    again = C.stratified_split(labels, 0.2, seed=42)
    other = C.stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, other[1])
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == labels.size
    counts = pd.Series(labels[test]).value_counts().to_dict()
    assert counts == {"a": 10, "b": 6, "c": 4}


def test_split_puts_every_class_on_both_sides():
    # At 20%, sklearn's stratified split rounds a 2-cell class wholly into training for some seeds
    # (Baron human 'schwann'): that class was then trained but never tested, silently.
    labels = np.array(["a"] * 577 + ["b"] * 623 + ["c"] * 2 + ["d"] * 3, dtype=object)
    for seed in range(20):
        train, test = C.stratified_split(labels, 0.2, seed=seed)
        assert set(labels[train]) == set(labels[test]) == {"a", "b", "c", "d"}, seed
        assert np.intersect1d(train, test).size == 0 and train.size + test.size == labels.size
        assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))


def test_macro_scores_average_over_the_test_cells_classes():
    metrics = C.classification_metrics(["a", "a", "b", "b"], ["a", "x", "b", "b"])  # 'x': a class no test cell holds
    assert metrics["macro_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)  # not averaged with an F1 of 0 for 'x'
    assert C.canonical_label("PP", {"pp": "Gamma"}) == C.canonical_label("gamma")  # a synonym's target is normalised too


def test_split_refuses_singleton_classes():
    with pytest.raises(InputDataError, match="fewer than 2"):
        C.stratified_split(np.array(["a"] * 10 + ["b"], dtype=object))


def test_within_task_uses_obs_positions():
    adata = labelled_counts({"a": 40, "b": 40, "c": 20})
    adata.obs.loc[adata.obs.index[5], "cell_type1"] = np.nan
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    assert 5 not in task.train_rows and 5 not in task.test_rows
    obs_labels = adata.obs["cell_type1"].to_numpy()
    assert np.array_equal(obs_labels[task.test_rows], task.test_labels)
    assert np.array_equal(obs_labels[task.train_rows], task.train_labels)
    assert task.test_rows.size == 20


# ---------------------------------------------------------------- metrics and outputs


def test_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    y_true = rng.choice(["a", "b", "c", "d"], size=200).astype(object)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.choice(["a", "b", "c", "e"], size=200)).astype(object)
    metrics = C.classification_metrics(y_true, y_pred)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=["a", "b", "c", "d"], average="macro", zero_division=0)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["macro_precision"] == pytest.approx(p)
    assert metrics["macro_recall"] == pytest.approx(r)
    assert metrics["macro_f1"] == pytest.approx(f)
    report = C.per_class_report(y_true, y_pred)
    reference = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for name in ["a", "b", "c", "d", "e"]:
        assert report.loc[name, "precision"] == pytest.approx(reference[name]["precision"])
        assert report.loc[name, "recall"] == pytest.approx(reference[name]["recall"])
        assert report.loc[name, "support"] == reference[name]["support"]


def test_predictions_written_to_obs_in_order():
    adata = labelled_counts({"a": 30, "b": 30})
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    classes = ["a", "b"]
    # A deliberately wrong but known prediction: flip every label.
    flipped = np.where(task.test_labels == "a", "b", "a").astype(object)
    proba = np.where(flipped[:, None] == np.array(classes)[None, :], 0.9, 0.1)
    result = C.evaluate(task, C.Prediction(flipped, proba, classes), "flip")
    assert result.metrics["accuracy"] == 0.0
    before = adata.obs.copy()
    C.write_predictions(adata, result, key="t")
    pred = adata.obs["t_pred"]
    assert pred.iloc[task.test_rows].astype(str).tolist() == flipped.tolist()
    assert pred.iloc[task.train_rows].isna().all()
    assert np.allclose(adata.obs["t_prob"].to_numpy()[task.test_rows], 0.9)
    assert adata.obs["t_prob"].iloc[task.train_rows].isna().all()
    pd.testing.assert_frame_equal(adata.obs[before.columns], before)
    with pytest.raises(InputDataError, match="overwrite=True"):
        C.write_predictions(adata, result, key="t")
    C.write_predictions(adata, result, key="t", overwrite=True)


def test_benchmark_table_columns():
    adata = labelled_counts({"a": 30, "b": 30})
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    result = C.evaluate(task, C.Prediction(task.test_labels.copy(), None, ["a", "b"]), "oracle")
    table = C.benchmark_table([result])
    assert list(table.columns) == ["setting", "method", "accuracy", "macro_precision", "macro_recall", "macro_f1"]
    assert table.loc[0, "accuracy"] == 1.0 and table.loc[0, "macro_f1"] == 1.0


# ---------------------------------------------------------------- zero-shot and baselines


def test_knn_and_logreg_on_separable_features():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 4
    y = np.repeat(np.array(["x", "y", "z"], dtype=object), 40)
    x = centers[np.repeat(np.arange(3), 40)] + rng.normal(size=(120, 16))
    order = rng.permutation(120)
    train, test = order[:90], order[90:]
    for pred in (C.knn_predict(x[train], y[train], x[test]), C.logreg_predict(x[train], y[train], x[test])):
        assert accuracy_score(y[test], pred.labels) > 0.95
        assert pred.probabilities.shape == (30, 3)
        assert np.allclose(pred.probabilities.sum(axis=1), 1.0)


def test_log_normalize_matches_definition():
    counts = sp.csr_matrix(np.array([[1, 0, 3], [0, 0, 0], [2, 2, 0]], dtype=np.int32))
    out = C.log_normalize(counts).toarray()
    expected = np.log1p(np.array([[2500, 0, 7500], [0, 0, 0], [5000, 5000, 0]], dtype=np.float64))
    assert np.allclose(out, expected, rtol=1e-5)


def test_baselines_run_and_beat_chance():
    adata = labelled_counts({"a": 60, "b": 60, "c": 60}, n_genes=80)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    results = C.baselines(task)
    assert [r.method for r in results] == ["logreg_counts", "knn_pca"]
    for result in results:
        assert result.metrics["accuracy"] > 0.9


# ---------------------------------------------------------------- cross-species label matching


def test_label_matching_rules():
    assert C.canonical_label("T cells") == "t_cell"
    assert C.canonical_label("T_cell") == "t_cell"
    assert C.canonical_label("t_cell") == "t_cell"
    assert C.canonical_label("PP") == "gamma"
    assert C.canonical_label("Activated-Stellate") == "activated_stellate"
    assert C.canonical_label("Mystery", {"mystery": "beta"}) == "beta"
    match = C.match_labels(["alpha", "beta", "t_cell", "acinar"], ["Alpha", "beta", "T_cell", "B_cell", "B_cell"])
    assert match.shared == ["alpha", "beta", "t_cell"]
    assert match.source_only == {"acinar": 1}
    assert match.target_only == {"b_cell": 2}
    with pytest.raises(InputDataError, match="share 0 class"):
        C.match_labels(["a", "b"], ["c", "d"])


def test_transfer_task_on_shared_labels_and_given_rows():
    source = labelled_counts({"alpha": 40, "beta": 40, "acinar": 40}, seed=1)
    target = labelled_counts({"Alpha": 40, "BETA": 40, "B_cell": 40}, seed=2)
    task = C.transfer_task(source, target, C.LabelConfig(unseen_test_labels="drop"))
    assert task.classes == ["alpha", "beta"]
    assert set(task.test_labels) == {"alpha", "beta"} and task.test_rows.size == 80
    assert any("acinar" in note for note in task.notes) and any("b_cell" in note for note in task.notes)
    subset = np.arange(0, 120, 2)
    task = C.transfer_task(source, target, C.LabelConfig(unseen_test_labels="drop"), target_rows=subset)
    assert np.isin(task.test_rows, subset).all()


# ---------------------------------------------------------------- models: zero-shot and fine-tuning


def token_task(n_per_class: int = 40, n_classes: int = 3, seed: int = 0):
    """A task over synthetic rank-value-encoded cells: each class puts its own genes first."""
    import datasets

    from mixgeneformer.vocab import Vocabulary

    genes = [f"ENSG{i:011d}" for i in range(1, 41)]
    tokens = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>", *genes]
    vocab = Vocabulary(tokens, {g: 6 + i for i, g in enumerate(genes)})
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array([f"type{k}" for k in range(n_classes)], dtype=object), n_per_class)
    rng.shuffle(labels)
    cells = []
    for label in labels:
        k = int(label[-1])
        marker = 6 + 8 * k + rng.permutation(8)[:6]
        background = 6 + 24 + rng.permutation(16)[: rng.integers(4, 12)]
        cells.append(np.concatenate([[vocab.cls_id], marker, background]).astype(np.int32))
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [c.tolist() for c in cells], "length": [len(c) for c in cells]}
    )
    obs = pd.DataFrame({"cell_type1": labels}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(X=sp.csr_matrix((len(labels), 1), dtype=np.float32), obs=obs)
    tokens_ = C.TokenizedCells(dataset=dataset, rows=np.arange(len(labels)))
    return adata, vocab, tokens_


def tiny_model(vocab, seed: int = 0):
    import torch

    from mixgeneformer.model import MixGeneformerForPretraining, make_config

    torch.manual_seed(seed)
    config = make_config("tiny", vocab, max_position_embeddings=64, hidden_size=32, intermediate_size=64)
    return MixGeneformerForPretraining(config).eval()


def test_zero_shot_on_frozen_embeddings():
    adata, vocab, tokens = token_task()
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    results = C.zero_shot(task, tiny_model(vocab), vocab, None, tokens=(tokens, tokens), device="cpu")
    assert [r.method for r in results] == ["knn", "logreg"]
    for result in results:
        assert result.y_pred.shape == task.test_labels.shape
        # Even an untrained encoder's mean-pooled embeddings keep which genes a cell has.
        assert result.metrics["accuracy"] > 0.6


def test_token_bag_holds_each_cells_genes_without_special_tokens():
    adata, vocab, tokens = token_task(n_per_class=5)
    rows = np.array([7, 2, 11])
    bag = C.token_bag(tokens, rows, len(vocab.tokens), vocab.special_ids)
    assert bag.shape == (3, len(vocab.tokens))
    for i, row in enumerate(rows):
        expected = set(tokens.dataset[int(row)]["input_ids"]) - {vocab.cls_id}
        assert set(bag[i].indices) == expected
        assert (bag[i].data == 1).all()


def test_token_baseline_reads_only_the_tokens():
    """The input bound sees the tokens and nothing else: with each class's marker genes cut from the
    tokens, it falls to chance although the same cells' labels are unchanged."""
    import datasets

    adata, vocab, tokens = token_task(n_per_class=40)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    full = C.token_baseline(task, (tokens, tokens), len(vocab.tokens), vocab.special_ids)
    assert full.method == "logreg_tokens"
    assert full.metrics["accuracy"] > 0.95, full.metrics
    cut = [[t for t in ids if t == vocab.cls_id or t >= 6 + 24] for ids in tokens.dataset["input_ids"]]
    background = C.TokenizedCells(datasets.Dataset.from_dict({"input_ids": cut}), tokens.rows)
    blind = C.token_baseline(task, (background, background), len(vocab.tokens), vocab.special_ids)
    assert blind.metrics["accuracy"] < 0.6, blind.metrics  # chance is 1/3


def test_token_baseline_needs_a_model():
    adata = labelled_counts({"a": 20, "b": 20})
    with pytest.raises(ConfigError, match="logreg_tokens.*needs a model"):
        C.run_classification(adata, methods=(), baseline_methods=("logreg_tokens",))


def test_finetune_improves_over_chance_and_round_trips(tmp_path):
    import torch

    adata, vocab, tokens = token_task(n_per_class=40)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = C.ClassifyConfig(
        finetune=C.FinetuneConfig(learning_rate=3e-3, batch_size=12, epochs=4, device="cpu", logging_steps=5)
    )
    model = tiny_model(vocab)
    encoder_before = {k: v.clone() for k, v in model.bert.state_dict().items()}
    result, fitted = C.finetune(task, model, vocab, None, config, tokens=(tokens, tokens))
    assert result.metrics["accuracy"] > 0.7, result.metrics  # chance is 1/3
    losses = [entry["loss"] for entry in fitted.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    # The pretrained model itself is left untouched (the classifier holds a copy of the encoder).
    for key, value in model.bert.state_dict().items():
        assert torch.equal(value, encoder_before[key])
    out = fitted.save(tmp_path / "clf")
    assert (out / "model.safetensors").exists() and (out / "mixgf.json").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    assert (out / "config.yaml").exists()
    loaded = C.load_classifier(out)
    assert loaded.classes == fitted.classes
    again = loaded.predict(tokens.select(task.test_rows), device="cpu")
    assert np.array_equal(again.labels, result.y_pred)
    assert np.allclose(again.probabilities, result.probabilities, atol=1e-5)


def test_classifier_folders_are_bundles_and_each_loader_refuses_the_other_kind(tmp_path):
    import shutil

    from mixgeneformer.bundle import load_bundle, save_bundle
    from mixgeneformer.errors import ArtifactError

    adata, vocab, tokens = token_task(n_per_class=10)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = C.ClassifyConfig(finetune=C.FinetuneConfig(epochs=1, batch_size=12, device="cpu"))
    _, fitted = C.finetune(task, tiny_model(vocab), vocab, None, config, tokens=(tokens, tokens))
    classifier = fitted.save(tmp_path / "clf")
    pretrained = save_bundle(tiny_model(vocab), tmp_path / "pretrained", vocab)
    with pytest.raises(ArtifactError, match="fine-tuned classifier, not a pretrained model"):
        load_bundle(classifier)
    with pytest.raises(ArtifactError, match="pretrained model, not a fine-tuned classifier"):
        C.load_classifier(pretrained)
    # A folder in the earlier layout (weights under model/, no marker) still loads.
    old = tmp_path / "old"
    (old / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(classifier / name, old / "model" / name)
    for name in ("vocab.json", "config.yaml", "training_log.json"):
        shutil.copy(classifier / name, old / name)
    cells = tokens.select(task.test_rows)
    expected = fitted.predict(cells, device="cpu").probabilities
    assert np.allclose(C.load_classifier(old).predict(cells, device="cpu").probabilities, expected, atol=1e-6)


def test_freezing_layers():
    adata, vocab, tokens = token_task(n_per_class=10)
    model = tiny_model(vocab)
    clf = C.build_classifier(model, ["a", "b"], vocab, C.FinetuneConfig(freeze_layers=1))
    assert not any(p.requires_grad for p in clf.bert.embeddings.parameters())
    assert not any(p.requires_grad for p in clf.bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in clf.bert.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in clf.classifier.parameters())
    head_only = C.build_classifier(model, ["a", "b"], vocab, C.FinetuneConfig(train_encoder=False))
    assert not any(p.requires_grad for p in head_only.bert.parameters())
    with pytest.raises(ConfigError, match="freeze_layers=5"):
        C.build_classifier(model, ["a", "b"], vocab, C.FinetuneConfig(freeze_layers=5))
    # Pooling equals the embedding protocol: mean over gene tokens of the last layer.
    import torch

    from mixgeneformer.embed import embed_corpus

    batch = PadCollator(vocab.pad_id)([{"input_ids": x} for x in tokens.dataset["input_ids"][:4]])
    with torch.no_grad():
        hidden = clf.eval().bert(**batch).last_hidden_state
    expected = embed_corpus(model, tokens.dataset.select(range(4)), vocab, layer=-1, progress=False, device="cpu")
    from mixgeneformer.model import pool_cells

    pooled = pool_cells(hidden, batch["input_ids"], batch["attention_mask"], vocab.special_ids).numpy()
    assert np.allclose(pooled, expected, atol=1e-5)


# ---------------------------------------------------------------- real data: end to end, CLI, transfer


def baron_subset(path, per_class: int, classes: list[str], seed: int = 0) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    rng = np.random.default_rng(seed)
    labels = adata.obs["cell_type1"].astype(str).to_numpy()
    rows = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])
    return adata[np.sort(rows)].copy()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, baron_data):
    """A random tiny model bundle with medians and a vocabulary built from the Baron data."""
    import torch

    from mixgeneformer.bundle import save_bundle
    from mixgeneformer.medians import compute_medians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.vocab import build_vocabulary

    human = baron_subset(baron_data / "baron_pancreas_human.h5ad", 30, ["alpha", "beta", "ductal", "acinar"])
    medians = compute_medians([human], species="human")
    vocab = build_vocabulary(gene_set="medians", medians=medians, species=("human",))
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=64, hidden_size=32, intermediate_size=64))
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    save_bundle(model, folder, vocab, medians)
    path = tmp_path_factory.mktemp("data") / "human.h5ad"
    human.write_h5ad(path)
    return folder, path, human


@pytest.mark.realdata
def test_cli_classify_writes_reports(tiny_bundle, tmp_path):
    from mixgeneformer.cli import main

    bundle, path, human = tiny_bundle
    out = tmp_path / "out"
    main(["classify", str(path), "--model", str(bundle), "--out", str(out), "--mode", "zero-shot", "--baselines", "--device", "cpu"])
    table = pd.read_csv(out / "metrics.csv")
    assert table["method"].tolist() == ["knn", "logreg", "logreg_tokens", "logreg_counts", "knn_pca"]
    accuracy = table.set_index("method")["accuracy"]
    # The top 64 genes of these cells still name their type (input bound of the model).
    assert (accuracy[["logreg_counts", "knn_pca", "logreg_tokens"]] > 0.8).all(), table
    # A random tiny encoder over the top 64 genes still beats chance (0.25, four balanced classes).
    assert (accuracy[["knn", "logreg"]] > 0.3).all(), table
    for method in table["method"]:
        assert (out / f"confusion_{method}.png").stat().st_size > 0
        assert (out / f"per_class_{method}.csv").exists()
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    assert list(predictions.obs_names) == list(human.obs_names)
    predicted = predictions.obs["cell_type1_knn_pred"]
    assert predicted.notna().sum() == 24  # 20% of 120 cells
    assert (out / "config.yaml").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(path), "--model", str(bundle), "--out", str(out), "--mode", "knn"])
    assert exit_info.value.code == 2


@pytest.mark.realdata
def test_cli_missing_label_column_exits_2(tiny_bundle, tmp_path, capsys):
    from mixgeneformer.cli import main

    bundle, path, _ = tiny_bundle
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(path), "--model", str(bundle), "--out", str(tmp_path / "o"), "--label", "celltype"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'celltype' not found" in err and "cell_type1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.realdata
def test_cli_classify_max_len_fine_tunes_on_more_genes_and_predict_follows(tiny_bundle, tmp_path, capsys):
    import yaml

    from mixgeneformer.cli import main

    bundle, path, _ = tiny_bundle
    assert not (bundle / "tokenize.yaml").exists()  # the default TokenizeConfig (2,048, capped at the 64 positions)
    out = tmp_path / "out"
    main(["classify", str(path), "--model", str(bundle), "--out", str(out), "--mode", "finetune", "--epochs", "1",
          "--max-len", "48", "--device", "cpu"])
    assert yaml.safe_load((out / "finetuned" / "tokenize.yaml").read_text())["max_len"] == 48
    main(["predict", str(path), "-c", str(out / "finetuned"), "-o", str(tmp_path / "p.h5ad"), "--device", "cpu"])
    assert ad.read_h5ad(tmp_path / "p.h5ad").obs["predicted_pred"].notna().all()
    for args in (["--max-len", "65"], ["--mode", "none", "--baselines", "--max-len", "48"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["classify", str(path), "--model", str(bundle), "--out", str(tmp_path / "bad"), *args])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "exceeds the model's 64 positions" in err and "--mode none runs none" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.realdata
def test_finetune_real_cells_for_a_few_steps(tiny_bundle):
    from mixgeneformer.bundle import load_bundle

    bundle, _, human = tiny_bundle
    model, vocab, medians = load_bundle(bundle)
    config = C.ClassifyConfig(
        labels=C.LabelConfig(min_class_fraction=0),
        finetune=C.FinetuneConfig(learning_rate=2e-3, epochs=6, batch_size=12, device="cpu"),
    )
    run = C.run_classification(human, model, vocab, medians, methods=("finetune",), config=config)
    assert run.results[0].metrics["accuracy"] > 0.5, run.results[0].metrics  # chance 0.25
    diverging = C.ClassifyConfig(labels=config.labels, finetune=C.FinetuneConfig(
        learning_rate=1e30, head_learning_rate=1e30, epochs=2, batch_size=12, device="cpu", logging_steps=1))
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+.*finetune\.learning_rate"):
        C.run_classification(human, model, vocab, medians, methods=("finetune",), config=diverging)


@pytest.mark.realdata
def test_cross_species_transfer_baselines_on_orthologs(baron_data):
    classes_h = ["alpha", "beta", "ductal", "acinar", "t_cell"]
    human = baron_subset(baron_data / "baron_pancreas_human.h5ad", 40, classes_h)
    mouse = baron_subset(baron_data / "baron_pancreas_mouse.h5ad", 40, ["alpha", "beta", "ductal", "T_cell", "B_cell"])
    config = C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0))
    run = C.run_classification(mouse, test=human, methods=(), baseline_methods=("logreg_counts",), config=config)
    task = run.task
    assert task.setting == "mouse->human"
    assert task.classes == ["alpha", "beta", "ductal", "t_cell"]  # T_cell and t_cell match; B_cell, acinar dropped
    assert set(task.test_labels) <= set(task.classes)
    assert any("acinar" in note for note in task.notes) and any("b_cell" in note for note in task.notes)
    assert run.results[0].metrics["accuracy"] > 0.5


# ---------------------------------------------------------------- count baselines read counts as the tokenizer does


def _scanpy_style(adata: ad.AnnData) -> ad.AnnData:
    """Counts kept in .raw and in layers['counts'], X log-normalised (scanpy's usual workflow)."""
    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    out.raw = out
    out.X = C.log_normalize(out.X)
    return out


def test_count_baselines_refuse_normalised_x_and_read_the_layer_given():
    from mixgeneformer.tokenize import TokenizeConfig

    counts = labelled_counts({"a": 40, "b": 40, "c": 40}, seed=3)
    scanpy = _scanpy_style(counts)
    labels = C.LabelConfig(min_class_fraction=0)
    with pytest.raises(InputDataError, match=r"layer='raw'"):
        C.run_classification(scanpy, methods=(), baseline_methods=("logreg_counts",), config=C.ClassifyConfig(labels=labels))
    expected = C.run_classification(counts, methods=(), baseline_methods=("logreg_counts", "knn_pca"),
                                    config=C.ClassifyConfig(labels=labels)).table()
    for layer in ("counts", "raw"):
        got = C.run_classification(scanpy, methods=(), baseline_methods=("logreg_counts", "knn_pca"),
                                   config=C.ClassifyConfig(labels=labels), tokenize_config=TokenizeConfig(layer=layer)).table()
        pd.testing.assert_frame_equal(got, expected)


def test_cli_count_baselines_take_the_layer_from_tokenize_config(tmp_path, capsys):
    from mixgeneformer.cli import main

    counts = labelled_counts({"a": 40, "b": 40}, seed=4)
    path = tmp_path / "scanpy.h5ad"
    _scanpy_style(counts).write_h5ad(path)
    base = ["classify", str(path), "--mode", "none", "--baselines", "--set", "labels.min_class_fraction=0"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "layer='raw'" in capsys.readouterr().err
    (tmp_path / "tok.yaml").write_text("layer: raw\n")
    main([*base, "--tokenize-config", str(tmp_path / "tok.yaml"), "--out", str(tmp_path / "ok")])
    table = pd.read_csv(tmp_path / "ok" / "metrics.csv").set_index("method")
    assert table.loc["logreg_counts", "accuracy"] > 0.9, table
