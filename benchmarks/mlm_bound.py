"""How far below the rank-position baseline can a masked-gene predictor get on the demo corpus?

The demo's pretraining is judged by its held-out MLM loss against "unigram given rank": the
frequency of each gene at each rank bucket of the training cells (``mixgeneformer.diagnostics``).
This script asks what the *data* allow, without training a network, by scoring predictors on the
same kind of held-out masked positions:

* ``rank_unigram``: the package's baseline (counted from the training split, prior strength
  chosen the package's way).
* ``rank_unigram_unseen``: the same, with the cell's visible genes excluded (a gene occurs at
  most once per cell, so the visible genes cannot be the masked one) and renormalised.
* ``rank_interval``: reads the encoding rather than the biology. A cell's genes are sorted by
  ``count / total / median``; where neighbouring genes share a count (most of a cell's tail, whose
  genes are seen once or twice), they are sorted by the gene's corpus median, so the masked gene's
  median usually lies between the medians of the nearest visible genes before and after it. The
  genes of the cell's species in that closed interval get ``lam_i`` of the mass of ``rank_unigram_unseen``
  (renormalised within the interval), the rest keeps ``1 - lam_i``. A network can learn this only
  by learning every gene's median from the order of genes in cells.
* ``neighbours``: a nonparametric predictor that reads the cell. The ``k`` training cells whose
  visible genes are most alike (cosine of rank-weighted token bags) vote for the genes they hold
  near the masked position (kernel ``exp(-|position - r| / s)``); the vote is mixed with the rank
  baseline, ``p = lam * p_neighbours + (1 - lam) * p_rank``, and the visible genes are excluded.
  ``neighbours+interval`` applies the interval step to the ``neighbours`` prediction.
  ``k``, ``s``, ``lam`` and ``lam_i`` are chosen on training cells scored against the other training cells
  (leave-one-out), never on the held-out cells.

The held-out cells are the pretraining runs' (``eval_fraction`` 0.05; split seeds as ``--seeds``, 0 1 2 by default),
15% of each cell's gene positions are masked (seeded), and the predictors see the unmasked genes
at their positions. A predictor that reaches ``X`` nats below the rank baseline shows that at least
that much is learnable from this corpus; it is a lower estimate of the attainable gap, not a bound.

Usage::

    python benchmarks/mlm_bound.py --out benchmarks/results/mlm_bound_demo.txt
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from sklearn.preprocessing import normalize  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.corpus import load_corpus  # noqa: E402
from mixgeneformer.demo.config import demo_data_dir  # noqa: E402
from mixgeneformer.diagnostics import frequency_baselines, token_positions  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    write_benchmark_files,
)
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.pretrain import split_train_eval  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

SPECIES = ("human", "mouse")
MASK_FRACTION = 0.15


def cells_of(dataset) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.int64) for x in dataset["input_ids"]]


def bag(cells: list[np.ndarray], keep: list[np.ndarray] | None, vocab_size: int) -> sp.csr_matrix:
    """Rows: L2-normalised token bags, weight ``1 / log2(position + 2)``; ``keep`` masks positions out."""
    lengths = np.fromiter((ids.size for ids in cells), dtype=np.int64, count=len(cells))
    flat = np.concatenate(cells)
    rows = np.repeat(np.arange(len(cells)), lengths)
    sel = np.ones(flat.size, bool) if keep is None else np.concatenate(keep)
    weights = 1.0 / np.log2(token_positions(lengths)[sel] + 2.0)
    return normalize(sp.csr_matrix((weights, (rows[sel], flat[sel])), shape=(len(cells), vocab_size)))


def masks(cells: list[np.ndarray], special: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Per cell, True where a gene position is masked (15%, at least one)."""
    out = []
    for ids in cells:
        gene = np.flatnonzero(~special[ids])
        n = max(1, int(round(MASK_FRACTION * gene.size)))
        m = np.zeros(ids.size, bool)
        m[rng.choice(gene, size=n, replace=False)] = True
        out.append(m)
    return out


def neighbour_votes(query_mask, pool, neighbours, scale: float, vocab_size: int) -> np.ndarray:
    """``(n_masked, V)``: each masked position's kernel-weighted vote of the neighbours' genes (rows sum to 1)."""
    positions = np.flatnonzero(query_mask)
    ids = [pool[n] for n in neighbours]
    flat = np.concatenate(ids)
    at = np.concatenate([np.arange(x.size) for x in ids])
    owner = np.repeat(np.arange(len(ids)), [x.size for x in ids])
    weight = np.exp(-np.abs(at[None, :] - positions[:, None]) / scale)  # (n_masked, tokens of all neighbours)
    per_neighbour = np.zeros((positions.size, len(ids)))
    np.add.at(per_neighbour.T, owner, weight.T)
    weight /= per_neighbour[:, owner] * len(ids)  # each neighbour's vote sums to 1 / k
    onehot = sp.csr_matrix((np.ones(flat.size), (np.arange(flat.size), flat)), shape=(flat.size, vocab_size))
    return np.asarray((sp.csr_matrix(weight) @ onehot).todense())


def interval_mask(ids: np.ndarray, mask: np.ndarray, log_median: np.ndarray, special: np.ndarray) -> np.ndarray:
    """``(n_masked, V)``: the genes whose median lies between those of the nearest visible genes around each masked position.

    Where the median falls from the gene before to the gene after (a change of count between
    them), the masked gene lies outside that open interval instead. ``log_median`` is NaN for the
    genes of the other species, which are never inside.
    """
    positions = np.flatnonzero(mask)
    visible = np.flatnonzero(~mask & ~special[ids])
    after = np.searchsorted(visible, positions)
    lo = np.full(positions.size, -np.inf)
    hi = np.full(positions.size, np.inf)
    lo[after > 0] = log_median[ids[visible[after[after > 0] - 1]]]
    hi[after < visible.size] = log_median[ids[visible[after[after < visible.size]]]]
    above, below = log_median[None, :] >= lo[:, None], log_median[None, :] <= hi[:, None]
    return np.where((lo <= hi)[:, None], above & below, above | below)


def with_interval(p: np.ndarray, inside: np.ndarray, lam_i: float) -> np.ndarray:
    """``lam_i`` of each row's mass moved into the interval, in proportion to ``p`` there (rows of ``p`` sum to 1)."""
    restricted = p * inside
    total = restricted.sum(axis=1, keepdims=True)
    restricted = np.where(total > 0, restricted / np.maximum(total, 1e-300), p)
    return lam_i * restricted + (1 - lam_i) * p


def score(cells, cell_masks, log_medians, similarity, pool, baselines, special, settings, interval_lams, max_k: int) -> pd.DataFrame:
    """Mean NLL / top-1 / top-10 of every predictor over the masked positions of ``cells``.

    ``settings``: the neighbours' ``(k, s, lam)`` to score; ``interval_lams``: predictor name
    (``rank_interval`` / ``neighbours+interval``) -> the ``lam_i`` values to score it with;
    ``log_medians``: per cell, the log median of every token for the cell's species.
    """
    vocab_size = baselines.rank_log_prob.shape[1]
    rank_p = np.exp(baselines.rank_log_prob.astype(np.float64))
    order = np.argsort(-similarity, axis=1)[:, :max_k]
    totals: dict[tuple, np.ndarray] = {}
    for i, (ids, mask) in enumerate(zip(cells, cell_masks, strict=True)):
        positions = np.flatnonzero(mask)
        target = ids[positions]
        buckets = np.minimum(positions // baselines.bucket_size, rank_p.shape[0] - 1)
        base = rank_p[buckets]
        seen = np.zeros(vocab_size, bool)
        seen[ids[~mask]] = True
        seen |= special
        unseen = np.where(seen[None, :], 0.0, base)
        unseen /= unseen.sum(axis=1, keepdims=True)
        inside = interval_mask(ids, mask, log_medians[i], special)
        preds = {("rank_unigram", None, None, None, None): base, ("rank_unigram_unseen", None, None, None, None): unseen}
        for lam_i in interval_lams.get("rank_interval", ()):
            preds[("rank_interval", None, None, None, lam_i)] = with_interval(unseen, inside, lam_i)
        for k, s in {(k, s) for k, s, _ in settings}:
            votes = np.where(seen[None, :], 0.0, neighbour_votes(mask, pool, order[i, :k], s, vocab_size))
            for lam in [lam for kk, ss, lam in settings if (kk, ss) == (k, s)]:
                mixed = lam * votes + (1 - lam) * unseen
                mixed /= mixed.sum(axis=1, keepdims=True)
                preds[("neighbours", k, s, lam, None)] = mixed
                for lam_i in interval_lams.get("neighbours+interval", ()):
                    preds[("neighbours+interval", k, s, lam, lam_i)] = with_interval(mixed, inside, lam_i)
        for key, p in preds.items():
            p = p / p.sum(axis=1, keepdims=True)
            p_target = p[np.arange(target.size), target]
            rank_of_target = (p > p_target[:, None]).sum(axis=1)
            stats = np.array([target.size, -np.log(np.maximum(p_target, 1e-300)).sum(),
                              (rank_of_target == 0).sum(), (rank_of_target < 10).sum()])
            totals[key] = totals.get(key, 0) + stats
    rows = [{"predictor": name, "k": k, "scale": s, "lam": lam, "lam_i": lam_i, "masked": int(t[0]), "nll": t[1] / t[0],
             "top1": t[2] / t[0], "top10": t[3] / t[0]} for (name, k, s, lam, lam_i), t in totals.items()]
    return pd.DataFrame(rows)


def token_log_medians(vocab, medians) -> dict[str, np.ndarray]:
    """Species -> log corpus median of every token's gene of that species (NaN where the token has none)."""
    out = {species: np.full(len(vocab.tokens), np.nan) for species in SPECIES}
    for gene, token in vocab.gene_to_id.items():
        if gene in medians:
            out["mouse" if gene.startswith("ENSMUSG") else "human"][token] = np.log(medians.values[gene])
    return out


def best(table: pd.DataFrame, predictor: str) -> pd.Series:
    return table[table["predictor"] == predictor].sort_values("nll").iloc[0]


def bound_for_seed(corpus, vocab, medians, max_len: int, seed: int, tune_cells: int) -> tuple[pd.DataFrame, dict]:
    """Score the predictors on the held-out cells of pretraining seed ``seed``; (table, chosen settings)."""
    train_set, eval_set = split_train_eval(corpus, 0.05, seed)
    train, held = cells_of(train_set), cells_of(eval_set)
    by_species = token_log_medians(vocab, medians)
    train_medians = [by_species[s] for s in train_set["species"]]
    held_medians = [by_species[s] for s in eval_set["species"]]
    vocab_size = len(vocab.tokens)
    special = np.zeros(vocab_size, bool)
    special[vocab.special_ids] = True
    baselines = frequency_baselines(train, vocab_size, vocab.special_ids, max_len=max_len, seed=seed)
    rng = np.random.default_rng(seed)
    train_bag = bag(train, None, vocab_size)
    grid = list(itertools.product((20, 50, 150, 400), (8.0, 32.0, 128.0, 1e6), (0.3, 0.5, 0.7, 0.9)))
    lam_grid = (0.3, 0.5, 0.7, 0.9)

    tune_rows = np.sort(rng.choice(len(train), size=min(tune_cells, len(train)), replace=False))
    tune = [train[i] for i in tune_rows]
    tune_masks = masks(tune, special, rng)
    tune_sim = (bag(tune, [~m for m in tune_masks], vocab_size) @ train_bag.T).toarray()
    tune_sim[np.arange(tune_rows.size), tune_rows] = -np.inf  # leave the cell itself out
    tune_medians = [train_medians[i] for i in tune_rows]
    tuned = score(tune, tune_masks, tune_medians, tune_sim, train, baselines, special, grid, {}, max_k=400)
    nb = best(tuned, "neighbours")
    chosen = (int(nb["k"]), float(nb["scale"]), float(nb["lam"]))
    tuned_i = score(tune, tune_masks, tune_medians, tune_sim, train, baselines, special, [chosen],
                    {"rank_interval": lam_grid, "neighbours+interval": lam_grid}, max_k=400)
    lam_i = {name: float(best(tuned_i, name)["lam_i"]) for name in ("rank_interval", "neighbours+interval")}

    held_masks = masks(held, special, rng)
    held_sim = (bag(held, [~m for m in held_masks], vocab_size) @ train_bag.T).toarray()
    result = score(held, held_masks, held_medians, held_sim, train, baselines, special, [chosen],
                   {name: (value,) for name, value in lam_i.items()}, max_k=400)
    result["below_rank_baseline"] = float(result.loc[result["predictor"] == "rank_unigram", "nll"].iloc[0]) - result["nll"]
    result.insert(0, "seed", seed)
    return result, {"seed": seed, "train": len(train), "held_out": len(held), "k": chosen[0], "s": chosen[1],
                    "lam": chosen[2], "tuning_nll": round(float(nb["nll"]), 3),
                    "lam_i (rank_interval)": lam_i["rank_interval"], "lam_i (neighbours+interval)": lam_i["neighbours+interval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with baron_pancreas_{human,mouse}.h5ad (default: the demo's)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds whose held-out splits are scored")
    parser.add_argument("--tune-cells", type=int, default=300, help="training cells scored leave-one-out to choose k, s, lam")
    parser.add_argument("--out", default=None)
    add_overwrite_argument(parser)
    args = parser.parse_args()
    check_benchmark_out([args.out], args.overwrite)
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    source = args.data or demo_data_dir()
    paths = [source / f"baron_pancreas_{s}.h5ad" for s in SPECIES]
    with tempfile.TemporaryDirectory(prefix="mixgf-mlm-bound-") as scratch:
        medians = compute_medians(paths)
        vocab = build_vocabulary(mode="ortholog", gene_set="protein_coding", medians=medians)  # the demo's vocabulary
        tokenize_files(paths, Path(scratch) / "corpus", vocab, medians, TokenizeConfig(max_len=args.max_len))
        corpus = load_corpus(Path(scratch) / "corpus")
        results = [bound_for_seed(corpus, vocab, medians, args.max_len, seed, args.tune_cells) for seed in args.seeds]
    per_seed = pd.concat([table for table, _ in results], ignore_index=True)
    summary = per_seed.groupby("predictor", sort=False)[["nll", "top1", "top10", "below_rank_baseline"]].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    header = (
        f"Masked-gene predictors without a network on the demo corpus (ortholog vocabulary, max_len {args.max_len}, "
        f"held-out cells of pretraining seeds {args.seeds} (5%), 15% of gene positions masked); the neighbours' k, s, lam "
        f"and the interval's lam_i chosen per seed on {args.tune_cells} training cells leave-one-out; {time.perf_counter() - started:.0f}s."
    )
    text = "\n\n".join([
        header,
        "Mean and sd over seeds:\n\n" + C.markdown_table(summary.reset_index(), digits=3),
        "Per seed:\n\n" + C.markdown_table(per_seed, digits=3),
        "Chosen settings:\n\n" + C.markdown_table(pd.DataFrame([chosen for _, chosen in results]), digits=3),
    ]) + "\n"
    print(text)
    if args.out:
        write_benchmark_files({args.out: text}, args.overwrite)


if __name__ == "__main__":
    main()
