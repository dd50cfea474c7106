"""Sharded ``mixgf embed``: one process vs ``torchrun --nproc_per_node W``, same corpus, same model.

Real cells (Baron pancreas, human, ../shared/data) are tokenized into a corpus folder with a
vocabulary and medians built from the data; a random model bundle of a preset's size is saved;
then the real command line runs twice: ``mixgf embed CORPUS`` in one process and under
``torchrun`` with W ranks (each on its own GPU, ``cuda:LOCAL_RANK``; on the CPU gloo ranks share
the cores). Printed: wall seconds of each command (start-up, model load, plan, shards, barrier,
merge and the h5ad write included), cells/s, and the largest difference between the two outputs
(fp32: ≤ 1e-5 expected; bf16 autocast: ~1e-3 from batch-dependent rounding).

Usage::

    python benchmarks/sharded_embed.py --n-cells 64 --world 2                  # CPU, gloo ranks
    python benchmarks/sharded_embed.py --device cuda --world 8 --n-cells 8000 --preset geneformer-v2-104m
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "baron_pancreas_human.h5ad"


def prepare(work: Path, data: Path, n_cells: int, preset: str, max_len: int) -> tuple[Path, Path]:
    """A corpus of ``n_cells`` Baron cells and a random bundle of ``preset``'s size."""
    import anndata as ad
    import torch

    from mixgeneformer.bundle import save_bundle
    from mixgeneformer.medians import compute_medians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files
    from mixgeneformer.vocab import build_vocabulary

    if (work / "corpus").is_dir() and (work / "model").is_dir():  # built by an earlier run: reused
        return work / "corpus", work / "model"
    adata = ad.read_h5ad(data)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    cells = work / "cells.h5ad"
    adata[rows].copy().write_h5ad(cells)
    medians = compute_medians([cells])
    vocab = build_vocabulary("separate", "protein_coding", medians, species=("human",))
    corpus = tokenize_files([cells], work / "corpus", vocab, medians, TokenizeConfig(max_len=max_len))
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config(preset, vocab, max_position_embeddings=max(max_len, 512)))
    return corpus, save_bundle(model, work / "model", vocab, medians)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n-cells", type=int, default=64)
    parser.add_argument("--world", type=int, default=2, help="ranks of the torchrun launch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--preset", default="mix-geneformer")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import anndata as ad

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixgf-sharded-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, bundle = prepare(work, args.data, args.n_cells, args.preset, args.max_len)
    common = ["embed", str(corpus), "--model", str(bundle), "--no-progress", "--precision", args.precision,
              "--batch-size", str(args.batch_size)]
    one, many = work / "one.h5ad", work / "sharded.h5ad"
    for path in (one, many):
        path.unlink(missing_ok=True)
    device = ["--device", "cuda:0"] if args.device == "cuda" else ["--device", "cpu"]
    seconds_one = timed([sys.executable, "-m", "mixgeneformer", *common, "--out", str(one), *device])
    # under the launcher each rank picks cuda:LOCAL_RANK itself (no --device), unless there are
    # fewer GPUs than ranks: then they share cuda:0
    launch_device = ["--device", "cpu"]
    if args.device == "cuda":
        import torch

        launch_device = [] if args.world <= torch.cuda.device_count() else ["--device", "cuda:0"]
    seconds_many = timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world),
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "mixgeneformer",
                          *common, "--out", str(many), *launch_device])
    a, b = ad.read_h5ad(one), ad.read_h5ad(many)
    assert list(a.obs_names) == list(b.obs_names)
    diff = float(np.nanmax(np.abs(a.obsm["X_mixgeneformer"] - b.obsm["X_mixgeneformer"])))
    n = a.n_obs
    print(f"# {n} Baron human cells, preset {args.preset}, max_len {args.max_len}, device {args.device}, "
          f"precision {args.precision}, batch {args.batch_size}")
    print("| run | processes | wall s | cells/s | max abs diff vs one process |")
    print("|---|---|---|---|---|")
    print(f"| mixgf embed | 1 | {seconds_one:.1f} | {n / seconds_one:,.1f} | - |")
    print(f"| torchrun mixgf embed | {args.world} | {seconds_many:.1f} | {n / seconds_many:,.1f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
