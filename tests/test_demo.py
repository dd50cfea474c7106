"""The end-to-end demo: shipped data, a reduced run of every step, the report, resume, bad folders."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mixgeneformer.demo import (
    DEMO_STEPS,
    DemoConfig,
    capped_rows,
    demo_data_dir,
    run_demo,
    write_report,
)
from mixgeneformer.errors import ArtifactError, ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTINGS = ("human (within)", "mouse (within)", "mouse → human", "human → mouse")
METHODS = ("mixgf_knn", "mixgf_logreg", "mixgf_finetune", "logreg_tokens", "logreg_counts", "knn_pca")


# --------------------------------------------------------------------------------------------
# The shipped demo dataset
# --------------------------------------------------------------------------------------------
def test_shipped_demo_data_is_small_real_and_keeps_full_totals():
    folder = demo_data_dir()
    files = {s: folder / f"baron_pancreas_{s}.h5ad" for s in ("human", "mouse")}
    assert sum(p.stat().st_size for p in files.values()) <= 15 * 1024 * 1024
    assert (folder / "SOURCES.md").read_text().count("GSE84133") >= 1
    for path in files.values():
        adata = ad.read_h5ad(path)
        assert sp.issparse(adata.X) and np.issubdtype(adata.X.dtype, np.integer)
        counts = adata.obs["cell_type1"].value_counts()
        assert counts.max() <= 400  # capped
        assert counts.min() <= 10  # rare types kept
        row_sums = np.asarray(adata.X.sum(axis=1)).ravel()
        totals = adata.obs["n_counts"].to_numpy()
        # n_counts covers ALL original genes, so it is at least the sum over the kept genes, and
        # strictly more for cells that expressed a dropped rare gene.
        assert np.all(totals >= row_sums)
        assert np.any(totals > row_sums)
        detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
        assert detected.min() >= 5


def test_capped_rows_is_seeded_caps_large_and_keeps_rare_labels():
    labels = np.array(["a"] * 50 + ["b"] * 3 + ["c"] * 20)
    rows = capped_rows(labels, cap=10, seed=0)
    kept = pd.Series(labels[rows]).value_counts()
    assert kept.to_dict() == {"a": 10, "c": 10, "b": 3}
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, capped_rows(labels, cap=10, seed=0))
    assert not np.array_equal(rows, capped_rows(labels, cap=10, seed=1))


def test_demo_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="pretrain_steps"):
        DemoConfig(pretrain_steps=0)
    with pytest.raises(ConfigError, match="perturb_goal"):
        DemoConfig(perturb_start="beta", perturb_goal="beta")
    with pytest.raises(ConfigError, match="unknown option"):
        DemoConfig.quick_config(no_such_option=1)
    with pytest.raises(ConfigError, match="cross_species_k"):
        DemoConfig(cross_species_k=0)
    with pytest.raises(ConfigError, match="cross_species_queue"):
        DemoConfig(cross_species_queue=-1)
    assert DemoConfig.quick_config().quick and DemoConfig.quick_config().pretrain_steps < DemoConfig().pretrain_steps
    # device / workers do not change results, so they do not change the fingerprint
    assert DemoConfig(device="cpu", workers=1).fingerprint() == DemoConfig().fingerprint()
    assert DemoConfig(seed=1).fingerprint() != DemoConfig().fingerprint()


def test_existing_foreign_folder_is_not_clobbered(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a demo output folder"):
        run_demo(tmp_path, DemoConfig.quick_config())
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# A reduced end-to-end run (every step), shared by the tests below
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    started = time.perf_counter()
    report = run_demo(out, DemoConfig.quick_config(device="cpu"), progress=False)
    return report, time.perf_counter() - started


def _metrics(report: Path) -> dict:
    return json.loads((report.parent / "metrics.json").read_text())


@pytest.mark.slow
def test_every_step_ran_and_is_recorded(quick_demo):
    report, _ = quick_demo
    metrics = _metrics(report)
    assert metrics["steps_completed"] == list(DEMO_STEPS)
    for record in metrics["steps"]:
        assert record["status"] == "ran"
        assert isinstance(record["seconds"], (int, float)) and record["seconds"] >= 0
    out = report.parent.parent
    for step in DEMO_STEPS:
        assert (out / step / "STEP_DONE.json").is_file()
    assert (out / "pretrain" / "run" / "model" / "model.safetensors").is_file()
    assert (out / "tokenize" / "corpus" / "mixgf_corpus.json").is_file()
    assert metrics["mode"] == "quick"
    assert metrics["tokenize"]["cells_per_species"].keys() == {"human", "mouse"}
    assert metrics["pretrain"]["steps"] == DemoConfig.quick_config().pretrain_steps
    held_out = metrics["pretrain"]["held_out"]  # the last held-out evaluation, beside the frequency baselines
    assert held_out["step"] == metrics["pretrain"]["steps"] and 0 <= held_out["top1"] <= 1
    assert "| unigram given rank |" in report.read_text()
    mixing = json.loads((out / "embed" / "STEP_DONE.json").read_text())["result"]["species_mixing"]
    assert 0 <= mixing["species_asw"] <= 1 and mixing["n_cells"] > 0 and "beta" in mixing["shared_types"]
    assert f"species ASW {mixing['species_asw']:.3f}" in report.read_text()
    assert metrics["embed"]["species_mixing"] == mixing
    # The pairing queue and K reach the pretrained model and the report names them.
    model_config = json.loads((out / "pretrain" / "run" / "model" / "config.json").read_text())
    config = DemoConfig.quick_config()
    assert (model_config["cross_species_queue"], model_config["cross_species_k"]) == (config.cross_species_queue, config.cross_species_k)
    assert f"{config.cross_species_k}-reciprocal nearest cells of the batch and {config.cross_species_queue:,} earlier cells" in report.read_text()


@pytest.mark.slow
def test_classification_metrics_are_fractions_for_every_setting_and_method(quick_demo):
    report, _ = quick_demo
    table = pd.DataFrame(_metrics(report)["classification"])
    assert set(table["setting"]) == set(SETTINGS)
    for setting in SETTINGS:
        assert set(table.loc[table["setting"] == setting, "method"]) == set(METHODS)
    values = table[["accuracy", "macro_precision", "macro_recall", "macro_f1"]].to_numpy(dtype=float)
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    # the count baseline on real pancreas cells is far above chance even on a small subsample
    within = table[(table["method"] == "logreg_counts") & table["setting"].str.contains("within")]
    assert (within["accuracy"] > 0.6).all()


@pytest.mark.slow
def test_classification_does_not_depend_on_worker_processes(quick_demo, tmp_path):
    import shutil

    report, _ = quick_demo
    out = tmp_path / "demo_output"
    shutil.copytree(report.parent.parent, out)
    for step in ("classify", "perturb"):
        (out / step / "STEP_DONE.json").unlink()
    assert DemoConfig.quick_config().workers == 2  # the fixture ran the settings in two worker processes
    run_demo(out, DemoConfig.quick_config(device="cpu", workers=1), progress=False)  # now one after another here
    pool = pd.read_csv(report.parent.parent / "classify" / "metrics_per_seed.csv")
    serial = pd.read_csv(out / "classify" / "metrics_per_seed.csv")
    pd.testing.assert_frame_equal(serial, pool)


@pytest.mark.slow
def test_figures_are_png_and_the_report_shows_them_with_commands(quick_demo):
    report, _ = quick_demo
    metrics = _metrics(report)
    expected = {
        "training_curves", "umap", "perturbation_ranking",
        "confusion_human_within", "confusion_mouse_within", "confusion_mouse_to_human", "confusion_human_to_mouse",
    }
    assert set(metrics["figures"]) == expected
    text = report.read_text()
    for relative in metrics["figures"].values():
        path = report.parent / relative
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, path
        assert f"]({relative})" in text, f"report.md does not show {relative}"
    for command in ("mixgf vocab build", "mixgf medians", "mixgf tokenize", "mixgf pretrain", "mixgf embed",
                    "mixgf classify", "mixgf perturb", "mixgf demo"):
        assert command in text, command
    assert set(metrics["commands"]) == {*DEMO_STEPS[1:], "demo"}
    # the resolved configs are embedded, and the numbers in the table are the ones in metrics.json
    assert "max_steps:" in text and "state_column:" in text and "cells_per_type:" in text
    first = metrics["classification"][0]
    assert f"{first['accuracy']:.3f}" in text
    html = (report.parent / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<img ") == len(expected)


@pytest.mark.slow
def test_perturbation_ranks_genes_with_statistics(quick_demo):
    report, _ = quick_demo
    out = report.parent.parent
    stats = pd.read_csv(out / "perturb" / "results" / "genes.csv")
    assert {"n_cells", "p_value", "fdr"} <= set(stats.columns)
    assert ((stats["fdr"] >= 0) & (stats["fdr"] <= 1)).all()
    shifts = pd.read_parquet(out / "perturb" / "results" / "cells.parquet")
    assert set(shifts["state"]) == {"beta"}
    assert shifts["cell"].nunique() == DemoConfig.quick_config().perturb_cells
    # every gene of each perturbed cell was deleted once: rows per cell == genes in that cell
    per_cell = shifts.groupby("cell").size()
    assert (per_cell == shifts.groupby("cell")["n_genes"].first()).all()
    assert _metrics(report)["perturbation"]["top_genes"]


@pytest.mark.slow
def test_rerun_resumes_finished_steps_and_rejects_changed_options(quick_demo):
    report, first_seconds = quick_demo
    out = report.parent.parent
    before = (out / "pretrain" / "run" / "model" / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    from mixgeneformer.cli import main

    main(["demo", "--quick", "--out", str(out), "--device", "cpu"])  # the CLI, on the same folder
    assert time.perf_counter() - started < first_seconds
    metrics = _metrics(report)
    assert [r["status"] for r in metrics["steps"]] == ["resumed"] * len(DEMO_STEPS)
    assert (out / "pretrain" / "run" / "model" / "model.safetensors").stat().st_mtime_ns == before
    # the report can be rewritten from the markers alone
    assert write_report(out) == report and re.search(r"\| pretrain \| resumed \|", report.read_text())
    with pytest.raises(ConfigError, match="other options"):
        run_demo(out, DemoConfig.quick_config(seed=1), progress=False)
