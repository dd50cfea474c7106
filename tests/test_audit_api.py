"""Public Python API audit (scverse user's view): each exported function called as its docstring says.

One regression test per fault found: a wrong argument (a path where an AnnData goes, a dict where a
config dataclass goes, one name where a list of names goes, an AnnData that is not the tested one)
failed deep inside with AttributeError / TypeError / IndexError / numpy errors, or was split into
characters; now it is refused with the package's error class, naming the argument and the fix, or
taken as one name.
"""

from __future__ import annotations

from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
from test_perturb import bundle_and_cells, vocab  # noqa: F401  (fixtures)

from mixgeneformer.errors import ConfigError, InputDataError


@pytest.fixture(scope="module")
def made(tmp_path_factory, vocab):  # noqa: F811
    """A tiny bundle (folder/bundle) and its 12 cells of two kinds 'x' / 'y' (folder/in.h5ad)."""
    folder = tmp_path_factory.mktemp("audit_api")
    bundle_and_cells(folder, vocab)
    return folder


def _cells(made) -> ad.AnnData:
    return ad.read_h5ad(made / "in.h5ad")


# -- perturb_anndata(path, ...) raised AttributeError: 'str' object has no attribute 'n_obs' --------------
def test_perturb_anndata_refuses_a_path_or_a_dict_config_by_name(made):
    from mixgeneformer.perturb import PerturbConfig, perturb_anndata

    with pytest.raises(ConfigError, match=r"adata must be an AnnData, got str.*read_h5ad"):
        perturb_anndata(str(made / "in.h5ad"), made / "bundle", PerturbConfig(genes=["INS"]), stats_mode=None,
                        progress=False)
    with pytest.raises(ConfigError, match=r"config must be a PerturbConfig.*from_dict"):
        perturb_anndata(_cells(made), made / "bundle", {"genes": ["INS"]}, stats_mode=None, progress=False)
    adata = _cells(made)
    result, _ = perturb_anndata(adata, made / "bundle", PerturbConfig(device="cpu", min_genes=1), stats_mode=None,
                                progress=False)
    assert (adata.obs_names[result.cells["cell"]] == result.cells["obs_name"]).all()


# -- a dict as tokenize_config failed inside the tokenizer (AttributeError: 'dict' object has no attribute ...) --
def test_a_dict_as_tokenize_config_is_refused_before_loading(made):
    from mixgeneformer.embed import embed_anndata
    from mixgeneformer.tokenize import tokenize_anndata

    with pytest.raises(ConfigError, match="tokenize_config must be a TokenizeConfig"):
        embed_anndata(_cells(made), made / "bundle", tokenize_config={"max_len": 16}, progress=False)
    from mixgeneformer.bundle import load_bundle

    _, vocab_, medians = load_bundle(made / "bundle")
    with pytest.raises(ConfigError, match="config must be a TokenizeConfig"):
        tokenize_anndata(_cells(made), vocab_, medians, {"max_len": 16})


# -- obs_columns="kind" was read as the columns ['k', 'i', 'n', 'd'] (InputDataError: not found) ---------
def test_one_obs_column_given_as_a_string_is_one_column(made):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.readers import open_source
    from mixgeneformer.tokenize import tokenize_anndata

    adata = _cells(made)
    _, vocab_, medians = load_bundle(made / "bundle")
    corpus = tokenize_anndata(adata, vocab_, medians, obs_columns="kind")
    assert corpus["kind"] == adata.obs["kind"].iloc[corpus["cell_index"]].tolist()
    with open_source(made / "in.h5ad") as source:
        chunks = list(source.iter_chunks(5, obs_columns="kind"))
    assert [c.obs.columns.tolist() for c in chunks] == [["kind"]] * 3
    assert np.concatenate([c.obs["kind"].to_numpy() for c in chunks]).tolist() == adata.obs["kind"].tolist()


# -- run_classification(methods="knn") failed: "methods ['k', 'n', 'n'] must be among ..."; a path or a dict
#    config raised AttributeError ----------------------------------------------------------------------------
def test_run_classification_takes_one_method_name_and_refuses_wrong_arguments(made):
    from mixgeneformer.classify import ClassifyConfig, LabelConfig, run_classification

    config = ClassifyConfig(labels=LabelConfig(key="kind", test_size=0.34))
    run = run_classification(_cells(made), made / "bundle", methods="knn", baseline_methods="logreg_counts",
                             config=config, device="cpu")
    assert [r.method for r in run.results] == ["knn", "logreg_counts"]
    with pytest.raises(ConfigError, match=r"adata must be an AnnData, got str"):
        run_classification(str(made / "in.h5ad"), made / "bundle", config=config)
    with pytest.raises(ConfigError, match=r"test must be an AnnData, got PosixPath"):
        run_classification(_cells(made), made / "bundle", test=made / "in.h5ad", config=config)
    with pytest.raises(ConfigError, match=r"config must be a ClassifyConfig.*from_dict"):
        run_classification(_cells(made), made / "bundle", config={"labels": {"key": "kind"}})


# -- within_task(adata, {"key": ...}) / prepare_labels(matrix) raised AttributeError -------------------------
def test_label_functions_refuse_wrong_argument_types(made):
    from mixgeneformer.classify import prepare_labels, transfer_task, within_task

    adata = _cells(made)
    with pytest.raises(ConfigError, match="config must be a LabelConfig"):
        within_task(adata, {"key": "kind"})
    with pytest.raises(ConfigError, match="config must be a LabelConfig"):
        transfer_task(adata, adata, {"key": "kind"})
    with pytest.raises(ConfigError, match=r"must be an AnnData, got ndarray"):
        prepare_labels(np.zeros((3, 2)), "kind")
    assert prepare_labels(adata.obs, "kind").classes == ["x", "y"]  # an obs DataFrame is still accepted


# -- predict_cells(fitted, "cells.h5ad") took the path's characters as cells (or TypeError for a matrix) ------
def test_predict_cells_refuses_what_is_neither_anndata_nor_corpus():
    from mixgeneformer.classify import predict_cells

    fitted = SimpleNamespace(classes=["a", "b"])  # never reached: refused before the classifier is used
    for data in ("cells.h5ad", np.zeros((4, 3))):
        with pytest.raises(ConfigError, match=r"data must be an AnnData or a tokenized corpus.*predict_file"):
            predict_cells(fitted, data)


# -- write_predictions into an AnnData other than the tested one: IndexError (fewer cells) ---------------------
def test_write_predictions_refuses_an_anndata_that_is_not_the_tested_one(made):
    from mixgeneformer.classify import (
        LabelConfig,
        Prediction,
        evaluate,
        within_task,
        write_predictions,
    )

    adata = _cells(made)
    task = within_task(adata, LabelConfig(key="kind", test_size=0.5))
    labels = np.asarray(task.test_labels, dtype=object)
    result = evaluate(task, Prediction(labels, None, task.classes), "m")
    small = adata[: int(task.test_rows.max())].copy()
    with pytest.raises(InputDataError, match=r"not the data this result was tested on.*task.test_data"):
        write_predictions(small, result)
    write_predictions(task.test_data, result)
    assert adata.obs["within_m_pred"].iloc[task.test_rows].tolist() == labels.tolist()


# -- capped_rows(labels, -1): numpy ValueError "negative dimensions are not allowed" --------------------------
def test_capped_rows_refuses_a_negative_cap():
    from mixgeneformer.demo import capped_rows

    labels = np.array(["a"] * 5 + ["b"] * 2)
    assert capped_rows(labels, 3).size == 5
    with pytest.raises(ConfigError, match="cap must be >= 0"):
        capped_rows(labels, -1)


# -- compute_medians(adata, lyer="counts") raised a bare TypeError; read={...} a dataclasses TypeError -----------
def test_compute_medians_refuses_unknown_options_and_a_dict_as_read(made):
    from mixgeneformer.medians import compute_medians
    from mixgeneformer.readers import ReadOptions

    adata = _cells(made)
    with pytest.raises(ConfigError, match=r"unknown medians option\(s\) \['lyer'\].*layer"):
        compute_medians(adata, lyer="counts")
    with pytest.raises(ConfigError, match=r"read must be a ReadOptions.*from_dict"):
        compute_medians(adata, read={"layer": None})
    assert compute_medians(adata, read=ReadOptions(species="human")).hash == compute_medians(adata).hash


# -- baselines(task, "logreg_counts") / zero_shot(..., methods="knn") iterated the name's characters -----------
def test_baselines_and_zero_shot_take_one_method_name(made):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.classify import LabelConfig, baselines, within_task, zero_shot

    task = within_task(_cells(made), LabelConfig(key="kind", test_size=0.34))
    assert [r.method for r in baselines(task, "logreg_counts")] == ["logreg_counts"]
    model, vocab_, medians = load_bundle(made / "bundle")
    assert [r.method for r in zero_shot(task, model, vocab_, medians, "knn", device="cpu")] == ["knn"]


# -- embed_corpus / perturb_cells given a 2-D array of token ids: "the corpus has no 'input_ids' column
#    (columns: None)", which names neither what was passed nor what is taken --------------------------------
def test_token_input_of_another_type_is_named_with_what_is_taken(made):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.embed import embed_corpus
    from mixgeneformer.perturb import PerturbConfig, perturb_cells

    model, vocab_, _ = load_bundle(made / "bundle")
    cells = np.array([[2, 4, 10, 11, 12, 3]])
    with pytest.raises(ConfigError, match=r"tokenized corpus .* or a list of token id sequences, got ndarray.*tolist"):
        embed_corpus(model, cells, vocab_, progress=False)
    with pytest.raises(ConfigError, match=r"got ndarray.*tolist"):
        perturb_cells(model, cells, vocab_, PerturbConfig(device="cpu"), progress=False)
    assert embed_corpus(model, cells.tolist(), vocab_, progress=False, device="cpu").shape == (1, model.config.hidden_size)


# -- tokenize_files("cells.h5ad", ...) read the path's characters as inputs (a Path: TypeError not iterable);
#    a dict as config: AttributeError ------------------------------------------------------------------------
def test_tokenize_files_takes_one_path_and_refuses_a_dict_config(made, tmp_path):
    import datasets

    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.tokenize import tokenize_files

    _, vocab_, medians = load_bundle(made / "bundle")
    for index, path in enumerate((str(made / "in.h5ad"), made / "in.h5ad")):
        out = tokenize_files(path, tmp_path / f"corpus{index}", vocab_, medians, obs_columns="kind")
        assert datasets.load_from_disk(str(out))["kind"] == _cells(made).obs["kind"].tolist()
    with pytest.raises(ConfigError, match="config must be a TokenizeConfig"):
        tokenize_files([made / "in.h5ad"], tmp_path / "corpus_dict", vocab_, medians, {"max_len": 16})


# -- fit_classifier / build_classifier given a dict as config raised AttributeError ------------------------------
def test_finetuning_functions_refuse_a_dict_config(made):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.classify import (
        LabelConfig,
        build_classifier,
        finetune,
        fit_classifier,
        within_task,
    )

    model, vocab_, medians = load_bundle(made / "bundle")
    task = within_task(_cells(made), LabelConfig(key="kind", test_size=0.34))
    with pytest.raises(ConfigError, match="config must be a FinetuneConfig"):
        build_classifier(model, ["x", "y"], vocab_, {"train_encoder": False})
    for fit in (fit_classifier, finetune):
        with pytest.raises(ConfigError, match="config must be a ClassifyConfig"):
            fit(task, model, vocab_, medians, {"finetune": {"max_steps": 1}})


# -- readers.row_sums(csc) read column pointers as rows: column sums, written out of bounds (heap corruption);
#    validate_counts(dense) raised AttributeError, and on a CSC block named a wrong cell and gene -------------
def test_row_sums_and_validate_counts_take_any_matrix_format():
    import scipy.sparse as sp

    from mixgeneformer.readers import row_sums, validate_counts

    dense = np.array([[1, 0, 2, 0, 0], [0, 3, 0, 0, 4], [5, 0, 0, 6, 0]], dtype=np.float64)
    for matrix in (sp.csr_matrix(dense), sp.csc_matrix(dense), dense, sp.coo_matrix(dense)):
        np.testing.assert_array_equal(row_sums(matrix), dense.sum(axis=1))
    bad = dense.copy()
    bad[2, 3] = 0.5
    for matrix in (sp.csc_matrix(bad), bad):
        with pytest.raises(InputDataError, match=r"0\.5 at cell 2 \(c\), gene column 3 \(g3\)"):
            validate_counts(matrix, cell_names=["a", "b", "c"], gene_ids=[f"g{i}" for i in range(5)])


# -- run_demo(out, {"cells_per_type": 10}) raised AttributeError: 'dict' object has no attribute 'device' ---------
def test_run_demo_refuses_a_dict_config_before_any_step(tmp_path):
    from mixgeneformer.demo import run_demo

    with pytest.raises(ConfigError, match=r"config must be a DemoConfig.*from_dict\(DemoConfig"):
        run_demo(tmp_path / "demo", {"cells_per_type": 10}, progress=False)
    assert not (tmp_path / "demo").exists()
