"""Benchmark: medians and tokenization throughput (cells/s) and peak RSS (children included).

Generates once, cached under ``benchmarks/.cache/`` (git-ignored), an uncompressed CSR h5ad of raw
counts with real human Ensembl IDs from the shipped gene table, ~2,000 detected genes per cell and
negative-binomial counts, then times ``compute_medians`` and ``tokenize_files`` with 1 and 2
workers. Prints a table. Usage::

    python benchmarks/tokenize.py                # 100k and 400k cells
    python benchmarks/tokenize.py --cells 20000  # a quick run
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib module ``tokenize``; drop its folder from the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
N_GENES = 20_000
GENES_PER_CELL = 2_000


def make_h5ad(n_cells: int, path: Path, block: int = 10_000, seed: int = 0) -> Path:
    """Write a realistic raw-count CSR h5ad block by block (memory flat in n_cells)."""
    import anndata as ad
    import pandas as pd

    from mixgeneformer.genes import gene_table

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    table = gene_table("human")
    genes = table.loc[table["biotype"] == "protein_coding", "ensembl_id"].to_numpy(dtype=object)
    genes = np.concatenate([genes, table.loc[table["biotype"] != "protein_coding", "ensembl_id"].to_numpy(dtype=object)])[:N_GENES]
    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.2, N_GENES) + 0.05  # a few genes detected everywhere, most rarely
    popularity /= popularity.sum()
    mean_expr = rng.lognormal(0.0, 1.2, N_GENES)
    tmp = path.with_suffix(".tmp")
    # Empty AnnData skeleton for obs/var, then the CSR matrix written directly with h5py.
    skeleton = ad.AnnData(obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]), var=pd.DataFrame(index=genes))
    skeleton.obs["cell_type"] = pd.Categorical(np.array(["a", "b", "c", "d"])[np.arange(n_cells) % 4])
    skeleton.write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = (n_cells, N_GENES)
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        nnz = 0
        for lo in range(0, n_cells, block):
            n = min(block, n_cells - lo)
            per_cell = np.clip(rng.normal(GENES_PER_CELL, 400, n).astype(np.int64), 200, 6000)
            cols = []
            for k in per_cell:  # generator only (not a measured path)
                cols.append(np.sort(rng.choice(N_GENES, size=k, replace=False, p=popularity)))
            cols = np.concatenate(cols).astype(np.int32)
            size = 2.0
            counts = 1 + rng.negative_binomial(size, size / (size + mean_expr[cols]))
            indptr.append(nnz + np.cumsum(per_cell))
            data.resize((nnz + len(cols),))
            indices.resize((nnz + len(cols),))
            data[nnz:] = counts.astype(np.int32)
            indices[nnz:] = cols
            nnz += len(cols)
        x.create_dataset("indptr", data=np.concatenate(indptr))
    tmp.rename(path)
    return path


class PeakRss:
    """Samples RSS of this process plus all children every 50 ms."""

    def __enter__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from mixgeneformer.medians import compute_medians
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files
    from mixgeneformer.vocab import build_vocabulary

    rows = []
    for n_cells in args.cells:
        path = make_h5ad(n_cells, CACHE / f"bench_{n_cells}.h5ad")
        for workers in args.workers:
            with PeakRss() as rss:
                t0 = time.perf_counter()
                medians = compute_medians([str(path)], workers=workers, species="human")
                seconds = time.perf_counter() - t0
            rows.append(("medians", n_cells, workers, n_cells / seconds, rss.peak / 2**30))
        vocab = build_vocabulary("separate", "protein_coding", medians, ("human", "mouse"))
        for workers in args.workers:
            out = Path(tempfile.mkdtemp(dir=CACHE)) / "corpus"
            with PeakRss() as rss:
                t0 = time.perf_counter()
                tokenize_files([path], out, vocab, medians, TokenizeConfig(), workers=workers)
                seconds = time.perf_counter() - t0
            rows.append(("tokenize", n_cells, workers, n_cells / seconds, rss.peak / 2**30))
            shutil.rmtree(out.parent)
    print(f"{'stage':<10}{'cells':>10}{'workers':>9}{'cells/s':>12}{'peak RSS GiB':>14}")
    for stage, n, w, rate, peak in rows:
        print(f"{stage:<10}{n:>10,}{w:>9}{rate:>12,.0f}{peak:>14.2f}")


if __name__ == "__main__":
    main()
