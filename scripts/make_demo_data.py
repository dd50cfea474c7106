"""Regenerate the shipped demo dataset from the Baron et al. 2016 pancreas files.

Source: GEO GSE84133 (Baron et al. 2016, inDrop), as re-bundled in the MIT-licensed PyPI package
``came==0.1.13`` and re-saved in ``../shared/data`` as gzip h5ad with integer counts.

What the script does, per species (deterministic, seed 0):

1. cap every ``cell_type1`` at ``--cap`` cells (a seeded random subset; rarer types are kept whole);
2. record obs ``n_counts`` = total counts over ALL original genes, so rank-value encoding keeps
   Geneformer's normalization even though genes are dropped next;
3. drop genes detected in fewer than ``--min-cells`` of the kept cells;
4. write integer counts (CSR, int32) as gzip-compressed h5ad.

Usage::

    python scripts/make_demo_data.py --source ../shared/data --out src/mixgeneformer/data/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from mixgeneformer.demo import capped_rows

SPECIES = ("human", "mouse")
OBS_COLUMNS = ["cell_type1", "cell_ontology_class", "cell_ontology_id", "donor", "library", "organism"]


def subsample(adata: ad.AnnData, cap: int, min_cells: int, seed: int) -> ad.AnnData:
    """Cap cells per ``cell_type1``, store full-gene totals in ``n_counts``, drop rare genes."""
    counts = sp.csr_matrix(adata.X)
    rows = capped_rows(adata.obs["cell_type1"], cap, seed)
    counts = counts[rows]
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    detected = np.asarray((counts > 0).sum(axis=0)).ravel()
    genes = np.flatnonzero(detected >= min_cells)
    counts = counts[:, genes].astype(np.int32)
    counts.sort_indices()
    obs = adata.obs.iloc[rows][OBS_COLUMNS].copy()
    for column in OBS_COLUMNS:
        obs[column] = obs[column].astype(str).astype("category")
    obs["n_counts"] = totals
    var = pd.DataFrame(index=pd.Index(adata.var_names[genes].astype(str), name="symbol"))
    out = ad.AnnData(X=counts, obs=obs, var=var)
    out.uns["demo_subsample"] = {
        "source": "GEO GSE84133 (Baron et al. 2016) via PyPI came==0.1.13",
        "cap_per_cell_type1": cap,
        "min_cells_per_gene": min_cells,
        "seed": seed,
        "n_cells_source": int(adata.n_obs),
        "n_genes_source": int(adata.n_vars),
        "n_counts": "total counts over all source genes (before gene filtering)",
    }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "mixgeneformer" / "data" / "demo")
    parser.add_argument("--cap", type=int, default=400, help="max cells per cell_type1 (default 400)")
    parser.add_argument("--min-cells", type=int, default=5, help="drop genes detected in fewer cells (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for species in SPECIES:
        source = args.source / f"baron_pancreas_{species}.h5ad"
        adata = ad.read_h5ad(source)
        demo = subsample(adata, args.cap, args.min_cells, args.seed)
        target = args.out / f"baron_pancreas_{species}.h5ad"
        tmp = target.with_name(f".{target.name}.tmp")
        demo.write_h5ad(tmp, compression="gzip", compression_opts=9)
        tmp.replace(target)
        size = target.stat().st_size
        total_bytes += size
        counts = demo.obs["cell_type1"].value_counts()
        print(f"{target}: {demo.n_obs} cells x {demo.n_vars} genes, {size / 1e6:.2f} MB")
        print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"total {total_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
