"""Session 31 fixes: messages about a file's counts name the file (not 'AnnData'), which of two with
``mixgf classify --test``. Each test failed on the code before its fix."""

from __future__ import annotations

import gc

import anndata as ad
import numpy as np
import pytest
from test_audit_predict import made  # noqa: F401  (fixture)
from test_sharding import data  # noqa: F401  (fixture)

from mixgeneformer.cli import main
from mixgeneformer.fileio import read_h5ad, remember_source, source_name


def _run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return int(exit_info.value.code), capsys.readouterr().err


def _with_negative_count(source, path) -> None:
    bad = source["adata"].copy()
    bad.X[3, 5] = -2.0
    bad.write_h5ad(path)


def test_classify_names_the_test_file_whose_counts_are_bad(data, tmp_path, capsys):  # noqa: F811
    # Before: "AnnData: ... negative value" for either file: nothing told whether --test or the input was at fault.
    bad = tmp_path / "test_cells.h5ad"
    _with_negative_count(data, bad)
    code, err = _run(capsys, "classify", data["h5ad"], "--test", bad, "--out", tmp_path / "out", "--mode", "none",
                     "--baselines", "--label", "cell_type1")
    assert code == 2
    assert str(bad) in err and "negative" in err
    assert "AnnData:" not in err
    assert not (tmp_path / "out").exists()


def test_embed_names_the_input_file_whose_counts_are_bad(data, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "cells.h5ad"
    _with_negative_count(data, bad)
    code, err = _run(capsys, "embed", bad, "--model", data["bundle"], "--out", tmp_path / "out.h5ad", "--no-progress",
                     "--device", "cpu")
    assert code == 2
    assert str(bad) in err and "negative" in err
    assert not (tmp_path / "out.h5ad").exists()


def test_a_file_without_any_vocabulary_gene_is_named_in_the_error(made, tmp_path, capsys):  # noqa: F811
    # Before: "the AnnData: no cell could be tokenized" for an input file of mixgf predict.
    code, err = _run(capsys, "predict", made["empty"], "--classifier", made["classifier"], "--out", tmp_path / "p.h5ad",
                     "--device", "cpu")
    assert code == 2
    assert f"{made['empty']}: no cell could be tokenized" in err


def test_an_anndata_made_in_python_is_still_called_anndata_and_a_name_is_forgotten_with_its_object(tmp_path):
    built = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    assert source_name(built) == "AnnData"
    path = tmp_path / "x.h5ad"
    built.write_h5ad(path)
    read = read_h5ad(path)
    assert source_name(read) == str(path)
    assert source_name(read.copy()) == "AnnData"  # a copy is another object: the caller's, not the file's
    remember_source(built, "elsewhere.h5ad")
    key = id(built)
    del built, read
    gc.collect()
    from mixgeneformer import fileio

    assert key not in fileio._SOURCES  # no growing table of dead objects



def test_predict_records_the_cells_per_species_it_classified_in_one_process_and_sharded(made, tmp_path):  # noqa: F811
    # Before: embed and perturb recorded the species of the cells they read (uns[KEY_params]["species"]);
    # predict recorded none, so a mixed-species prediction file did not say what it held.
    from test_audit_predict import _predict, _sharded

    one, sharded = tmp_path / "one.h5ad", tmp_path / "sharded.h5ad"
    _predict(made["h5ad"], made["classifier"], one)
    _sharded(made["h5ad"], made["classifier"], sharded, 3)
    one_params, sharded_params = (ad.read_h5ad(p).uns["predicted_params"] for p in (one, sharded))
    n_kept = int(one_params["n_cells"]) - int(one_params["n_dropped"])
    assert {k: int(v) for k, v in one_params["species"].items()} == {"human": n_kept}
    assert {k: int(v) for k, v in sharded_params["species"].items()} == {"human": n_kept}


def test_training_and_held_out_masking_seeds_are_the_hashes_they_were():
    # The two masking seeds now share seeds.content_seed; the numbers of every earlier run depend on them being
    # exactly the former hashes, recomputed here by hand.
    import hashlib

    from mixgeneformer.collator import EVAL_MASK_EPOCH
    from mixgeneformer.sampling import batch_seed
    from mixgeneformer.seeds import content_seed

    rng = np.random.default_rng(0)
    for _ in range(50):
        cells = [rng.integers(0, 30_000, size=int(rng.integers(1, 200))).astype(np.int32) for _ in range(3)]
        seed, epoch = int(rng.integers(0, 2**31)), int(rng.integers(0, 5))
        digest = hashlib.blake2b(np.asarray([seed, epoch], dtype=np.int64).tobytes(), digest_size=8)
        for cell in cells:
            digest.update(np.int64(cell.size).tobytes() + cell.tobytes())
        assert batch_seed(seed, epoch, cells) == int.from_bytes(digest.digest(), "little") & (2**63 - 1)
        held_out = hashlib.blake2b(np.asarray([seed, EVAL_MASK_EPOCH, cells[0].size], dtype=np.int64).tobytes()
                                   + cells[0].tobytes(), digest_size=8)
        assert content_seed(seed, EVAL_MASK_EPOCH, [cells[0]]) == int.from_bytes(held_out.digest(), "little")


def test_demo_names_a_damaged_input_of_its_data_dir(tmp_path, capsys):
    # Before: the demo read its inputs with anndata directly: a truncated h5ad in data_dir was a traceback.
    import shutil

    from mixgeneformer.demo import demo_data_dir

    folder = tmp_path / "data"
    folder.mkdir()
    for path in demo_data_dir().glob("baron_pancreas_*.h5ad"):
        shutil.copy(path, folder / path.name)
    broken = folder / "baron_pancreas_mouse.h5ad"
    broken.write_bytes(broken.read_bytes()[:4096])
    code, err = _run(capsys, "demo", "--quick", "--out", tmp_path / "run", "--set", f"data_dir={folder}")
    assert code == 2
    assert f"demo input {broken}" in err and "Traceback" not in err
