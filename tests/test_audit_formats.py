"""Damaged and odd input files a user may hand the readers (found by auditing every format): one
clear InputDataError naming the file, never a crash, a traceback or a silently wrong matrix."""

from __future__ import annotations

import gzip

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from _tokenize_helpers import make_adata
from test_readers import read_all, write_10x_h5, write_loom, write_mtx

from mixgeneformer.errors import ArtifactError, ConfigError, GeneIdError, InputDataError
from mixgeneformer.fileio import check_output
from mixgeneformer.genes import detect_species, gene_table, map_gene_ids
from mixgeneformer.medians import compute_medians
from mixgeneformer.readers import ReadOptions


def _edit(path, key, change):
    """Replace dataset ``key`` of an HDF5 file by ``change(old values)``."""
    with h5py.File(path, "a") as f:
        values = change(f[key][()].copy())
        del f[key]
        f[key] = values


@pytest.fixture
def h5ad(tmp_path):
    path = tmp_path / "cells.h5ad"
    make_adata(30, 50).write_h5ad(path)
    return path


def _set(position, value):
    def change(values):
        values[position] = value
        return values
    return change


@pytest.mark.parametrize(("key", "change", "message"), [
    ("X/indices", _set(3, 10**6), "corrupt"),  # read out of bounds by the kernels before: a segfault
    ("X/indices", _set(3, -5), "corrupt"),  # silently other tokens before
    ("X/indptr", _set(15, 0), "pointers decrease"),  # one cell silently dropped before
    ("X/data", lambda v: v[:-4], "values but"),
    ("obs/_index", lambda v: v[:-3], "obs names"),
])
def test_a_damaged_h5ad_is_one_message(h5ad, key, change, message):
    _edit(h5ad, key, change)
    with pytest.raises(InputDataError, match=message):
        read_all(h5ad)


def test_a_damaged_csc_h5ad_and_10x_h5_are_refused(tmp_path):
    adata = make_adata(30, 50)
    csc = tmp_path / "csc.h5ad"
    ad.AnnData(sp.csc_matrix(adata.X), adata.obs, adata.var).write_h5ad(csc)
    _edit(csc, "X/indices", _set(2, 30))  # a row beyond the last cell: silently discarded before
    with pytest.raises(InputDataError, match="row index outside"):
        read_all(csc)
    tenx = tmp_path / "cells.h5"
    write_10x_h5(adata, tenx)
    _edit(tenx, "matrix/indices", _set(2, 10**6))
    with pytest.raises(InputDataError, match="corrupt"):
        read_all(tenx)


def test_broken_loom_and_mtx_files_are_one_message(tmp_path):
    adata = make_adata(30, 50)
    loom = tmp_path / "cells.loom"
    write_loom(adata, loom)
    _edit(loom, "row_attrs/Accession", lambda v: v[:-5])  # a segfault before
    with pytest.raises(InputDataError, match="matrix rows"):
        read_all(loom)
    with h5py.File(loom, "a") as f:
        del f["row_attrs"]
    with pytest.raises(InputDataError, match="opening it as a .loom file failed"):  # a KeyError traceback before
        read_all(loom)
    write_mtx(adata, tmp_path / "tenx")
    matrix = tmp_path / "tenx" / "matrix.mtx.gz"
    matrix.write_bytes(matrix.read_bytes()[: matrix.stat().st_size // 2])  # exit 130, no message before
    with pytest.raises(InputDataError, match="EOFError"):
        read_all(tmp_path / "tenx")
    with gzip.open(matrix, "wt") as handle:
        handle.write("%%MatrixMarket matrix coordinate pattern general\n50 30 1\n1 1\n")
    with pytest.raises(InputDataError, match="pattern"):  # "NaN or Inf" before
        read_all(tmp_path / "tenx")


def test_half_precision_counts_are_read_and_boolean_refused(tmp_path):
    adata = make_adata(30, 50)
    half = tmp_path / "half.h5ad"
    adata.write_h5ad(half)
    _edit(half, "X/data", lambda v: v.astype(np.float16))
    np.testing.assert_array_equal(read_all(half)[0], adata.X.toarray())
    adata.write_h5ad(tmp_path / "full.h5ad")
    assert compute_medians([str(half)]).hash == compute_medians([str(tmp_path / "full.h5ad")]).hash  # numba had no float16 kernel
    boolean = tmp_path / "bool.h5ad"
    ad.AnnData(adata.X.astype(bool), adata.obs, adata.var).write_h5ad(boolean)
    with pytest.raises(InputDataError, match="boolean"):
        read_all(boolean)


def test_no_output_inside_an_input_folder(tmp_path):
    write_mtx(make_adata(10, 20), tmp_path / "tenx")
    with pytest.raises(ArtifactError, match="inside the input folder"):  # it replaced matrix.mtx.gz's reading before
        check_output(tmp_path / "tenx" / "matrix.mtx", [tmp_path / "tenx"], option="--out")
    assert check_output(tmp_path / "medians.tsv", [tmp_path / "tenx"]) == tmp_path / "medians.tsv"


def test_species_from_changed_case_is_refused():
    mouse = gene_table("mouse")["symbol"].dropna().head(3000).to_numpy()
    assert detect_species(mouse) == "mouse"
    with pytest.raises(GeneIdError, match="species='mouse'"):  # read as human (81% mapped) before
        detect_species(np.char.upper(mouse.astype(str)))
    assert map_gene_ids(np.char.upper(mouse.astype(str)), species="mouse").species == "mouse"
    human = gene_table("human")["symbol"].dropna().head(3000).to_numpy().astype(str)
    assert detect_species(human) == "human"
    with pytest.raises(GeneIdError, match="upper-case them"):  # read as mouse (77% mapped) before
        detect_species(np.char.capitalize(np.char.lower(human)))


def test_min_coverage_is_a_fraction():
    with pytest.raises(ConfigError, match="from 0 to 1"):
        ReadOptions(min_coverage=1.5)


def test_cli_refuses_clashing_per_file_names_and_count_files_for_model_commands(tmp_path, capsys):
    from _tokenize_helpers import cli_exit_code

    adata = make_adata(20, 40)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        adata.write_h5ad(tmp_path / folder / "s.h5ad")
    out = tmp_path / "medians"
    assert cli_exit_code(["medians", str(tmp_path / "a" / "s.h5ad"), str(tmp_path / "b" / "s.h5ad"), "-o", str(out), "--per-file"]) == 2
    assert "named ['s']" in capsys.readouterr().err and not out.exists()  # one table silently lost before
    write_loom(adata, tmp_path / "cells.loom")
    assert cli_exit_code(["embed", str(tmp_path / "cells.loom"), "-m", str(tmp_path), "-o", str(tmp_path / "e.h5ad")]) == 2
    # "AnnData.__init__() got an unexpected keyword" before; the model commands now read a .loom (was refused with "is
    # a .loom file": tests/test_input_formats.py), so the one message is about another mistake (--out in the -m folder)
    err = capsys.readouterr().err
    assert "is a .loom file" not in err and "inside the input folder" in err and "Traceback" not in err, err


def test_a_stale_zero_n_counts_is_refused(tmp_path):
    from mixgeneformer.readers import normalization_totals, open_source

    adata = make_adata(20, 40)
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.obs.loc[adata.obs_names[3], "n_counts"] = 0  # the cell was dropped as "without a vocabulary gene" before
    with open_source(adata) as source:
        chunk = next(source.iter_chunks(100, obs_columns=["n_counts"]))
    with pytest.raises(InputDataError, match="is 0 for 1 cells that have counts"):
        normalization_totals(chunk)
