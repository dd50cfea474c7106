"""Audit of session 29's changes (rank agreement, --gene-column on predict / perturb / classify,
classify_file, sharded merge options, FSDP refusal): the faults found, each with its regression test."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mixgeneformer.classify import classify_file
from mixgeneformer.errors import ConfigError


def _labelled_counts(path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["alpha", "beta"], 40)
    rates = np.where(labels[:, None] == "alpha", np.linspace(5, 0.5, 30), np.linspace(0.5, 5, 30))
    cells = ad.AnnData(sp.csr_matrix(rng.poisson(rates).astype(np.float32)),
                       obs=pd.DataFrame({"cell_type1": labels}, index=[f"c{i}" for i in range(80)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    cells.write_h5ad(path)
    return path


def test_classify_file_refuses_a_test_file_that_is_the_training_file(tmp_path):
    # classify_file (session 29) took the CLI's reading, but not its check that --test is another file:
    # the Python API scored the classifiers on the cells they were trained on, without a word.
    path = _labelled_counts(tmp_path / "cells.h5ad")
    same = tmp_path / "." / "cells.h5ad"  # another spelling of the same file
    with pytest.raises(ConfigError, match=r"is the training file.*held-out split"):
        classify_file(path, None, same, methods=(), baseline_methods=("logreg_counts",))
    run = classify_file(path, None, methods=(), baseline_methods=("logreg_counts",))  # the split of the input runs
    assert set(run.table()["method"]) == {"logreg_counts"}


def test_perturb_refuses_tokenize_options_with_a_corpus_input(tmp_path):
    # --gene-column with a corpus was refused (session 29), but --tokenize-config (and tokenize_config= in
    # Python) was taken and ignored: the corpus is perturbed as it was tokenized. Refused before the model loads.
    from mixgeneformer.bundle import TokenizeOverrides
    from mixgeneformer.perturb.cells import perturb_file

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "state.json").write_text("{}")  # what datasets.save_to_disk writes
    with pytest.raises(ConfigError, match=r"--tokenize-config \(tokenize_config=\).*tokenized corpus folder.*perturb the cells"):
        perturb_file(corpus, tmp_path / "no_model", tokenize_config=TokenizeOverrides(max_len=64))


def test_perturb_cli_refuses_tokenize_config_with_a_corpus_before_any_output(tmp_path, capsys):
    # A shard run of `mixgf perturb CORPUS --tokenize-config FILE` went on with the file ignored.
    from _tokenize_helpers import cli_exit_code

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "state.json").write_text("{}")
    (tmp_path / "tok.yaml").write_text("max_len: 64\n")
    code = cli_exit_code(["perturb", str(corpus), "-m", str(tmp_path / "no_model"), "-o", str(tmp_path / "out"),
                          "--genes", "INS,GCG", "--device", "cpu", "--tokenize-config", str(tmp_path / "tok.yaml"),
                          "--shard-index", "0", "--num-shards", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--tokenize-config (tokenize_config=)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_classify_file_with_nothing_to_run_or_no_model_is_refused_before_reading(tmp_path, monkeypatch):
    # classify_file(path, None, methods=()) returned an empty run (no metrics, no word), and the methods that need
    # a model were refused only after every cell of both files was read.
    from mixgeneformer.classify import files

    path = _labelled_counts(tmp_path / "cells.h5ad")
    with pytest.raises(ConfigError, match=r"no method to run"):
        classify_file(path, None, methods=())
    monkeypatch.setattr(files, "read_classify_cells", lambda *a: pytest.fail("read before the check"))
    with pytest.raises(ConfigError, match=r"need a model"):
        classify_file(path, None)
    with pytest.raises(ConfigError, match=r"logreg_tokens .* needs a model"):
        classify_file(path, None, methods=(), baseline_methods=("logreg_tokens",))
