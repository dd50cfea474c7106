"""Shared synthetic data for the reader / median / tokenizer tests (real human Ensembl IDs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mixgeneformer.genes import gene_table
from mixgeneformer.medians import GeneMedians
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]


def human_ids(n: int) -> np.ndarray:
    table = gene_table("human")
    return table.loc[table["biotype"] == "protein_coding", "ensembl_id"].to_numpy(dtype=object)[:n]


def make_counts(n_cells: int = 40, n_genes: int = 60, seed: int = 0, density: float = 0.3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.negative_binomial(1, 0.3, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    return sp.csr_matrix(dense.astype(np.int32))


def make_adata(n_cells: int = 40, n_genes: int = 60, seed: int = 0):
    import anndata as ad

    counts = make_counts(n_cells, n_genes, seed)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(np.array(["a", "b", "c"])[np.arange(n_cells) % 3]), "score": np.arange(n_cells, dtype=float)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=pd.Index(human_ids(n_genes)))
    return ad.AnnData(X=counts, obs=obs, var=var)


def make_vocab(genes: np.ndarray, drop_every: int = 7) -> Vocabulary:
    """Vocabulary of all but every ``drop_every``-th gene (so some columns are out of vocabulary)."""
    kept = [g for i, g in enumerate(genes) if i % drop_every != drop_every - 1]
    tokens = SPECIALS + kept
    return Vocabulary(tokens, {g: i + len(SPECIALS) for i, g in enumerate(kept)}, "separate")


def make_medians(genes: np.ndarray, seed: int = 1) -> GeneMedians:
    rng = np.random.default_rng(seed)
    return GeneMedians({g: float(v) for g, v in zip(genes, rng.uniform(0.5, 20, len(genes)), strict=True)})
