"""Held-out masked-gene diagnostics of pretraining, and the frequency baselines they are judged by.

A model that has learned nothing about cells still predicts a masked gene far better than chance:
gene frequencies, and above all the frequency of each gene at each rank position of a
rank-value-encoded cell, carry the easy part of the signal. The baselines are counted once from
the training split's tokens (as the model sees them: cut to its length), over gene tokens only:

* unigram:            ``p(g)     = (n_g + 1) / (N + G)`` (add-one over the ``G`` gene tokens)
* unigram given rank: ``p(g | b) = (n_bg + m p(g)) / (n_b + m)`` with ``b = position // bucket_size``
  (the position in the tokenized cell) and a Dirichlet prior of strength ``m`` toward the unigram,
  so genes unseen at a rank keep some mass. ``m`` is chosen from :data:`PRIOR_GRID` by the
  likelihood of a tenth of the training cells under counts of the other nine tenths (a corpus
  of a few thousand cells spreads too few tokens over a rank bucket: with a fixed small ``m`` the
  rank baseline scores *worse* than the unigram on held-out cells), then counted from them all

and scored on the *same* held-out masked positions as the model: cross-entropy (nats), top-1 and
top-10 accuracy. The model's top-k ranks gene tokens only, as the baselines do; its cross-entropy is
its MLM loss over the whole vocabulary (mass on special tokens counts against it). A model beats
"which genes are frequent at this rank" only when its held-out MLM loss is below the rank baseline's.
Each held-out cell is masked by a seed of its own (:class:`mixgeneformer.collator.HeldOutMaskingCollator`),
so the numbers do not depend on the batch size or the number of processes.

Per-cell sums (:data:`STAT_NAMES`) are what an evaluation batch returns, so a distributed
evaluation can gather them per cell and :func:`summarize` divides totals by the number of masked
positions at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InputDataError
from .inference import token_columns
from .losses import IGNORE_INDEX

if TYPE_CHECKING:
    import datasets
    from transformers import EvalPrediction

TOP_K = 10
PRIOR_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1_000.0, 3_000.0, 10_000.0, 30_000.0, 100_000.0)
STAT_NAMES = (
    "n_masked",
    "mlm_nll",
    "mlm_top1",
    "mlm_top10",
    "unigram_nll",
    "unigram_top1",
    "unigram_top10",
    "rank_unigram_nll",
    "rank_unigram_top1",
    "rank_unigram_top10",
)
# metrics.csv / log names (Trainer prefixes "eval_"), in the order summarize() returns them.
METRIC_NAMES = (
    "mlm_loss",
    "top1",
    "top10",
    "unigram_loss",
    "unigram_top1",
    "unigram_top10",
    "rank_unigram_loss",
    "rank_unigram_top1",
    "rank_unigram_top10",
)


def token_positions(lengths: np.ndarray) -> np.ndarray:
    """Position of every token of a flat, concatenated batch of cells (0 at each cell's start)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


@dataclass
class FrequencyBaselines:
    """Log-probabilities of the unigram and the rank-bucket unigram baselines (special tokens: -inf).

    Attributes
    ----------
    unigram_log_prob
        ``(V,)`` float32.
    rank_log_prob
        ``(n_buckets, V)`` float32; positions beyond the last bucket use the last.
    bucket_size
        Positions per rank bucket.
    n_cells, n_tokens
        Training cells and gene tokens counted.
    train_entropy
        Plug-in entropies (nats) of the training tokens: ``unigram`` and ``rank_unigram``
        (conditional on the bucket). Held-out losses of the baselines lie above them (a plug-in
        entropy of sparse counts underestimates), by more the fewer tokens a bucket holds.
    prior_strength
        The ``m`` of the rank baseline.
    """

    unigram_log_prob: np.ndarray
    rank_log_prob: np.ndarray
    bucket_size: int
    n_cells: int
    n_tokens: int
    train_entropy: dict[str, float]
    prior_strength: float = 10.0
    _device_tables: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        return {
            "bucket_size": self.bucket_size,
            "n_buckets": int(self.rank_log_prob.shape[0]),
            "n_cells": self.n_cells,
            "n_tokens": self.n_tokens,
            "prior_strength": self.prior_strength,
            "train_entropy_nats": dict(self.train_entropy),
        }

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Torch tables on ``device`` (cached): log-probabilities, top-k token ids and which tokens are genes."""
        key = str(device)
        if key not in self._device_tables:
            unigram = torch.from_numpy(self.unigram_log_prob)
            rank = torch.from_numpy(self.rank_log_prob)
            genes = torch.isfinite(unigram)  # gene tokens (special tokens: -inf)
            k = min(TOP_K, int(genes.sum()))
            self._device_tables[key] = {
                "genes": genes.to(device),
                "unigram": unigram.to(device),
                "rank": rank.to(device),
                "unigram_top": torch.topk(unigram, k).indices.to(device),
                "rank_top": torch.topk(rank, k, dim=1).indices.to(device),
            }
        return self._device_tables[key]


def count_tokens(
    flat_tokens: np.ndarray,
    lengths: np.ndarray,
    vocab_size: int,
    special_ids: np.ndarray,
    bucket_size: int = 8,
    max_len: int | None = None,
    n_buckets: int | None = None,
) -> np.ndarray:
    """``(n_buckets, V)`` int64 counts of gene tokens per rank bucket of a flat batch of cells.

    ``max_len`` cuts cells as :func:`mixgeneformer.collator.pad_sequences` does: a cut cell that
    ends with a special token (V2's ``<eos>``) has it put back at its last kept position, so the
    gene there is not counted.
    """
    flat = np.asarray(flat_tokens, dtype=np.int64)
    positions = token_positions(lengths)
    if flat.size != positions.size:
        raise InputDataError(f"{flat.size} tokens but lengths sum to {positions.size}.")
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise InputDataError(f"token ids outside 0..{vocab_size - 1}; the corpus was tokenized with another vocabulary.")
    special = np.zeros(vocab_size, dtype=bool)
    special[np.asarray(special_ids, dtype=np.int64)] = True
    keep = ~special[flat]
    if max_len is not None:
        keep &= positions < max_len
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        cut = np.flatnonzero(lengths > max_len)
        cut = cut[special[flat[starts[cut] + lengths[cut] - 1]]]
        keep[starts[cut] + max_len - 1] = False
    if n_buckets is None:
        n_buckets = max(1, -(-(max_len or int(positions.max(initial=0)) + 1) // bucket_size))
    buckets = np.minimum(positions[keep] // bucket_size, n_buckets - 1)
    flat_index = buckets * vocab_size + flat[keep]
    return np.bincount(flat_index, minlength=n_buckets * vocab_size).reshape(n_buckets, vocab_size)


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _unigram(counts: np.ndarray, special_ids: np.ndarray) -> np.ndarray:
    gene = np.ones(counts.shape[1], dtype=bool)
    gene[np.asarray(special_ids, dtype=np.int64)] = False
    unigram_counts = counts.sum(axis=0)
    return np.where(gene, (unigram_counts + 1.0) / (unigram_counts.sum() + gene.sum()), 0.0)


def choose_prior_strength(fit: np.ndarray, tune: np.ndarray, special_ids: np.ndarray, grid=PRIOR_GRID) -> float:
    """The ``m`` of :data:`PRIOR_GRID` under which the ``tune`` counts are likeliest given the ``fit`` counts."""
    fit = np.asarray(fit, dtype=np.float64)
    unigram = _unigram(fit, special_ids)
    per_bucket = fit.sum(axis=1)
    b, t = np.nonzero(tune)
    if b.size == 0:
        return float(grid[len(grid) // 2])
    weight = np.asarray(tune, dtype=np.float64)[b, t]
    scores = [
        float((weight * np.log((fit[b, t] + m * unigram[t]) / (per_bucket[b] + m))).sum()) for m in grid
    ]
    return float(grid[int(np.argmax(scores))])


def baselines_from_counts(
    counts: np.ndarray, special_ids: np.ndarray, bucket_size: int, n_cells: int, prior_strength: float = 10.0
) -> FrequencyBaselines:
    """Smoothed baselines (module docstring) from ``(n_buckets, V)`` counts."""
    counts = np.asarray(counts, dtype=np.float64)
    unigram_counts = counts.sum(axis=0)
    n_tokens = float(unigram_counts.sum())
    unigram = _unigram(counts, special_ids)
    per_bucket = counts.sum(axis=1, keepdims=True)
    rank = (counts + prior_strength * unigram[None, :]) / (per_bucket + prior_strength)
    with np.errstate(divide="ignore"):
        unigram_log = np.log(unigram).astype(np.float32)
        rank_log = np.log(rank).astype(np.float32)
    bucket_entropy = [_entropy(row) for row in counts]
    weights = per_bucket[:, 0] / max(n_tokens, 1.0)
    conditional = float(np.nansum(weights * np.asarray(bucket_entropy)))
    return FrequencyBaselines(
        unigram_log_prob=unigram_log,
        rank_log_prob=rank_log,
        bucket_size=int(bucket_size),
        n_cells=int(n_cells),
        n_tokens=int(n_tokens),
        train_entropy={"unigram": _entropy(unigram_counts), "rank_unigram": conditional},
        prior_strength=float(prior_strength),
    )


def frequency_baselines(
    dataset: datasets.Dataset | Sequence[Sequence[int]],
    vocab_size: int,
    special_ids: np.ndarray,
    *,
    max_len: int,
    bucket_size: int = 8,
    prior_strength: float | None = None,
    max_cells: int | None = 200_000,
    seed: int = 0,
    chunk_cells: int = 20_000,
) -> FrequencyBaselines:
    """Count the baselines from a corpus (a ``datasets.Dataset`` with ``input_ids``, or a list of arrays).

    At most ``max_cells`` cells (a seeded random subset) are read, in chunks of ``chunk_cells``,
    so a very large corpus costs a bounded, small pass. ``max_len`` cuts cells as the model does
    (positions from ``max_len`` on are not counted).
    ``prior_strength`` None: chosen on a tenth of the cells (:func:`choose_prior_strength`).
    """
    if bucket_size < 1:
        raise InputDataError(f"bucket_size must be >= 1, got {bucket_size}.")
    n_total = len(dataset)
    rows = np.arange(n_total)
    if max_cells is not None and n_total > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n_total, size=max_cells, replace=False))
    n_buckets = max(1, -(-max_len // bucket_size))
    if rows.size == 0:
        raise InputDataError("no training cells to count frequency baselines from.")
    tune = np.random.default_rng(seed + 1).random(rows.size) < 0.1
    counts = {}
    for part_name, part_rows in (("fit", rows[~tune]), ("tune", rows[tune])):
        counts[part_name] = np.zeros((n_buckets, vocab_size), dtype=np.int64)
        for start in range(0, part_rows.size, chunk_cells):
            flat, lengths = _read_tokens(dataset, part_rows[start : start + chunk_cells])
            counts[part_name] += count_tokens(flat, lengths, vocab_size, special_ids, bucket_size, max_len, n_buckets)
    if prior_strength is None:
        prior_strength = choose_prior_strength(counts["fit"], counts["tune"], special_ids)
    return baselines_from_counts(counts["fit"] + counts["tune"], special_ids, bucket_size, int(rows.size), prior_strength)


def _read_tokens(dataset: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat tokens and lengths of ``rows`` (Arrow columns read without a per-cell Python loop)."""
    part = [dataset[int(i)] for i in rows] if isinstance(dataset, list | tuple) else dataset.select(rows)
    flat, offsets = token_columns(part, 0, len(part))
    return flat.astype(np.int64), np.diff(offsets)


def masked_gene_stats(
    masked_logits: torch.Tensor,
    labels: torch.Tensor,
    baselines: FrequencyBaselines,
) -> torch.Tensor:
    """Per-cell sums of :data:`STAT_NAMES` for one batch.

    Parameters
    ----------
    masked_logits
        ``(n, V)`` model scores at the masked positions, in row-major order of ``labels != -100``
        (as :meth:`MixGeneformerForPretraining.forward` returns them with ``output_masked_logits``).
    labels
        ``(B, L)`` original tokens at masked positions, ``-100`` elsewhere.
    baselines
        The frequency baselines of the training split.

    Returns
    -------
    torch.Tensor
        ``(B, len(STAT_NAMES))`` float32 sums per cell.
    """
    masked = labels != IGNORE_INDEX
    rows, positions = torch.nonzero(masked, as_tuple=True)
    target = labels[masked]
    if masked_logits.shape[0] != target.shape[0]:
        raise ValueError(f"{masked_logits.shape[0]} rows of masked logits for {target.shape[0]} masked positions.")
    device = masked_logits.device
    tables = baselines.tables(device)
    logits = masked_logits.float()
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)
    # top-k among gene tokens, as the baselines rank them: a special token is never the answer, and
    # one ranked high (<mask>, <pad>) must not take a place of the model's top 10 that the baselines keep.
    k = tables["unigram_top"].shape[0]  # TOP_K, or every gene token when fewer
    top = torch.topk(logits.masked_fill(~tables["genes"], float("-inf")), k, dim=-1).indices

    bucket = torch.clamp(positions // baselines.bucket_size, max=tables["rank"].shape[0] - 1)
    rank_top = tables["rank_top"][bucket]
    columns = [
        torch.ones_like(nll),
        nll,
        (top[:, 0] == target).float(),
        (top == target[:, None]).any(dim=1).float(),
        -tables["unigram"][target],
        (tables["unigram_top"][0] == target).float(),
        (tables["unigram_top"][None, :] == target[:, None]).any(dim=1).float(),
        -tables["rank"][bucket, target],
        (rank_top[:, 0] == target).float(),
        (rank_top == target[:, None]).any(dim=1).float(),
    ]
    values = torch.stack(columns, dim=1)
    out = torch.zeros((labels.shape[0], len(STAT_NAMES)), dtype=torch.float32, device=device)
    return out.index_add_(0, rows, values)


def summarize(stats: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Metrics (:data:`METRIC_NAMES`) from per-cell sums: totals over cells / masked positions."""
    array = stats.detach().cpu().numpy() if isinstance(stats, torch.Tensor) else np.asarray(stats)
    array = np.asarray(array, dtype=np.float64).reshape(-1, len(STAT_NAMES))
    totals = array.sum(axis=0)
    n = totals[0]
    if n <= 0:
        return {name: float("nan") for name in METRIC_NAMES}
    return {name: float(value / n) for name, value in zip(METRIC_NAMES, totals[1:], strict=True)}


def compute_eval_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` for the Hugging Face Trainer: ``prediction.predictions`` holds per-cell sums."""
    predictions = prediction.predictions
    if isinstance(predictions, tuple | list):
        predictions = predictions[0]
    return summarize(predictions)


def final_evaluation(rows: list[dict[str, float]], rank_bucket: int | None = None) -> dict[str, float] | None:
    """The last held-out evaluation of a run's ``metrics.csv`` rows (:func:`pretrain.read_metrics`), or None.

    ``rank_bucket``: the run's ``logging.rank_bucket`` (positions per bucket of the rank baseline), kept
    under that key for :func:`diagnostics_markdown`.
    """
    evaluated = [r for r in rows if "eval_mlm_loss" in r]
    if not evaluated:
        return None
    last = evaluated[-1]
    out = {"step": last.get("step", float("nan"))}
    if rank_bucket is not None:
        out["rank_bucket"] = int(rank_bucket)
    out.update({name: last[f"eval_{name}"] for name in METRIC_NAMES if f"eval_{name}" in last})
    return out


def diagnostics_markdown(final: dict[str, float] | None) -> str:
    """A markdown table: the model's held-out masked-gene loss / top-1 / top-10 beside both baselines."""
    if not final:
        return "(no held-out evaluation: pretraining ran with data.eval_fraction = 0)"
    final = {k: float("nan") if v is None else v for k, v in final.items()}  # JSON stores NaN as null
    size = final.get("rank_bucket", float("nan"))
    bucket = f"of {int(size)} positions" if np.isfinite(size) else "of positions"  # older records: size unknown
    lines = [
        f"Held-out cells at step {int(final['step'])}: every masked position replaced by `<mask>`; the baselines "
        f"are gene frequencies of the training split (overall, and per rank bucket {bucket}), scored on the "
        "same positions.",
        "",
        "| predictor | MLM loss (nats) | top-1 | top-10 |",
        "|---|---|---|---|",
    ]
    for label, prefix in (("model", ""), ("unigram", "unigram_"), ("unigram given rank", "rank_unigram_")):
        loss = final.get(f"{prefix}loss" if prefix else "mlm_loss", float("nan"))
        lines.append(
            f"| {label} | {loss:.3f} | {final.get(prefix + 'top1', float('nan')):.3f} | "
            f"{final.get(prefix + 'top10', float('nan')):.3f} |"
        )
    lines += ["", learning_verdict(final)[0]]
    return "\n".join(lines)


def learning_verdict(final: dict[str, float]) -> tuple[str, bool]:
    """One sentence on whether pretraining learned more than gene frequency at each rank, and whether it did.

    ``final`` is :func:`final_evaluation` of a run. Learned means a held-out masked-gene loss below
    the rank-position unigram baseline of the training cells; a loss at or above it means the model
    predicts no better than "genes frequent at this rank".
    """
    gap = final.get("rank_unigram_loss", float("nan")) - final.get("mlm_loss", float("nan"))
    side = f"{-gap:.2f} nats above" if gap < 0 else f"{gap:.2f} nats below"  # never "-0.02 nats below"
    sentence = f"The model's held-out MLM loss is {side} the rank-position baseline."
    learned = bool(gap > 0)
    if not learned:
        sentence += (" It has learned nothing beyond gene frequency at each rank yet: train longer (train.max_steps), "
                     "on more cells, or check the learning rate in metrics.csv's curves.")
    return sentence, learned


__all__ = [
    "METRIC_NAMES",
    "STAT_NAMES",
    "FrequencyBaselines",
    "baselines_from_counts",
    "choose_prior_strength",
    "compute_eval_metrics",
    "count_tokens",
    "diagnostics_markdown",
    "final_evaluation",
    "frequency_baselines",
    "learning_verdict",
    "masked_gene_stats",
    "summarize",
    "token_positions",
]
