"""Peak memory (RSS) and time of reading a 10x ``matrix.mtx`` folder, whole and a shard's quarter.

Builds (once, cached under ``benchmarks/.cache``, in a child process so the parent stays small) a
synthetic CellRanger-style folder: ``--cells`` barcodes × ``--genes`` genes, about ``--per-cell``
counts per cell, entries sorted by cell then gene, plain text. Then, in one fresh interpreter per
case, reads it with :func:`mixgeneformer.readers.read_anndata` (every cell, or the first quarter as
rank 0 of ``--num-shards 4`` reads it) and prints the peak RSS (``resource.getrusage`` ru_maxrss) after
the imports and after the read, the seconds, and a checksum of the AnnData's counts and cell names
(the same for every version that reads the same cells). Usage::

    python benchmarks/mtx_memory.py [--cells 20000] [--genes 20000] [--per-cell 2000] [--before SRC]

``--before SRC``: also measure the package in ``SRC`` (e.g. ``git worktree add /tmp/mtx_old <commit>``,
then ``--before /tmp/mtx_old/src``); the package on ``PYTHONPATH`` (or installed) is "after".
"""

from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def build(folder: Path, n_cells: int, n_genes: int, per_cell: int) -> None:
    """The folder: per cell, strictly increasing genes (random gaps averaging n_genes / per_cell / 1.05), counts 1-9."""
    import numpy as np
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    top = max(2, int(2 * n_genes / per_cell / 1.05))
    parts = []
    for lo in range(0, n_cells, 1000):
        cells = np.arange(lo, min(lo + 1000, n_cells))
        genes = np.cumsum(rng.integers(1, top, size=(cells.size, per_cell)), axis=1) - 1
        keep = genes < n_genes
        parts.append(pd.DataFrame({"row": genes[keep] + 1, "col": np.repeat(cells + 1, keep.sum(axis=1)),
                                   "value": rng.integers(1, 10, int(keep.sum()))}))
    table = pd.concat(parts, ignore_index=True)
    with open(folder / "matrix.mtx", "w") as handle:
        handle.write(f"%%MatrixMarket matrix coordinate integer general\n%metadata_json: {{}}\n{n_genes} {n_cells} {len(table)}\n")
        table.to_csv(handle, sep=" ", header=False, index=False)
    pd.DataFrame({"id": [f"ENSG{i:011d}" for i in range(n_genes)], "name": [f"G{i}" for i in range(n_genes)],
                  "type": "Gene Expression"}).to_csv(folder / "features.tsv", sep="\t", header=False, index=False)
    pd.Series([f"AAAC{i:012d}-1" for i in range(n_cells)]).to_csv(folder / "barcodes.tsv", header=False, index=False)
    (folder / "complete").touch()


def measure(folder: str, quarter: bool) -> None:
    """Runs in the child: ``peak_MiB_after_imports peak_MiB_after_read seconds cells entries checksum module``."""
    import resource
    import zlib

    import numpy as np

    import mixgeneformer
    from mixgeneformer.readers import read_anndata

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    base = peak()
    n_cells = sum(1 for _ in open(Path(folder) / "barcodes.tsv"))
    t0 = time.perf_counter()
    adata = read_anndata(folder, (0, n_cells // 4) if quarter else None)
    seconds = time.perf_counter() - t0
    x = adata.X
    crc = 0
    for part in (x.indptr.astype(np.int64), x.indices.astype(np.int64), x.data, "\n".join(adata.obs_names).encode()):
        crc = zlib.crc32(part if isinstance(part, bytes) else np.ascontiguousarray(part).tobytes(), crc)
    print(f"{base:.0f} {peak():.0f} {seconds:.1f} {adata.n_obs} {x.nnz} {crc:08x}/{x.dtype} {Path(mixgeneformer.__file__).parent}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--per-cell", type=int, default=2_000)
    parser.add_argument("--before", help="src folder of the version to compare with (PYTHONPATH for its cases)")
    args = parser.parse_args()
    folder = CACHE / f"mtx_{args.cells}x{args.genes}x{args.per_cell}"
    if not (folder / "complete").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build", str(folder), str(args.cells), str(args.genes), str(args.per_cell)],
                       check=True)
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s")
    with open(folder / "matrix.mtx") as handle:
        handle.readline(), handle.readline()
        entries = int(handle.readline().split()[2])
    size = (folder / "matrix.mtx").stat().st_size / 2**20
    print(f"folder: {args.cells:,} cells × {args.genes:,} genes, {entries:,} entries ({entries * 12 / 2**20:.0f} MiB as "
          f"int32 indices + int64 counts); matrix.mtx {size:.0f} MiB of text; one fresh process per case, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; peak RSS = getrusage ru_maxrss")
    versions = ([("before", args.before)] if args.before else []) + [("after", os.environ.get("PYTHONPATH", ""))]
    print(f"{'case':<36} {'peak MiB: imports':>17} {'after read':>11} {'seconds':>8} {'cells':>7} {'entries':>11}  checksum")
    for version, path in versions:
        for quarter in (False, True):
            env = dict(os.environ, PYTHONPATH=path) if path else dict(os.environ)
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(int(quarter))], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            base, done, seconds, cells, nnz, crc, module = out.stdout.split()[-7:]
            case = f"{version}: {'rank 0 of 4 (first quarter)' if quarter else 'every cell'}"
            print(f"{case:<36} {base:>17} {done:>11} {seconds:>8} {int(cells):>7,} {int(nnz):>11,}  {crc}  ({module})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        measure(sys.argv[2], sys.argv[3] == "1")
    elif len(sys.argv) == 6 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
    else:
        main()
