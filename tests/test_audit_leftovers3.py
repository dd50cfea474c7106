"""Leftovers of earlier audits: fine-tuning's scratch folder after kill -9, Ctrl-C while the CLI is
still importing, a rerun perturb-merge, and histogram counters near their width."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mixgeneformer.errors import ArtifactError

# -- Ctrl-C while Python is still importing the command line -------------------------------------------
# The console script (`mixgf = "mixgeneformer.cli:main"`) imports mixgeneformer.cli outside any guard,
# and that import pulled in numpy, pandas, typer and every command module: a Ctrl-C during it printed a
# KeyboardInterrupt traceback. A Ctrl-C during a command's own imports (torch) said "interrupted".
_INTERRUPT_ON_IMPORT = """
import sys

class InterruptOn:  # a deterministic Ctrl-C: the moment MODULE is first imported
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, InterruptOn())
sys.argv = ["mixgf", *{argv!r}]
{launch}
"""
_LAUNCH = {
    # what the installed console script runs: its entry point, resolved by name
    "console script": "from importlib.metadata import entry_points\n"
                      "sys.exit(entry_points(group='console_scripts')['mixgf'].load()())",
    "python -m": "import runpy\nrunpy.run_module('mixgeneformer', run_name='__main__', alter_sys=True)",
}


@pytest.mark.parametrize(("module", "launch"), [("typer", "console script"), ("pandas", "python -m"), ("torch", "console script")])
def test_ctrl_c_while_importing_exits_130_with_one_line(tmp_path, module, launch):
    argv = ["embed", str(tmp_path / "cells.h5ad"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.h5ad")]
    script = _INTERRUPT_ON_IMPORT.format(module=module, argv=argv, launch=_LAUNCH[launch])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted\n"  # the line an interrupted command prints; no traceback
    assert not list(tmp_path.iterdir())


def test_cli_module_stays_light_and_keeps_app_and_main():
    code = ("import sys, mixgeneformer.cli as cli\n"
            "print(sorted(m for m in ('typer', 'pandas', 'numpy', 'torch') if m in sys.modules))\n"
            "print(type(cli.app).__name__, cli.state['debug'], callable(cli.main))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "Typer False True"]


# -- fine-tuning's scratch folder after kill -9 -----------------------------------------------------------
# fit_classifier's Trainer wrote into tempfile.TemporaryDirectory(prefix="mixgf-finetune-"): kill -9 left
# /tmp/mixgf-finetune-XXXX (with the Trainer's checkpoints under a validation split) for good, and
# nothing could tell a dead run's folder from a live one's.
def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_finetuning_removes_scratch_folders_killed_runs_left_and_its_own(tmp_path):
    from test_classify import tiny_model, token_task
    from test_finetune_recipe import recipe
    from transformers import TrainerCallback

    from mixgeneformer import classify as C
    from mixgeneformer.classify.finetune import scratch_kind

    kind = scratch_kind(tmp_path)
    assert kind.parent == tmp_path and kind.name.startswith("mixgf-finetune-")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = tmp_path / f".{kind.name}.tmp-{_dead_pid()}-0123abcd"
        live = tmp_path / f".{kind.name}.tmp-{sleeper.pid}-89abcdef"
        others = [tmp_path / f".{kind.name}.tmp-{_dead_pid()}-notahexx",  # not the exact pattern
                  tmp_path / f".mixgf-finetune-otherhost.tmp-{_dead_pid()}-0123abcd",  # another machine's
                  tmp_path / "mixgf-finetune-abc_1234"]  # the old naming: no pid to check
        for folder in (dead, live, *others):
            (folder / "checkpoint-2").mkdir(parents=True)
            (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"weights")
        adata, vocab, tokens = token_task(n_per_class=10)
        task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
        seen = []

        class Seen(TrainerCallback):  # the scratch folder (output_dir), and whether it exists mid-run
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                seen.append((Path(args.output_dir), Path(args.output_dir).is_dir()))

        fitted = C.fit_classifier(task, tiny_model(vocab), vocab, None, recipe(epochs=1, validation_fraction=0.2),
                                  train_tokens=tokens, work_dir=tmp_path, callbacks=[Seen()])
        assert fitted.summary["n_validation"] > 0  # the Trainer evaluated and checkpointed into its scratch
        own, existed = seen[0]
        assert existed and own.parent == tmp_path and own.name.startswith(f".{kind.name}.tmp-{os.getpid()}-")
        assert not own.exists() and not dead.exists()  # its own at the end, a killed run's at the start
        assert live.is_dir() and all(folder.is_dir() for folder in others)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, *others))
    finally:
        sleeper.kill()
        sleeper.wait()


# -- a rerun perturb-merge ---------------------------------------------------------------------------------
# A second `mixgf perturb-merge OUT` merged again and silently replaced OUT/merged (another --stats
# included); embed-merge and predict-merge refuse a rerun with one message naming --overwrite (exit 2).
def test_perturb_merge_rerun_is_refused_and_overwrite_merges_again(tmp_path, capsys):
    import json

    import pandas as pd
    from _tokenize_helpers import cli_exit_code

    import mixgeneformer.perturb as pt
    from mixgeneformer.errors import ArtifactError
    from mixgeneformer.vocab import Vocabulary

    genes = [f"ENSG{i:011d}" for i in range(1, 5)]
    vocab = Vocabulary(["<pad>", "<mask>", "<cls>", "<eos>", *genes], {g: 4 + i for i, g in enumerate(genes)})
    vocab.save((tmp_path / "model").mkdir() or tmp_path / "model" / "vocab.json")
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    for index in range(2):
        cells = pd.DataFrame([{"cell": 10 * index + c, "perturbed": g, "gene_token": vocab.gene_to_id[g], "gene_rank": 0,
                               "shift": float(rng.normal(0.1 * k, 0.05))} for c in range(5) for k, g in enumerate(genes)])
        config = pt.PerturbConfig(shard_index=index, num_shards=2)
        pt.write_shard(out, pt.PerturbationResult(cells, None, {"cells_perturbed": 5, "variants": 20}), config)
    args = ["perturb-merge", out, "--model", tmp_path / "model"]
    assert cli_exit_code(args) == 0
    merged = out / "merged"
    first = {name: (merged / name).read_bytes() for name in ("cells.parquet", "genes.csv", "summary.json")}
    assert json.loads(first["summary.json"])["statistics"]["mode"] == "vs_all"
    capsys.readouterr()

    assert cli_exit_code([*args, "--stats", "aggregate"]) == 2  # a rerun: refused, the first merge kept
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert {name: (merged / name).read_bytes() for name in first} == first
    assert sorted(p.name for p in out.iterdir()) == [".mixgf-output", "merged", "shards"]  # no lock, no staging
    with pytest.raises(ArtifactError, match="merged before.*overwrite=True"):
        pt.merge_run(out, vocab)

    assert cli_exit_code([*args, "--stats", "aggregate", "--overwrite"]) == 0  # asked for: merged again
    assert json.loads((merged / "summary.json").read_text())["statistics"]["mode"] == "aggregate"
    assert (merged / "cells.parquet").read_bytes() == first["cells.parquet"]
    assert sorted(p.name for p in out.iterdir()) == [".mixgf-output", "merged", "shards"]


# -- histogram counters near their width -------------------------------------------------------------------
# MedianAccumulator counted in uint32 and its update (a compiled `hist[slot, bin] += 1`) wrapped silently
# past 4,294,967,295 values in one bin; a merge of accumulators that added past it raised instead, so
# corpora over that size could not be counted at all.
def _near_limit_file(tmp_path, count: int):
    """A saved accumulator of one gene whose bin of the value 1.0 (count 1 of 10,000) holds ``count``."""
    import scipy.sparse as sp

    from mixgeneformer.medians import MedianAccumulator

    gene = "ENSG00000000001"
    probe = MedianAccumulator(genes=[gene])
    probe.update(sp.csr_matrix(np.ones((1, 1))), np.array([gene]), np.array([1e4]))
    (bin_,) = np.flatnonzero(probe.histograms[0])
    synthetic = MedianAccumulator(genes=[gene])
    synthetic.histograms[0, bin_] = count
    synthetic.n_cells = count
    return synthetic.save(tmp_path / f"near-{count}.npz"), gene, int(bin_)


def test_histogram_counts_pass_the_uint32_limit_without_wrapping(tmp_path):
    import scipy.sparse as sp

    from mixgeneformer.medians import MedianAccumulator

    limit = int(np.iinfo(np.uint32).max)
    path, gene, bin_ = _near_limit_file(tmp_path, limit - 1)
    acc = MedianAccumulator.load(path)
    acc.update(sp.csr_matrix(np.ones((3, 1))), np.array([gene]), np.full(3, 1e4))  # 3 more values in that bin
    assert int(acc.histograms[0, bin_]) == limit + 2 and int(acc.histograms.sum()) == limit + 2
    assert acc.n_cells == limit + 2
    assert acc.finalize().lookup([gene])[0] == pytest.approx(1.0, rel=acc.relative_error_bound)
    again = MedianAccumulator.load(acc.save(tmp_path / "past.npz"))  # saved wide, read back exactly
    assert int(again.histograms[0, bin_]) == limit + 2
    with np.load(tmp_path / "past.npz") as saved:
        assert saved["histograms"].dtype == np.int64

    merged = MedianAccumulator.load(path).merge(MedianAccumulator.load(path))  # was refused ("overflow uint32")
    assert int(merged.histograms[0, bin_]) == 2 * (limit - 1) and merged.n_cells == 2 * (limit - 1)


def test_histograms_stay_uint32_in_memory_and_on_disk_while_counts_fit(tmp_path):
    import scipy.sparse as sp

    from mixgeneformer.medians import MedianAccumulator

    path, gene, bin_ = _near_limit_file(tmp_path, int(np.iinfo(np.uint32).max) - 5)
    acc = MedianAccumulator.load(path)
    acc.update(sp.csr_matrix(np.ones((5, 1))), np.array([gene]), np.full(5, 1e4))  # up to the limit exactly
    assert acc.histograms.dtype == np.uint32 and int(acc.histograms[0, bin_]) == np.iinfo(np.uint32).max
    with np.load(acc.save(tmp_path / "full.npz")) as saved:  # the format earlier versions read
        assert saved["histograms"].dtype == np.uint32
    bad = tmp_path / "negative.npz"
    with np.load(path) as z:
        np.savez(bad, **{**dict(z), "histograms": z["histograms"].astype(np.int64) - 1})
    with pytest.raises(ArtifactError, match="negative"):
        MedianAccumulator.load(bad)
