"""Figures: each function returns a Figure and writes a non-empty image on request."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from mixgeneformer import plots
from mixgeneformer.errors import ConfigError, InputDataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


@pytest.fixture(scope="module")
def clustered():
    """Two species x three well separated cell types in 16 dimensions."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=8, size=(3, 16))
    labels = np.repeat(["alpha", "beta", "delta"], 30)
    embeddings = centres[np.repeat(np.arange(3), 30)] + rng.normal(size=(90, 16))
    species = np.tile(["human", "mouse"], 45)
    return embeddings.astype(np.float32), labels, species


def test_umap_of_an_array_has_label_and_species_panels(clustered, tmp_path):
    embeddings, labels, species = clustered
    out = tmp_path / "umap.png"
    fig = plots.umap(embeddings, color=labels, species=species, n_neighbors=10, save=out)
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["color", "species"]
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["alpha (30)", "beta (30)", "delta (30)"]
    assert _is_png(out)


def test_umap_of_anndata_uses_obsm_and_skips_nan_rows(clustered, tmp_path):
    anndata = pytest.importorskip("anndata")
    embeddings, labels, species = clustered
    embeddings = embeddings.copy()
    embeddings[:4] = np.nan  # cells the tokenizer dropped
    adata = anndata.AnnData(obs=pd.DataFrame({"cell_type1": labels, "organism": species}, index=[f"c{i}" for i in range(90)]))
    adata.obsm["X_mixgeneformer"] = embeddings
    fig = plots.umap(adata, color="cell_type1", n_neighbors=10)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["cell_type1", "organism"]  # organism picked as the species column
    assert "4 cells without embedding" in fig.get_suptitle()
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 86
    with pytest.raises(ConfigError, match="not an obs column"):
        plots.umap(adata, color="missing")
    with pytest.raises(ConfigError, match="obsm"):
        plots.umap(adata, key="X_other")


def test_confusion_matrix_is_row_normalized_and_labelled(tmp_path):
    y_true = ["a"] * 4 + ["b"] * 2 + ["c"] * 3
    y_pred = ["a", "a", "a", "b", "b", "b", "c", "c", "a"]
    out = tmp_path / "cm.png"
    fig = plots.confusion_matrix(y_true, y_pred, save=out)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(shown).sum(axis=1), 1.0)
    np.testing.assert_allclose(shown[0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(shown[2], [1 / 3, 0.0, 2 / 3])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (n=4)", "b (n=2)", "c (n=3)"]
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"
    assert _is_png(out)
    matrix = pd.DataFrame([[3, 1], [0, 2]], index=["x", "y"], columns=["x", "y"])
    fig2 = plots.confusion_matrix(matrix=matrix, normalize=False)
    np.testing.assert_allclose(fig2.axes[0].images[0].get_array(), [[3, 1], [0, 2]])
    with pytest.raises(InputDataError, match="y_pred has"):
        plots.confusion_matrix(["a", "b"], ["a"])


def test_perturbation_ranking_shows_top_genes_by_absolute_shift(tmp_path):
    rng = np.random.default_rng(1)
    results = pd.DataFrame(
        {"gene": [f"G{i}" for i in range(50)], "shift": rng.normal(size=50), "fdr": rng.uniform(size=50)}
    )
    results.loc[7, ["shift", "fdr"]] = [-5.0, 0.001]
    out = tmp_path / "rank.png"
    fig = plots.perturbation_ranking(results, top=10, save=out)
    ax = fig.axes[0]
    assert len(ax.patches) == 10
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names[0] == "G7 *"  # the largest |shift| comes first (drawn at the top)
    expected = set(results.reindex(results["shift"].abs().sort_values(ascending=False).index)["gene"].head(10))
    assert {n.removesuffix(" *") for n in names} == expected
    assert _is_png(out)
    with pytest.raises(ConfigError, match="score"):
        plots.perturbation_ranking(results.rename(columns={"shift": "weird"}))


def test_training_curves_plot_loss_parts_and_learning_rate(tmp_path):
    steps = np.arange(0, 200, 10)
    table = pd.DataFrame(
        {
            "step": steps,
            "loss": np.exp(-steps / 100) + 1,
            "mlm_loss": np.exp(-steps / 100),
            "contrastive_loss": np.where(steps % 20 == 0, 1.0, np.nan),  # logged every other row
            "learning_rate": np.linspace(1e-3, 0, len(steps)),
        }
    )
    csv = tmp_path / "metrics.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "curves.png"
    fig = plots.training_curves(csv, save=out)
    losses, lr = fig.axes[:2]
    assert sorted(line.get_label() for line in losses.get_lines()) == ["contrastive_loss", "loss", "mlm_loss"]
    contrastive = next(line for line in losses.get_lines() if line.get_label() == "contrastive_loss")
    assert len(contrastive.get_xdata()) == 10
    np.testing.assert_allclose(lr.get_lines()[0].get_ydata(), table["learning_rate"])
    assert _is_png(out)
    with pytest.raises(InputDataError, match="loss"):
        plots.training_curves(table[["step", "learning_rate"]])


def test_save_rejects_unknown_formats(tmp_path):
    fig = plots.confusion_matrix(["a"], ["a"])
    with pytest.raises(ConfigError, match="format"):
        plots.save_figure(fig, tmp_path / "x.doc")
    plots.save_figure(fig, tmp_path / "x.pdf")
    assert (tmp_path / "x.pdf").read_bytes().startswith(b"%PDF")
    assert not list(tmp_path.glob(".*tmp*"))


def test_umap_coordinates_keep_clusters_apart_with_the_exact_graph_and_with_umap_only_metrics(clustered):
    """Cosine (scikit-learn's exact neighbour graph) and hellinger (umap-learn's own search) both separate the clusters."""
    embeddings, labels, _ = clustered
    for metric, x in (("cosine", embeddings), ("hellinger", np.abs(embeddings))):
        coords = plots.umap_coordinates(x, n_neighbors=10, metric=metric)
        assert coords.shape == (90, 2) and np.isfinite(coords).all()
        centers = np.stack([coords[labels == t].mean(axis=0) for t in np.unique(labels)])
        spread = max(np.linalg.norm(coords[labels == t] - c, axis=1).mean() for t, c in zip(np.unique(labels), centers, strict=True))
        gaps = [np.linalg.norm(a - b) for i, a in enumerate(centers) for b in centers[i + 1:]]
        assert min(gaps) > spread, metric
