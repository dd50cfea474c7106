"""In silico perturbation of rank-value-encoded cells, and its statistics.

A cell is a sequence of gene tokens ordered by normalized expression (SPEC §2). A perturbation
rewrites that sequence and asks how far the cell's embedding moves:

* ``delete``: remove the gene's token (the genes below it move up one rank);
* ``overexpress``: move the gene to the front (after any leading ``<cls>`` / species token); a
  listed gene the cell lacks is skipped, or with ``overexpress_absent="insert"`` inserted there
  and the cell cut to the model's length (Geneformer's);
* ``activate``: move the gene up to gene rank ``target_rank`` (a gene already ranked at or above
  it stays where it is); ``inhibit``: move it down to ``target_rank`` (negative ranks count from
  the end, ``-1`` = last).

Every perturbation of a cell is a *gather index* into the original sequence (deletion drops
indices, a move permutes them), so all variants of a cell are built at once as one 2-D array
(:func:`perturbation_indices`), and a variant's token ``j`` is the original token ``src[j]`` —
which also aligns gene states for per-gene shifts.

Scores (cell embedding = pooled hidden state of ``layer``, :mod:`mixgeneformer.embed`):

* ``shift`` = 1 − cos(original, perturbed);
* ``goal_shift`` = cos(perturbed, goal) − cos(original, goal), the goal state being the mean
  embedding of the cells labelled ``goal`` in ``state_column`` (likewise ``alt_shift:<state>``);
* with ``gene_shifts=True``, per affected gene 1 − cos of its contextual state before and after;
* with ``score="cell_emb"``, also Geneformer's ``InSilicoPerturber`` cell score: ``cell_emb`` =
  the mean, over the cell's remaining genes, of the cosine similarity between each gene's state
  (hidden state of ``layer``) before and after the perturbation — the perturbed gene's position
  left out of the original, special tokens left out of both — exactly the value Geneformer stores
  under ``(gene, "cell_emb")`` (1 = unchanged); ``cell_emb_shift`` = 1 − ``cell_emb`` is the
  column statistics rank by. ``shift`` compares the pooled cell embeddings; ``cell_emb`` averages
  per-gene changes, so genes that move a lot count however the pooling weighs them.

Variants of many cells run through the encoder together, in length-sorted batches, under
``torch.inference_mode``, computing only the layers needed. When every variant of a cell deletes
one gene, the first encoder block is computed for all of them at once
(:class:`mixgeneformer.deletion.DeletionScan`: shared projections, running attention sums).
Cells can be sharded across processes (``shard_index`` / ``num_shards``, default from the
``RANK`` / ``WORLD_SIZE`` environment that ``torchrun`` sets) and the shard tables concatenated.

Fast screening (``mode="screen"``, single-gene deletions)
--------------------------------------------------------
All deletions of a cell are estimated from one forward pass and one (batched) backward pass by a
first-order Taylor expansion, then the ``screen_top_k`` genes with the largest estimated score
are re-scored exactly: the table marks them ``exact=True`` and holds their exact scores in
``shift`` / ``goal_shift`` (NaN in every other row), while the ``*_estimate`` columns hold the
estimate of every row. Statistics test the estimates (one measurement for every gene) and report
exact means over the re-scored rows as ``mean_*_exact``. Two expansions (``screen_method``):

* ``"mask"`` (default), around the original cell: deleting the gene at position ``p`` is (a) its
  presence weight going from 1 to 0 — a weight that scales the token's attention as a key
  (additive log-weight, i.e. an attention-mask relaxation) and its weight in mean pooling — plus
  (b) every token after it moving one position up, an input change ``P[j-1] − P[j]`` of the
  position embeddings. For a read-out ``s`` of the cell embedding,
  ``Δs_p ≈ −∂s/∂w_p + Σ_{j>p} ∂s/∂x_j · (P[j-1] − P[j])``: a suffix sum over positions, so one
  backward pass gives the estimate for every ``p``.
* ``"shift"``, around the cell with its last gene deleted (computed exactly): deleting ``p``
  then replaces ``t_j`` by ``t_{j+1}`` at every position of ``[p, last)``, linearised in the word
  embeddings, ``Δs_p ≈ Σ_{j=p}^{last-1} ∂s/∂x_j · (W[t_{j+1}] − W[t_j])`` (gradient × input
  difference).

Read-outs: ``cos(e, goal)`` per state (the goal shift is linear to first order), the component of
``e`` along itself, and ``screen_probes`` random orthonormal directions orthogonal to it whose
squared projections estimate the orthogonal displacement ``‖δ⊥‖²`` and hence ``shift`` (which is
second order in ``δ``, so it needs the vector, not one gradient; a randomised, Hutchinson-style
estimate). All read-outs share the forward pass; their gradients come from one vmapped backward
pass (``is_grads_batched``). ``benchmarks/perturb.py`` reports the estimates' per-cell Spearman
correlation with exact scores on real cells and the speed-up.

Statistics over the cell table (rank-sum tests with FDR, vs-null, aggregate) live in
:mod:`mixgeneformer.perturb.stats`; :func:`perturbation_statistics` is re-exported here.
"""

from __future__ import annotations

from .cells import PerturbationResult, perturb_anndata, perturb_cells, perturb_file
from .config import PerturbConfig, PerturbType
from .results import (
    check_shard_folder,
    finish_run,
    is_shard_run,
    merge_run,
    merge_shards,
    read_cells,
    write_results,
    write_shard,
)
from .screen import screen_deletions
from .stats import (
    StatsMode,
    benjamini_hochberg,
    gene_names,
    perturbation_statistics,
    run_statistics,
)
from .variants import cell_variants, perturbation_indices, resolve_genes

__all__ = [
    "PerturbConfig",
    "PerturbType",
    "PerturbationResult",
    "StatsMode",
    "benjamini_hochberg",
    "cell_variants",
    "check_shard_folder",
    "finish_run",
    "gene_names",
    "is_shard_run",
    "merge_run",
    "merge_shards",
    "perturb_anndata",
    "perturb_cells",
    "perturb_file",
    "perturbation_indices",
    "perturbation_statistics",
    "read_cells",
    "resolve_genes",
    "run_statistics",
    "screen_deletions",
    "write_results",
    "write_shard",
]
