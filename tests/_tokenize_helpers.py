"""Shared synthetic data for the reader / median / tokenizer tests (real human Ensembl IDs), and
the in-process CLI runner of the audit tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mixgeneformer.genes import gene_table
from mixgeneformer.medians import GeneMedians
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]


def cli_exit_code(args: list) -> int:
    """Run ``mixgf ARGS`` in-process; its exit code (0 when it returns)."""
    from mixgeneformer.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


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


@dataclass
class GeneBundle:
    """A saved random model bundle over real human genes (see :func:`random_gene_bundle`)."""

    ids: list[str]  # the vocabulary's genes, then the genes outside it
    vocab: Vocabulary
    medians: GeneMedians
    model: object
    folder: Path
    rng: np.random.Generator  # seeded 0 and drawn only for the medians: draw the cells from it


def random_gene_bundle(folder: Path, n_genes: int, n_outside: int) -> GeneBundle:
    """A tiny 3-layer model (random, seeded) over the first ``n_genes`` protein-coding human genes,
    with random medians, saved as a bundle in ``folder``; ``n_outside`` more genes lie outside it."""
    import torch

    from mixgeneformer.bundle import save_bundle
    from mixgeneformer.model import MixGeneformerForPretraining, make_config

    ids = human_ids(n_genes + n_outside).tolist()
    in_vocab = ids[:n_genes]
    tokens = SPECIALS + in_vocab
    vocab = Vocabulary(tokens, {t: i for i, t in enumerate(tokens) if t.startswith("ENSG")})
    rng = np.random.default_rng(0)
    medians = GeneMedians({g: float(m) for g, m in zip(in_vocab, rng.uniform(0.5, 5, n_genes), strict=True)})
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, num_hidden_layers=3, max_position_embeddings=128))
    return GeneBundle(ids, vocab, medians, model, save_bundle(model, folder, vocab, medians), rng)


def partly_outside_files(root: Path) -> tuple[GeneBundle, Path]:
    """``random_gene_bundle(root / "model", 100, 20)`` and its :func:`cells_partly_outside` (labels "a", "b")
    written to ``root / "cells.h5ad"``."""
    made = random_gene_bundle(root / "model", 100, 20)
    path = root / "cells.h5ad"
    cells_partly_outside(made, ["a", "b"]).write_h5ad(path)
    return made, path


def cells_partly_outside(made: GeneBundle, labels: list[str]):
    """30 cells over ``random_gene_bundle(..., 100, 20)``'s genes: cells 0-19 hold counts only on the 20
    genes outside the vocabulary (untokenizable), cell 24 none at all; ``obs["cell_type1"]`` cycles ``labels``."""
    import anndata as ad

    counts = made.rng.poisson(1.0, size=(30, 120)).astype(np.float32)
    counts[:20, :100] = 0
    counts[20:, 100:] = 0
    counts[24] = 0
    obs = pd.DataFrame({"cell_type1": (labels * 30)[:30]}, index=[f"cell{i}" for i in range(30)])
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=made.ids))
