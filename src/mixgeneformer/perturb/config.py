"""Options of an in silico perturbation run (saved as config.yaml beside its results)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from ..config import check_choices
from ..errors import ConfigError
from ..sharding import shard_role

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
    overexpress_absent
        ``perturb="overexpress"`` of listed ``genes`` in a cell that lacks one: ``"skip"`` (default)
        leaves that gene out for the cell (a set, with ``combine``: the cell); ``"insert"``
        (Geneformer's ``InSilicoPerturber``) puts it first like an expressed gene — after any
        leading ``<cls>`` / species token, the set in the listed order — and truncates the cell to
        the model's ``max_position_embeddings``, dropping its lowest-ranked genes and keeping a
        trailing ``<eos>``. Inserted genes have ``gene_rank`` -1. Not with ``anchor``.
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
    score
        The score statistics test: ``"shift"`` (ours: 1 − cosine of the pooled cell embeddings
        before and after; ``goal_shift`` when a goal state is given) or ``"cell_emb"``
        (Geneformer's ``InSilicoPerturber`` cell score, for users migrating from Geneformer: adds
        the ``cell_emb`` column, the mean cosine similarity of the remaining genes' states before
        and after, and ``cell_emb_shift`` = 1 − ``cell_emb``, which is tested). Exact mode only.
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
    overexpress_absent: Literal["skip", "insert"] = "skip"
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
    score: Literal["shift", "cell_emb"] = "shift"
    batch_size: int = 16
    device: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    species: Literal["auto", "human", "mouse"] = "auto"
    seed: int = 0
    shard_index: int | None = None
    num_shards: int | None = None

    def _check_choices(self) -> None:
        """Values a typo would otherwise turn into another setting silently (the CLI checks them too)."""
        for name in ("genes", "alternatives"):  # a bare string would be read letter by letter
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list of names, got {value!r}; e.g. {name}=[{value!r}]")
        check_choices(self, ("pooling", "screen_method", "precision", "species", "overexpress_absent"))

    def __post_init__(self) -> None:
        self._check_choices()
        if self.perturb not in ("delete", "overexpress", "activate", "inhibit"):
            raise ConfigError(
                f"perturb={self.perturb!r}; use 'delete', 'overexpress', 'activate' or 'inhibit'"
            )
        if self.perturb in ("activate", "inhibit") and self.target_rank is None:
            raise ConfigError(
                f"perturb={self.perturb!r} needs target_rank (CLI: --target-rank), the gene rank "
                "to move genes to (0 = top, -1 = last)"
            )
        if self.target_rank is not None and self.perturb not in ("activate", "inhibit"):
            raise ConfigError(
                f"target_rank={self.target_rank} moves genes for perturb='activate' / 'inhibit' only; "
                f"perturb={self.perturb!r} does not use it (drop --target-rank)"
            )
        if self.overexpress_absent == "insert" and (self.perturb != "overexpress" or self.anchor is not None):
            raise ConfigError(
                "overexpress_absent='insert' puts listed genes a cell lacks first, for perturb='overexpress' without "
                f"an anchor; this run has perturb={self.perturb!r}, anchor={self.anchor!r} (drop overexpress_absent)"
            )
        if self.combine and len(self.genes) < 2:
            raise ConfigError("combine=True perturbs the listed genes together; list at least two genes")
        if self.combine and self.anchor is not None:
            raise ConfigError("use either combine (one set of genes) or anchor (pairs with one gene), not both")
        if (self.start or self.goal or self.alternatives) and not self.state_column:
            raise ConfigError("start / goal / alternatives need state_column (CLI: --state-column)")
        if self.cells_per_state is not None and not self.state_column:
            raise ConfigError("cells_per_state caps the cells of each state and needs state_column (CLI: --state-column)")
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
        if self.mode == "screen" and self.genes:
            raise ConfigError(
                f"mode='screen' screens every gene of each cell and would ignore genes={self.genes}; "
                "drop the genes (CLI: --genes) to screen, or use mode='exact' to score the listed genes"
            )
        if self.score not in ("shift", "cell_emb"):
            raise ConfigError(f"score={self.score!r}; use 'shift' (ours) or 'cell_emb' (Geneformer's InSilicoPerturber)")
        if self.score == "cell_emb" and self.mode == "screen":
            raise ConfigError("score='cell_emb' needs every gene's state after each perturbation; use mode='exact'")
        if self.gene_shifts and not self.genes:
            raise ConfigError(
                "gene_shifts=True with every gene perturbed would produce cells × genes² rows; "
                "list the genes to perturb (CLI: --genes INS,GCG)"
            )
        if (self.shard_index is None) != (self.num_shards is None):
            raise ConfigError("give both shard_index and num_shards, or neither")
        if self.num_shards is not None and not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index={self.shard_index} must be in [0, num_shards={self.num_shards})")

    @property
    def statistics_score(self) -> str | None:
        """The cell-table column statistics test: ``cell_emb_shift`` for ``score="cell_emb"``, else
        None (``goal_shift`` when the table has it, else ``shift``)."""
        return "cell_emb_shift" if self.score == "cell_emb" else None

    @property
    def scores_one_perturbation(self) -> bool:
        """Whether a run scores a single perturbation (a gene set, or one gene without an anchor):
        statistics ``mode="vs_all"`` would have nothing to test it against."""
        return self.combine or (len(self.genes) == 1 and self.anchor is None)

    @property
    def needs_gene_states(self) -> bool:
        """Whether every variant's per-gene states are compared with the original's."""
        return self.gene_shifts or self.score == "cell_emb"

    def shard(self) -> tuple[int, int]:
        """(shard index, number of shards), from the config or the torchrun environment."""
        role = shard_role(self.shard_index, self.num_shards)
        return role.index, role.world
