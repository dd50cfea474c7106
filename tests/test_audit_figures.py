"""Figures read back from their artists and checked against an independent computation: each
confusion cell under its true / predicted class, each UMAP point in its own label's colour, each
ranking bar the value of its gene, each training curve the column its legend names."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from mixgeneformer import plots
from mixgeneformer.errors import InputDataError
from mixgeneformer.metrics_csv import METRICS_FIELDS

matplotlib.use("Agg")

BARON_HUMAN = Path("/work/shared/data/baron_pancreas_human.h5ad")


def _ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


# Confusion matrix ------------------------------------------------------------------------------
def test_confusion_matrix_cells_and_annotations_sit_under_their_true_and_predicted_class():
    """Rows true, columns predicted; a class only predicted ("z") and one only true ("c") are drawn."""
    y_true = ["b", "b", "b", "a", "c", "a"]
    y_pred = ["b", "a", "z", "a", "a", "a"]
    ax = plots.confusion_matrix(y_true, y_pred, normalize=False).axes[0]
    classes = ["a", "b", "c", "z"]
    expected = np.zeros((4, 4))
    for t, p in zip(y_true, y_pred, strict=True):
        expected[classes.index(t), classes.index(p)] += 1
    np.testing.assert_array_equal(ax.images[0].get_array(), expected)
    assert _ticks(ax.get_xticklabels()) == classes
    assert _ticks(ax.get_yticklabels()) == ["a (n=2)", "b (n=3)", "c (n=1)", "z (n=0)"]
    drawn = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert drawn == {(i, j): str(int(expected[i, j])) for i, j in zip(*np.nonzero(expected), strict=True)}
    shown = plots.confusion_matrix(y_true, y_pred).axes[0].images[0].get_array()
    np.testing.assert_allclose(shown[1], [1 / 3, 1 / 3, 0, 1 / 3])  # per true class
    assert plots.confusion_matrix(["a"], ["a"]).axes[0].images[0].get_array().tolist() == [[1.0]]  # one class


def test_confusion_matrix_compares_numeric_labels_as_numbers_in_numeric_order():
    """An int label column against float predictions (or a float column holding NaN) was drawn as
    two classes per label ("1" and "1.0"), every cell off the diagonal; "10" sorted before "2"."""
    y_true = np.array([1, 2, 10, 2])
    y_pred = np.array([1.0, 2.0, 10.0, np.nan])  # the NaN cell has no prediction: left out
    ax = plots.confusion_matrix(y_true, y_pred, normalize=False).axes[0]
    assert _ticks(ax.get_xticklabels()) == ["1", "2", "10"]
    np.testing.assert_array_equal(ax.images[0].get_array(), np.diag([1.0, 1.0, 1.0]))
    ax = plots.confusion_matrix(y_true, [1, 2, 10, 2], labels=[10.0, 2, 1], normalize=False).axes[0]
    assert _ticks(ax.get_xticklabels()) == ["10", "2", "1"]
    np.testing.assert_array_equal(ax.images[0].get_array(), np.diag([1.0, 2.0, 1.0]))


def test_confusion_matrix_refuses_labels_that_leave_a_class_out_and_bad_count_matrices():
    """labels= without "c" dropped c's cells from the figure and its row totals without a word; a
    NaN count was a matplotlib ValueError, a negative one was drawn."""
    with pytest.raises(InputDataError, match=r"missing: \['c'\]"):
        plots.confusion_matrix(["a", "b", "c"], ["a", "c", "c"], labels=["a", "b"])
    with pytest.raises(InputDataError, match="once"):
        plots.confusion_matrix(["a", "b"], ["a", "b"], labels=["a", "a", "b"])
    ax = plots.confusion_matrix(["a"], ["a"], labels=["b", "a"], normalize=False).axes[0]  # extra classes allowed
    assert _ticks(ax.get_xticklabels()) == ["b", "a"] and ax.images[0].get_array().tolist() == [[0, 0], [0, 1]]
    for bad in ([[1, np.nan], [0, 1]], [[1, -1], [0, 1]]):
        with pytest.raises(InputDataError, match="counts"):
            plots.confusion_matrix(matrix=np.asarray(bad, dtype=float))


# UMAP (layout replaced by the embedding's first two dimensions: each point's place is known) ---
@pytest.fixture
def identity_layout(monkeypatch):
    # patched where plots.umap looks it up (plots/embedding.py); plots.umap_coordinates is only a re-export
    monkeypatch.setattr(plots.embedding, "umap_coordinates", lambda x, *a, **k: np.asarray(x[:, :2], np.float32))


def _panel(ax) -> dict[str, tuple[np.ndarray, tuple]]:
    """legend text -> (x of its points, colour), checking the legend swatch is the points' colour."""
    handles, texts = ax.get_legend().legend_handles, _ticks(ax.get_legend().get_texts())
    out = {}
    for collection, handle, text in zip(ax.collections, handles, texts, strict=True):
        colours = np.unique(collection.get_facecolors(), axis=0)
        assert len(colours) == 1 and np.allclose(colours[0], handle.get_facecolor()[0])
        out[text] = (np.sort(collection.get_offsets()[:, 0]), tuple(colours[0]))
    return out


def test_umap_points_carry_their_own_label_with_nan_rows_and_missing_labels(identity_layout):
    """Cells without an embedding are left out without shifting the others; a cell without a label
    is grey and listed last, and the labelled types keep the colours they have without it (the "NA"
    category used to sort first and take the first palette colour); a type named "_x" has its
    legend entry (matplotlib drops legend labels starting with "_")."""
    n = 14
    embeddings = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    embeddings[[2, 9]] = np.nan
    labels = np.array(["a", "_x", "b", "a", None, "b", "a", "_x", "b", "a", "a", "b", "_x", "a"], dtype=object)
    panel = _panel(plots.umap(embeddings, color=labels).axes[0])
    keep = np.isfinite(embeddings).all(axis=1)
    for name in ("a", "b", "_x"):
        chosen = keep & (labels == name)
        np.testing.assert_array_equal(panel[f"{name} ({chosen.sum()})"][0], np.flatnonzero(chosen))
    assert list(panel)[-1] == "NA (1)" and panel["NA (1)"][0].tolist() == [4]
    assert np.allclose(panel["NA (1)"][1], to_rgba("lightgrey"))
    known = pd.notna(labels)
    labelled = _panel(plots.umap(embeddings[known], color=labels[known]).axes[0])
    assert {k: v[1] for k, v in labelled.items()} == {k: v[1] for k, v in panel.items() if k != "NA (1)"}


def test_umap_numeric_labels_sort_by_value_and_nan_values_stay_drawn(identity_layout):
    """Integer labels were listed "0, 1, 10, 11, 2"; a NaN value of a colour-bar label was silently not drawn."""
    embeddings = np.stack([np.arange(40), np.arange(40)], axis=1).astype(np.float32)
    fig = plots.umap(embeddings, color=np.arange(40) % 12)
    assert [t.split(" ")[0] for t in _panel(fig.axes[0])] == [str(i) for i in range(12)]
    values = np.arange(40, dtype=float)
    values[3] = np.nan
    points = plots.umap(embeddings, color=values).axes[0].collections[0]
    assert len(points.get_offsets()) == 40


def test_umap_of_real_baron_cells_colours_each_cell_by_its_own_type(identity_layout):
    anndata = pytest.importorskip("anndata")
    if not BARON_HUMAN.exists():
        pytest.skip("Baron pancreas data not present")
    obs = anndata.read_h5ad(BARON_HUMAN, backed="r").obs
    rows = np.sort(np.random.default_rng(0).choice(len(obs), 300, replace=False))
    adata = anndata.AnnData(obs=obs.iloc[rows].copy())
    embeddings = np.stack([np.arange(300), np.zeros(300)], axis=1).astype(np.float32)
    embeddings[::37] = np.nan
    adata.obsm["X_mixgeneformer"] = embeddings
    fig = plots.umap(adata, color="cell_type1")
    assert [ax.get_title() for ax in fig.axes] == ["cell_type1", "organism"]
    panel = _panel(fig.axes[0])
    types = adata.obs["cell_type1"].astype(str).to_numpy()
    keep = np.isfinite(embeddings).all(axis=1)
    assert len(panel) == len(set(types[keep]))
    for text, (x, _) in panel.items():
        name = text.rsplit(" (", 1)[0]
        np.testing.assert_array_equal(x, np.flatnonzero(keep & (types == name)))
    assert len({colour for _, colour in panel.values()}) == len(panel)


# Perturbation ranking ---------------------------------------------------------------------------
def _bars(fig) -> list[tuple[str, float, bool]]:
    """(label, bar value, solid) from the top bar down."""
    ax = fig.axes[0]
    label_at = {round(t.get_position()[1]): t.get_text() for t in ax.get_yticklabels()}
    bars = sorted(ax.patches, key=lambda p: -(p.get_y() + p.get_height() / 2))
    return [(label_at[round(p.get_y() + p.get_height() / 2)], p.get_width(), p.get_hatch() is None) for p in bars]


def test_perturbation_ranking_bars_are_the_top_genes_by_absolute_score_with_their_values():
    results = pd.DataFrame({"gene": ["A", "B", "C", "D", "E"], "shift": [0.1, -0.5, 0.3, np.nan, 0.3],
                            "fdr": [0.01, 0.2, 0.01, 0.01, 0.5]})
    bars = _bars(plots.perturbation_ranking(results, top=3))
    assert bars == [("B", -0.5, False), ("C *", 0.3, True), ("E", 0.3, False)]  # a tie keeps table order
    colours = [p.get_edgecolor() for p in sorted(plots.perturbation_ranking(results).axes[0].patches,
                                                 key=lambda p: -p.get_y())]
    assert np.allclose(colours[0], to_rgba("#2c7fb8")) and np.allclose(colours[1], to_rgba("#c0392b"))
    assert _bars(plots.perturbation_ranking(results.iloc[[0]])) == [("A *", 0.1, True)]  # one gene


def test_perturbation_ranking_with_a_repeated_index_blank_symbols_and_infinite_scores():
    """A table with a repeated index (concatenated shards) was a pandas ValueError; a gene without a
    symbol was drawn with an empty label (the demo passes label="symbol"); an infinite score drew
    a bar to nowhere."""
    results = pd.DataFrame({"symbol": ["S1", "", None], "ensembl_id": ["E1", "E2", "E3"],
                            "perturbed": ["p1", "p2", "p3"], "mean_shift": [0.2, 0.9, -0.4]}, index=[0, 0, 1])
    bars = _bars(plots.perturbation_ranking(results, label="symbol"))
    assert bars == [("E2", 0.9, True), ("E3", -0.4, True), ("S1", 0.2, True)]
    with pytest.raises(InputDataError, match="infinite"):
        plots.perturbation_ranking(results.assign(mean_shift=[0.2, np.inf, 0.1]))


def test_perturbation_results_figure_ranks_vs_null_runs_by_the_shift_beyond_the_null(tmp_path, monkeypatch):
    """genes.csv and the test of a vs_null run rank by mean_<score>_vs_null; ranking.png drew the raw
    mean, so a gene that moves cells as much in the null run came first."""
    import mixgeneformer.perturb as pt
    from mixgeneformer.perturb import results as results_module
    from mixgeneformer.perturb.cells import PerturbationResult

    rng = np.random.default_rng(0)

    def cells(means):
        return pd.DataFrame([{"cell": c, "perturbed": g, "gene_token": 10 + i, "shift": 0.1,
                              "goal_shift": m + 0.01 * rng.normal()}
                             for i, (g, m) in enumerate(zip("ABC", means, strict=True)) for c in range(8)])

    run = cells([0.5, 0.2, -0.1])
    stats = pt.perturbation_statistics(run, mode="vs_null", null=cells([0.5, -0.3, -0.1]))
    drawn = []
    monkeypatch.setattr(results_module, "perturbation_ranking",
                        lambda *a, **k: drawn.append(plots.perturbation_ranking(*a, **k)))
    config = pt.PerturbConfig(perturb="delete", state_column="state", start="s", goal="g")
    results_module.write_results(tmp_path / "run", PerturbationResult(run, None, {}), stats, config)
    assert drawn[0].axes[0].get_xlabel() == "mean_goal_shift_vs_null"
    expected = stats.set_index("perturbed")["mean_goal_shift_vs_null"]
    assert [(name.removesuffix(" *"), value) for name, value, _ in _bars(drawn[0])][0] == ("B", expected["B"])
    assert (tmp_path / "run" / "ranking.png").stat().st_size > 0


# Training curves -----------------------------------------------------------------------------------
def _lines(fig) -> dict[str, np.ndarray]:
    return {str(line.get_label()): line.get_xydata() for ax in fig.axes for line in ax.get_lines()}


def _write_metrics(path: Path, rows: list[dict], tail: str = "") -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        handle.write(tail)
    return path


def test_training_curves_draw_each_column_its_legend_names_on_its_panel(tmp_path):
    rows = [{"step": s, "loss": 5 - s / 10, "mlm_loss": 4 - s / 10, "contrastive_loss": s / 100,
             "learning_rate": 1e-3 * s} for s in (10, 20, 30)]
    rows.append({"step": 30, "eval_loss": 4.5, "eval_top1": 0.2, "eval_unigram_top1": 0.1, "eval_unigram_loss": 6.0})
    fig = plots.training_curves(_write_metrics(tmp_path / "metrics.csv", rows))
    assert [ax.get_title() for ax in fig.axes] == ["losses", "learning rate", "held-out masked-gene accuracy"]
    table = pd.DataFrame(rows)
    for ax in fig.axes:
        for line in ax.get_lines():
            col = line.get_label()
            logged = table[["step", col]].dropna().to_numpy(float)
            np.testing.assert_array_equal(line.get_xydata(), logged, err_msg=col)
            assert line.get_linestyle() == ("--" if "unigram" in col else "-")
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {
        "loss", "mlm_loss", "contrastive_loss", "eval_loss", "eval_unigram_loss"}
    assert {line.get_label() for line in fig.axes[2].get_lines()} == {"eval_top1", "eval_unigram_top1"}


def test_training_curves_leave_out_a_cut_short_last_row_and_draw_in_step_order(tmp_path):
    """A run killed while appending a row leaves "40,0.1,1.9" (loss cut from 1.95...): it was drawn
    as a logged point. Steps out of order or logged twice (a resumed log not cut back) were joined
    into a line running backwards; now in step order, a step's last value."""
    rows = [{"step": s, "loss": 5 - s / 10} for s in (10, 20, 30)]
    fig = plots.training_curves(_write_metrics(tmp_path / "metrics.csv", rows, tail="40,0.1,1.9"))
    np.testing.assert_array_equal(_lines(fig)["loss"], [[10, 4], [20, 3], [30, 2]])
    table = pd.DataFrame({"step": [10, 20, 30, 20, 30, 40], "loss": [4.0, 3.0, 2.0, 3.5, 2.5, 1.5]})
    np.testing.assert_array_equal(_lines(plots.training_curves(table))["loss"], [[10, 4], [20, 3.5], [30, 2.5], [40, 1.5]])


def test_training_curves_of_a_log_without_loss_values_is_one_error(tmp_path):
    """A metrics.csv with its header only (a run before its first log) drew empty axes with a
    matplotlib legend warning."""
    with pytest.raises(InputDataError, match="no loss value"):
        plots.training_curves(_write_metrics(tmp_path / "metrics.csv", []))
    with pytest.raises(InputDataError, match="no loss value"):
        plots.training_curves(pd.DataFrame({"step": [1, 2], "loss": [np.nan, np.nan]}))


# Writing -----------------------------------------------------------------------------------------
def test_a_figure_failing_while_written_leaves_no_file(tmp_path, monkeypatch):
    fig = plots.confusion_matrix(["a", "b"], ["a", "a"])

    def fail(handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fig, "savefig", fail)
    with pytest.raises(RuntimeError, match="renderer"):
        plots.save_figure(fig, tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []
