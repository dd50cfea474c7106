"""The user's files (RELIABILITY 23-26): outputs never replace inputs or foreign files; disk full,
read-only folders and wrong file types give one message; failed runs leave nothing behind; one
writer per output; workers never outlive their parent."""

from __future__ import annotations

import builtins
import contextlib
import errno
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _tokenize_helpers import make_adata, make_medians, make_vocab

from mixgeneformer.cli import main
from mixgeneformer.errors import ArtifactError, InputDataError
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files


def run_cli(capsys, *args) -> tuple[int, str]:
    """Run ``mixgf ARGS`` in-process; return (exit code, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.fixture()
def files(tmp_path):
    """An input h5ad, a vocabulary JSON and a medians TSV in tmp_path/inputs."""
    root = tmp_path / "inputs"
    root.mkdir()
    adata = make_adata(30, 60, seed=3)
    genes = np.asarray(adata.var_names)
    adata.write_h5ad(root / "in.h5ad")
    make_vocab(genes).save(root / "vocab.json")
    make_medians(genes).save(root / "medians.tsv")
    return root


def tokenize_args(files, out, *extra):
    return ["tokenize", files / "in.h5ad", "--vocab", files / "vocab.json", "--medians", files / "medians.tsv",
            "--out", out, *extra]


@contextlib.contextmanager
def lock_holder(target: Path):
    """Another process holding the output lock of ``target`` (killed on exit); yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from mixgeneformer.fileio import output_lock
            with output_lock({str(target)!r}):
                print("locked", flush=True)
                time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary / partial / lock files beside outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ 7-9: data loss
def test_tokenize_never_replaces_the_folder_holding_its_input(files, capsys):
    before = (files / "in.h5ad").read_bytes()
    for extra in ((), ("--overwrite",)):
        code, err = run_cli(capsys, *tokenize_args(files, files, *extra))
        assert code == 2 and "holds the input" in err and "Traceback" not in err
    assert (files / "in.h5ad").read_bytes() == before
    assert sorted(p.name for p in files.iterdir()) == ["in.h5ad", "medians.tsv", "vocab.json"]


def test_overwrite_replaces_only_what_the_package_wrote(files, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, err = run_cli(capsys, *tokenize_args(files, foreign, "--overwrite"))
    assert code == 2 and "--overwrite only replaces outputs of mixgeneformer" in err
    assert (foreign / "notes.txt").read_text() == "keep me"

    corpus = tmp_path / "corpus"
    assert run_cli(capsys, *tokenize_args(files, corpus))[0] == 0
    assert (corpus / ".mixgf-output").is_file()
    code, err = run_cli(capsys, *tokenize_args(files, corpus))
    assert code == 2 and "--overwrite" in err
    assert run_cli(capsys, *tokenize_args(files, corpus, "--overwrite"))[0] == 0
    assert leftovers(tmp_path) == []


def test_pretrain_overwrite_never_deletes_its_corpus_or_a_foreign_folder(tmp_path):
    from test_pretrain import make_vocab as pretrain_vocab
    from test_pretrain import tiny_config, training_data

    from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining

    work = tmp_path / "work"
    work.mkdir()
    training_data(work, pretrain_vocab(), n_cells=32)
    config = pretrain_config_from_dict(tiny_config(work, work, train={"max_steps": 2}))
    with pytest.raises(ArtifactError, match="holds the input"):
        run_pretraining(config, overwrite=True)
    assert (work / "vocab.json").is_file() and (work / "corpus" / "state.json").is_file()

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("x")
    config = pretrain_config_from_dict(tiny_config(work, foreign, train={"max_steps": 2}))
    with pytest.raises(ArtifactError, match="only replaces outputs of mixgeneformer"):
        run_pretraining(config, overwrite=True)
    assert (foreign / "paper.tex").read_text() == "x"


def test_medians_never_overwrite_their_input_and_single_files_need_overwrite(files, tmp_path, capsys):
    before = (files / "in.h5ad").read_bytes()
    for extra in ((), ("--overwrite",)):
        code, err = run_cli(capsys, "medians", files / "in.h5ad", "--out", files / "in.h5ad", *extra)
        assert code == 2 and "is the input" in err
    assert (files / "in.h5ad").read_bytes() == before

    code, err = run_cli(capsys, "medians", files / "in.h5ad", "--out", tmp_path / "medians.json")
    assert code == 2 and "must end in one of ['.tsv']" in err
    out = tmp_path / "m.tsv"
    assert run_cli(capsys, "medians", files / "in.h5ad", "--out", out)[0] == 0
    code, err = run_cli(capsys, "medians", files / "in.h5ad", "--out", out)
    assert code == 2 and "--overwrite" in err
    assert run_cli(capsys, "medians", files / "in.h5ad", "--out", out, "--overwrite")[0] == 0


def test_vocab_build_refuses_existing_files(files, tmp_path, capsys):
    h5ad = tmp_path / "existing.h5ad"
    h5ad.write_bytes((files / "in.h5ad").read_bytes())
    for extra in ((), ("--overwrite",)):
        code, err = run_cli(capsys, "vocab", "build", "--out", h5ad, "--species", "mouse", *extra)
        assert code == 2 and "must end in one of ['.json']" in err
    assert h5ad.read_bytes() == (files / "in.h5ad").read_bytes()
    other = tmp_path / "package.json"  # a JSON file this package did not write
    other.write_text('{"name": "mine"}')
    code, err = run_cli(capsys, "vocab", "build", "--out", other, "--species", "mouse")
    assert code == 2 and "already exists" in err
    code, err = run_cli(capsys, "vocab", "build", "--out", other, "--species", "mouse", "--overwrite")
    assert code == 2 and "not a file mixgeneformer wrote" in err
    assert other.read_text() == '{"name": "mine"}'
    out = tmp_path / "v.json"
    assert run_cli(capsys, "vocab", "build", "--out", out, "--species", "mouse")[0] == 0
    assert run_cli(capsys, "vocab", "build", "--out", out, "--species", "mouse")[0] == 2
    assert run_cli(capsys, "vocab", "build", "--out", out, "--species", "mouse", "--overwrite")[0] == 0


def test_check_output_rules(tmp_path):
    from mixgeneformer.fileio import check_output

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.h5ad").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="holds the input"):
        check_output(tmp_path, [tmp_path / "data" / "x.h5ad"], overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, overwrite=True) == empty  # nothing to lose
    assert check_output(tmp_path / "new", [tmp_path / "data" / "x.h5ad"]) == tmp_path / "new"


# -------------------------------------------------------------- 11: disk full, read-only folders
def _failing_writes(monkeypatch, module, code: int) -> None:
    """Make every ``open(..., "w"/"wb")`` in ``module`` fail with ``code`` (ENOSPC, EACCES, EROFS)."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax"):
            raise OSError(code, errno.errorcode[code] if code not in (errno.ENOSPC,) else "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


@pytest.mark.parametrize(("code", "cause"), [(errno.ENOSPC, "disk is full"), (errno.EACCES, "not writable"),
                                             (errno.EROFS, "read-only file system")])
def test_single_file_outputs_on_a_full_or_read_only_disk(files, tmp_path, capsys, monkeypatch, code, cause):
    from mixgeneformer import fileio

    _failing_writes(monkeypatch, fileio, code)
    out = tmp_path / "out"
    out.mkdir()
    for args in (("vocab", "build", "--out", out / "v.json", "--species", "mouse"),
                 ("medians", files / "in.h5ad", "--out", out / "m.tsv")):
        status, err = run_cli(capsys, *args)
        assert status == 2 and cause in err and str(out) in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_tokenize_on_a_full_disk_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    from datasets.arrow_writer import ArrowWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ArrowWriter, "write_table", full)
    out = tmp_path / "corpus"
    status, err = run_cli(capsys, *tokenize_args(files, out))
    assert status == 2 and f"cannot write {out}" in err and "disk is full" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_pretrain_disk_full_during_a_checkpoint(tmp_path, capsys, monkeypatch):
    import yaml
    from test_pretrain import make_vocab as pretrain_vocab
    from test_pretrain import tiny_config, training_data

    from mixgeneformer import checkpoints as ckpt

    root = tmp_path / "data"
    root.mkdir()
    training_data(root, pretrain_vocab(), n_cells=64)
    run = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config(root, run, train={"max_steps": 6})))
    monkeypatch.setenv("MIXGF_TEST_FAIL_IN_SAVE", "6")
    status, err = run_cli(capsys, "pretrain", "--config", tmp_path / "run.yaml")
    assert status == 2 and "disk is full" in err and "checkpoint-6" in err and "Traceback" not in err
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["checkpoint-3"]
    assert ckpt.checkpoint_problem(run / "checkpoint-3") is None
    assert not (run / ckpt.STAGING).exists()


# ------------------------------------------------------------------------- 12: wrong file types
@pytest.mark.parametrize("option", ["--vocab", "--medians"])
def test_wrong_file_types_for_vocab_and_medians(files, tmp_path, capsys, option):
    pickled = tmp_path / "dict.pkl"
    pickled.write_bytes(pickle.dumps({"ENSG00000000003": 1}))
    folder = tmp_path / "folder"
    folder.mkdir()
    expected = {pickled: "is a Python pickle", files / "in.h5ad": "is an HDF5 file", folder: "is a directory"}
    for path, message in expected.items():
        args = tokenize_args(files, tmp_path / "out")
        args[args.index(option) + 1] = path
        status, err = run_cli(capsys, *args)
        assert status == 2 and message in err and "Traceback" not in err, (path, err)
        assert ("vocabulary" if option == "--vocab" else "gene median table") in err


def test_truncated_h5ad_in_classify_is_a_clear_error(files, tmp_path, capsys):
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes((files / "in.h5ad").read_bytes()[:3000])
    status, err = run_cli(capsys, "classify", broken, "--out", tmp_path / "out", "--mode", "none", "--baselines",
                          "--label", "cell_type")
    assert status == 2 and "cannot read input h5ad" in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- 13: validation failures clean up
def _bad(kind: str):
    adata = make_adata(20, 60, seed=4)
    x = adata.X.toarray().astype(np.float32)
    if kind == "fractional":
        x[3, 5] = 0.5
    elif kind == "negative":
        x[3, 5] = -1
    elif kind == "nan":
        x[3, 5] = np.nan
    elif kind == "inf":
        x[3, 5] = np.inf
    elif kind == "all_empty":
        x[:] = 0
    elif kind == "no_cells":
        adata, x = adata[:0].copy(), x[:0]
    adata.X = x
    return adata


@pytest.mark.parametrize("kind", ["fractional", "negative", "nan", "inf", "all_empty", "no_cells"])
def test_invalid_data_leaves_no_partial_folder(tmp_path, kind):
    adata = _bad(kind)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    genes = np.asarray(adata.var_names)
    with pytest.raises(InputDataError):
        tokenize_files([tmp_path / "bad.h5ad"], tmp_path / "corpus", make_vocab(genes), make_medians(genes),
                       TokenizeConfig(task_cells=8, chunk_size=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]


# ------------------------------------------------------------------ 14: one writer per output
def test_a_second_tokenize_into_the_same_output_is_refused(files, tmp_path, capsys):
    out = tmp_path / "corpus"
    partial = tmp_path / ".corpus.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")  # the first run's work in progress
    with lock_holder(out) as pid:
        status, err = run_cli(capsys, *tokenize_args(files, out))
    assert status == 2 and f"being written by another process (pid {pid})" in err
    assert (partial / "manifest.json").read_text() == "{}" and not out.exists()
    # Once the other process is gone (even killed), the lock is free again.
    assert run_cli(capsys, *tokenize_args(files, out))[0] == 0
    assert leftovers(tmp_path) == []


def test_output_lock_is_reentrant_and_removed(tmp_path):
    from mixgeneformer.fileio import output_lock

    with output_lock(tmp_path / "x"), output_lock(tmp_path / "x"):
        assert (tmp_path / ".x.lock").read_text() == str(__import__("os").getpid())
    assert not (tmp_path / ".x.lock").exists()


# --------------------------------------------------------------- 21: workers die with the parent
def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_pool_workers_and_forkserver_exit_when_the_parent_is_killed(tmp_path):
    import psutil

    script = textwrap.dedent("""
        import time
        from mixgeneformer.parallel import worker_pool
        pool = worker_pool(2)
        print(sum(pool.map(abs, range(-8, 0))), flush=True)  # both workers started, then idle
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "36"
        deadline = time.time() + 30
        family = []
        while time.time() < deadline:
            family = [p for p in psutil.Process(parent.pid).children(recursive=True)]
            workers = [p for p in family if "forkserver" not in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
            if len(workers) >= 2:
                break
            time.sleep(0.2)
        assert len(family) >= 3, [p.cmdline() for p in family]  # forkserver + 2 workers (+ resource tracker)
        parent.kill()  # SIGKILL: no cleanup runs in the parent
        parent.wait()
        deadline = time.time() + 20
        while time.time() < deadline and (alive := [p for p in family if _running(p)]):
            time.sleep(0.2)
        assert alive == [], [(p.pid, p.cmdline()) for p in alive]
    finally:
        parent.kill()
        for p in family:
            if p.is_running():
                p.kill()


def test_import_geneformer_never_replaces_its_pickles(tmp_path, capsys):
    token_dictionary = tmp_path / "token_dictionary.pkl"
    token_dictionary.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2}))
    before = token_dictionary.read_bytes()
    code, err = run_cli(capsys, "vocab", "import-geneformer", "--token-dictionary", token_dictionary,
                        "--out", token_dictionary, "--overwrite")
    assert code == 2 and "is the input" in err
    assert token_dictionary.read_bytes() == before
    medians = tmp_path / "gene_median_dictionary.pkl"
    medians.write_bytes(pickle.dumps({"ENSG00000000003": 1.5}))
    for out, medians_out, expected in (("vocab.pkl", "m.tsv", "--out vocab.pkl must end in one of ['.json']"),
                                       ("v.json", "m.pkl", "--medians-out m.pkl must end in one of ['.tsv']"),
                                       ("same.json", "same.json", "must end in one of ['.tsv']")):
        code, err = run_cli(capsys, "vocab", "import-geneformer", "--token-dictionary", token_dictionary,
                            "--gene-median-dictionary", medians, "--out", tmp_path / out, "--medians-out", tmp_path / medians_out)
        assert code == 2 and expected in err.replace(f"{tmp_path}/", ""), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gene_median_dictionary.pkl", "token_dictionary.pkl"]


# ------------------------------------------------------------------ stamps and failed writes (23, 24)
def test_overwrite_replaces_only_single_files_this_package_wrote(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import anndata as ad
    from matplotlib.figure import Figure

    from mixgeneformer.fileio import check_output, write_h5ad
    from mixgeneformer.filekinds import parquet_table
    from mixgeneformer.plots import save_figure

    adata = make_adata(5, 10, seed=0)
    frame = pd.DataFrame({"gene": ["a", "b"], "x": [1.0, 2.0]})
    figure = Figure()
    figure.add_subplot().plot([1, 2])
    users = {"user.h5ad": lambda p: adata.write_h5ad(p), "user.parquet": lambda p: frame.to_parquet(p),
             "user.png": lambda p: figure.savefig(p), "user.pdf": lambda p: figure.savefig(p),
             "my_mixgeneformer_umap.eps": lambda p: figure.savefig(p),  # the word alone, in its title, is no stamp
             "user.svg": lambda p: figure.savefig(p, metadata={"Title": "mixgeneformer embedding"})}
    ours = {"ours.h5ad": lambda p: write_h5ad(adata, p), "ours.parquet": lambda p: pq.write_table(parquet_table(frame), p),
            **{f"ours.{fmt}": lambda p: save_figure(figure, p) for fmt in ("png", "pdf", "svg", "eps", "ps")}}
    for name, write in {**users, **ours}.items():
        write(tmp_path / name)
    for name in users:  # the same kind of file, written by anything else: the user's data
        with pytest.raises(ArtifactError, match="not a file mixgeneformer wrote"):
            check_output(tmp_path / name, overwrite=True)
    for name in ours:
        assert check_output(tmp_path / name, overwrite=True) == tmp_path / name
    back = ad.read_h5ad(tmp_path / "ours.h5ad")  # the stamp is invisible to anndata
    assert back.obs_names.tolist() == adata.obs_names.tolist() and (back.X != adata.X).nnz == 0


def test_a_full_disk_during_an_h5ad_write_is_one_error_and_leaves_nothing(tmp_path):
    pytest.importorskip("resource")  # POSIX file-size limits
    # A file-size limit makes every write past 64 KiB fail, as a full disk does. HDF5 used to keep
    # flushing into the failed file and crash the interpreter (exit 139) with pages of tracebacks.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np, anndata as ad
        from mixgeneformer.errors import ArtifactError
        from mixgeneformer.fileio import write_h5ad
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        adata = ad.AnnData(np.random.default_rng(0).random((400, 400)).astype(np.float32))
        try:
            write_h5ad(adata, {str(tmp_path / "out.h5ad")!r})
        except ArtifactError as exc:
            print("ArtifactError:", exc)
            sys.exit(0)
        sys.exit(3)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cannot write" in run.stdout and "File too large" in run.stdout
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_an_unexplained_write_error_on_a_full_disk_names_the_disk(tmp_path, monkeypatch):
    import shutil as _shutil

    from mixgeneformer.fileio import output_error

    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")  # torch's zip writer
    monkeypatch.setattr(_shutil, "disk_usage", lambda path: _shutil._ntuple_diskusage(10 << 30, 0, 10 << 30))
    assert output_error(tmp_path / "checkpoint-15", error) is None  # space left: not a disk problem
    monkeypatch.setattr(_shutil, "disk_usage", lambda path: _shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    assert "the disk is full" in str(output_error(tmp_path / "checkpoint-15", error))
    assert output_error(tmp_path / "checkpoint-15", error, guess=False) is None
    assert output_error(tmp_path / "x", KeyboardInterrupt()) is None


def test_single_file_commands_and_the_demo_hold_their_output_for_the_whole_run(files, tmp_path, capsys, monkeypatch):
    from mixgeneformer import fileio, medians
    from mixgeneformer.demo import DemoConfig, run_demo

    out = tmp_path / "m.tsv"
    held, compute = [], medians.compute_medians
    monkeypatch.setattr(medians, "compute_medians", lambda *a, **k: held.append(
        str(fileio.lock_path(out).resolve()) in fileio._HELD_LOCKS) or compute(*a, **k))
    assert run_cli(capsys, "medians", files / "in.h5ad", "--out", out)[0] == 0
    assert held == [True]  # locked while computing, not only while renaming: two runs cannot both compute
    out.unlink()
    with lock_holder(out) as pid:  # another `mixgf medians -o m.tsv` is running: this one must not race it
        code, err = run_cli(capsys, "medians", files / "in.h5ad", "--out", out)
        assert code == 2 and f"being written by another process (pid {pid})" in err
        code, err = run_cli(capsys, "vocab", "build", "--out", tmp_path / "v.json", "--species", "mouse")
        assert code == 0, err  # other outputs are free
    assert not out.exists()
    demo = tmp_path / "demo"
    with lock_holder(demo) as pid, pytest.raises(ArtifactError, match=f"pid {pid}"):
        run_demo(demo, DemoConfig.quick_config(), progress=False)
    assert not demo.exists()


def test_a_file_where_the_package_keeps_unfinished_work(files, tmp_path, capsys):
    (tmp_path / ".corpus.partial").write_text("not a folder")
    code, err = run_cli(capsys, *tokenize_args(files, tmp_path / "corpus"))
    assert code == 2 and ".corpus.partial is a file" in err and "Traceback" not in err
    assert (tmp_path / ".corpus.partial").read_text() == "not a folder"

    from test_pretrain import make_vocab as pretrain_vocab
    from test_pretrain import tiny_config, training_data

    from mixgeneformer import checkpoints as ckpt
    from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining

    training_data(tmp_path, pretrain_vocab(), n_cells=64)
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(tmp_path, out, train={"max_steps": 4}, checkpoint={"save_steps": 2}))
    run_pretraining(config)
    (out / ckpt.STAGING).write_text("junk")  # inside the run folder: the package's own, replaced
    config = pretrain_config_from_dict(tiny_config(tmp_path, out, train={"max_steps": 6}, checkpoint={"save_steps": 2}))
    assert run_pretraining(config, resume=True).global_step == 6
    ckpt.previous_run_dir(out).write_text("mine")  # beside it: refused, the run untouched
    with pytest.raises(ArtifactError, match=r"\.run\.replaced is a file"):
        run_pretraining(config, overwrite=True)
    assert (out / "model").is_dir() and ckpt.previous_run_dir(out).read_text() == "mine"


def test_an_h5ad_write_that_the_disk_takes_only_in_part_is_an_error(tmp_path):
    # An unbuffered write on a filling disk may take part of the data and fail only on the next
    # call; h5py ignores the count, so a last short write used to leave a corrupt file, renamed into place.
    import io as _io

    from mixgeneformer import filekinds

    class Short(_io.FileIO):
        def write(self, data):
            return super().write(bytes(memoryview(data).cast("B")[: max(1, len(data) // 2)]))

    real_open = builtins.open
    taken = [0]

    def short_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".h5ad") and not taken[0]:
            taken[0] = 1
            return Short(path, "w+")
        return real_open(path, mode, *args, **kwargs)

    adata = make_adata(20, 30, seed=1)
    filekinds_open = filekinds.__dict__.get("open")
    try:
        filekinds.open = short_open
        filekinds.write_h5ad(adata, tmp_path / "whole.h5ad")  # every part written in the end
    finally:
        if filekinds_open is None:
            del filekinds.open
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "whole.h5ad")
    assert (back.X != adata.X).nnz == 0 and back.obs_names.tolist() == adata.obs_names.tolist()


def test_a_failed_command_removes_the_folders_its_lock_created(files, tmp_path, capsys):
    (tmp_path / "bad.tsv").write_text("not a median table")
    code, _ = run_cli(capsys, "vocab", "build", "--out", tmp_path / "new" / "sub" / "v.json", "--medians", tmp_path / "bad.tsv")
    assert code == 2 and not (tmp_path / "new").exists()
