"""Peak memory (RSS) of opening a TileDB-SOMA experiment and streaming it in chunks.

Builds (once, cached under ``benchmarks/.cache``) a synthetic experiment shaped like CELLxGENE
Census's obs: many cells, many wide string columns, a tiny X. Then, in a fresh interpreter per
case, opens it with :func:`mixgeneformer.readers.open_source` and reads every chunk, printing the
peak RSS (VmHWM) after the imports, after opening, and after reading. Usage::

    python benchmarks/soma_memory.py [--cells 200000] [--columns 20]

The figures of the package on ``PYTHONPATH`` (or installed) are measured; run it with
``PYTHONPATH=<other checkout>/src`` to measure another version.
"""

from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
CHUNK = 10_000


def build(path: Path, n_cells: int, n_columns: int) -> None:
    """A SOMA experiment: ``n_cells`` cells, ``n_columns`` distinct ~30-character strings per cell,
    50 genes with 3 counts per cell; written in slices so building it stays small too."""
    import numpy as np
    import pyarrow as pa
    import tiledbsoma

    shutil.rmtree(path, ignore_errors=True)
    width = 30
    fields = [pa.field("obs_id", pa.large_string())] + [pa.field(f"meta_{j:02d}", pa.large_string()) for j in range(n_columns)]
    with tiledbsoma.Experiment.create(str(path)) as exp:
        obs = exp.add_new_dataframe("obs", schema=pa.schema(fields), domain=[(0, n_cells - 1)])
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection("RNA", tiledbsoma.Measurement)
        var = rna.add_new_dataframe("var", schema=pa.schema([pa.field("var_id", pa.large_string())]), domain=[(0, 49)])
        var.write(pa.table({"soma_joinid": np.arange(50, dtype=np.int64), "var_id": [f"ENSG{i:011d}" for i in range(50)]}))
        x = rna.add_new_collection("X").add_new_sparse_ndarray("data", type=pa.float32(), shape=(n_cells, 50))
        rng = np.random.default_rng(0)
        for lo in range(0, n_cells, 50_000):
            ids = np.arange(lo, min(lo + 50_000, n_cells), dtype=np.int64)
            columns = {"soma_joinid": ids, "obs_id": [f"cell{i:012d}" for i in ids]}
            for j in range(n_columns):
                columns[f"meta_{j:02d}"] = [f"value_{j:02d}_{i:010d}".ljust(width, "x") for i in ids]
            obs.write(pa.table(columns))
            rows = np.repeat(ids, 3)
            cols = (rows * 7 + np.tile([0, 1, 2], ids.size)) % 50  # three distinct genes per cell
            x.write(pa.table({"soma_dim_0": rows, "soma_dim_1": cols.astype(np.int64),
                              "soma_data": rng.integers(1, 5, rows.size).astype(np.float32)}))


def measure(path: str, case: str) -> None:
    """Runs in the child: one case, printing ``peak_after_import peak_after_open peak_after_read seconds``."""
    from mixgeneformer.readers import open_source

    def peak() -> float:
        """Peak RSS of this process in MiB: VmHWM (getrusage's ru_maxrss keeps the parent's peak across
        fork + exec, so a parent that built the experiment would be counted)."""
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024

    base = peak()
    t0 = time.perf_counter()
    with open_source(path) as source:
        opened = peak()
        columns = {"open only": None, "chunks, no obs column": [], "chunks, 2 obs columns": ["meta_00", "meta_07"]}[case]
        cells = 0
        if columns is not None:
            for chunk in source.iter_chunks(CHUNK, obs_columns=columns):
                cells += chunk.counts.shape[0]
    print(f"{base:.0f} {opened:.0f} {peak():.0f} {time.perf_counter() - t0:.1f} {cells}")


CASES = ("open only", "chunks, no obs column", "chunks, 2 obs columns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--columns", type=int, default=20)
    args = parser.parse_args()
    path = CACHE / f"soma_{args.cells}x{args.columns}"
    if not (path / "complete").exists():
        t0 = time.perf_counter()
        build(path, args.cells, args.columns)
        (path / "complete").touch()
        print(f"built {path} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    import mixgeneformer

    print(f"mixgeneformer from {Path(mixgeneformer.__file__).parent}")
    print(f"experiment: {args.cells:,} cells × {args.columns} string obs columns (~30 chars), 50 genes; {size:.0f} MiB on disk; "
          f"chunks of {CHUNK:,} cells; one fresh process per case, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'case':<24} {'peak MiB: imports':>18} {'after open':>11} {'after read':>11} {'seconds':>8} {'cells read':>11}")
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", str(path), case], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        base, opened, done, seconds, cells = out.stdout.split()[-5:]
        print(f"{case:<24} {base:>18} {opened:>11} {done:>11} {seconds:>8} {int(cells):>11,}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        measure(sys.argv[2], sys.argv[3])
    else:
        main()
