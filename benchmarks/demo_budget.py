"""The demo's budget by measurement: validation macro-F1 of fine-tuned models per pretraining setting.

Each setting is a pretraining budget of the same code the demo runs (tiny preset, MLM + SimCSE,
ortholog vocabulary, mean pooling), pretrained by ``benchmarks/classify.py --pretrain-only`` on
the TRAINING cells of the seed's split (``--work-dir W/<setting>`` holds ``seed<s>/run_both``).
Here every model is fine-tuned with the package's recipe on within-human and within-mouse training
cells; the score is the best validation macro-F1 (validation cells carved from the training
cells, as :func:`mixgeneformer.classify.fit_classifier` does). Test cells are never scored here,
and the training cells that another seed of ``--exclude-test-seeds`` (the demo's classify seeds)
tests on are left out, so no seed's test cells steer a budget it is then scored with.
The frozen-embedding logistic-regression probe on the same fit / validation cells is reported
beside it.

``--bundle`` instead scores one model (e.g. the demo's own, on the demo data with ``--demo-data``)
under several fine-tuning budgets (``--variants``): the demo fine-tunes 4 settings x 3 seeds, so
its fine-tuning budget weighs as much as its pretraining. CPU seconds of each fine-tuning (this
process, one thread) are recorded.

Cost: pretraining FLOPs (:func:`mixgeneformer.trainer.training_flops`, MLM + 2 SimCSE views)
and fine-tuning tokens per epoch, both relative to the first setting (the demo's former
default: 1,600 steps x 16 cells x 128 genes). The validation curve shows what fewer epochs give.

Usage::

    python benchmarks/demo_budget.py --work-dir W --settings "A:128:1600:16,B:256:800:16" \\
        --out benchmarks/results/demo_budget_sweep
    python benchmarks/demo_budget.py --bundle demo_output/pretrain/run/model --demo-data --max-len 128 \\
        --variants all --out benchmarks/results/demo_budget_finetune
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
import pandas as pd  # noqa: E402

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
from mixgeneformer.trainer import count_flop_parameters, training_flops  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPECIES = ("human", "mouse")
#: fine-tuning variants: name -> FinetuneConfig overrides (the library defaults otherwise)
VARIANTS = {
    "default (10 epochs)": {},
    "frozen embeddings": {"freeze_embeddings": True},
    "5 epochs": {"epochs": 5.0},
    "8 epochs": {"epochs": 8.0},
    "10 epochs, batch 32": {"batch_size": 32},
    "8 epochs, batch 32": {"epochs": 8.0, "batch_size": 32},
    "8 epochs, batch 32, random head": {"epochs": 8.0, "batch_size": 32, "head_init": "random"},
    "5 epochs, batch 32": {"epochs": 5.0, "batch_size": 32},
    "5 epochs, random head": {"epochs": 5.0, "head_init": "random"},
    "5 epochs, batch 32, head at 1x": {"epochs": 5.0, "batch_size": 32, "head_lr_multiplier": 1.0},
    "5 epochs, batch 32, lr 4e-4": {"epochs": 5.0, "batch_size": 32, "learning_rate": 4e-4},
    "3 epochs": {"epochs": 3.0},
    "5 epochs, frozen embeddings": {"epochs": 5.0, "freeze_embeddings": True},
    "3 epochs, frozen embeddings": {"epochs": 3.0, "freeze_embeddings": True},
    "3 epochs, frozen embeddings, batch 32": {"epochs": 3.0, "freeze_embeddings": True, "batch_size": 32},
    "5 epochs, frozen embeddings, batch 32": {"epochs": 5.0, "freeze_embeddings": True, "batch_size": 32},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="holds <setting>/seed<s>/run_both/model")
    parser.add_argument("--settings", default="", help="name:max_len:steps:batch, comma-separated")
    parser.add_argument("--bundle", type=Path, default=None, help="score this one model instead of --settings")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per cell with --bundle")
    parser.add_argument("--demo-data", action="store_true", help="the demo's shipped data (V1 tokens) instead of --data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude-test-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="split seeds whose test cells no fit or validation cell is (default: the demo's classify seeds; none given: every training cell)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--label", default="cell_type1")
    parser.add_argument("--variants", default="default (10 epochs);frozen embeddings",
                        help="fine-tuning variants separated by ;, or all")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.csv, <out>.txt, <out>.json")
    add_overwrite_argument(parser)
    return parser.parse_args()


def outputs(out: Path | None) -> list[Path]:
    """The files a run writes: ``<out>.csv``, ``.txt`` and ``.json`` (none without ``--out``)."""
    return [] if out is None else [out.with_suffix(suffix) for suffix in (".csv", ".txt", ".json")]


def pretraining_cost(model, max_len: int, steps: int, batch: int) -> float:
    config = model.config
    per_step = training_flops(
        count_flop_parameters(model), config.num_hidden_layers, config.hidden_size, batch, max_len, n_views=2,
        vocab_size=config.vocab_size, n_predicted=int(round(0.15 * batch * max_len)),
    )
    return per_step * steps


def main() -> None:
    args = parse_args()
    check_benchmark_out(outputs(args.out), args.overwrite)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    labels = C.LabelConfig(key=args.label, seed=args.seed)
    folder = demo_data_dir() if args.demo_data else args.data
    data = {s: ad.read_h5ad(folder / f"baron_pancreas_{s}.h5ad") for s in SPECIES}
    excluded = {s: C.tested_rows(data[s], labels, args.exclude_test_seeds) for s in SPECIES}
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(";") if v.strip()]
    if args.bundle is not None:
        settings = [("bundle", args.bundle, args.max_len, 0, 0)]
    else:
        settings = []
        for spec in args.settings.split(","):
            name, max_len, steps, batch = spec.split(":")
            bundle = args.work_dir / name / f"seed{args.seed}" / "run_both" / "model"
            settings.append((name, bundle, int(max_len), int(steps), int(batch)))
    rows, curves = [], {}
    reference_cost = reference_tokens = None
    for name, bundle, max_len, steps, batch in settings:
        model, vocab, medians = load_bundle(bundle)
        cost = pretraining_cost(model, max_len, steps, batch) if steps else 1.0
        reference_cost = reference_cost or cost
        reference_tokens = reference_tokens or max_len
        tok = TokenizeConfig(max_len=max_len, style="v1" if args.demo_data else "v2")
        for species in SPECIES:
            task = C.without_training_rows(C.within_task(data[species], labels), excluded[species])
            task, tokens, _ = C.tokenize_task(task, vocab, medians, tok)
            ids = pd.Index(task.classes).get_indexer(task.train_labels)
            fit, val = C.validation_split(ids, C.FinetuneConfig().validation_fraction, args.seed)
            cells = embed_corpus(model, tokens.select(task.train_rows), vocab, layer=-1, pooling="mean", progress=False, device="cpu")
            probe = C.logreg_predict(cells[fit], task.train_labels[fit], cells[val])
            probe_f1 = C.classification_metrics(task.train_labels[val], probe.labels)["macro_f1"]
            for variant in variants:
                finetune = dataclasses.replace(C.FinetuneConfig(device="cpu"), **VARIANTS[variant])
                started = time.process_time()
                fitted = C.fit_classifier(task, model, vocab, medians, C.ClassifyConfig(labels=labels, finetune=finetune),
                                          train_tokens=tokens)
                seconds = time.process_time() - started
                curve = [e["macro_f1"] for e in fitted.summary["validation_curve"]]
                curves[f"{name} {species} {variant}"] = curve
                rows.append({
                    "setting": name, "max_len": max_len, "steps": steps, "batch": batch,
                    "pretrain_cost": round(cost / reference_cost, 2),
                    "finetune_tokens_per_epoch": round(max_len / reference_tokens, 2),
                    "species": species, "finetune": variant, "probe_val_f1": round(probe_f1, 3),
                    "val_f1_epoch3": round(max(curve[:3]), 3), "val_f1_epoch5": round(max(curve[:5]), 3),
                    "val_f1_best": round(max(curve), 3), "best_epoch": fitted.summary["best_epoch"],
                    # the model fit_classifier returns: its probe start where no epoch beat it on validation
                    "kept": fitted.summary["kept"],
                    "val_f1_kept": round(max(curve) if fitted.summary["kept"] == "trained"
                                         else fitted.summary["probe_validation_macro_f1"], 3),
                    "epochs_run": round(fitted.summary["steps_run"] / fitted.summary["steps_per_epoch"], 1),
                    "finetune_cpu_seconds": round(seconds, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    summary = (
        table.groupby(["setting", "finetune"], sort=False)[
            ["probe_val_f1", "val_f1_epoch3", "val_f1_epoch5", "val_f1_best", "val_f1_kept", "epochs_run", "finetune_cpu_seconds"]
        ].mean().round(3).reset_index()
    )
    text = "\n".join([
        f"Validation macro-F1 (seed {args.seed}; within-human and within-mouse, validation cells carved from the "
        f"training cells less those split seeds {args.exclude_test_seeds or 'none'} test on; test cells unused). Costs relative to the first setting. CPU seconds of this process "
        "(one thread, on a shared machine): compare within this table only.",
        "",
        C.markdown_table(table, digits=3),
        "",
        "Mean over the two species:",
        "",
        C.markdown_table(summary, digits=3),
    ])
    print("\n" + text)
    if args.out is not None:
        texts = [table.to_csv(index=False), text + "\n", json.dumps(curves, indent=1)]
        write_benchmark_files(dict(zip(outputs(args.out), texts, strict=True)), args.overwrite)


if __name__ == "__main__":
    main()
