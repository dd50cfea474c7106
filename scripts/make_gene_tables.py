"""Derive the compact gene tables shipped in ``src/mixgeneformer/data`` from ../shared/data.

Run from the project root: ``python scripts/make_gene_tables.py``. Sources and licenses are
recorded in ``src/mixgeneformer/data/SOURCES.md``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parents[1] / "src" / "mixgeneformer" / "data"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for species, name in [("human", "gencode_v48_homo_sapiens"), ("mouse", "gencode_vM37_mus_musculus")]:
        table = pd.read_csv(
            SHARED / "genes" / f"{name}.csv.gz", header=None,
            names=["ensembl_id", "symbol", "version", "length", "biotype"],
        )
        table = table[["ensembl_id", "symbol", "biotype"]].sort_values("ensembl_id")
        table.to_csv(OUT / f"genes_{species}.tsv.gz", sep="\t", index=False, compression={"method": "gzip", "mtime": 0})
    orth = pd.read_csv(SHARED / "orthologs" / "ensembl_biomart_human_to_mouse.csv.gz")
    orth.columns = ["human_id", "human_symbol", "mouse_symbol", "mouse_id", "homology_type", "confidence", "goc"]
    orth = orth.dropna(subset=["mouse_id"])
    orth["homology_type"] = orth["homology_type"].str.replace("ortholog_", "", regex=False)
    orth["confidence"] = orth["confidence"].astype("Int64")
    orth = orth[["human_id", "mouse_id", "homology_type", "confidence", "human_symbol", "mouse_symbol"]]
    orth = orth.drop_duplicates(["human_id", "mouse_id"]).sort_values(["human_id", "mouse_id"])
    orth.to_csv(OUT / "orthologs_human_mouse.tsv.gz", sep="\t", index=False, compression={"method": "gzip", "mtime": 0})


if __name__ == "__main__":
    main()
