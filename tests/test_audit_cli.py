"""The command line: usage errors, options checked before any work, clear messages for full disks
and broken inputs in the model commands (RELIABILITY 24, 25, 28)."""

from __future__ import annotations

import errno
import subprocess
import sys

import pandas as pd
import pytest
from test_audit_files import leftovers, run_cli
from test_embed import bundle  # noqa: F401  (the tiny model bundle fixture)


# ------------------------------------------------------------------------ 10: usage errors
@pytest.mark.parametrize(
    "args",
    [
        ["vocab", "build", "--bogus"],  # unknown option
        ["vocab", "build"],  # missing option
        ["tokenize", "x.h5ad", "--vocab", "v.json", "--out", "o", "--workers", "two"],  # bad integer
        ["no-such-command"],  # unknown command
        ["vocab", "no-such-subcommand"],
    ],
)
def test_usage_errors_exit_2_without_traceback(args, capsys):
    code, err = run_cli(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and ("Usage" in err or "Error" in err)


def test_usage_error_from_the_console_script():
    result = subprocess.run([sys.executable, "-m", "mixgeneformer", "embed", "--no-such-option"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "No such option" in result.stderr


# --------------------------------------------------------- 16: every option before any work
def _embed_args(bundle, tmp_path, *extra):  # noqa: F811
    folder, adata = bundle
    source = tmp_path / "cells.h5ad"
    if not source.exists():
        adata.write_h5ad(source)
    return ["embed", source, "--model", folder, "--out", tmp_path / "out.h5ad", "--no-progress", "--device", "cpu", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--umap", "fig.png", "--color", "no_such_column"), "--color 'no_such_column' is not a column"),
        (("--umap", "fig.xyz", "--color", "cell_type1"), "--umap"),
        (("--gene-embeddings", "genes.csv"), "--gene-embeddings"),
    ],
)
def test_embed_checks_every_option_before_writing(bundle, tmp_path, capsys, extra, message):  # noqa: F811
    extra = tuple(str(tmp_path / e) if e.startswith(("fig", "genes")) else e for e in extra)
    code, err = run_cli(capsys, *_embed_args(bundle, tmp_path, *extra))
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


def test_embed_output_never_replaces_the_input(bundle, tmp_path, capsys):  # noqa: F811
    args = _embed_args(bundle, tmp_path, "--overwrite")
    source = args[1]
    args[args.index("--out") + 1] = source
    before = source.read_bytes()
    code, err = run_cli(capsys, *args)
    assert code == 2 and "is the input" in err
    assert source.read_bytes() == before


def test_embed_on_a_full_disk(bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    import anndata as ad

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    args = _embed_args(bundle, tmp_path)
    monkeypatch.setattr(ad.io, "write_elem", full)
    with pytest.warns(UserWarning, match="dropped"):
        code, err = run_cli(capsys, *args)
    assert code == 2 and "disk is full" in err and str(tmp_path / "out.h5ad") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


def test_embed_outputs_are_replaced_all_or_none(bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    import pyarrow.parquet as pq

    args = _embed_args(bundle, tmp_path, "--gene-embeddings", tmp_path / "genes.parquet", "--overwrite")
    with pytest.warns(UserWarning, match="dropped"):
        assert run_cli(capsys, *args)[0] == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("out.h5ad", "genes.parquet")}

    def full(*args, **kwargs):  # the disk fills up while the second file is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.warns(UserWarning, match="dropped"):
        code, err = run_cli(capsys, *args, "--layer", "-1")  # another embedding: another h5ad
    assert code == 2 and "disk is full" in err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the h5ad too, though written first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "genes.parquet", "out.h5ad"]


# --------------------------------------------------- 11 / 12: classify and perturb outputs
def test_classify_on_a_read_only_folder_leaves_nothing(bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    folder, adata = bundle
    adata.write_h5ad(tmp_path / "cells.h5ad")

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pd.DataFrame, "to_csv", denied)
    out = tmp_path / "report"
    code, err = run_cli(capsys, "classify", tmp_path / "cells.h5ad", "--out", out, "--mode", "none", "--baselines")
    assert code == 2 and f"cannot write {out}" in err and "not writable" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_perturb_truncated_input_and_full_disk(bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    folder, adata = bundle
    adata[:6].copy().write_h5ad(tmp_path / "cells.h5ad")
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes((tmp_path / "cells.h5ad").read_bytes()[:2000])
    out = tmp_path / "perturbed"
    base = ["perturb", "--model", folder, "--out", out, "--genes", "all", "--device", "cpu", "--no-progress"]
    code, err = run_cli(capsys, base[0], broken, *base[1:])
    assert code == 2 and "cannot read input h5ad" in err and "Traceback" not in err

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full)
    code, err = run_cli(capsys, base[0], tmp_path / "cells.h5ad", *base[1:])
    assert code == 2 and f"cannot write {out}" in err and "disk is full" in err
    assert not out.exists() and leftovers(tmp_path) == []
