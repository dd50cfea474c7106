"""Fine-tuning recipes compared by cross-validation on the TRAINING cells only (no test cell of any
seed in ``--exclude-test-seeds``, by default every seed of ``--seeds``, is read).

The demo's within-species scores come from 345 (human) / 278 (mouse) test cells in which a rare
class has 4-15 cells, and each fine-tuned model is chosen on a validation split of ~140 cells
(1-4 per rare class): one seed's macro-F1 moves by 5-10 points with a few cells. To choose a recipe
without reading test cells and with less noise, this script takes each split seed's training cells
(the split ``mixgf classify`` and the demo make: stratified 80/20, ``labels.seed``), cuts them into
``--folds`` stratified folds, fine-tunes every recipe on the other folds (each fit carving its own
validation split, as ``fit_classifier`` always does) and predicts the held-out fold. Each training
cell is predicted once, so a recipe's cross-validated macro-F1 is scored on every training cell
(about 4x the test cells). The frozen-embedding probe and count logistic regression run in the same
folds as references.

A recipe is chosen on the mean over seeds, and one seed's test cells are mostly other seeds'
training cells: cross-validating on each seed's whole training split let every seed's test cells
steer the choice that seed is then scored with. So each seed's folds are cut from the cells that
are training cells under every seed of ``--exclude-test-seeds`` (default: ``--seeds``; pass the
seeds a chosen recipe will be reported on, e.g. ``0 1 2 3 4 5 6 7 8 9`` for ``split_seeds.py``; the
option with no seed gives the former whole training splits).

Usage::

    python benchmarks/finetune_cv.py --bundle demo_output/pretrain/run/model --species human \\
        --out benchmarks/results/finetune_cv_human.txt
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.demo import DemoConfig, demo_data_dir  # noqa: E402
from mixgeneformer.embed import embed_corpus  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    write_benchmark_files,
)
from mixgeneformer.tokenize import TokenizeConfig  # noqa: E402

#: The options every recipe starts from: the demo's fine-tuning before this comparison (at most 5
#: epochs of batch 32, a 10% validation split selecting the epoch by macro-F1; library defaults else).
BASE = C.FinetuneConfig(epochs=5.0, batch_size=32, device="cpu")

#: The demo's fine-tuning as overrides of BASE.
DEMO = {"epochs": 10.0, "validation_fraction": 0.0, "attention_dropout": 0.0, "hidden_dropout": 0.0}

#: name -> FinetuneConfig overrides of BASE. The demo now uses "no validation, 10 ep, no encoder dropout".
RECIPES: dict[str, dict] = {
    "macro-F1 selection, 5 ep (former demo)": {},
    "loss selection, 5 ep": {"selection_metric": "loss"},
    "no validation, 5 ep": {"validation_fraction": 0.0},
    "macro-F1 selection, 10 ep": {"epochs": 10.0},
    "loss selection, 10 ep": {"epochs": 10.0, "selection_metric": "loss"},
    "no validation, 10 ep": {"epochs": 10.0, "validation_fraction": 0.0},
    "no validation, 8 ep, no attention dropout": {"epochs": 8.0, "validation_fraction": 0.0, "attention_dropout": 0.0},
    "no validation, 10 ep, no attention dropout": {"epochs": 10.0, "validation_fraction": 0.0, "attention_dropout": 0.0},
    "no validation, 10 ep, no encoder dropout": DEMO,
    "demo recipe, 5 ep": {**DEMO, "epochs": 5.0},
    "demo recipe, 15 ep": {**DEMO, "epochs": 15.0},
    "demo recipe, lr x2": {**DEMO, "learning_rate": 1.6e-3},
    "demo recipe, no class weights": {**DEMO, "class_weights": "none"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="pretrained model bundle (the demo's pretrain/run/model)")
    parser.add_argument("--data", type=Path, default=None, help="folder with baron_pancreas_<species>.h5ad (default: the demo's)")
    parser.add_argument("--species", default="human")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds (the demo's classify_seeds)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--exclude-test-seeds", type=int, nargs="*", default=None,
                        help="split seeds whose test cells no fold reads (default: --seeds; none given: every training cell)")
    parser.add_argument("--recipes", default="", help="recipe names separated by ; (default: all)")
    parser.add_argument("--max-len", type=int, default=DemoConfig().max_len, help="genes per cell (default: the demo's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's classify jobs use 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (+ .csv per seed and per class)")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.exclude_test_seeds is None:
        args.exclude_test_seeds = args.seeds
    return args


def outputs(out: Path | None) -> list[Path]:
    """The files a run writes: the report ``out``, its per-seed and its per-class CSV (none without ``--out``)."""
    return [] if out is None else [out, out.with_suffix(".csv"), out.with_name(out.stem + "_per_class.csv")]


def cross_validated(task: C.Task, folds: list[tuple[np.ndarray, np.ndarray]], fit_predict) -> np.ndarray:  # noqa: ANN001
    """Out-of-fold labels of the task's training cells: ``fit_predict(fit_task)`` on each fold's split."""
    predicted = np.empty(task.train_rows.size, dtype=object)
    for fit, held in folds:
        fold = C.Task(
            setting=task.setting,
            train_data=task.train_data, train_rows=task.train_rows[fit], train_labels=task.train_labels[fit],
            test_data=task.train_data, test_rows=task.train_rows[held], test_labels=task.train_labels[held],
        )
        predicted[held] = fit_predict(fold)
    return predicted


def seed_rows(seed: int, data: ad.AnnData, bundle: tuple, recipes: list[str], folds: int,
              max_len: int, excluded: np.ndarray) -> tuple[list[dict], str, pd.DataFrame]:
    """Cross-validated scores of the references and of every recipe on one split seed's training cells
    (less the ``excluded`` obs positions), with each one's per-class F1 (long table: recipe, seed, class, f1, support)."""
    model, vocab, medians = bundle
    demo = DemoConfig()
    labels = C.LabelConfig(key=demo.label_key, seed=seed)
    task, tokens, _ = C.tokenize_task(C.within_task(data, labels), vocab, medians, TokenizeConfig(max_len=max_len))
    n_split = task.train_rows.size
    task = C.without_training_rows(task, excluded)
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(task.train_rows, task.train_labels))
    truth = task.train_labels
    note = (f"seed {seed}: {truth.size} of its {n_split} training cells (the rest: test cells of the excluded seeds), "
            f"{len(task.classes)} classes, smallest {pd.Series(truth).value_counts().min()} cells; test cells unused")
    embedded = embed_corpus(model, tokens.select(task.train_rows), vocab, layer=demo.embed_layer, pooling=demo.pooling,
                            progress=False, device="cpu")
    position = pd.Series(np.arange(task.train_rows.size), index=task.train_rows)

    def probe(fold: C.Task) -> np.ndarray:
        fit, held = position[fold.train_rows].to_numpy(), position[fold.test_rows].to_numpy()
        return C.logreg_predict(embedded[fit], fold.train_labels, embedded[held]).labels

    def count_logreg(fold: C.Task) -> np.ndarray:
        return C.baseline_predict(data.X[fold.train_rows], fold.train_labels, data.X[fold.test_rows], "logreg_counts").labels

    rows, per_class = [], []

    def record(name: str, predicted: np.ndarray, seconds: float, **extra: float) -> None:
        rows.append({"recipe": name, "seed": seed, **C.classification_metrics(truth, predicted), "seconds": seconds, **extra})
        report = C.per_class_report(truth, predicted).reset_index()
        per_class.append(report.assign(recipe=name, seed=seed)[["recipe", "seed", "class", "f1", "support"]])

    for name, fit_predict in {"reference: frozen probe (logreg)": probe, "reference: count logreg": count_logreg}.items():
        t = time.perf_counter()
        predicted = cross_validated(task, splits, fit_predict)
        record(name, predicted, time.perf_counter() - t, kept_probe=np.nan, mean_best_epoch=np.nan)
    for name in recipes:
        config = C.ClassifyConfig(labels=labels, finetune=dataclasses.replace(BASE, **RECIPES[name]))
        kept, epochs = [], []

        def finetuned(fold: C.Task, config: C.ClassifyConfig = config, kept: list = kept, epochs: list = epochs) -> np.ndarray:
            fitted = C.fit_classifier(fold, model, vocab, medians, config, train_tokens=tokens)
            kept.append(fitted.summary["kept"] == "probe")
            epochs.append(fitted.summary.get("best_epoch", config.finetune.epochs))
            return fitted.predict(tokens.select(fold.test_rows), device="cpu").labels

        t = time.perf_counter()
        predicted = cross_validated(task, splits, finetuned)
        record(name, predicted, time.perf_counter() - t, kept_probe=float(np.mean(kept)), mean_best_epoch=float(np.mean(epochs)))
        print(f"seed {seed} {name}: macro-F1 {rows[-1]['macro_f1']:.4f} ({rows[-1]['seconds']:.0f}s)", flush=True)
    return rows, note, pd.concat(per_class, ignore_index=True)


def main() -> None:
    args = parse_args()
    check_benchmark_out(outputs(args.out), args.overwrite)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data = ad.read_h5ad((args.data or demo_data_dir()) / f"baron_pancreas_{args.species}.h5ad")
    bundle = load_bundle(args.bundle)
    chosen = [r.strip() for r in args.recipes.split(";") if r.strip()] or list(RECIPES)
    rows, notes, per_class = [], [], []
    started_all = time.perf_counter()
    excluded = C.tested_rows(data, C.LabelConfig(key=DemoConfig().label_key), args.exclude_test_seeds)
    notes.append(f"test cells of split seeds {args.exclude_test_seeds or 'none'} left out of every fold: {excluded.size} cells")
    for seed in args.seeds:
        seed_table, note, classes = seed_rows(seed, data, bundle, chosen, args.folds, args.max_len, excluded)
        rows += seed_table
        notes.append(note)
        per_class.append(classes)
    per_seed = pd.DataFrame(rows)
    order = list(dict.fromkeys(per_seed["recipe"]))
    summary = per_seed.groupby("recipe", sort=False).agg(
        macro_f1_mean=("macro_f1", "mean"), macro_f1_std=("macro_f1", "std"),
        accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        kept_probe=("kept_probe", "mean"), best_epoch=("mean_best_epoch", "mean"), seconds=("seconds", "mean"),
    ).loc[order].reset_index()
    wide = per_seed.pivot(index="recipe", columns="seed", values="macro_f1").loc[order].reset_index()
    wide.columns = [str(c) if c == "recipe" else f"seed {c}" for c in wide.columns]
    per_class = pd.concat(per_class, ignore_index=True)
    by_class = per_class.pivot_table(index="class", columns="recipe", values="f1", aggfunc="mean")[order]
    by_class.insert(0, "training cells", per_class.groupby("class")["support"].mean().round().astype(int))
    by_class = by_class.sort_values("training cells").reset_index()
    lines = [
        f"{args.folds}-fold cross-validated macro-F1 on the training cells of each split seed, {args.species}, "
        f"bundle {args.bundle}, {args.max_len} genes per cell; fine-tuning = BASE ({json.dumps({'epochs': BASE.epochs, 'batch_size': BASE.batch_size})}, "
        f"validation_fraction {BASE.validation_fraction}) + the recipe's overrides; {args.threads} torch thread(s); {time.perf_counter() - started_all:.0f}s in all.",
        *notes,
        "",
        C.markdown_table(summary, digits=3),
        "",
        "Per seed (macro-F1):",
        "",
        C.markdown_table(wide, digits=4),
        "",
        "Per class: out-of-fold F1, mean over seeds (rarest classes first):",
        "",
        C.markdown_table(by_class, digits=3),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        texts = [report + "\n", per_seed.to_csv(index=False), per_class.to_csv(index=False)]
        write_benchmark_files(dict(zip(outputs(args.out), texts, strict=True)), args.overwrite)


if __name__ == "__main__":
    main()
