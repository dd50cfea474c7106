"""Audit of the figures, the species-mixing scores and the demo report: edge cases that crashed or
gave silently wrong output (many classes, tiny inputs, reordered tables, labels with Markdown)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from mixgeneformer import plots
from mixgeneformer.errors import InputDataError


def _colours(ax) -> list[tuple[float, ...]]:
    return [tuple(np.round(c.get_facecolor()[0], 4)) for c in ax.collections]


def test_umap_gives_every_category_of_a_legend_its_own_colour():
    rng = np.random.default_rng(0)
    labels = np.array([f"type{i:02d}" for i in range(25)] * 2)
    fig = plots.umap(rng.normal(size=(50, 4)), color=labels, n_neighbors=5)
    colours = _colours(fig.axes[0])
    assert len(colours) == 25 and len(set(colours)) == 25  # tab20 alone repeated the first five
    assert fig.axes[0].get_legend() is not None
    assert len(set(plots.category_colours(45))) == 45 and len(set(plots.category_colours(80))) == 80


def test_umap_of_three_cells_is_one_message_not_a_scipy_type_error():
    x = np.random.default_rng(0).normal(size=(8, 4))
    x[3:] = np.nan
    with pytest.raises(InputDataError, match="at least 4 cells with a finite embedding, got 3"):
        plots.umap(x)


def test_a_dataframe_confusion_matrix_is_drawn_by_class_name_not_position():
    counts = pd.DataFrame([[3, 1], [0, 2]], index=["x", "y"], columns=["x", "y"])
    swapped = counts[["y", "x"]]  # the same table, columns stored in another order
    shown = plots.confusion_matrix(matrix=swapped, normalize=False).axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, [[3, 1], [0, 2]])
    ax = plots.confusion_matrix(matrix=counts, labels=["y", "x"], normalize=False).axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[2, 0], [1, 3]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["y (n=2)", "x (n=4)"]
    with pytest.raises(InputDataError, match="same classes as rows"):
        plots.confusion_matrix(matrix=pd.DataFrame([[1, 0], [0, 1]], index=["x", "y"], columns=["x", "z"]))
    with pytest.raises(InputDataError, match="name each class"):
        plots.confusion_matrix(matrix=counts, labels=["x", "x"])


def test_empty_inputs_of_the_figures_are_refused():
    with pytest.raises(InputDataError, match="no class"):
        plots.confusion_matrix([None, None], [None, None])
    with pytest.raises(InputDataError, match="all NaN"):
        plots.perturbation_ranking(pd.DataFrame({"gene": ["a", "b"], "shift": [np.nan, np.nan]}))


def test_ilisi_of_a_tiny_neighbourhood_is_nan_not_minus_two():
    from mixgeneformer import integration
    from mixgeneformer.errors import ConfigError

    if not integration.scib_available():
        pytest.skip("scib-metrics (extra 'metrics') is not installed")
    x = np.random.default_rng(0).normal(size=(5, 4))
    species, types = np.array(["human", "mouse"] * 3)[:5], np.array(["a"] * 5)
    scores = integration.species_mixing(x, species, types)
    assert np.isnan(scores["ilisi"]) and np.isnan(scores["ilisi_shuffled"])  # scib's sentinel gave -2.0
    six = integration.species_mixing(np.random.default_rng(0).normal(size=(6, 4)), np.tile(["human", "mouse"], 3), ["a"] * 6)
    assert 0.0 <= six["ilisi"] <= 1.0
    with pytest.raises(ConfigError, match="n_neighbors=5"):
        integration.species_mixing(x, species, types, n_neighbors=5)


def test_no_shared_cell_type_is_named_as_such_not_blamed_on_the_embeddings():
    from mixgeneformer.integration import shared_type_mixing

    x = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(InputDataError, match=r"no cell type is shared by human and mouse \(human: \['alpha'\], mouse: \['beta'\]\)"):
        shared_type_mixing({"human": x, "mouse": x}, {"human": ["alpha"] * 4, "mouse": ["beta"] * 4})


def test_benchmark_text_is_written_atomically(tmp_path, monkeypatch):
    from mixgeneformer import integration

    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: None)  # the text fails to encode at the write

    out = tmp_path / "result.txt"
    out.write_text("previous result\n")
    table = pd.DataFrame({"metric": ["f1"], "a": ["0.5 ± 0.1"]}).set_index("metric")
    with pytest.raises(UnicodeEncodeError):  # fails while writing: Path.write_text had emptied the file
        integration.write_benchmark_text("header \ud800", table, pd.DataFrame({"seed": [0]}), str(out), overwrite=True)
    assert out.read_text() == "previous result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_report_text_escapes_emphasis_strikethrough_and_entities_in_labels():
    from mixgeneformer.demo.markdown import frame_markdown, markdown_to_html, md_text

    label = "_beta_ &amp; ~~delta~~"
    assert md_text(label) == r"\_beta\_ \&amp; \~\~delta\~\~"  # GitHub showed beta in italics, '&', struck delta
    page = markdown_to_html(frame_markdown(pd.DataFrame({"cell_type": [label]})), "t")
    assert "<td>_beta_ &amp;amp; ~~delta~~</td>" in page  # the HTML shows the label as written
    assert "<th>cell_type</th>" in page


def _fake_context(tmp_path, **config):
    from mixgeneformer.demo.config import DemoConfig
    from mixgeneformer.demo.context import _Context

    results = {
        "pretrain": {"steps": 10, "first_loss": 9.0, "final_loss": 7.0},
        "embed": {"n_cells": 100, "dim": 8, "cells_without_embedding": 3},
        "classify": {"table": [], "notes": {}},
        "perturb": {"summary": {"cells_perturbed": 5}, "n_genes_tested": 20, "n_significant_fdr_0.05": 1,
                    "top_genes": []},
    }
    return _Context(out_dir=tmp_path, config=DemoConfig(**config), progress=False, results=results)


def test_report_perturbation_labels_cannot_inject_html_into_report_md(tmp_path):
    from mixgeneformer.demo.markdown import markdown_to_html
    from mixgeneformer.demo.report import _classify_perturb_sections

    ctx = _fake_context(tmp_path, perturb_start="x`<img src=x onerror=alert(1)>`", perturb_goal="alpha")
    markdown = "\n".join(_classify_perturb_sections(ctx, {}, lambda name, alt: alt))
    assert re.search(r"(?<!\\)<img", markdown) is None  # the label closed its code span: raw HTML in report.md
    assert "&lt;img src=x onerror=alert(1)&gt;" in markdown_to_html(markdown, "t")


def test_report_counts_the_cells_without_an_embedding(tmp_path):
    from mixgeneformer.demo.report import _pretrain_embed_sections

    ctx = _fake_context(tmp_path)
    text = "\n".join(_pretrain_embed_sections(ctx, lambda name, alt: alt))
    assert "97 of 100 cells embedded (3 without an embedding" in text  # it said "100 cells embedded"


def test_a_report_that_fails_to_build_leaves_the_previous_metrics_json(tmp_path, monkeypatch):
    from mixgeneformer.demo import report

    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"old": 1}\n')
    (folder / "report.md").write_text("old report\n")
    monkeypatch.setattr(report, "_load_context", lambda out: _fake_context(tmp_path))
    monkeypatch.setattr(report, "_figures", lambda ctx: {})
    monkeypatch.setattr(report, "_commands", lambda ctx: {})
    monkeypatch.setattr(report, "report_metrics", lambda *args: {"new": 2})

    def broken(*args):
        raise RuntimeError("a section failed")

    monkeypatch.setattr(report, "report_sections", broken)
    with pytest.raises(RuntimeError, match="a section failed"):
        report.write_report(tmp_path)
    assert (folder / "metrics.json").read_text() == '{"old": 1}\n'  # not the new numbers beside the old report
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "report.md"]


def test_embed_refuses_a_umap_of_too_few_cells_before_the_model_is_read(tmp_path):
    import anndata as ad

    from mixgeneformer.embed import embed_to_outputs
    from mixgeneformer.errors import ConfigError

    data = tmp_path / "three.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32), obs=pd.DataFrame({"cell_type": list("abc")}, index=list("xyz"))).write_h5ad(data)
    with pytest.raises(ConfigError, match="--umap needs at least 4 cells; .* has 3"):
        embed_to_outputs(data, tmp_path / "no_model", tmp_path / "out.h5ad", umap=tmp_path / "u.png", color="cell_type")
    assert not (tmp_path / "out.h5ad").exists()
