"""classify.classify_file: classification of count files (any format), the API under ``mixgf classify``.
It equals run_classification on the read AnnData, reads a .loom as the .h5ad, refuses a missing label
column naming it and the obs columns there are, and gives the table the CLI writes."""

from __future__ import annotations

import io
import re
import shutil

import anndata as ad
import pandas as pd
import pytest
from _tokenize_helpers import cli_exit_code
from test_classify import baron_subset, tiny_bundle  # noqa: F401  (the tiny Baron model bundle fixture)
from test_input_formats import inputs  # noqa: F401  (200 Baron cells as .h5ad, .loom, 10x, ...)

from mixgeneformer.classify import ClassifyConfig, LabelConfig, classify_file, run_classification
from mixgeneformer.cli import main
from mixgeneformer.errors import InputDataError

pytestmark = pytest.mark.realdata
ZERO_SHOT = ("knn", "logreg")


def _csv(table: pd.DataFrame) -> pd.DataFrame:
    """The table as metrics.csv holds it (written and read back)."""
    return pd.read_csv(io.StringIO(table.to_csv(index=False)))


def test_an_h5ad_equals_run_classification_on_the_read_anndata(inputs, tiny_bundle):  # noqa: F811
    path = inputs[1]["h5ad"]
    run = classify_file(path, tiny_bundle[0], methods=ZERO_SHOT, baseline_methods=("logreg_counts",), device="cpu")
    want = run_classification(ad.read_h5ad(path), tiny_bundle[0], methods=ZERO_SHOT,
                              baseline_methods=("logreg_counts",), device="cpu")
    assert list(run.table()["method"]) == ["knn", "logreg", "logreg_counts"]
    pd.testing.assert_frame_equal(run.table(), want.table())
    assert run.task.test_rows.tolist() == want.task.test_rows.tolist()


def test_a_loom_equals_the_h5ad_as_input_and_as_test(inputs, tiny_bundle, tmp_path):  # noqa: F811
    paths, bundle = inputs[1], tiny_bundle[0]
    want = classify_file(paths["h5ad"], bundle, methods=ZERO_SHOT, device="cpu").table()
    pd.testing.assert_frame_equal(classify_file(paths["loom"], bundle, methods=ZERO_SHOT, device="cpu").table(), want)
    # the --test file is read by its own format too (mixed formats: train on the h5ad, test on the loom)
    as_test = classify_file(paths["h5ad"], bundle, paths["loom"], methods=ZERO_SHOT, device="cpu")
    # a copy: the training file itself as test is refused, as by the CLI (tests/test_audit_session29.py)
    shutil.copyfile(paths["h5ad"], tmp_path / "copy.h5ad")
    same = classify_file(paths["h5ad"], bundle, tmp_path / "copy.h5ad", methods=ZERO_SHOT, device="cpu")
    assert as_test.task.setting == "transfer" and as_test.task.test_rows.size == 200
    pd.testing.assert_frame_equal(as_test.table(), same.table())


def test_a_missing_label_column_names_it_and_the_obs_columns(inputs, tiny_bundle):  # noqa: F811
    paths, bundle = inputs[1], tiny_bundle[0]
    config = ClassifyConfig(labels=LabelConfig(key="celltype"))
    with pytest.raises(InputDataError, match=r"label column 'celltype' not found in the obs of .*cells\.loom") as info:
        classify_file(paths["loom"], bundle, methods=ZERO_SHOT, config=config, device="cpu")
    assert "'cell_type1'" in str(info.value) and "'donor'" in str(info.value)  # the obs columns there are
    # a 10x file carries no labels; as the test file, the message names it (not the training file)
    with pytest.raises(InputDataError, match=r"label column 'cell_type1' not found in the obs of .*cells\.h5\. "
                                             r"Available obs columns: \[\]"):
        classify_file(paths["h5ad"], bundle, paths["10x_h5"], methods=ZERO_SHOT, device="cpu")


def test_the_cli_writes_the_api_table_and_keeps_its_messages(inputs, tiny_bundle, tmp_path, capsys):  # noqa: F811
    path, bundle = inputs[1]["h5ad"], tiny_bundle[0]
    main(["classify", str(path), "-m", str(bundle), "-o", str(tmp_path / "out"), "--mode", "zero-shot",
          "--baselines", "--device", "cpu"])
    run = classify_file(path, bundle, methods=ZERO_SHOT, baseline_methods=("logreg_counts", "knn_pca", "logreg_tokens"),
                        device="cpu")
    got = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert list(got["method"]) == ["knn", "logreg", "logreg_tokens", "logreg_counts", "knn_pca"]
    pd.testing.assert_frame_equal(got, _csv(run.table()))
    capsys.readouterr()
    loom = inputs[1]["loom"]
    code = cli_exit_code(["classify", str(loom), "-m", str(bundle), "-o", str(tmp_path / "bad"), "--mode", "zero-shot",
                          "--label", "celltype", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "bad").exists()
    assert re.search(rf"label column 'celltype' not found in the obs of {re.escape(str(loom))}\. Available obs "
                     r"columns: \['cell_type1', 'donor', 'n_counts'\]\. Pass the right one with --label \(config\.labels\.key in Python\)\.", " ".join(err.split()))
