"""Running every variant of every cell through the encoder, in length-ordered batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..devices import inference_context
from ..inference import continue_encoder, hidden_at_layer, layers_to_run, length_order
from ..model import pool_cells
from .config import PerturbConfig
from .deletion import DeletionScan, supports_shared_first_block
from .variants import NoGeneLeftError, _Variants, cell_variants

if TYPE_CHECKING:

    from ..vocab import Vocabulary


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _forward(
    bert: torch.nn.Module,
    ids: np.ndarray,
    mask: np.ndarray,
    special_ids: np.ndarray,
    cls_id: int | None,
    config: PerturbConfig,
    device: torch.device,
    want_hidden: bool = False,
    first_block: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Cell embeddings (and token states) of one padded batch.

    ``first_block``: the batch's states after the first encoder block when already known
    (:class:`~mixgeneformer.deletion.DeletionScan`); the encoder then continues from there.
    """
    ids_t = torch.from_numpy(ids).to(device)
    mask_t = torch.from_numpy(mask).to(device)
    if first_block is None:
        hidden = hidden_at_layer(bert, ids_t, mask_t, config.layer)
    else:
        hidden = continue_encoder(bert, first_block, mask_t, 1, config.layer)
    cells = pool_cells(hidden, ids_t, mask_t, special_ids, config.pooling, cls_id)
    return cells.double().cpu().numpy(), (hidden.float() if want_hidden else None)


@dataclasses.dataclass
class _CellJob:
    """One cell queued for perturbation and its result arrays."""

    row: int  # row in the input dataset
    tokens: np.ndarray
    variants: _Variants
    embedding: np.ndarray  # original cell embedding, float64
    hidden: torch.Tensor | None = None  # original token states (gene shifts only)
    emb: np.ndarray | None = None  # (n_variants, hidden) perturbed embeddings, float64
    scan: DeletionScan | None = None  # shared first block, when every variant deletes one token
    deleted: np.ndarray | None = None  # (n_variants,) position each variant deletes (with scan)
    gene_rows: list = dataclasses.field(default_factory=list)  # (variant, affected token, shift)
    cell_emb: np.ndarray | None = None  # (n_variants,) Geneformer's cell_emb score (score="cell_emb")


def _variant_batches(jobs: Iterator[_CellJob], batch_size: int) -> Iterator[list[tuple[_CellJob, slice]]]:
    """Group the variants of consecutive cells into batches of ``batch_size`` rows."""
    pending: list[tuple[_CellJob, slice]] = []
    filled = 0
    for job in jobs:
        n = len(job.variants.src)
        start = 0
        while start < n:
            take = min(batch_size - filled, n - start)
            pending.append((job, slice(start, start + take)))
            filled += take
            start += take
            if filled == batch_size:
                yield pending
                pending, filled = [], 0
    if pending:
        yield pending


# long: one batching loop: pack variants of several cells, forward, unpack per cell.
def _run_variants(
    bert: torch.nn.Module,
    jobs: Iterator[_CellJob],
    vocab: Vocabulary,
    config: PerturbConfig,
    device: torch.device,
    on_done,
) -> None:
    """Embed every variant of ``jobs`` in batches, calling ``on_done(job)`` when a cell is complete."""
    special = vocab.special_ids
    pad = vocab.pad_id
    remaining: dict[int, int] = {}
    shareable = layers_to_run(len(bert.encoder.layer), config.layer) >= 1 and supports_shared_first_block(bert)
    for batch in _variant_batches(jobs, config.batch_size):
        pieces = []
        for job, part in batch:
            if job.emb is None:
                job.emb = np.full((len(job.variants.src), bert.config.hidden_size), np.nan)
                if config.score == "cell_emb":
                    job.cell_emb = np.full(len(job.variants.src), np.nan)
                remaining[id(job)] = len(job.variants.src)
                job.deleted = _single_deletions(job.variants.src, len(job.tokens)) if shareable else None
                if job.deleted is not None and len(job.deleted) >= _MIN_SCAN_VARIANTS:
                    job.scan = DeletionScan(bert, torch.from_numpy(job.tokens.astype(np.int64)).to(device))
            src = job.variants.src[part]
            identity = _identity_rows(src, len(job.tokens))
            pieces.append((job, part, src, identity))
        todo = [(job, part, src, ident) for job, part, src, ident in pieces]
        widths = [int((src >= 0).sum(axis=1).max()) for _, _, src, _ in todo]
        width = max(widths)
        n_rows = sum(len(src) for _, _, src, _ in todo)
        ids = np.full((n_rows, width), pad, dtype=np.int64)
        origin = np.full((n_rows, width), -1, dtype=np.int64)
        at = 0
        for job, _part, src, _ident in todo:
            s = src[:, :width] if src.shape[1] >= width else np.pad(src, ((0, 0), (0, width - src.shape[1])), constant_values=-1)
            valid = s >= 0
            ids[at : at + len(s)][valid] = job.variants.pool(job.tokens)[s[valid]]
            origin[at : at + len(s)] = s
            at += len(s)
        mask = (origin >= 0).astype(np.int64)
        first_block = None
        if all(job.scan is not None for job, _, _, _ in todo):
            states = [job.scan.first_block(job.deleted[part]) for job, part, _, _ in todo]
            first_block = states[0].new_zeros((n_rows, width, states[0].shape[-1]))
            at = 0
            for block in states:
                first_block[at : at + len(block), : block.shape[1]] = block
                at += len(block)
        emb, hidden = _forward(
            bert, ids, mask, special, vocab.cls_id, config, device, want_hidden=config.needs_gene_states,
            first_block=first_block,
        )
        at = 0
        for job, part, src, ident in todo:
            n = len(src)
            block = emb[at : at + n]
            block[ident] = job.embedding  # a perturbation of nothing: exactly the original
            job.emb[part] = block
            if hidden is not None:
                rows, cols, cos = _remaining_gene_cosines(job, part, hidden[at : at + n], origin[at : at + n], ids[at : at + n], special)
                if config.gene_shifts:
                    job.gene_rows.append((np.arange(part.start, part.stop)[rows], ids[at : at + n][rows, cols], 1.0 - cos))
                if job.cell_emb is not None:
                    with np.errstate(invalid="ignore"):
                        mean = np.bincount(rows, weights=cos, minlength=n) / np.bincount(rows, minlength=n)
                    job.cell_emb[part] = np.where(ident, 1.0, mean)
            at += n
            remaining[id(job)] -= n
            if remaining[id(job)] == 0:
                del remaining[id(job)]
                job.scan = None
                on_done(job)


#: Fewest single deletions of a cell for which sharing the first block pays for its set-up.
_MIN_SCAN_VARIANTS = 4


def _single_deletions(src: np.ndarray, length: int) -> np.ndarray | None:
    """The position each row of ``src`` deletes when every row deletes exactly one token, else None."""
    if src.ndim != 2 or src.shape[1] != length - 1 or len(src) == 0:
        return None
    kept = np.arange(length - 1)
    moved = src != kept
    deleted = np.where(moved.any(axis=1), moved.argmax(axis=1), length - 1)
    expected = kept + (kept[None, :] >= deleted[:, None])
    return deleted if np.array_equal(src, expected) else None


def _identity_rows(src: np.ndarray, length: int) -> np.ndarray:
    """Rows that gather the cell unchanged (``src`` may be right-padded with -1)."""
    if src.shape[1] < length:
        return np.zeros(len(src), dtype=bool)
    return (src[:, :length] == np.arange(length)).all(axis=1) & (src[:, length:] == -1).all(axis=1)


def _remaining_gene_cosines(job, part, hidden, origin, ids, special) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cos(state before, state after) of every gene a variant keeps unperturbed: (rows, cols, cos)."""
    valid = (origin >= 0) & ~np.isin(ids, special)
    perturbed = job.variants.perturbed_tokens[part]
    valid &= ~(ids[:, :, None] == perturbed[:, None, :]).any(-1)
    rows, cols = np.nonzero(valid)
    before = job.hidden[torch.from_numpy(origin[rows, cols])]
    after = hidden[torch.from_numpy(rows), torch.from_numpy(cols)]
    cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).cpu().numpy()
    return rows, cols, cos


def _genes_per_cell(flat: np.ndarray, offsets: np.ndarray, special: np.ndarray) -> np.ndarray:
    is_gene = ~np.isin(flat, special)
    counts = np.add.reduceat(is_gene.astype(np.int64), offsets[:-1]) if len(flat) else np.zeros(len(offsets) - 1, np.int64)
    counts[np.diff(offsets) == 0] = 0
    return counts


def _score_columns(
    original: np.ndarray, perturbed: np.ndarray, targets: dict[str, np.ndarray], config: PerturbConfig
) -> dict[str, np.ndarray]:
    """shift / goal_shift / alt_shift:<state> of perturbed embeddings (rows) of one cell."""
    unchanged = (perturbed == original[None, :]).all(axis=1)  # a perturbation of nothing scores 0
    columns = {"shift": np.where(unchanged, 0.0, 1.0 - _cosine(original[None, :], perturbed))}
    for name, target in targets.items():
        key = "goal_shift" if name == config.goal else f"alt_shift:{name}"
        change = _cosine(perturbed, target[None, :]) - _cosine(original[None, :], target[None, :])
        columns[key] = np.where(unchanged, 0.0, change)
    return columns


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None

    return tqdm(total=total, unit="cell", desc=desc, dynamic_ncols=True)


def _length_order(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rows longest first (stable), so consecutive batches hold sequences of similar length."""
    return rows[length_order(np.diff(offsets)[rows])]


def _exact(bert, flat, offsets, rows, base_of, targets, vocab, config, device, gene_tokens, anchor_token, progress):
    """Every variant through the encoder; returns (cell table, gene-shift table, summary)."""
    frames: list[pd.DataFrame] = []
    gene_frames: list[pd.DataFrame] = []
    counts = {"cells_perturbed": 0, "cells_skipped_gene_absent": 0, "cells_skipped_no_gene_left": 0, "variants": 0}
    if config.overexpress_absent == "insert":
        counts["variants_inserting_absent_genes"] = 0
    max_len = int(bert.config.max_position_embeddings)
    bar = _progress(len(rows), progress, f"perturb ({config.perturb})")

    def jobs() -> Iterator[_CellJob]:
        for row in _length_order(rows, offsets).tolist():
            tokens = flat[offsets[row] : offsets[row + 1]]
            try:
                variants = cell_variants(tokens, vocab, config, gene_tokens, anchor_token, max_len)
            except NoGeneLeftError:  # it holds no gene besides those a deletion removes
                variants, skip = None, "cells_skipped_no_gene_left"
            else:
                skip = "cells_skipped_gene_absent"
            if variants is None or len(variants.src) == 0:
                counts[skip] += 1
                if bar is not None:
                    bar.update(1)
                continue
            job = _CellJob(row, tokens, variants, base_of[row])
            if config.needs_gene_states:
                ids = torch.from_numpy(tokens[None, :].astype(np.int64)).to(device)
                job.hidden = hidden_at_layer(bert, ids, torch.ones_like(ids), config.layer)[0].float()
            yield job

    def done(job: _CellJob) -> None:
        v = job.variants
        frame, label = _cell_frame(job, targets, vocab, config, anchor_token)
        frames.append(frame)
        if job.gene_rows:
            variant, affected, shift = (np.concatenate(parts) for parts in zip(*job.gene_rows, strict=True))
            gene_frames.append(
                pd.DataFrame({"cell": job.row, "perturbed": label[variant], "affected_token": affected, "gene_shift": shift})
            )
        counts["cells_perturbed"] += 1
        counts["variants"] += len(v.src)
        if len(v.extra):
            counts["variants_inserting_absent_genes"] += int((v.src >= len(job.tokens)).any(axis=1).sum())
        job.hidden = None
        job.emb = None
        job.cell_emb = None
        if bar is not None:
            bar.update(1)

    try:
        with torch.inference_mode(), inference_context(device, config.precision, bert):
            _run_variants(bert, jobs(), vocab, config, device, done)
    finally:
        if bar is not None:
            bar.close()
    frame = _sorted_cells(frames, targets, config, anchor=anchor_token is not None)
    gene_frame = _gene_shift_table(gene_frames, vocab) if config.gene_shifts else None
    return frame, gene_frame, counts


def _cell_frame(job, targets: dict, vocab, config: PerturbConfig, anchor_token: int | None) -> tuple[pd.DataFrame, np.ndarray]:
    """One cell's rows of the cells table (one per variant) and the variants' names."""
    v = job.variants
    columns = _score_columns(job.embedding, job.emb, targets, config)
    if job.cell_emb is not None:
        columns["cell_emb"] = job.cell_emb
        columns["cell_emb_shift"] = 1.0 - job.cell_emb
    label = np.asarray(v.label, dtype=object)
    if anchor_token is not None:
        columns["anchor_shift"] = 1.0 - _cosine(job.emb[v.anchor_only][0][None, :], job.emb)
        label = np.where(v.anchor_only, label, vocab.tokens[anchor_token] + "+" + label.astype(str)).astype(object)
    frame = pd.DataFrame(
        {"cell": job.row, "perturbed": label, "gene_token": v.gene_token, "gene_rank": v.gene_rank, **columns}
    )
    if anchor_token is not None:  # pair rows: gene_token is the partner; the anchor-alone row: -1
        frame["anchor_token"] = np.where(v.anchor_only, -1, anchor_token)
    return frame, label


def _sorted_cells(frames: list[pd.DataFrame], targets: dict, config: PerturbConfig, anchor: bool) -> pd.DataFrame:
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        score_cols = ["shift"] + [
            "goal_shift" if name == config.goal else f"alt_shift:{name}" for name in targets
        ] + (["cell_emb", "cell_emb_shift"] if config.score == "cell_emb" else []) + (["anchor_shift"] if anchor else [])
        frame = pd.DataFrame({"cell": pd.Series(dtype=np.int64), "perturbed": pd.Series(dtype=object),
                              "gene_token": pd.Series(dtype=np.int64), "gene_rank": pd.Series(dtype=np.int64),
                              **{c: pd.Series(dtype=np.float64) for c in score_cols}})
        if anchor:
            frame["anchor_token"] = pd.Series(dtype=np.int64)
        if config.mode == "screen":  # a shard with no cells: the columns a screen's table has
            frame["exact"] = pd.Series(dtype=bool)
            for column in score_cols:
                frame[f"{column}_estimate"] = pd.Series(dtype=np.float64)
    # Deterministic order whatever the batching or sharding: dataset row, then gene rank.
    return frame.sort_values(["cell", "gene_rank", "perturbed"], kind="stable").reset_index(drop=True)


def _gene_shift_table(gene_frames: list[pd.DataFrame], vocab: Vocabulary) -> pd.DataFrame:
    if not gene_frames:
        return pd.DataFrame(columns=["perturbed", "affected_token", "affected", "n_cells", "mean_gene_shift"])
    long = pd.concat(gene_frames, ignore_index=True)
    table = (
        long.groupby(["perturbed", "affected_token"], sort=True)
        .agg(n_cells=("cell", "nunique"), mean_gene_shift=("gene_shift", "mean"))
        .reset_index()
    )
    table.insert(2, "affected", np.asarray(vocab.tokens, dtype=object)[table["affected_token"].to_numpy()])
    return table.sort_values(["perturbed", "mean_gene_shift"], ascending=[True, False], kind="stable").reset_index(drop=True)
