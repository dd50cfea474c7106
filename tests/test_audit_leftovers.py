"""Leftover defects of the audits: an overwrite interrupted between its renames, read vs write
permission errors, write_h5ad onto a folder, a median table cut at a line break, a median table of
another vocabulary."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_audit_files import run_cli

from mixgeneformer import fileio
from mixgeneformer.errors import ArtifactError


# ------------------------------------------------------- 1: an overwrite cut between its renames
def _write(target: Path, text: str, overwrite: bool = False) -> None:
    with fileio.atomic_directory(target, overwrite=overwrite) as tmp:
        (tmp / "a.txt").write_text(text)


def _interrupted_overwrite(target: Path, monkeypatch) -> Path:
    """Replace ``target`` and stop between moving the old output aside and moving the new one in;
    return where the old output is."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder into place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _write(target, "new", overwrite=True)
    monkeypatch.setattr(fileio.os, "replace", real)
    assert not target.exists()
    (aside,) = fileio.moved_aside(target)
    assert (aside / "a.txt").read_text() == "old"
    return aside


def test_the_next_write_restores_an_output_an_interrupted_overwrite_moved_aside(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write(target, "old")
    aside = _interrupted_overwrite(target, monkeypatch)
    with pytest.warns(UserWarning, match=f"restored from {aside.name}"):
        with pytest.raises(ArtifactError, match="already exists"):  # without overwrite: as before the interrupted run
            _write(target, "again")
    assert (target / "a.txt").read_text() == "old" and fileio.moved_aside(target) == []
    _write(target, "newer", overwrite=True)
    assert (target / "a.txt").read_text() == "newer" and fileio.moved_aside(target) == []


def test_a_command_claiming_the_output_restores_it_and_a_reader_is_told_where_it_is(tmp_path, monkeypatch):
    target = tmp_path / "model"
    _write(target, "old")
    aside = _interrupted_overwrite(target, monkeypatch)
    with pytest.raises(ArtifactError, match=f"interrupted overwrite left {target} at {aside}"):
        fileio.check_readable_file(target / "a.txt", "model")
    with pytest.warns(UserWarning, match="restored"):
        with pytest.raises(ArtifactError, match="already exists"):
            with fileio.claim_outputs(lambda: fileio.check_output(target), target):
                pass
    assert (target / "a.txt").read_text() == "old"


def test_a_half_deleted_old_output_is_removed_and_a_kept_one_is_named(tmp_path):
    target = tmp_path / "out"
    _write(target, "current")
    half = tmp_path / ".out.old-0123abcd"  # its deletion had begun: no marker
    half.mkdir()
    (half / "rest.bin").write_bytes(b"x")
    kept = tmp_path / ".out.old-89abcdef"  # an old output beside a complete new one: the user's to delete
    kept.mkdir()
    fileio.write_output_marker(kept)
    with pytest.warns(UserWarning, match=str(kept)):
        _write(target, "next", overwrite=True)
    assert not half.exists() and kept.is_dir() and (target / "a.txt").read_text() == "next"


# ---------------------------------------------------------- 3: write_h5ad onto an existing folder
def test_write_h5ad_onto_a_folder_names_the_path_and_the_fix(tmp_path):
    import anndata as ad
    import numpy as np

    folder = tmp_path / "cells.h5ad"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=f"cannot write {folder}: it is a folder.*Give a file path"):
        fileio.write_h5ad(ad.AnnData(np.ones((2, 3), dtype=np.float32)), folder)
    assert (folder / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


# ----------------------------------------------- 2: a permission error on reading says "cannot read"
def _deny_reading(monkeypatch, path: Path) -> None:
    real_access = os.access  # tests may run as root, who may read anything: os.access says what a user sees
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path and mode & os.R_OK else real_access(p, mode, **kw))


def test_an_unreadable_input_met_by_the_cli_is_called_unreadable(tmp_path, capsys, monkeypatch):
    import mixgeneformer.vocab as vocab

    (tmp_path / "vocab.json").write_text("{}")  # typer checks the file it is given; a file read from it, not
    path = tmp_path / "genes.tsv"
    path.write_text("x")
    _deny_reading(monkeypatch, path)

    def denied(p):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(vocab.Vocabulary, "load", staticmethod(denied))
    code, err = run_cli(capsys, "vocab", "info", tmp_path / "vocab.json")
    assert code == 2 and f"cannot read {path}" in err and "not readable" in err and "cannot write" not in err


def test_an_unreadable_input_read_while_an_output_is_written_is_called_unreadable(tmp_path, monkeypatch):
    source, out = tmp_path / "in.txt", tmp_path / "out"
    source.write_text("data")
    _deny_reading(monkeypatch, source)
    with pytest.raises(ArtifactError) as caught:
        with fileio.atomic_directory(out):  # the command's work runs inside writing(out)
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
    assert f"cannot read {source}: the file is not readable" in str(caught.value) and "cannot write" not in str(caught.value)
    assert not out.exists()


def test_a_write_denied_is_still_called_unwritable(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match=f"cannot write {out}.*not writable"):
        with fileio.atomic_directory(out) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "new.bin"))


def test_a_permission_error_without_a_path_does_not_claim_a_write(capsys, monkeypatch):
    import mixgeneformer.vocab as vocab

    def denied(p):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(vocab.Vocabulary, "load", staticmethod(denied))
    code, err = run_cli(capsys, "vocab", "info", "vocab.json")
    assert code == 2 and "permission denied" in err and "cannot write" not in err


# ------------------------------------------------ 4: a median table cut at a line break
def _table(n: int = 5):
    from mixgeneformer.medians import GeneMedians

    return GeneMedians({f"ENSG{i:011d}": 1.0 + i / 3 for i in range(1, n + 1)})


def test_a_median_table_cut_at_a_line_break_is_refused(tmp_path):
    from mixgeneformer.medians import GeneMedians

    path = _table().save(tmp_path / "m.tsv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a table with its count: no warning
        assert GeneMedians.load(path) == _table()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # two whole lines lost: still parses
    with pytest.raises(ArtifactError, match=rf"{path} holds 3 genes, and its header records 5.*truncated"):
        GeneMedians.load(path)


def test_a_changed_median_is_refused_and_an_old_table_loads_with_a_warning(tmp_path):
    from mixgeneformer.medians import GeneMedians

    path = _table().save(tmp_path / "m.tsv")
    path.write_text(path.read_text().replace("\t1.3333333333333333\n", "\t1.5\n"))
    with pytest.raises(ArtifactError, match=f"{path} does not match the hash"):
        GeneMedians.load(path)
    old = tmp_path / "old.tsv"  # the format before the count was recorded
    old.write_text("ensembl_id\tmedian\n" + "".join(f"{g}\t{m!r}\n" for g, m in _table().values.items()))
    with pytest.warns(UserWarning, match=f"{old} does not record its number of genes"):
        assert GeneMedians.load(old) == _table()
    with pytest.raises(ArtifactError, match="must start with the header"):
        old.write_text("ensembl_id\tmedian\tsomething else\nENSG00000000001\t1.0\n")
        GeneMedians.load(old)


# -------------------------------------- 5: a median table built for another vocabulary is refused
@pytest.fixture()
def mismatched(tmp_path):
    """An h5ad, its vocabulary and a median table of mostly other genes (5 of 105 shared), as files."""
    from _tokenize_helpers import human_ids, make_adata, make_medians, make_vocab

    adata = make_adata()
    adata.write_h5ad(tmp_path / "in.h5ad")
    vocab = make_vocab(np.asarray(adata.var_names, dtype=object))
    vocab.save(tmp_path / "vocab.json")
    other = np.concatenate([human_ids(60)[:5], human_ids(400)[300:]])
    make_medians(other).save(tmp_path / "other_medians.tsv")
    make_medians(np.asarray(adata.var_names, dtype=object)).save(tmp_path / "medians.tsv")
    return tmp_path



def test_tokenizing_with_a_median_table_of_another_vocabulary_names_both_files(mismatched, capsys):
    from mixgeneformer.errors import VocabularyMismatchError
    from mixgeneformer.medians import GeneMedians
    from mixgeneformer.tokenize import tokenize_anndata, tokenize_files
    from mixgeneformer.vocab import Vocabulary

    vocab = Vocabulary.load(mismatched / "vocab.json")
    other = GeneMedians.load(mismatched / "other_medians.tsv")
    pattern = rf"gene median table {mismatched / 'other_medians.tsv'} was built for another vocabulary than the vocabulary {mismatched / 'vocab.json'}: they share 5 genes"
    with pytest.raises(VocabularyMismatchError, match=pattern):
        tokenize_files([mismatched / "in.h5ad"], mismatched / "corpus", vocab, other)
    assert not (mismatched / "corpus").exists()
    import anndata as ad

    with pytest.raises(VocabularyMismatchError, match=pattern):
        tokenize_anndata(ad.read_h5ad(mismatched / "in.h5ad"), vocab, other)
    code, err = run_cli(capsys, "tokenize", mismatched / "in.h5ad", "--vocab", mismatched / "vocab.json",
                        "--medians", mismatched / "other_medians.tsv", "--out", mismatched / "corpus")
    assert code == 2 and "other_medians.tsv was built for another vocabulary" in err and "vocab.json" in err
    # the table the vocabulary was built for tokenizes
    assert len(tokenize_anndata(ad.read_h5ad(mismatched / "in.h5ad"), vocab, GeneMedians.load(mismatched / "medians.tsv"))) > 0


def test_a_table_holding_the_vocabulary_or_held_by_it_is_accepted():
    from _tokenize_helpers import human_ids, make_medians, make_vocab

    ids = human_ids(400)
    vocab = make_vocab(ids[:100])
    make_medians(ids).check_vocabulary(vocab.gene_to_id, 0.5)  # a corpus of all genes, a small vocabulary
    make_medians(ids[:20]).check_vocabulary(vocab.gene_to_id, 0.5)  # a small panel
    make_medians(ids[300:]).check_vocabulary(vocab.gene_to_id, 0.0)  # min_coverage=0: never checked
