"""Cell-type classification within and across species: does mixed-species pretraining help?

The paper's claim (SPEC §1): one model pretrained on human AND mouse cells classifies cell types
at least as well as single-species models. This script measures it on the Baron pancreas data
(../shared/data, human 2,142 and mouse 1,886 cells, label ``cell_type1``):

1. Each species is split once, stratified 80/20 (seed 42), after dropping classes under 0.5% of
   cells (the authors' rule). Every method below sees the same splits; nothing is tuned on a test
   split.
2. Gene medians, the vocabulary (``--vocab-mode``) and the pretraining corpora are built from the
   TRAINING cells only (test cells are never pretrained on, not even without labels).
3. Four encoders of the same architecture (``--preset``): randomly initialised; pretrained on human
   only; on mouse only; on both. Each pretrained model gets the same budget: ``--steps`` ×
   ``--batch`` cells (MLM + SimCSE, the package defaults).
4. Settings: within-human, within-mouse (train split -> test split), mouse->human and human->mouse
   (the source's train split -> the target's test split, on the classes both share, matched by
   canonical name: see :mod:`mixgeneformer.classify`).
   With ``--seeds a b c`` (or ``a,b,c``) steps 1-3 are repeated per seed (the seed of the split AND of
   pretraining) and the table gives mean ± sd over seeds; per-seed rows go to ``--out``.
5. Methods: zero-shot kNN (k=5, cosine) and logistic regression on frozen embeddings (``--layer``,
   default the last, mean over genes, the same for every model; the SimCSE term is trained on the
   same mean, ``--pooling mean``, as in the demo); fine-tuning when ``--finetune-epochs`` > 0 (the
   package's recipe: validation split from the training cells, best epoch by validation macro-F1,
   class weights, learning rates by model width unless ``--finetune-lr``); count
   baselines (CellTypist-style logistic regression on log1p-normalised counts; kNN on 50 PCs),
   across species on one-to-one-ortholog genes.

Usage::

    python benchmarks/classify.py                               # CPU default budget, one seed
    python benchmarks/classify.py --seeds 0,1,2 --models both --finetune-epochs 10 --work-dir W \
        --out benchmarks/results/classify_cpu_ortholog_1600_3seeds.csv   # mean ± sd over 3 seeds
    python benchmarks/classify.py --steps 2000 --batch 32 --preset mix-geneformer --max-len 2048 \\
        --finetune-epochs 3 --device cuda                          # GPU run
    python benchmarks/classify.py --eval-fraction 0.05 ...      # also held-out MLM vs frequency baselines
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import pandas as pd  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.bundle import load_bundle, save_bundle  # noqa: E402
from mixgeneformer.diagnostics import diagnostics_markdown, final_evaluation  # noqa: E402
from mixgeneformer.embed import embed_corpus  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    write_benchmark_files,
)
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.metrics_csv import read_metrics  # noqa: E402
from mixgeneformer.pretrain import build_model, pretrain_config_from_dict, run_pretraining  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPECIES = ("human", "mouse")
HELD_OUT: list[dict] = []  # held-out evaluations of every pretraining run (record_held_out)


def _seed_list(text: str) -> list[int]:
    """One --seeds word: an integer, or comma-separated integers (the form the recorded commands use)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are integers, e.g. 0 1 2 or 0,1,2") from None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with baron_pancreas_{human,mouse}.h5ad")
    parser.add_argument("--label", default="cell_type1")
    parser.add_argument("--preset", default="tiny", help="model preset (tiny on CPU)")
    parser.add_argument("--overrides", default="", help="model overrides, e.g. num_hidden_layers=4,hidden_size=128")
    parser.add_argument("--steps", type=int, default=1600, help="pretraining steps per model (the budget)")
    parser.add_argument("--batch", type=int, default=16, help="pretraining cells per step (the budget)")
    parser.add_argument("--mlm-bias-init", choices=["zero", "unigram"], default="zero",
                        help="train.mlm_bias_init of the pretraining (the MLM output bias starts at zero or the log gene frequencies)")
    parser.add_argument("--lr", type=float, default=1e-3, help="pretraining learning rate")
    parser.add_argument("--eval-fraction", type=float, default=0.0,
                        help="> 0: hold out this fraction of each pretraining corpus and score the masked-gene loss "
                             "against the frequency baselines (data.eval_fraction); the table is printed and, with --out, "
                             "written beside it as *_held_out.csv")
    parser.add_argument("--eval-steps", type=int, default=None, help="held-out evaluation every N steps (default: --steps / 4)")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per cell (top-ranked genes)")
    parser.add_argument("--vocab-mode", choices=["separate", "ortholog"], default="ortholog",
                        help="ortholog: one token per 1:1 human-mouse ortholog pair; separate: the paper's vocabulary")
    parser.add_argument("--pooling", choices=["mean", "cls", "pooler"], default="mean", help="cell pooling of the SimCSE term")
    parser.add_argument("--layer", type=int, default=-1, help="hidden state embedded for zero-shot methods (-1 = last)")
    parser.add_argument("--finetune-epochs", type=float, default=0.0, help="> 0: also fine-tune each model")
    parser.add_argument("--finetune-lr", type=float, default=None, help="encoder fine-tuning learning rate (default: by width)")
    parser.add_argument("--finetune-set", default="", help="more FinetuneConfig options, e.g. freeze_embeddings=true,batch_size=32")
    parser.add_argument("--models", default="random,human,mouse,both", help="encoders to compare (random, human, mouse, both)")
    parser.add_argument("--pretrain-only", action="store_true", help="prepare and pretrain, then stop (run seeds in parallel)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the models already pretrained in --work-dir by an earlier run with the same options")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep corpora and models here (default: temporary)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this CSV")
    parser.add_argument("--seeds", type=_seed_list, nargs="+", default=[[42]],
                        help="seeds (split + pretraining), e.g. 0 1 2 or 0,1,2; mean ± sd over them")
    add_overwrite_argument(parser)
    return parser.parse_args()


def parse_overrides(text: str) -> dict:
    import yaml

    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def model_section(args) -> dict:
    overrides = {"max_position_embeddings": args.max_len, "pooling": args.pooling, **parse_overrides(args.overrides)}
    return {"preset": args.preset, "overrides": overrides}


def pretrain_model(name: str, corpora: list[Path], work: Path, vocab_path: Path, medians_path: Path, args) -> Path:
    done = work / f"run_{name}" / "model"
    if args.reuse and done.is_dir():
        print(f"reusing pretrained '{name}' from {done}")
        record_held_out(name, done.parent, args)
        return done
    config = pretrain_config_from_dict(
        {
            "output_dir": str(work / f"run_{name}"),
            "data": {"corpus": [str(c) for c in corpora], "vocab": str(vocab_path), "medians": str(medians_path),
                     "eval_fraction": args.eval_fraction},
            "model": model_section(args),
            "train": {
                "max_steps": args.steps, "per_device_batch_size": args.batch, "learning_rate": args.lr,
                "warmup_steps": max(1, args.steps // 10), "seed": args.seed, "mlm_bias_init": args.mlm_bias_init,
            },
            "checkpoint": {"save_steps": args.steps, "keep": 1},
            "logging": {"logging_steps": max(1, args.steps // 5), "tensorboard": False, "progress_bar": False,
                        "eval_steps": args.eval_steps or max(1, args.steps // 4)},
        }
    )
    started = time.perf_counter()
    result = run_pretraining(config, overwrite=True)
    print(f"pretrained '{name}': {result.global_step} steps, final loss {result.final_loss}, {time.perf_counter() - started:.0f}s")
    record_held_out(name, result.run_dir, args)
    return result.bundle_dir


def record_held_out(name: str, run_dir: Path, args) -> None:
    """Print the held-out evaluations of a pretraining run (model against both frequency baselines, from its
    metrics.csv) and keep them for the run's held-out table."""
    evaluated = [row for row in read_metrics(run_dir) if "eval_mlm_loss" in row]
    for row in evaluated:
        HELD_OUT.append({
            "seed": args.seed, "model": name, "step": int(row["step"]),
            **{key.removeprefix("eval_"): value for key, value in row.items() if key.startswith("eval_")},
            "below_rank_baseline": row.get("eval_rank_unigram_loss", float("nan")) - row["eval_mlm_loss"],
        })
    if evaluated:
        print(diagnostics_markdown(final_evaluation(evaluated)))


def random_model(work: Path, vocab, medians, vocab_path: Path, args) -> Path:
    import torch

    torch.manual_seed(args.seed)
    config = pretrain_config_from_dict(
        {
            "output_dir": str(work / "run_random"),
            "data": {"corpus": ["unused"], "vocab": str(vocab_path)},
            "model": model_section(args),
        }
    )
    if args.reuse and (work / "bundle_random").is_dir():
        return work / "bundle_random"
    return save_bundle(build_model(config, vocab), work / "bundle_random", vocab, medians, overwrite=True)


def run_seed(args, seed: int, work: Path) -> list[dict]:
    """Splits, corpora, models and every method for one seed; one row per (setting, method)."""
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    args.seed = seed
    labels = C.LabelConfig(key=args.label, seed=seed)
    data = {s: ad.read_h5ad(args.data / f"baron_pancreas_{s}.h5ad") for s in SPECIES}
    within = {s: C.within_task(data[s], labels, setting=f"within-{s}") for s in SPECIES}
    tasks = [within["human"], within["mouse"]]
    for src, tgt in (("mouse", "human"), ("human", "mouse")):
        tasks.append(
            C.transfer_task(
                data[src], data[tgt], labels, f"{src}->{tgt}",
                source_rows=within[src].train_rows, target_rows=within[tgt].test_rows,
            )
        )
    for task in tasks:
        print(f"[seed {seed}, {task.setting}] train {task.train_rows.size}, test {task.test_rows.size}; " + " | ".join(task.notes))

    # Medians, vocabulary and corpora from training cells only.
    train_files = {}
    for s in SPECIES:
        train_files[s] = work / f"train_{s}.h5ad"
        data[s][within[s].train_rows].copy().write_h5ad(train_files[s])
    medians = compute_medians([train_files[s] for s in SPECIES])
    vocab = build_vocabulary(mode=args.vocab_mode, gene_set="medians", medians=medians)
    vocab_path, medians_path = work / "vocab.json", work / "medians.tsv"
    vocab.save(vocab_path)
    medians.save(medians_path)
    tok_config = TokenizeConfig(max_len=args.max_len, style="v2")
    corpora = {
        s: tokenize_files([train_files[s]], work / f"corpus_{s}", vocab, medians, tok_config, overwrite=True)
        for s in SPECIES
    }
    print(f"vocabulary: {vocab}; prepared in {time.perf_counter() - started:.0f}s")

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bundles = {"random": random_model(work, vocab, medians, vocab_path, args)} if "random" in names else {}
    for name, sources in (("human", ["human"]), ("mouse", ["mouse"]), ("both", ["human", "mouse"])):
        if name in names:
            bundles[name] = pretrain_model(name, [corpora[s] for s in sources], work, vocab_path, medians_path, args)
    if args.pretrain_only:
        return []

    tokens = {s: C.tokenize_cells(data[s], vocab, medians, tok_config) for s in SPECIES}
    species_of = {"within-human": ("human", "human"), "within-mouse": ("mouse", "mouse"),
                  "mouse->human": ("mouse", "human"), "human->mouse": ("human", "mouse")}
    tasks = [C.restrict_to_tokenized(t, tokens[species_of[t.setting][0]], tokens[species_of[t.setting][1]]) for t in tasks]

    results: list[C.EvalResult] = []
    for task in tasks:
        src, tgt = species_of[task.setting]
        for result in C.baselines(task, species=(src, tgt)):
            result.method = f"baseline {result.method}"
            results.append(result)
    finetune = C.FinetuneConfig(
        epochs=max(args.finetune_epochs, 1.0), learning_rate=args.finetune_lr, device=args.device,
        **parse_overrides(args.finetune_set),
    )
    config = C.ClassifyConfig(labels=labels, finetune=finetune)
    for name, bundle in bundles.items():
        model, model_vocab, model_medians = load_bundle(bundle)
        t0 = time.perf_counter()
        # One embedding per cell and model (--layer, mean over genes), shared by all tasks.
        cells = {
            s: embed_corpus(model, tokens[s].dataset, model_vocab, layer=args.layer, pooling="mean", device=args.device, progress=False)
            for s in SPECIES
        }
        for task in tasks:
            src, tgt = species_of[task.setting]
            position = {s: pd.Index(tokens[s].rows) for s in SPECIES}
            train_x = cells[src][position[src].get_indexer(task.train_rows)]
            test_x = cells[tgt][position[tgt].get_indexer(task.test_rows)]
            for method in ("knn", "logreg"):
                prediction = C.zero_shot_predict(task, train_x, test_x, method)
                results.append(C.evaluate(task, prediction, f"{name} {method}"))
            if args.finetune_epochs > 0:
                result, fitted = C.finetune(task, model, model_vocab, model_medians, config, tokens=(tokens[src], tokens[tgt]),
                                            method=f"{name} finetune")
                summary = fitted.summary
                print(f"  {name} finetune {task.setting}: {summary['steps_run']} steps, best validation macro-F1 "
                      f"{summary.get('best_validation_macro_f1', float('nan')):.3f} at epoch {summary.get('best_epoch')}")
                results.append(result)
        print(f"seed {seed}: evaluated model '{name}' in {time.perf_counter() - t0:.0f}s")
    table = C.benchmark_table(results)
    table.insert(1, "seed", seed)
    return table.to_dict(orient="records")


def mean_sd_table(per_seed: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """mean ± sd over seeds per (setting, method), settings in ``order``."""
    summary = C.seed_summary(per_seed)
    table = summary[["setting", "method", "n_seeds"]].rename(columns={"n_seeds": "seeds"})
    for metric in C.METRIC_COLUMNS:
        # C.mean_sd_text: "m" alone for one seed (its sd is undefined: NaN), "n/a" without a mean
        table[metric] = [C.mean_sd_text(m, sd) for m, sd in zip(summary[metric], summary[f"{metric}_sd"], strict=True)]
    rank = {s: i for i, s in enumerate(order)}
    return table.sort_values("setting", key=lambda col: col.map(rank), kind="stable").reset_index(drop=True)


def main() -> None:
    args = parse_args()
    held_out_csv = args.out.with_name(f"{args.out.stem}_held_out.csv") if args.out is not None and args.eval_fraction > 0 else None
    check_benchmark_out([args.out, held_out_csv], args.overwrite)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    seeds = [seed for group in args.seeds for seed in group]
    with tempfile.TemporaryDirectory(prefix="mixgf-bench-classify-") as scratch:
        root = args.work_dir or Path(scratch)
        rows = []
        for seed in seeds:
            # One folder per seed (a single seed keeps the former flat layout for --reuse).
            rows += run_seed(args, seed, root if len(seeds) == 1 and args.work_dir is None else root / f"seed{seed}")
        held_out = pd.DataFrame(HELD_OUT)
        if not held_out.empty:
            print("\nHeld-out masked-gene loss of every pretraining run (nats; below_rank_baseline > 0: learned more than "
                  "gene frequency at each rank):")
            print(C.markdown_table(held_out))
        if args.pretrain_only:
            if held_out_csv is not None and not held_out.empty:
                write_benchmark_files({held_out_csv: held_out.to_csv(index=False)}, args.overwrite)
            return
        per_seed = pd.DataFrame(rows)
        order = ["within-human", "within-mouse", "mouse->human", "human->mouse"]
        print()
        print(
            f"Budget: {args.steps} steps x {args.batch} cells per pretrained model, preset {args.preset}, "
            f"max_len {args.max_len}, vocab {args.vocab_mode}, SimCSE pooling {args.pooling}, overrides {args.overrides or '-'}, "
            f"embedding layer {args.layer}, fine-tuning at most {args.finetune_epochs:g} epochs "
            f"(lr {args.finetune_lr or 'by width'}{', ' + args.finetune_set if args.finetune_set else ''}); "
            f"seeds {seeds} (split and pretraining); total {time.perf_counter() - started:.0f}s"
        )
        print(C.markdown_table(mean_sd_table(per_seed, order)))
        if args.out is not None:
            files = {args.out: per_seed.to_csv(index=False)}
            if held_out_csv is not None and not held_out.empty:
                files[held_out_csv] = held_out.to_csv(index=False)
            write_benchmark_files(files, args.overwrite)


if __name__ == "__main__":
    main()
