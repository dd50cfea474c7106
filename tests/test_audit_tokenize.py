"""Tokenize audit: what a corpus must never silently get wrong, and how an interrupted run resumes.

obs columns named like the corpus's own columns, obs columns typed differently in different
inputs, a resume over a folder input (10x mtx, SOMA) changed in place, an input that changes while
it is being tokenized, and a failing task that must end the worker pool rather than run every
other task first.
"""

from __future__ import annotations

import gzip
import json
import os

import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from _tokenize_helpers import cli_exit_code, make_adata, make_medians, make_vocab
from test_readers import write_mtx

from mixgeneformer.errors import ConfigError, InputDataError
from mixgeneformer.fileio import write_json
from mixgeneformer.tokenize import TokenizeConfig, run_manifest, tokenize_anndata, tokenize_files


@pytest.fixture
def small():
    adata = make_adata(12, 40, seed=3)
    genes = np.asarray(adata.var_names)
    return adata, make_vocab(genes), make_medians(genes)


# ------------------------------------------------------------------------------------------------
# 1. An obs column named like a column the corpus holds itself replaced it silently


@pytest.mark.parametrize("column", ["species", "length", "input_ids", "cell_index"])
def test_an_obs_column_named_like_a_corpus_column_is_refused(small, tmp_path, column):
    # Before: obs "species" (e.g. "Homo sapiens") replaced the corpus's species column that
    # species-balanced sampling and the cross-species term read; obs "length" replaced the lengths.
    adata, vocab, medians = small
    adata.obs[column] = 7 if column != "species" else "Homo sapiens"
    with pytest.raises(ConfigError, match=f"obs column '{column}'.*rename"):
        tokenize_anndata(adata, vocab, medians, obs_columns=[column])
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ConfigError, match=f"obs column '{column}'"):
        tokenize_files([tmp_path / "a.h5ad"], tmp_path / "corpus", vocab, medians, obs_columns=[column])
    assert not (tmp_path / "corpus").exists() and not (tmp_path / ".corpus.partial").exists()


def test_cli_obs_column_named_species_exits_2_with_one_message(small, tmp_path, capsys):
    adata, vocab, medians = small
    adata.obs["species"] = "Homo sapiens"
    adata.write_h5ad(tmp_path / "a.h5ad")
    vocab.save(tmp_path / "vocab.json")
    medians.save(tmp_path / "medians.tsv")
    code = cli_exit_code(["tokenize", tmp_path / "a.h5ad", "--vocab", tmp_path / "vocab.json", "--medians",
                          tmp_path / "medians.tsv", "--out", tmp_path / "corpus", "--obs-columns", "cell_type,species"])
    err = capsys.readouterr().err
    assert code == 2 and "obs column 'species'" in err and "Traceback" not in err
    assert not (tmp_path / "corpus").exists()


# ------------------------------------------------------------------------------------------------
# 2. obs column types were taken from the first input only: a later input crashed in pyarrow


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (list(range(10)), [f"d{i}" for i in range(8)], [str(i) for i in range(10)] + [f"d{i}" for i in range(8)]),
        (list(range(10)), [1.5, np.nan] + [2.0] * 6, [float(i) for i in range(10)] + [1.5, None] + [2.0] * 6),
        ([True] * 10, ["yes"] * 8, ["True"] * 10 + ["yes"] * 8),
    ],
    ids=["int-then-str", "int-then-float", "bool-then-str"],
)
def test_an_obs_column_typed_differently_in_two_inputs_gets_one_common_type(tmp_path, first, second, expected):
    a, b = make_adata(10, 30, seed=1), make_adata(8, 30, seed=2)
    a.X = sp.csr_matrix(a.X.toarray() + 1)  # every cell tokenized, so the column is compared whole
    b.X = sp.csr_matrix(b.X.toarray() + 1)
    a.obs["donor"], b.obs["donor"] = first, second
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    genes = np.asarray(a.var_names)
    out = tokenize_files([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "c", make_vocab(genes),
                         make_medians(genes), obs_columns=["donor"])
    assert datasets.load_from_disk(str(out))["donor"] == expected


# ------------------------------------------------------------------------------------------------
# 3. A folder input (10x mtx, SOMA) was fingerprinted by the folder's own stat only


def _interrupted_partial(tmp_path, files, vocab, medians, config, blocked_start):
    """A run interrupted at the task starting at ``blocked_start`` (a folder blocks its shard)."""
    partial = tmp_path / ".corpus.partial"
    partial.mkdir()
    write_json(partial / "manifest.json", run_manifest([str(f) for f in files], vocab.hash, medians.hash, config, []))
    blocker = partial / f"shard-00000-{blocked_start:012d}.arrow"
    blocker.mkdir()
    with pytest.raises(OSError):
        tokenize_files(files, tmp_path / "corpus", vocab, medians, config)
    assert sorted(p.name for p in partial.glob("*.arrow.json"))  # finished shards kept to resume from
    blocker.rmdir()
    return partial


def test_resume_over_a_10x_folder_rewritten_in_place_does_not_mix_old_shards(tmp_path):
    old, new = make_adata(30, 60, seed=1), make_adata(30, 60, seed=7)
    folder = tmp_path / "mtx"
    write_mtx(old, folder)
    genes = np.asarray(old.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    config = TokenizeConfig(task_cells=10, chunk_size=5)
    _interrupted_partial(tmp_path, [folder], vocab, medians, config, blocked_start=20)

    before = os.stat(folder).st_mtime_ns
    with gzip.open(folder / "matrix.mtx.gz", "wb") as handle:  # re-exported into the same files
        scipy.io.mmwrite(handle, sp.coo_matrix(new.X.T), field="integer")
    assert os.stat(folder).st_mtime_ns == before  # the folder itself looks unchanged

    resumed = datasets.load_from_disk(str(tokenize_files([folder], tmp_path / "corpus", vocab, medians, config)))
    write_mtx(new, tmp_path / "fresh")
    fresh = datasets.load_from_disk(str(tokenize_files([tmp_path / "fresh"], tmp_path / "ref", vocab, medians, config)))
    assert resumed["input_ids"] == fresh["input_ids"]


# ------------------------------------------------------------------------------------------------
# 4. An input that changed while it was being tokenized gave a corpus of two versions of it


def test_an_input_changed_during_the_run_is_refused_not_mixed(small, tmp_path, monkeypatch, capsys):
    from mixgeneformer.tokenize import files as files_module

    adata, vocab, medians = small
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    task = files_module._tokenize_task
    calls = []

    def rewrite_after_first(*args, **kwargs):
        result = task(*args, **kwargs)
        if not calls:
            changed = adata.copy()
            changed.X = sp.csr_matrix(changed.X.toarray()[::-1])
            changed.write_h5ad(path)  # e.g. another job re-exports it meanwhile
        calls.append(1)
        return result

    monkeypatch.setattr(files_module, "_tokenize_task", rewrite_after_first)
    with pytest.raises(InputDataError, match="changed while"):
        tokenize_files([path], tmp_path / "corpus", vocab, medians, TokenizeConfig(task_cells=4))
    assert not (tmp_path / "corpus").exists() and not (tmp_path / ".corpus.partial").exists()


# ------------------------------------------------------------------------------------------------
# 5. A failing task let the pool run every other task before the error was reported


def test_a_failing_task_ends_the_worker_pool_without_running_every_other_task(tmp_path):
    adata = make_adata(240, 30, seed=5)
    adata.write_h5ad(tmp_path / "a.h5ad")
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    config = TokenizeConfig(task_cells=2, chunk_size=2)  # 120 tasks
    partial = tmp_path / ".corpus.partial"
    partial.mkdir()
    write_json(partial / "manifest.json", run_manifest([str(tmp_path / "a.h5ad")], vocab.hash, medians.hash, config, []))
    (partial / "shard-00000-000000000000.arrow").mkdir()  # the first task cannot write its shard
    with pytest.raises(OSError):
        tokenize_files([tmp_path / "a.h5ad"], tmp_path / "corpus", vocab, medians, config, workers=2)
    done = len(list(partial.glob("*.arrow.json")))
    assert done < 60, f"{done} of 119 other tasks ran after the first one failed"



def test_worker_pool_left_by_an_exception_cancels_its_queued_tasks():
    """The medians, tokenize and demo stages share parallel.worker_pool: an error inside its ``with``
    block cancels what is still queued (ProcessPoolExecutor's own exit ran every queued task first)."""
    import time

    from mixgeneformer.parallel import worker_pool

    futures = []
    with pytest.raises(RuntimeError, match="boom"):
        with worker_pool(1) as pool:
            futures = [pool.submit(time.sleep, 0.05) for _ in range(40)]
            raise RuntimeError("boom")
    assert sum(f.cancelled() for f in futures) >= 30
    with worker_pool(1) as pool:  # a block that ends normally still runs every task
        done = [pool.submit(abs, -i) for i in range(5)]
    assert [f.result() for f in done] == [0, 1, 2, 3, 4]

# ------------------------------------------------------------------------------------------------
# Sound areas, pinned: chunk / task boundaries and obs alignment with dropped cells


def test_task_and_chunk_boundaries_keep_cells_and_obs_aligned(tmp_path):
    adata = make_adata(23, 40, seed=11)
    x = adata.X.toarray()
    x[[0, 4, 5, 9, 22]] = 0  # dropped cells at chunk and task edges
    adata.X = sp.csr_matrix(x)
    adata.obs["name"] = pd.Index(adata.obs_names).astype(str)
    adata.write_h5ad(tmp_path / "a.h5ad")
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    whole = tokenize_anndata(adata, vocab, medians, TokenizeConfig(chunk_size=100), obs_columns=["name", "score"])
    for task_cells, chunk_size in ((5, 5), (5, 2), (4, 3), (1, 1)):
        out = tokenize_files([tmp_path / "a.h5ad"], tmp_path / f"c{task_cells}{chunk_size}", vocab, medians,
                             TokenizeConfig(task_cells=task_cells, chunk_size=chunk_size), obs_columns=["name", "score"])
        corpus = datasets.load_from_disk(str(out))
        assert corpus["input_ids"] == whole["input_ids"]
        assert corpus["name"] == [f"cell{i}" for i in corpus["cell_index"]]
        assert corpus["score"] == [float(i) for i in corpus["cell_index"]]
        report = json.loads((out / "mixgf_corpus.json").read_text())
        assert (report["cells_in"], report["cells_out"], report["dropped_zero_counts"]) == (23, 18, 5)


# ------------------------------------------------------------------------------------------------
# 6. A partial run was resumed by another version of the package (its shards tokenized by the old code)


def test_shards_of_another_package_version_are_not_resumed(small, tmp_path, monkeypatch, caplog):
    from mixgeneformer.tokenize import files as files_module

    adata, vocab, medians = small
    adata.write_h5ad(tmp_path / "a.h5ad")
    config = TokenizeConfig(task_cells=4)
    partial = _interrupted_partial(tmp_path, [tmp_path / "a.h5ad"], vocab, medians, config, blocked_start=8)
    assert list(partial.glob("shard-*.arrow.json"))
    monkeypatch.setattr(files_module, "__version__", "999.0")  # the package was upgraded before the rerun
    with caplog.at_level("WARNING", logger="mixgeneformer.tokenize.files"):
        out = tokenize_files([tmp_path / "a.h5ad"], tmp_path / "corpus", vocab, medians, config)
    assert "discarding" in caplog.text and len(datasets.load_from_disk(str(out))) == 12


# ------------------------------------------------------------------------------------------------
# 7. A finished shard whose file was cut short (marker intact) broke every rerun at assembly


def test_a_truncated_finished_shard_is_redone_on_resume(small, tmp_path):
    adata, vocab, medians = small
    adata.write_h5ad(tmp_path / "a.h5ad")
    config = TokenizeConfig(task_cells=4)
    partial = _interrupted_partial(tmp_path, [tmp_path / "a.h5ad"], vocab, medians, config, blocked_start=8)
    shard = partial / "shard-00000-000000000000.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # e.g. a crash of the machine before the file reached the disk
    out = tokenize_files([tmp_path / "a.h5ad"], tmp_path / "corpus", vocab, medians, config)
    fresh = tokenize_anndata(adata, vocab, medians, config)
    assert datasets.load_from_disk(str(out))["input_ids"] == fresh["input_ids"]


# ------------------------------------------------------------------------------------------------
# 8. A missing species token was found only by the task of that input, after the others had run


def test_a_missing_species_token_is_refused_before_any_shard_is_written(tmp_path):
    import anndata as ad

    from mixgeneformer.genes import gene_table
    from mixgeneformer.vocab import Vocabulary

    mouse_genes = gene_table("mouse").query("biotype == 'protein_coding'")["ensembl_id"].to_numpy(dtype=object)[:30]
    human = make_adata(10, 30, seed=4)
    mouse = ad.AnnData(make_adata(8, 30, seed=5).X, var=pd.DataFrame(index=mouse_genes))
    human.write_h5ad(tmp_path / "h.h5ad")
    mouse.write_h5ad(tmp_path / "m.h5ad")
    genes = np.concatenate([np.asarray(human.var_names), mouse_genes])
    full, medians = make_vocab(genes, drop_every=1000), make_medians(genes)
    tokens = [t for t in full.tokens if t != "<mouse>"]
    vocab = Vocabulary(tokens, {g: i for i, g in enumerate(tokens) if g.startswith("ENS")}, "separate")
    with pytest.raises(ConfigError, match="no species token"):
        tokenize_files([tmp_path / "h.h5ad", tmp_path / "m.h5ad"], tmp_path / "c", vocab, medians,
                       TokenizeConfig(add_species_token=True))
    assert not (tmp_path / ".c.partial").exists() and not (tmp_path / "c").exists()


def test_per_file_medians_with_a_table_passed_too_are_refused_and_models_of_per_file_corpora_tokenize(tmp_path):
    """medians='per_file' ignored a median table passed beside it (the library; the CLI refuses the pair);
    tokenize_for_model, which always has the bundle's table, normalizes by each input's own medians
    when the model's corpus was made that way."""
    from mixgeneformer.tokenize import tokenize_for_model

    adata = make_adata(30, 40, seed=3)
    adata.write_h5ad(tmp_path / "a.h5ad")
    genes = np.asarray(adata.var_names)
    vocab, medians = make_vocab(genes), make_medians(genes)
    per_file = TokenizeConfig(medians="per_file")
    with pytest.raises(ConfigError, match="medians='per_file'.*a median table was passed too"):
        tokenize_anndata(adata, vocab, medians, per_file)
    with pytest.raises(ConfigError, match="medians='per_file'.*a median table was passed too"):
        tokenize_files([tmp_path / "a.h5ad"], tmp_path / "corpus", vocab, medians, per_file)
    assert not (tmp_path / "corpus").exists()
    corpus, _rows, _config = tokenize_for_model(adata, vocab, medians, per_file)
    assert corpus["input_ids"] == tokenize_anndata(adata, vocab, None, per_file)["input_ids"]
