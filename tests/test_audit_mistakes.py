"""Users' mistakes found by trying the commands the wrong way: each one exits 2 with one message
and changes no file, before any work (RELIABILITY 18, 23-25, 28)."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
from test_audit_files import files, lock_holder, run_cli  # noqa: F401  (the inputs fixture)
from test_classify import tiny_model, token_task
from test_embed import bundle  # noqa: F401  (the tiny model bundle fixture)

from mixgeneformer import classify as C
from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.fileio import OUTPUT_MARKER, check_output


# ------------------------------------------------------------------ output paths (23, 24)
def test_a_folder_where_one_file_is_written_is_refused_before_work(files, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / OUTPUT_MARKER).write_text("")  # even a folder this package wrote
    for args in (("medians", files / "in.h5ad", "--out", folder, "--overwrite"),
                 ("vocab", "build", "--out", folder, "--species", "mouse", "--overwrite")):
        code, err = run_cli(capsys, *args)
        assert code == 2 and "is a folder" in err and "Traceback" not in err, err
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER]


def test_an_output_under_a_file_is_refused(files, tmp_path, capsys):  # noqa: F811
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, err = run_cli(capsys, "vocab", "build", "--out", notes / "v.json", "--species", "mouse")
    assert code == 2 and f"{notes} is a file, not a folder" in err
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        check_output(notes / "deeper" / "corpus")
    assert notes.read_text() == "mine"


def test_an_output_in_a_folder_without_write_permission_is_refused_up_front(tmp_path, monkeypatch):
    from mixgeneformer import fileio

    real_access = os.access
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode))
    with pytest.raises(ArtifactError, match=f"{tmp_path} is not writable"):
        check_output(tmp_path / "new" / "m.tsv", writes=".tsv")


# ------------------------------------------------------------------------- wrong files (25)
@pytest.mark.parametrize("kind", ["binary", "folder"])
def test_a_config_that_is_not_a_yaml_file(tmp_path, kind):
    from mixgeneformer.config import load_config
    from mixgeneformer.pretrain_config import PretrainConfig

    path = tmp_path / "config.yaml"
    if kind == "binary":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)))
    else:
        path.mkdir()
    with pytest.raises(ArtifactError, match="config file .*(HDF5 file|is a directory)"):
        load_config(PretrainConfig, path)


def test_import_geneformer_refuses_the_wrong_dictionaries(tmp_path, capsys):
    from mixgeneformer.vocab import import_geneformer

    names = tmp_path / "gene_name_id_dict.pkl"  # symbol -> Ensembl ID: neither of the two dictionaries
    names.write_bytes(pickle.dumps({"INS": "ENSG00000254647", "GCG": "ENSG00000115263"}))
    with pytest.raises(ArtifactError, match="values must be integer token ids"):
        import_geneformer(names)
    tokens = tmp_path / "token_dictionary.pkl"
    tokens.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000254647": 2}))
    with pytest.raises(ArtifactError, match="not a Geneformer gene median dictionary"):
        import_geneformer(tokens, names)
    code, err = run_cli(capsys, "vocab", "import-geneformer", "--token-dictionary", tokens, "--out",
                        tmp_path / "v.json", "--medians-out", tmp_path / "m.tsv")
    assert code == 2 and "--medians-out needs --gene-median-dictionary" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gene_name_id_dict.pkl", "token_dictionary.pkl"]


def test_a_pickle_given_as_vocabulary_points_to_the_converter(tmp_path):
    from mixgeneformer.vocab import Vocabulary

    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0}))
    with pytest.raises(ArtifactError, match="is a Python pickle.*mixgf vocab import-geneformer"):
        Vocabulary.load(path)


# ------------------------------------------------------------ pretrain --resume (23, 27)
def test_resume_never_writes_into_an_input_nor_without_a_checkpoint_into_a_foreign_folder(tmp_path, caplog, monkeypatch):
    from test_pretrain import make_corpus
    from test_pretrain import make_vocab as pretrain_vocab

    from mixgeneformer import checkpoints
    from mixgeneformer.checkpoints import plan_run_dir

    vocab = pretrain_vocab()
    corpus = make_corpus(tmp_path / "corpus", vocab, n_cells=8)
    for resume in (True, False):  # with a checkpoint in it too: the run would write its config.yaml there
        with pytest.raises(ArtifactError, match="is the input"):
            plan_run_dir(corpus, resume, False, None, [corpus])
    with monkeypatch.context() as patch:  # as if a run had already checkpointed there
        patch.setattr(checkpoints, "latest_complete_checkpoint", lambda run_dir: run_dir / "checkpoint-2")
        with pytest.raises(ArtifactError, match="is the input"):
            plan_run_dir(corpus, True, False, None, [corpus])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("x")
    other_output = make_corpus(tmp_path / "other_corpus", vocab, n_cells=8)  # a mixgeneformer output, not a run
    (other_output / OUTPUT_MARKER).write_text("")
    for folder in (foreign, other_output):
        with pytest.raises(ArtifactError, match="no checkpoint to resume from.*not a pretraining run folder"):
            plan_run_dir(folder, True, False, None, [corpus])
    assert (foreign / "paper.tex").read_text() == "x"

    started = tmp_path / "run"  # a run stopped before its first checkpoint starts over
    started.mkdir()
    (started / OUTPUT_MARKER).write_text("")
    (started / "environment.json").write_text("{}")
    with caplog.at_level("WARNING"):
        assert plan_run_dir(started, True, False, None, [corpus]) == ("overwrite", None)
        assert plan_run_dir(tmp_path / "typo", True, False, None, [corpus]) == ("fresh", None)
    assert "holds no complete checkpoint" in caplog.text and "no run in" in caplog.text


# --------------------------------------------------------------- options (18, 28)
def test_workers_below_one_are_usage_errors(files, tmp_path, capsys):  # noqa: F811
    for args in (("medians", files / "in.h5ad", "--out", tmp_path / "m.tsv", "--workers", "0"),
                 ("tokenize", files / "in.h5ad", "--vocab", files / "vocab.json", "--medians", files / "medians.tsv",
                  "--out", tmp_path / "c", "--workers", "-4")):
        code, err = run_cli(capsys, *args)
        assert code == 2 and "--workers" in err
    from mixgeneformer.medians import compute_medians

    with pytest.raises(Exception, match="workers must be >= 1"):
        compute_medians([files / "in.h5ad"], workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_cells_per_state_needs_a_state_column():
    from mixgeneformer.perturb import PerturbConfig

    with pytest.raises(ConfigError, match="cells_per_state .* needs state_column"):
        PerturbConfig(genes=["ENSG00000254647"], cells_per_state=5)


def test_classify_refuses_its_training_file_as_test(bundle, tmp_path, capsys):  # noqa: F811
    folder, adata = bundle
    adata.write_h5ad(tmp_path / "cells.h5ad")
    code, err = run_cli(capsys, "classify", tmp_path / "cells.h5ad", "--test", tmp_path / "cells.h5ad", "--model", folder,
                        "--mode", "knn", "--out", tmp_path / "report")
    assert code == 2 and "is the training file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


def test_freeze_layers_beyond_the_model_is_refused_before_tokenizing(bundle, monkeypatch):  # noqa: F811
    from mixgeneformer.classify import run as classify_run

    folder, adata = bundle

    def tokenize_task(*args, **kwargs):
        raise AssertionError("tokenized before the options were checked")

    monkeypatch.setattr(classify_run, "tokenize_task", tokenize_task)
    config = C.ClassifyConfig(finetune=C.FinetuneConfig(freeze_layers=99, device="cpu"))
    with pytest.raises(ConfigError, match="freeze_layers=99 but the model has"):
        C.run_classification(adata, folder, methods=("finetune",), config=config)


# ------------------------------------------------- a classifier predicts as it was trained
def test_a_saved_classifier_keeps_its_tokenize_options(tmp_path, monkeypatch):
    from mixgeneformer.classify import predict as predict_module
    from mixgeneformer.tokenize import TokenizeConfig

    adata, vocab, tokens = token_task(n_per_class=6)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    options = TokenizeConfig(style="v2", max_len=64)
    config = C.ClassifyConfig(finetune=C.FinetuneConfig(batch_size=8, epochs=1, device="cpu", validation_fraction=0))
    _, fitted = C.finetune(task, tiny_model(vocab), vocab, None, config, options, tokens=(tokens, tokens))
    loaded = C.load_classifier(fitted.save(tmp_path / "finetuned"))
    assert (tmp_path / "finetuned" / "tokenize.yaml").is_file() and loaded.tokenize_config == options

    seen = []

    def tokenize_cells(data, vocab, medians, tokenize_config, max_len):
        seen.append(tokenize_config)
        return tokens

    monkeypatch.setattr(predict_module, "tokenize_cells", tokenize_cells)
    predict_module.predict_cells(loaded, adata, device="cpu")
    predict_module.predict_cells(loaded, adata, tokenize_config=TokenizeConfig(style="v2", max_len=32), device="cpu")
    assert seen == [options, TokenizeConfig(style="v2", max_len=32)]


# ------------------------------------------------------------------------------ small ones
def test_unknown_symbols_only_map_without_a_pandas_warning():
    from mixgeneformer.genes import map_gene_ids

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(Exception, match="FOOBAR1"):
            map_gene_ids(np.array(["FOOBAR1"], dtype=object), species="human")


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    import numba

    from mixgeneformer import jit

    real = numba.njit

    def njit(*args, **options):  # numba itself may call njit meanwhile
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available")
        return real(*args, **options)

    monkeypatch.setattr(jit.numba, "njit", njit)

    def add(a, b):
        return a + b

    assert jit.njit(add)(2, 3) == 5


def test_a_second_embed_or_predict_into_the_same_file_is_refused(bundle, tmp_path, capsys):  # noqa: F811
    folder, adata = bundle
    adata.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "out.h5ad"
    with lock_holder(out) as pid:
        for args in (("embed", tmp_path / "cells.h5ad", "--model", folder), ("predict", tmp_path / "cells.h5ad", "-c", folder)):
            code, err = run_cli(capsys, *args, "--out", out, "--device", "cpu")
            assert code == 2 and f"being written by another process (pid {pid})" in err, err
    assert not out.exists()  # (the killed holder's lock file stays; the lock itself is gone with it)


# ------------------------------------------------------- silent results of the Python API
def test_text_that_means_no_label_is_dropped_not_a_class():
    import pandas as pd

    from mixgeneformer.classify.labels import prepare_labels

    labels = ["alpha"] * 10 + ["beta"] * 10 + ["nan", "", "None", " NA ", np.nan]
    selection = prepare_labels(pd.DataFrame({"lab": labels}), "lab", min_class_fraction=0)
    assert sorted(set(selection.labels)) == ["alpha", "beta"] and len(selection.rows) == 20


def test_one_gene_named_twice_is_refused(bundle):  # noqa: F811
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.perturb.variants import resolve_genes

    _, vocab, _ = load_bundle(bundle[0])
    gene = sorted(vocab.gene_to_id)[0]
    assert resolve_genes([gene], vocab).size == 1
    with pytest.raises(ConfigError, match=f"one gene more than once \\({gene} = {gene}.1\\)"):
        resolve_genes([gene, f"{gene}.1"], vocab)  # an Ensembl ID and its versioned form


def test_perturbing_an_anndata_counts_the_cells_the_tokenizer_dropped(bundle):  # noqa: F811
    from mixgeneformer.perturb import PerturbConfig, perturb_anndata

    folder, adata = bundle  # two of its 40 cells have no vocabulary gene
    with pytest.warns(UserWarning, match="2 of 12 cells were dropped by the tokenizer"):
        result, _ = perturb_anndata(adata[:12].copy(), folder, PerturbConfig(device="cpu"), progress=False)
    assert result.summary["cells_dropped_by_tokenizer"] == 2


def test_human_symbols_given_as_mouse_are_refused_and_upper_case_mouse_still_folds():
    import anndata as ad

    from mixgeneformer.demo.config import demo_data_dir
    from mixgeneformer.errors import GeneIdError
    from mixgeneformer.genes import map_gene_ids

    def var_names(species):
        return np.asarray(ad.read_h5ad(demo_data_dir() / f"baron_pancreas_{species}.h5ad", backed="r").var_names, dtype=object)

    with pytest.raises(GeneIdError, match="spelled as human symbols.*Pass species='human'"):
        map_gene_ids(var_names("human"), species="mouse")
    mouse = var_names("mouse")
    upper = map_gene_ids(np.array([g.upper() for g in mouse], dtype=object), species="mouse")
    assert list(upper.ensembl_ids) == list(map_gene_ids(mouse, species="mouse").ensembl_ids)
