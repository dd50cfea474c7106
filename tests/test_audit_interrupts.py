"""Interrupting the long commands other than pretraining (SIGTERM / SIGINT / kill -9): nothing
half-written is kept, what a killed writer left is cleared by the next writer of that output, an
interrupted command says what it kept, and a rerun resumes or restarts cleanly."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest
from _tokenize_helpers import cli_exit_code, human_ids, make_adata, make_medians, make_vocab

from mixgeneformer.errors import ArtifactError
from mixgeneformer.fileio import atomic_directory, atomic_file, write_h5ad
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.tmp-"))


def test_kill_9_while_writing_leaves_a_temporary_file_the_next_run_removes(tmp_path):
    # `mixgf vocab build` killed (kill -9, no cleanup possible) while its JSON is half written: the
    # temporary file and the lock file stay behind. The next run takes the stale lock over and removes
    # the temporary file (it stayed for good, beside every later output).
    out = tmp_path / "v.json"
    script = textwrap.dedent(f"""
        import os, sys, time
        from mixgeneformer import vocab
        from mixgeneformer.cli import main
        from mixgeneformer.fileio import atomic_file

        def save(self, path):
            with atomic_file(path) as handle:
                handle.write('{{"half": ')
                handle.flush()
                print("HALF", flush=True)
                time.sleep(60)

        vocab.Vocabulary.save = save
        main(["vocab", "build", "--out", {str(out)!r}, "--species", "mouse"])
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while child.stdout.readline().strip() != "HALF":
            assert time.monotonic() < deadline and child.poll() is None, "the child never reached the write"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert len(_leftovers(tmp_path, "v.json")) == 1 and not out.exists()
    assert (tmp_path / ".v.json.lock").exists()  # a stale lock: the kernel released its flock

    assert cli_exit_code(["vocab", "build", "--out", out, "--species", "mouse"]) == 0
    assert _leftovers(tmp_path, "v.json") == [] and not (tmp_path / ".v.json.lock").exists()
    assert out.read_text().rstrip().endswith("}")


def test_a_dead_writers_staging_folder_and_files_are_removed_a_live_ones_kept(tmp_path):
    # A classifier / perturbation / corpus folder staged by a process killed before its rename stayed
    # as `.OUT.tmp-*` for good (a full model's size each time). Under the output's lock the next
    # writer removes what ended writers left; a temporary path of a running process is left alone.
    dead, alive = _dead_pid(), os.getppid()
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead}-0123abcd").mkdir()
    (tmp_path / f".out.tmp-{dead}-0123abcd" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".out.tmp-{alive}-4567abcd").mkdir()
    (tmp_path / f".other.tmp-{dead}-89abcdef").mkdir()  # another output's: not ours to remove
    with atomic_directory(out) as staging:
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert _leftovers(tmp_path, "out") == [f".out.tmp-{alive}-4567abcd"]
    assert (tmp_path / f".other.tmp-{dead}-89abcdef").is_dir()

    # single files (atomic_file under a command's lock, h5ad files)
    import anndata as ad
    import numpy as np

    from mixgeneformer.fileio import output_lock

    (tmp_path / f".t.json.tmp-{dead}-0123abcd").write_text("{")
    (tmp_path / f".c.h5ad.tmp-{dead}-0123abcd.h5ad").write_bytes(b"\x89HDF")
    with output_lock(tmp_path / "t.json"), atomic_file(tmp_path / "t.json") as handle:
        handle.write("{}")
    with output_lock(tmp_path / "c.h5ad"):
        write_h5ad(ad.AnnData(X=np.zeros((2, 2), dtype=np.float32)), tmp_path / "c.h5ad")
    assert _leftovers(tmp_path, "t.json") == [] and _leftovers(tmp_path, "c.h5ad") == []


@pytest.mark.parametrize("merge", ["embed", "predict"])
def test_a_rerun_merge_says_the_output_is_merged_and_clears_a_killed_merges_file(tmp_path, merge):
    # The merge held no lock (two merges raced to OUT, and the h5ad a killed merge had staged stayed
    # for good); once merged (its shards removed), a second merge said "shard manifest not found:
    # ... Check the path".
    if merge == "embed":
        from mixgeneformer.embed.run import merge_embed_shards as run_merge
    else:
        from mixgeneformer.classify.predict import merge_predict_shards as run_merge
    out = tmp_path / "cells.h5ad"
    out.write_bytes(b"merged")
    stale = tmp_path / f".cells.h5ad.tmp-{_dead_pid()}-0123abcd.h5ad"
    stale.write_bytes(b"\x89HDF half")
    with pytest.raises(ArtifactError, match="already merged.*rerun the shards with --overwrite"):
        run_merge(out)
    assert not stale.exists() and out.read_bytes() == b"merged"


def test_import_geneformer_interrupted_between_its_files_writes_neither(tmp_path, shared_data, monkeypatch):
    # The vocabulary JSON was renamed into place before the medians TSV was written: an interrupt in
    # between left a vocabulary without its medians, and the rerun was refused ("already exists").
    from mixgeneformer.medians import GeneMedians

    gf = shared_data / "geneformer_v1"
    args = ["vocab", "import-geneformer", "--token-dictionary", gf / "token_dictionary.pkl",
            "--gene-median-dictionary", gf / "gene_median_dictionary.pkl",
            "--out", tmp_path / "v.json", "--medians-out", tmp_path / "m.tsv"]
    real = GeneMedians.save

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(GeneMedians, "save", interrupted)
    assert cli_exit_code(args) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(GeneMedians, "save", real)
    assert cli_exit_code(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tsv", "v.json"]


def test_interrupted_tokenize_says_what_it_kept_and_resumes_to_the_same_corpus(tmp_path, monkeypatch, caplog):
    from mixgeneformer.tokenize import files as tokenize_files_module

    adata = make_adata(40, 60)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    genes = human_ids(60)
    vocab, medians = make_vocab(genes), make_medians(genes)
    config = TokenizeConfig(task_cells=10)
    straight = tokenize_files([path], tmp_path / "straight", vocab, medians, config, ["cell_type"])

    real = tokenize_files_module._tokenize_task
    calls = []

    def task(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # SIGINT as the third of four tasks starts
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize_files_module, "_tokenize_task", task)
    with caplog.at_level(logging.WARNING, "mixgeneformer.tokenize.files"), pytest.raises(KeyboardInterrupt):
        tokenize_files([path], tmp_path / "corpus", vocab, medians, config, ["cell_type"])
    assert "2 of 4 tasks had finished; they are kept in" in caplog.text and "Run the same command again to resume" in caplog.text
    assert not (tmp_path / "corpus").exists() and (tmp_path / ".corpus.partial").is_dir()

    calls.clear()
    monkeypatch.setattr(tokenize_files_module, "_tokenize_task", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    tokenize_files([path], tmp_path / "corpus", vocab, medians, config, ["cell_type"])
    assert len(calls) == 2  # only the unfinished tasks ran
    resumed, reference = datasets.load_from_disk(str(tmp_path / "corpus")), datasets.load_from_disk(str(straight))
    assert resumed["input_ids"] == reference["input_ids"] and resumed["cell_type"] == reference["cell_type"]
    assert not (tmp_path / ".corpus.partial").exists()
