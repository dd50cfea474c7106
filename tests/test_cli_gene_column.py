"""`--gene-column` on every command that tokenizes cells: predict, perturb and classify had only
`--tokenize-config`, while the readers' and gene mapping's messages tell the user to pass
`--gene-column`. Cells whose var_names are not gene identifiers (an index of numbers, the gene IDs in a
var column) give the same numbers with `--gene-column ID` as the same cells with IDs as var_names."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _tokenize_helpers import cli_exit_code
from test_classify import tiny_bundle  # noqa: F401  (fixture)
from test_input_formats import _classify, _predict, classifier, h5ad_prediction, inputs  # noqa: F401  (fixtures)

from mixgeneformer.cli import main
from mixgeneformer.cli._app import load_tokenize_config


@pytest.fixture(scope="module")
def numbered(inputs):  # noqa: F811
    """The .h5ad's cells with var_names 0..n-1 and the gene IDs in var['ensembl']."""
    cells, _, root = inputs
    other = cells.copy()
    other.var["ensembl"] = other.var_names.to_numpy()
    other.var_names = [str(i) for i in range(other.n_vars)]
    path = root / "numbered.h5ad"
    other.write_h5ad(path)
    return path


def test_every_command_that_tokenizes_cells_takes_gene_column():
    import typer

    from mixgeneformer.cli._main import app

    commands = typer.main.get_command(app).commands
    for name in ("tokenize", "medians", "embed", "predict", "perturb", "classify"):
        assert any("--gene-column" in param.opts for param in commands[name].params), name


def test_predict_with_gene_column_equals_the_cells_with_ids_as_var_names(numbered, classifier, h5ad_prediction,  # noqa: F811
                                                                         tmp_path, capsys):
    _predict(numbered, classifier, tmp_path / "p.h5ad", "--gene-column", "ensembl")
    got = ad.read_h5ad(tmp_path / "p.h5ad")
    assert got.obs["predicted_pred"].tolist() == h5ad_prediction.obs["predicted_pred"].tolist()
    np.testing.assert_allclose(got.obsm["predicted_probabilities"], h5ad_prediction.obsm["predicted_probabilities"],
                               rtol=0, atol=1e-6)
    code = cli_exit_code(["predict", str(numbered), "-c", str(classifier), "-o", str(tmp_path / "q.h5ad"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--gene-column" in err and "Traceback" not in err  # the hint names an option that exists
    assert not (tmp_path / "q.h5ad").exists()


def test_perturb_and_classify_with_gene_column_equal_the_cells_with_ids(numbered, inputs, tiny_bundle, tmp_path):  # noqa: F811
    _, paths, _ = inputs
    bundle = tiny_bundle[0]
    shifts = {}
    for name, path, extra in (("ids", paths["h5ad"], []), ("column", numbered, ["--gene-column", "ensembl"])):
        main(["perturb", str(path), "-m", str(bundle), "-o", str(tmp_path / name), "--genes", "INS,GCG",
              "--device", "cpu", "--no-progress", *extra])
        shifts[name] = pd.read_parquet(tmp_path / name / "cells.parquet")["shift"].to_numpy()
    assert shifts["ids"].size > 50
    np.testing.assert_allclose(shifts["column"], shifts["ids"], rtol=0, atol=1e-6)
    want = _classify(paths["h5ad"], bundle, tmp_path / "c_ids")
    pd.testing.assert_frame_equal(_classify(numbered, bundle, tmp_path / "c_column", "--gene-column", "ensembl"), want)


def test_gene_column_is_laid_over_the_file_and_refused_with_a_corpus(tmp_path):
    from mixgeneformer.errors import ConfigError

    (tmp_path / "tok.yaml").write_text("layer: counts\ngene_column: symbol\n")
    merged = load_tokenize_config(tmp_path / "tok.yaml", "ensembl")
    assert merged.given == {"layer", "gene_column"} and (merged.layer, merged.gene_column) == ("counts", "ensembl")
    alone = load_tokenize_config(None, "ensembl")
    assert alone.given == {"gene_column"}
    assert load_tokenize_config(None) is None
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "state.json").write_text("{}")  # what datasets.save_to_disk writes
    with pytest.raises(ConfigError, match=r"--gene-column \(gene_column=\).*tokenized corpus folder.*predict the cells"):
        load_tokenize_config(None, "ensembl", corpus, "predict")
