"""Regression tests of the audit of sharding, locks, parallel, simulate, sampling and flops: each
test fails on the code before its fix."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch.distributed as dist
from _tokenize_helpers import human_ids

from mixgeneformer import flops, locks
from mixgeneformer.errors import ArtifactError, ConfigError, InputDataError
from mixgeneformer.medians import compute_medians
from mixgeneformer.parallel import plan_ranges
from mixgeneformer.sampling import species_balanced_draw
from mixgeneformer.sharding import ShardJob, ShardRole, plan_shards, run_shard, shard_folder
from mixgeneformer.simulate import PlantedConfig, simulate_planted


def _h5ad(path: Path, n_cells: int, n_genes: int = 30) -> Path:
    counts = np.random.default_rng(0).poisson(1.0, (n_cells, n_genes)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=human_ids(n_genes)))
    adata.write_h5ad(path)
    return path


# --- sharding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 5])
def test_plan_shards_of_no_cells_is_empty_shards(world):
    # Was: IndexError (indexing the empty cumulative sum) for world > 1.
    bounds = plan_shards(np.zeros(0, dtype=np.int64), world)
    assert bounds.dtype == np.int64 and bounds.tolist() == [0] * (world + 1)


def test_plan_shards_covers_every_cell_once_for_any_sizes():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n, world = int(rng.integers(0, 9)), int(rng.integers(1, 12))
        bounds = plan_shards(rng.integers(0, 40, size=n), world)
        cells = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in range(world)])
        assert len(bounds) == world + 1 and cells.tolist() == list(range(n))


def _job(tmp_path: Path, input: Path) -> ShardJob:
    return ShardJob("embed", input, tmp_path / "out.h5ad", [input], {}, {"key": "X", "model": "m"})


def test_a_sharded_run_of_an_input_without_cells_is_refused(tmp_path):
    # Was: IndexError out of plan_shards; a one-process run refuses such an input (InputDataError).
    empty = _h5ad(tmp_path / "empty.h5ad", 0)
    computed = []
    with pytest.raises(InputDataError, match="holds no cells"):
        run_shard(_job(tmp_path, empty), ShardRole(0, 2, False), lambda a, b: computed.append((a, b)) or {}, 60, print)
    assert computed == [] and not shard_folder(tmp_path / "out.h5ad").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_launched_shard_destroys_the_process_group_it_created(tmp_path, monkeypatch):
    # Was: the gloo group run_shard created stayed initialized after compute raised, so a later call in
    # the process took it for the caller's own group (and never destroyed it).
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    job = _job(tmp_path, _h5ad(tmp_path / "cells.h5ad", 6))
    role = ShardRole(0, 1, True)

    def fail(start: int, stop: int) -> dict:
        raise RuntimeError("compute failed")

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="compute failed"):
        run_shard(job, role, fail, 30, lambda line: None)
    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert run_shard(job, role, lambda a, b: {"values": np.zeros((b - a, 2), np.float32)}, 30, lambda line: None)
    assert not dist.is_initialized()


# --- locks ---------------------------------------------------------------------------------------
def test_a_lock_whose_pid_cannot_be_written_is_taken_and_released(tmp_path, monkeypatch):
    # Was: ENOSPC writing the pid raised after the flock, leaving the descriptor (and the lock) held:
    # every later lock of that output in this process failed with "another process (pid unknown)".
    out = tmp_path / "out.h5ad"

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "pwrite", full_disk)
    ran = []
    with locks.output_lock(out):
        ran.append(True)
    monkeypatch.undo()
    assert ran == [True] and not locks.lock_path(out).exists()
    with locks.output_lock(out):
        assert locks.lock_path(out).read_text() == str(os.getpid())


def test_a_failing_flock_leaves_no_descriptor_open(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    for _ in range(3):
        with pytest.raises(OSError, match="No locks"), locks.output_lock(tmp_path / "out"):
            pass
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_second_holder_is_still_refused(tmp_path):
    import fcntl

    out = tmp_path / "out"
    other = os.open(locks.lock_path(out), os.O_RDWR | os.O_CREAT)  # another open file description: a second writer
    try:
        os.write(other, b"4242")
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ArtifactError, match="pid 4242"), locks.output_lock(out):
            pass
    finally:
        os.close(other)


# --- parallel ------------------------------------------------------------------------------------
def test_plan_ranges_refuses_a_zero_chunk_size():
    with pytest.raises(ConfigError, match="chunk_size"):
        plan_ranges(100, 2, 0)


def test_medians_with_workers_and_a_zero_chunk_size_is_a_config_error(tmp_path):
    # Was: ZeroDivisionError in plan_ranges (one worker got the reader's own error).
    path = _h5ad(tmp_path / "cells.h5ad", 10)
    with pytest.raises(ConfigError, match="chunk_size"):
        compute_medians(path, workers=2, chunk_size=0)


def test_plan_ranges_covers_every_cell_once():
    for n, workers, chunk in [(0, 3, 5), (1, 4, 5), (7, 10, 3), (1000, 3, 64), (10, 1, 100)]:
        ranges = plan_ranges(n, workers, chunk)
        cells = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        assert cells.tolist() == list(range(n))


# --- simulate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    # Was accepted, then numpy's "a cannot be empty unless no samples are taken" inside simulate_planted:
    # the sibling draws 40 shared genes outside its sibling's 40 among 40 left after the markers.
    {"n_types": 6, "n_markers": 5, "program_size": 40, "n_shared_genes": 70, "program_overlap": 1.0,
     "sibling_overlap": 0.0},
    {"library_sd": -1.0},  # was numpy's "sigma < 0"
    {"baseline_sd": -0.5},
    {"species_shift": -0.1},
    {"specific_program_size": -1},  # was "negative dimensions are not allowed"
])
def test_planted_configs_that_cannot_be_simulated_are_refused_up_front(options):
    with pytest.raises(ConfigError, match="planted\\."):
        PlantedConfig(**options)


def test_the_smallest_accepted_sibling_layout_simulates():
    config = PlantedConfig(n_types=2, n_markers=1, program_size=4, n_shared_genes=10, program_overlap=1.0,
                           sibling_overlap=0.0, n_specific_genes=2, specific_program_size=1, cells_per_type=2)
    data = simulate_planted(config)
    assert data.human.shape == (4, 12)
    with pytest.raises(ConfigError, match="too small"):
        PlantedConfig(**{**config.__dict__, "n_shared_genes": 9})


# --- sampling ------------------------------------------------------------------------------------
def test_species_balance_holds_for_negative_codes():
    # Was: a negative code indexed the weight table from its end, so [-1, 0, 0, 0] drew uniformly.
    draws = species_balanced_draw(np.array([-1, 0, 0, 0]), 20_000, np.random.default_rng(0))
    share = np.bincount(draws, minlength=4) / draws.size
    assert share[0] == pytest.approx(0.5, abs=0.02)


def test_species_balanced_draw_is_unchanged_for_ordinary_codes():
    codes = np.array([0, 0, 0, 1, 2, 2])
    rng = np.random.default_rng(7)
    weights = np.array([1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6])
    cumulative = np.cumsum(weights) / weights.sum()
    want = np.searchsorted(cumulative, np.random.default_rng(7).random(500), side="right")
    assert species_balanced_draw(codes, 500, rng).tolist() == want.tolist()  # resumed runs replay the same order


# --- flops ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L40", None),  # was the L4's 121 TFLOP/s
    ("NVIDIA RTX A1000", None),  # was the A100's
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 790e12),
    ("NVIDIA H200", 790e12),
])
def test_device_peak_is_matched_by_whole_model_name(monkeypatch, name, peak):
    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: name)
    assert flops.device_peak_flops("cuda") == peak


def test_a_metrics_row_cut_short_by_a_crash_is_dropped_not_parsed(tmp_path):
    """A run killed while appending a row leaves a last line without its line end; neither the
    reader (the report's curves) nor the resume's trim may take it for a row."""
    from mixgeneformer.metrics_csv import METRICS_FIELDS, MetricsCSV, read_metrics, trim_metrics

    path = tmp_path / "metrics.csv"

    class State:
        is_world_process_zero = True
        epoch = 0.5

    callback = MetricsCSV(path)
    for step, loss in ((10, 9.5), (20, 9.25)):
        State.global_step = step
        callback.on_log(None, State, None, logs={"loss": loss})
    with open(path, "a", newline="") as handle:
        handle.write("30,0.75,9.1e")  # torn in the middle of the loss
    assert [r["step"] for r in read_metrics(tmp_path)] == [10.0, 20.0]
    trim_metrics(path, max_step=100)
    text = path.read_text()
    assert text.endswith("\n") and "9.1e" not in text
    assert text.splitlines()[0] == ",".join(METRICS_FIELDS)
    State.global_step = 30  # the resumed run appends a whole row after the trim
    callback.on_log(None, State, None, logs={"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(10.0, 9.5), (20.0, 9.25), (30.0, 9.0)]


def test_cell_lengths_of_a_csr_h5ad_come_from_its_row_pointer_alone(tmp_path, monkeypatch):
    """Each rank of a sharded run plans shards from cell lengths: a CSR .h5ad answers from its
    row pointer, without reading every count; a CSC one still reads them, to the same lengths."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from mixgeneformer.readers.h5ad import _H5adSource
    from mixgeneformer.sharding import cell_lengths
    from mixgeneformer.tokenize import TokenizeConfig

    rng = np.random.default_rng(0)
    counts = sp.random(40, 30, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    expected = np.minimum(np.diff(counts.indptr), 6)
    var = {"index": [f"ENSG{i:011d}" for i in range(30)]}
    ad.AnnData(counts, var=var).write_h5ad(tmp_path / "csr.h5ad")
    ad.AnnData(counts.tocsc(), var=var).write_h5ad(tmp_path / "csc.h5ad")
    config = TokenizeConfig(max_len=6)
    assert np.array_equal(cell_lengths(tmp_path / "csc.h5ad", config), expected)

    def no_count_reads(self, start, stop):
        raise AssertionError("counts were read")

    monkeypatch.setattr(_H5adSource, "_read_rows", no_count_reads)
    lengths = cell_lengths(tmp_path / "csr.h5ad", config)
    assert lengths.dtype == np.int64 and np.array_equal(lengths, expected)


def test_an_unknown_species_is_refused_before_workers_start_or_a_file_is_read(tmp_path):
    """`mixgf medians --species cat` started its workers and progress bar, then failed inside a worker."""
    import subprocess
    import sys

    import pytest

    from mixgeneformer.errors import ConfigError
    from mixgeneformer.readers import ReadOptions

    with pytest.raises(ConfigError, match=r"species='cat': use 'auto' or one of \['human', 'mouse'\]"):
        ReadOptions(species="cat")
    missing = tmp_path / "not-read.h5ad"  # never opened: the option is checked first
    proc = subprocess.run([sys.executable, "-m", "mixgeneformer", "medians", str(missing), "--species", "cat", "--out",
                           str(tmp_path / "m.tsv")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "species='cat'" in proc.stderr and "medians:" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.tsv").exists()


def test_the_prediction_summary_lists_only_classes_that_were_predicted(tmp_path):
    import anndata as ad
    import numpy as np
    import pandas as pd

    from mixgeneformer.classify.predict import write_prediction_file

    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.obs["cell_type_pred"] = pd.Categorical(["beta", "beta", "alpha"], categories=["alpha", "beta", "delta"])
    line = write_prediction_file(adata, tmp_path / "out.h5ad", "cell_type")
    assert line.endswith("obs['cell_type_pred'] beta 2, alpha 1")


def test_signal_handlers_set_outside_python_are_restored_as_the_default():
    """signal.signal returns None for a handler not installed from Python; restoring None raised TypeError
    at the end of every run (and masked the run's own outcome)."""
    import signal

    from mixgeneformer.stopping import SignalFlag

    before = signal.getsignal(signal.SIGTERM)
    try:
        flag = SignalFlag()
        flag.previous = {signal.SIGTERM: None}
        flag.uninstall()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and flag.previous == {}
    finally:
        signal.signal(signal.SIGTERM, before)
