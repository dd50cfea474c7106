"""How much cell-type information the model's input holds: a linear model on each cell's tokens.

The encoder reads a cell as its top ``max_len`` genes by normalised expression (rank-value
encoding), while the count baselines read every gene. This script fits the same L2 logistic
regression the package uses (:func:`mixgeneformer.classify.logreg_predict`) to a bag of each
cell's tokens (binary, and weighted ``1/log2(rank + 2)``) and to log-normalised counts
(``logreg_counts``), on the demo's within-species splits (split seeds as the demo's,
stratified 80/20, rare classes dropped). Where the bag of 128 tokens scores below the counts, a
model that reads 128 genes starts from less information than the count baseline; raising
``max_len`` shows how much of the gap the input length explains. Labels are used only to fit and
score the regressions; no model is trained.

A rare class has 1-3 test cells per split, so its test F1 is 0 or 1 by chance. ``--cv K`` scores
every split seed's TRAINING cells instead, out of fold (K stratified folds), and writes the per-class
F1 beside the macro-F1: which classes the top-N genes fail to identify.

Usage::

    python benchmarks/input_bound.py --out benchmarks/results/input_bound_demo.txt
    python benchmarks/input_bound.py --cv 5 --species mouse --out benchmarks/results/input_bound_cv_mouse.txt
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.demo.config import demo_data_dir  # noqa: E402
from mixgeneformer.diagnostics import token_positions  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    seed_table,
    write_benchmark_files,
    write_benchmark_text,
)
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

SPECIES = ("human", "mouse")


def token_bag(dataset, n_tokens: int, rank_weighted: bool) -> sp.csr_matrix:
    """``(cells, n_tokens)``: 1 (or ``1/log2(rank + 2)``) for each token of each cell."""
    ids = dataset["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    rows = np.repeat(np.arange(len(ids)), lengths)
    ranks = token_positions(lengths)
    values = 1.0 / np.log2(ranks + 2.0) if rank_weighted else np.ones(cols.size)
    return sp.csr_matrix((values, (rows, cols)), shape=(len(ids), n_tokens))


def out_of_fold(features: dict[str, sp.csr_matrix], labels: np.ndarray, folds: int, seed: int) -> dict[str, np.ndarray]:
    """Out-of-fold logistic-regression labels of every cell, per feature set (count features use the
    count baseline's normalisation, token bags the package's clipped regression)."""
    predicted = {name: np.empty(labels.size, dtype=object) for name in features}
    for fit, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels):
        for name, x in features.items():
            if name == "logreg_counts":
                predicted[name][held] = C.baseline_predict(x[fit], labels[fit], x[held], "logreg_counts").labels
            else:
                predicted[name][held] = C.logreg_predict(x[fit], labels[fit], x[held], clip=10.0).labels
    return predicted


def cv_rows(data: ad.AnnData, species: str, vocab, medians, args: argparse.Namespace) -> tuple[list[dict], list[pd.DataFrame]]:  # noqa: ANN001
    """Cross-validated macro-F1 (one row per seed) and per-class F1 on the training cells of each split."""
    rows, per_class = [], []
    for seed in args.seeds:
        task = C.within_task(data, C.LabelConfig(key=args.label, seed=seed))
        features = {}
        for max_len in [int(x) for x in args.max_lens.split(",")]:
            task_n, train, _ = C.tokenize_task(task, vocab, medians, TokenizeConfig(), max_len=max_len)
            if not np.array_equal(task_n.train_rows, task.train_rows):
                raise SystemExit(f"{max_len} genes per cell: the tokenizer dropped training cells; compare at equal cells")
            features[f"bag_binary_{max_len}"] = token_bag(train.select(task.train_rows), len(vocab.tokens), False)
        features["logreg_counts"] = sp.csr_matrix(data.X)[task.train_rows]
        labels = np.asarray(task.train_labels, dtype=object)
        predicted = out_of_fold(features, labels, args.cv, seed)
        rows.append({"config": species, "seed": seed, **{n: f1_score(labels, p, average="macro") for n, p in predicted.items()}})
        print(rows[-1], flush=True)
        for name, p in predicted.items():
            report = C.per_class_report(labels, p)
            per_class.append(report.reset_index().assign(species=species, features=name, seed=seed, training_cells=report["support"].to_numpy()))
    return rows, per_class


def seed_scores(adata: ad.AnnData, task: C.Task, vocab, medians, max_lens: list[int]) -> dict[str, float]:  # noqa: ANN001
    """Test macro-F1 of the token bags at each ``max_len`` and of ``logreg_counts``, all on the same cells:
    those the tokenizer kept (the counts baseline scored every cell of the split, so a cell the
    tokenizer dropped was tested by the counts and not by the bags)."""
    row, cells = {}, None
    for max_len in max_lens:
        task_n, train, test = C.tokenize_task(task, vocab, medians, TokenizeConfig(), max_len=max_len)
        if cells is None:
            cells = task_n
        elif not (np.array_equal(task_n.train_rows, cells.train_rows) and np.array_equal(task_n.test_rows, cells.test_rows)):
            raise SystemExit(f"{max_len} genes per cell: the tokenizer kept other cells than at {max_lens[0]}; compare at equal cells")
        for name, weighted in (("binary", False), ("rank", True)):
            fitted = C.logreg_predict(token_bag(train.select(task_n.train_rows), len(vocab.tokens), weighted),
                                      task_n.train_labels,
                                      token_bag(test.select(task_n.test_rows), len(vocab.tokens), weighted), clip=10.0)
            row[f"bag_{name}_{max_len}"] = f1_score(task_n.test_labels, fitted.labels, average="macro")
    cells = cells or task
    x = sp.csr_matrix(adata.X)
    fitted = C.baseline_predict(x[cells.train_rows], cells.train_labels, x[cells.test_rows], "logreg_counts")
    row["logreg_counts"] = f1_score(cells.test_labels, fitted.labels, average="macro")
    return row


def class_table(per_class: list[pd.DataFrame]) -> pd.DataFrame:
    """Out-of-fold F1 per species and class (rows, rarest first) and feature set (columns), mean over seeds."""
    frame = pd.concat(per_class, ignore_index=True)
    order = list(dict.fromkeys(frame["features"]))
    table = frame.pivot_table(index=["species", "class"], columns="features", values="f1", aggfunc="mean")[order]
    table.insert(0, "cells", frame.groupby(["species", "class"])["training_cells"].mean().round().astype(int))
    return table.reset_index().sort_values(["species", "cells"], kind="stable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with baron_pancreas_{human,mouse}.h5ad (default: the demo's)")
    parser.add_argument("--label", default="cell_type1")
    parser.add_argument("--max-lens", default="128,256,512", help="genes per cell to compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds (the demo's)")
    parser.add_argument("--species", nargs="+", default=list(SPECIES))
    parser.add_argument("--cv", type=int, default=0, help="K > 1: K-fold scores on the training cells, per class")
    parser.add_argument("--out", default=None)
    add_overwrite_argument(parser)
    args = parser.parse_args()
    check_benchmark_out([args.out], args.overwrite)
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    source = args.data or demo_data_dir()
    data = {s: ad.read_h5ad(source / f"baron_pancreas_{s}.h5ad") for s in SPECIES}
    medians = compute_medians([data[s] for s in SPECIES])
    vocab = build_vocabulary(mode="ortholog", gene_set="protein_coding", medians=medians)  # the demo's vocabulary
    if args.cv > 1:
        rows, per_class = [], []
        for species in args.species:
            species_rows, species_classes = cv_rows(data[species], species, vocab, medians, args)
            rows += species_rows
            per_class += species_classes
        table, _ = seed_table(pd.DataFrame(rows))
        header = (
            f"{args.cv}-fold out-of-fold macro-F1 on the TRAINING cells of split seeds {args.seeds} (no test cell is fitted or scored; the gene medians and vocabulary, as the demo's, come from all cells, labels unused): "
            f"logistic regression on each cell's top-N tokens (bag_binary_N) vs log-normalised counts, within "
            f"{', '.join(args.species)}, demo data, ortholog vocabulary; {time.perf_counter() - started:.0f}s."
        )
        text = write_benchmark_text(header, table, pd.DataFrame(rows), None)
        text += "\n\nPer class: out-of-fold F1, mean over seeds (cells: training cells per seed; rarest first):\n\n"
        text += C.markdown_table(class_table(per_class), digits=3) + "\n"
        print(text[text.index("Per class:"):])
        if args.out:
            write_benchmark_files({args.out: text}, args.overwrite)
        return
    rows = []
    for species in args.species:
        for seed in args.seeds:
            task = C.within_task(data[species], C.LabelConfig(key=args.label, seed=seed))
            row = {"config": species, "seed": seed,
                   **seed_scores(data[species], task, vocab, medians, [int(x) for x in args.max_lens.split(",")])}
            print(row, flush=True)
            rows.append(row)
    per_seed = pd.DataFrame(rows)
    table, _ = seed_table(per_seed)
    header = (
        f"Macro-F1 of logistic regression on each cell's top-N tokens (bag_binary_N, bag_rank_N) vs log-normalised counts "
        f"(logreg_counts), within species, demo data ({', '.join(f'{s} {data[s].n_obs}' for s in SPECIES)} cells), "
        f"ortholog vocabulary, split seeds {args.seeds}; {time.perf_counter() - started:.0f}s."
    )
    write_benchmark_text(header, table, per_seed, args.out, args.overwrite)


if __name__ == "__main__":
    main()
