"""Options of an in silico perturbation run (saved as config.yaml beside its results)."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Literal

from ..errors import ConfigError

if TYPE_CHECKING:

    pass


PerturbType = Literal["delete", "overexpress", "activate", "inhibit"]


@dataclasses.dataclass
class PerturbConfig:
    """Options of an in silico perturbation run (saved as ``config.yaml`` beside the results).

    Attributes
    ----------
    perturb
        ``"delete"``, ``"overexpress"``, ``"activate"`` or ``"inhibit"``.
    genes
        Genes to perturb (Ensembl IDs or symbols); empty = every gene of each cell, one at a time.
    combine
        Perturb all ``genes`` together as one variant (a cell must express all of them).
    anchor
        A gene perturbed in every variant together with each other gene (combinations); the
        ``anchor_shift`` column is the shift relative to the anchor-only perturbation.
    target_rank
        Gene rank (0 = top) that ``activate`` / ``inhibit`` move genes to; negative counts from
        the end (-1 = last).
    state_column, start, goal, alternatives
        ``obs``/corpus column of cell states; cells of ``start`` are perturbed (all cells when
        unset); ``goal`` and ``alternatives`` are states whose mean embeddings shifts are
        measured towards.
    cells_per_state
        At most this many cells per state (drawn with ``seed``) for the state means and the
        perturbed cells.
    min_genes
        Cells with fewer genes are dropped (counted and logged).
    layer, pooling
        Hidden state and pooling of the cell embedding (see :mod:`mixgeneformer.embed`).
    mode
        ``"exact"``: every variant through the encoder; ``"screen"``: first-order estimates for
        all single-gene deletions, exact re-scoring of the top ``screen_top_k`` per cell.
    screen_top_k, screen_probes
        Genes re-scored exactly per cell; random probe directions of the shift estimate.
    screen_method
        First-order expansion used by screening: ``"mask"`` (presence-weight relaxation plus
        position shift, around the original cell) or ``"shift"`` (token shift around the cell
        with its last gene deleted). See the module docstring.
    gene_shifts
        Also measure how each remaining gene's contextual state moves (explicit ``genes`` only).
    batch_size
        Sequences per forward pass (variants of several cells share a batch).
    device, precision
        Torch device (``None``: CUDA when available) and ``"fp32"`` / ``"bf16"`` / ``"auto"``.
    species
        Species used to resolve gene symbols: ``"auto"`` (the cells' species, else human).
    seed
        Seed of the per-state cell sampling and of the screening probes.
    shard_index, num_shards
        This process' share of the cells (``None``: from ``RANK`` / ``WORLD_SIZE``, else 0 / 1).
    """

    perturb: PerturbType = "delete"
    genes: list[str] = dataclasses.field(default_factory=list)
    combine: bool = False
    anchor: str | None = None
    target_rank: int | None = None
    state_column: str | None = None
    start: str | None = None
    goal: str | None = None
    alternatives: list[str] = dataclasses.field(default_factory=list)
    cells_per_state: int | None = None
    min_genes: int = 2
    layer: int = -2
    pooling: Literal["mean", "cls"] = "mean"
    mode: Literal["exact", "screen"] = "exact"
    screen_top_k: int = 20
    screen_probes: int = 8
    screen_method: Literal["mask", "shift"] = "mask"
    gene_shifts: bool = False
    batch_size: int = 16
    device: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    species: Literal["auto", "human", "mouse"] = "auto"
    seed: int = 0
    shard_index: int | None = None
    num_shards: int | None = None

    def __post_init__(self) -> None:
        if self.perturb not in ("delete", "overexpress", "activate", "inhibit"):
            raise ConfigError(
                f"perturb={self.perturb!r}; use 'delete', 'overexpress', 'activate' or 'inhibit'"
            )
        if self.perturb in ("activate", "inhibit") and self.target_rank is None:
            raise ConfigError(
                f"perturb={self.perturb!r} needs target_rank (CLI: --target-rank), the gene rank "
                "to move genes to (0 = top, -1 = last)"
            )
        if self.combine and len(self.genes) < 2:
            raise ConfigError("combine=True perturbs the listed genes together; list at least two genes")
        if self.combine and self.anchor is not None:
            raise ConfigError("use either combine (one set of genes) or anchor (pairs with one gene), not both")
        if (self.start or self.goal or self.alternatives) and not self.state_column:
            raise ConfigError("start / goal / alternatives need state_column (CLI: --state-column)")
        for name in ("min_genes", "batch_size", "screen_top_k", "screen_probes"):
            value = getattr(self, name)
            if value < (1 if name != "screen_top_k" else 0):
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.cells_per_state is not None and self.cells_per_state < 1:
            raise ConfigError(f"cells_per_state must be positive, got {self.cells_per_state}")
        if self.mode not in ("exact", "screen"):
            raise ConfigError(f"mode={self.mode!r}; use 'exact' or 'screen'")
        if self.mode == "screen" and (self.perturb != "delete" or self.combine or self.anchor or self.gene_shifts):
            raise ConfigError(
                "mode='screen' estimates single-gene deletions only; use perturb='delete' without "
                "combine/anchor/gene_shifts, or mode='exact'"
            )
        if self.gene_shifts and not self.genes:
            raise ConfigError(
                "gene_shifts=True with every gene perturbed would produce cells × genes² rows; "
                "list the genes to perturb (CLI: --genes INS,GCG)"
            )
        if (self.shard_index is None) != (self.num_shards is None):
            raise ConfigError("give both shard_index and num_shards, or neither")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})")

    def shard(self) -> tuple[int, int]:
        """(shard index, number of shards), from the config or the torchrun environment."""
        if self.num_shards is not None:
            return int(self.shard_index), int(self.num_shards)
        try:
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError as exc:
            raise ConfigError(f"RANK / WORLD_SIZE must be integers ({exc})") from exc
        if not 0 <= rank < world:
            raise ConfigError(f"environment RANK={rank} is not within WORLD_SIZE={world}")
        return rank, world
