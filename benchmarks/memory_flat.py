"""Peak memory of medians and tokenization in a fresh process per corpus size (1 worker).

``benchmarks/tokenize.py`` runs every stage in one process, so later rows carry what earlier
stages left in the parent. This script starts a clean interpreter per (stage, size) to show that
peak RSS does not grow with the number of cells. Uses the corpora cached by
``benchmarks/tokenize.py`` (run that first). Usage: ``python benchmarks/memory_flat.py``.
"""

from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def run_stage(stage: str, n_cells: int) -> None:
    """Runs inside the child: one stage on the cached corpus, printing seconds and peak RSS."""
    import psutil

    from mixgeneformer.medians import GeneMedians, compute_medians
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files
    from mixgeneformer.vocab import build_vocabulary

    path = CACHE / f"bench_{n_cells}.h5ad"
    medians_path = CACHE / "medians_100000.tsv"
    if stage == "tokenize" and not medians_path.exists():
        compute_medians([str(CACHE / "bench_100000.h5ad")], species="human").save(medians_path)
    peak = [0]

    def watch() -> None:
        me = psutil.Process()
        while True:
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    started = time.perf_counter()
    if stage == "medians":
        compute_medians([str(path)], species="human", workers=1)
    else:
        medians = GeneMedians.load(medians_path)
        vocab = build_vocabulary("separate", "protein_coding", medians, ("human",))
        with tempfile.TemporaryDirectory() as tmp:
            tokenize_files([path], Path(tmp) / "corpus", vocab, medians, TokenizeConfig(), workers=1)
    seconds = time.perf_counter() - started
    print(f"{stage:<9} {n_cells:>9,} {n_cells / seconds:>10,.0f} {peak[0] / 2**30:>12.2f}")


def main() -> None:
    sizes = [n for n in (100_000, 400_000) if (CACHE / f"bench_{n}.h5ad").exists()]
    if not sizes:
        raise SystemExit("no cached corpora: run `python benchmarks/tokenize.py` first")
    print(f"{'stage':<9} {'cells':>9} {'cells/s':>10} {'peak RSS GiB':>12}   (1 worker, fresh process each)")
    for stage in ("medians", "tokenize"):
        for n_cells in sizes:
            subprocess.run([sys.executable, __file__, stage, str(n_cells)], check=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        run_stage(sys.argv[1], int(sys.argv[2]))
    else:
        main()
