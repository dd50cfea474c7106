"""Why fine-tuning underfits: train loss, validation macro-F1 per epoch and gradient norms per layer.

Takes one pretrained bundle (e.g. the demo's ``demo_output/pretrain/run/model``) and one labelled
species of the demo data, splits it as ``mixgf classify`` does (stratified 80/20, ``--seed``) and
carves a stratified validation set from the TRAINING cells. Every recipe below is fine-tuned on
the remaining training cells; the test split is never touched (no number here is a test score).

Per recipe it prints: steps run, the train loss over the first and the last logged steps, the
validation macro-F1 after every epoch (the best marked), and the mean gradient norm of each
parameter group (embeddings, each encoder block, head) over the first and the last epoch, so one
sees which parts learn and how fast. The frozen-embedding logistic-regression probe (standardised
features, L-BFGS to convergence) on the same fit / validation cells is the reference line.

Usage::

    python benchmarks/finetune_diagnostics.py --bundle demo_output/pretrain/run/model --species human \\
        --out benchmarks/results/finetune_diagnostics_human.txt
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
from transformers import TrainerCallback  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.demo import demo_data_dir  # noqa: E402
from mixgeneformer.embed import embed_corpus  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    write_benchmark_files,
)
from mixgeneformer.tokenize import TokenizeConfig  # noqa: E402

#: name -> FinetuneConfig overrides. "authors" is the recipe fine-tuning had before (the
#: authors' lr 5e-5, batch 12, warmup 500 capped at 10% of steps, one learning rate, no class
#: weights); "demo-100-steps" the demo's former 100 steps at 1e-3; "default" the current defaults.
OLD = dict(learning_rate=5e-5, head_lr_multiplier=1.0, batch_size=12, class_weights="none", early_stopping_patience=0,
           pooling="mean")
RECIPES: dict[str, dict] = {
    "authors (old default)": OLD,
    "demo-100-steps (old demo)": {**OLD, "learning_rate": 1e-3, "batch_size": 16, "max_steps": 100, "warmup_steps": 10},
    "lr 1e-3, one lr": {**OLD, "learning_rate": 1e-3},
    "lr 5e-5, head x10": {**OLD, "head_lr_multiplier": 10.0},
    "head only (frozen encoder), lr 2e-3": {**OLD, "train_encoder": False, "learning_rate": 2e-3},
    "default": {},
    "default, no class weights": {"class_weights": "none"},
    "default, head x1": {"head_lr_multiplier": 1.0},
    "default, lr 1e-3": {"learning_rate": 1e-3},
    "default, lr 1e-3, head x1": {"learning_rate": 1e-3, "head_lr_multiplier": 1.0},
    "default, frozen embeddings": {"freeze_embeddings": True},
    "default, no dropout": {"classifier_dropout": 0.0},
}


class GradientNorms(TrainerCallback):
    """Per optimizer step: the gradient norm of each parameter group (before clipping)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @staticmethod
    def group(name: str) -> str:
        if name.startswith("classifier."):
            return "head"
        if ".embeddings." in f".{name}":
            return "embeddings"
        if ".layer." in name:
            return "block" + name.split(".layer.")[1].split(".")[0]
        return "other"

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        squares: dict[str, float] = {}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                key = self.group(name)
                squares[key] = squares.get(key, 0.0) + float(parameter.grad.detach().float().pow(2).sum())
        self.rows.append({"step": state.global_step + 1, "epoch": state.epoch, **{k: v**0.5 for k, v in squares.items()}})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="pretrained model bundle")
    parser.add_argument("--data", type=Path, default=None, help="folder with baron_pancreas_<species>.h5ad (default: the demo's)")
    parser.add_argument("--species", default="human")
    parser.add_argument("--label", default="cell_type1")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per cell (the bundle's pretraining length)")
    parser.add_argument("--epochs", type=float, default=10.0)
    parser.add_argument("--recipes", default="", help="recipe names separated by ; (default: all)")
    parser.add_argument("--seed", type=int, default=42, help="split, validation and fine-tuning seed")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (+ .json with every curve)")
    add_overwrite_argument(parser)
    return parser.parse_args()


def outputs(out: Path | None) -> list[Path]:
    """The files a run writes: the report ``out`` and the curves beside it (none without ``--out``)."""
    return [] if out is None else [out, out.with_suffix(".json")]


def main() -> None:
    args = parse_args()
    check_benchmark_out(outputs(args.out), args.overwrite)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data = ad.read_h5ad((args.data or demo_data_dir()) / f"baron_pancreas_{args.species}.h5ad")
    model, vocab, medians = load_bundle(args.bundle)
    labels = C.LabelConfig(key=args.label, seed=args.seed)
    task, tokens, _ = C.tokenize_task(C.within_task(data, labels), vocab, medians, TokenizeConfig(max_len=args.max_len))
    # The validation cells every recipe is scored on: the same carve fit_classifier makes.
    ids = pd.Index(task.classes).get_indexer(task.train_labels)
    fit, val = C.validation_split(ids, C.FinetuneConfig().validation_fraction, args.seed)
    lines = [
        f"bundle {args.bundle}; {args.species}: {task.train_rows.size} training cells "
        f"({fit.size} fit + {val.size} validation), {len(task.classes)} classes; test cells unused",
        f"class counts (training): {dict(zip(*np.unique(task.train_labels, return_counts=True), strict=True))}",
    ]
    cells = embed_corpus(model, tokens.select(task.train_rows), vocab, layer=-1, pooling="mean", progress=False, device="cpu")
    probe = C.logreg_predict(cells[fit], task.train_labels[fit], cells[val])
    probe_scores = C.classification_metrics(task.train_labels[val], probe.labels)
    lines.append(f"frozen probe (logreg, last layer mean): validation macro-F1 {probe_scores['macro_f1']:.3f}, "
                 f"accuracy {probe_scores['accuracy']:.3f}")
    # What the head sees: pooled features with a large shared component and little spread between
    # cells (the probe standardises them; the head does not).
    mean, sd = cells.mean(axis=0), cells.std(axis=0)
    lines.append(f"pooled features: |mean| {np.linalg.norm(mean):.3f}, per-dimension sd between cells "
                 f"median {np.median(sd):.4f} (min {sd.min():.4f}), |mean| / median sd {np.linalg.norm(mean) / np.median(sd):.0f}")
    chosen = [r.strip() for r in args.recipes.split(";") if r.strip()] or list(RECIPES)
    records = []
    for name in chosen:
        overrides = {"epochs": args.epochs, "device": "cpu", "logging_steps": 1, **RECIPES[name]}
        config = C.ClassifyConfig(labels=labels, finetune=dataclasses.replace(C.FinetuneConfig(), **overrides))
        norms = GradientNorms()
        started = time.perf_counter()
        fitted = C.fit_classifier(task, model, vocab, medians, config, train_tokens=tokens, callbacks=[norms])
        seconds = time.perf_counter() - started
        summary = fitted.summary
        losses = [e["loss"] for e in fitted.log_history if "loss" in e and "eval_loss" not in e]
        k = max(1, min(10, len(losses) // 5))
        grads = pd.DataFrame(norms.rows)
        per_epoch = summary["steps_per_epoch"]
        first = grads[grads["step"] <= per_epoch].drop(columns=["step", "epoch"]).mean()
        last = grads[grads["step"] > grads["step"].max() - per_epoch].drop(columns=["step", "epoch"]).mean()
        curve = summary.get("validation_curve", [])
        record = {
            "recipe": name, "overrides": RECIPES[name], "seconds": round(seconds, 1), "steps": summary["steps_run"],
            "lr": summary["learning_rate"], "head_lr": summary["head_learning_rate"], "warmup": summary["warmup_steps"],
            "class_weights": summary["class_weights"] is not None,
            "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "val_f1_curve": [round(e["macro_f1"], 3) for e in curve],
            "val_f1_last": curve[-1]["macro_f1"] if curve else float("nan"),
            "val_f1_best": summary.get("best_validation_macro_f1", float("nan")),
            "best_epoch": summary.get("best_epoch"),
            "grad_first_epoch": first.round(4).to_dict(), "grad_last_epoch": last.round(4).to_dict(),
        }
        records.append(record)
        lines += [
            "",
            f"## {name}  ({json.dumps(RECIPES[name])})",
            f"steps {record['steps']} (of {summary['total_steps']}; {per_epoch}/epoch), lr {record['lr']:.2g}, "
            f"head lr {record['head_lr']:.2g}, warmup {record['warmup']}, class weights {record['class_weights']}, "
            f"{seconds:.0f}s",
            f"train loss {record['loss_first']:.3f} (first {k} steps) -> {record['loss_last']:.3f} (last {k})",
            f"validation macro-F1 per evaluation: {record['val_f1_curve']}; last {record['val_f1_last']:.3f}, "
            f"best {record['val_f1_best']:.3f} at epoch {record['best_epoch']}",
            "gradient norm, mean over the first epoch: " + ", ".join(f"{g} {v:.3g}" for g, v in first.items()),
            "gradient norm, mean over the last epoch:  " + ", ".join(f"{g} {v:.3g}" for g, v in last.items()),
        ]
        print("\n".join(lines[-6:]), flush=True)
    table = pd.DataFrame(records)[["recipe", "steps", "lr", "head_lr", "loss_first", "loss_last", "val_f1_last", "val_f1_best", "best_epoch"]]
    lines += ["", f"probe validation macro-F1: {probe_scores['macro_f1']:.3f}", "", C.markdown_table(table, digits=3)]
    report = "\n".join(lines)
    print("\n" + C.markdown_table(table, digits=3))
    if args.out is not None:
        texts = [report + "\n", json.dumps({"probe": probe_scores, "recipes": records}, indent=1, default=str)]
        write_benchmark_files(dict(zip(outputs(args.out), texts, strict=True)), args.overwrite)


if __name__ == "__main__":
    main()
