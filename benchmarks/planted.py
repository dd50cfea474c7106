"""Planted-truth benchmark: does the method recover what was planted, whatever the budget?

Two species are simulated over real human and mouse Ensembl IDs (:mod:`mixgeneformer.simulate`):
cell types defined by gene programs shared through one-to-one orthologs plus species-specific
genes, library-size and negative-binomial noise, a species-level shift in expression, and a few
planted marker genes per type. The real pipeline runs unchanged on it (medians over both species,
vocabulary, tokenization, pretraining with held-out diagnostics, embedding, classification,
perturbation), for three configurations of the cross-species machinery:

* ``separate``     the paper's vocabulary (every gene its own token), MLM + SimCSE
* ``ortholog``     one token per one-to-one ortholog pair, MLM + SimCSE
* ``ortholog+xs``  the same plus the cross-species InfoNCE term (weight ``--cross-weight``)

Measured per configuration and seed (means ± sd over ``--seeds``):

1. held-out masked-gene prediction vs the frequency baselines (unigram given rank position);
2. within-species cell-type accuracy: kNN (k=5, cosine) on frozen embeddings and fine-tuning
   (stratified 80/20 split, seed 42);
3. cross-species label transfer (train on all cells of one species, test on all of the other):
   kNN on embeddings vs kNN on 50 PCs of one-to-one-ortholog counts (macro-F1);
4. species mixing within cell types (:func:`mixgeneformer.integration.species_mixing`);
5. perturbation (type B is A's sibling: it shares most of A's program, not its markers): every
   gene of ``--perturb-cells`` human cells of type A deleted in turn, genes
   deleted in at least a quarter of those cells ranked by the mean shift of the cell embedding toward
   the mean type-B embedding; recall of type A's planted markers among the top 20 (beside the
   chance level, 20 / number of ranked genes).

Usage::

    python benchmarks/planted.py                         # 3 seeds, CPU (a few minutes per seed on 2 cores)
    python benchmarks/planted.py --seeds 0 --steps 100 --finetune-steps 20   # smoke run
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer import perturb as P  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.diagnostics import final_evaluation  # noqa: E402
from mixgeneformer.embed import embed_corpus  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    cross_species_scores,
    seed_table,
    write_benchmark_text,
)
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining  # noqa: E402
from mixgeneformer.simulate import PlantedConfig, simulate_planted  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

SPECIES = ("human", "mouse")
CONFIGS = {"separate": ("separate", False), "ortholog": ("ortholog", False), "ortholog+xs": ("ortholog", True)}
LABEL = "cell_type"
RESULTS = Path(__file__).resolve().parent / "results"
# metric -> (target, which configurations it applies to); ratios and scores as printed
TARGETS = {
    "top1_over_rank_baseline": (2.0, tuple(CONFIGS)),
    "knn_within_acc": (0.95, tuple(CONFIGS)),
    "finetune_within_acc": (0.95, tuple(CONFIGS)),
    "transfer_f1": (0.90, ("ortholog+xs",)),
    "marker_recall_at_20": (0.5, tuple(CONFIGS)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--types", type=int, default=6)
    parser.add_argument("--cells-per-type", type=int, default=250, help="per species")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--cross-weight", type=float, default=0.5)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--perturb-cells", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", default=str(RESULTS / "planted_cpu.txt"), help="table (markdown); '' to skip")
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def pretrain(work: Path, corpus: Path, vocab_path: Path, medians_path: Path, cross: bool, seed: int, args) -> tuple[Path, dict]:
    objective = {"pooling": "mean", "contrastive_weight": 1.0}
    if cross:
        objective["cross_species_weight"] = args.cross_weight
    config = pretrain_config_from_dict({
        "output_dir": str(work),
        "data": {"corpus": [str(corpus)], "vocab": str(vocab_path), "medians": str(medians_path), "eval_fraction": 0.1},
        "model": {"preset": "tiny", "overrides": {"max_position_embeddings": args.max_len}},
        "objective": objective,
        "train": {"max_steps": args.steps, "per_device_batch_size": args.batch, "learning_rate": args.lr,
                  "warmup_steps": max(1, args.steps // 20), "seed": seed},
        "checkpoint": {"save_steps": args.steps, "keep": 1},
        "logging": {"logging_steps": max(1, args.steps // 10), "eval_steps": args.steps, "tensorboard": False,
                    "progress_bar": False},
    })
    result = run_pretraining(config, overwrite=True)
    return result.bundle_dir, final_evaluation(read_metrics(result.run_dir)) or {}


def knn_accuracy(task: C.Task, emb: np.ndarray, rows: pd.Index) -> float:
    prediction = C.zero_shot_predict(task, emb[rows.get_indexer(task.train_rows)], emb[rows.get_indexer(task.test_rows)], "knn")
    return C.evaluate(task, prediction, "knn").metrics["accuracy"]


def marker_recall(adata, model, vocab, medians, tok_config, truth, start: str, goal: str, args, seed: int) -> tuple[float, float]:
    """Recall of ``start``'s planted markers among the 20 genes whose deletion moves cells most toward
    ``goal``, over genes deleted in at least a quarter of the perturbed cells (a gene seen in one or
    two cells has a noisy mean); also the chance level, 20 / number of such genes."""
    config = P.PerturbConfig(perturb="delete", state_column=LABEL, start=start, goal=goal,
                             cells_per_state=args.perturb_cells, layer=-1, pooling="mean", device=args.device, seed=seed)
    result, _ = P.perturb_anndata(adata, model, config, vocab=vocab, medians=medians, tokenize_config=tok_config,
                                  stats_mode="aggregate", progress=False)
    stats = P.perturbation_statistics(result.cells, vocab, mode="aggregate")
    n_cells = result.cells["cell"].nunique()
    recurrent = stats[stats["n_cells"] >= max(1, int(np.ceil(0.25 * n_cells)))]
    top = recurrent.sort_values("mean_goal_shift", ascending=False).head(20)
    markers = set(vocab.encode_genes(np.asarray(truth.markers[start]["human"], dtype=object)).tolist())
    return len(markers & set(top["gene_token"].astype(int))) / len(markers), min(1.0, 20 / max(len(recurrent), 1))


def run_seed(seed: int, args, work: Path) -> list[dict]:
    data = simulate_planted(PlantedConfig(n_types=args.types, cells_per_type=args.cells_per_type, seed=seed))
    paths = {}
    for s in SPECIES:
        paths[s] = work / f"{s}.h5ad"
        data[s].write_h5ad(paths[s])
    medians = compute_medians([paths[s] for s in SPECIES])
    medians_path = work / "medians.tsv"
    medians.save(medians_path)
    tok_config = TokenizeConfig(max_len=args.max_len, style="v2")
    labels = C.LabelConfig(key=LABEL)
    within = {s: C.within_task(data[s], labels, setting=f"within-{s}") for s in SPECIES}
    pca = None
    types = data.truth.types
    rows = []
    for name in args.configs:
        mode, cross = CONFIGS[name]
        started = time.perf_counter()
        vocab = build_vocabulary(mode=mode, gene_set="medians", medians=medians)
        vocab_path = vocab.save(work / f"vocab_{mode}.json")
        corpus = work / f"corpus_{mode}"
        if not corpus.exists():
            tokenize_files([paths[s] for s in SPECIES], corpus, vocab, medians, tok_config, obs_columns=(LABEL,))
        bundle, diag = pretrain(work / f"run_{name}", corpus, Path(vocab_path), medians_path, cross, seed, args)
        model, vocab, medians_b = load_bundle(bundle)
        tokens = {s: C.tokenize_cells(data[s], vocab, medians_b, tok_config) for s in SPECIES}
        emb = {s: embed_corpus(model, tokens[s].dataset, vocab, layer=-1, pooling="mean", device=args.device, progress=False)
               for s in SPECIES}
        position = {s: pd.Index(tokens[s].rows) for s in SPECIES}
        row = {"seed": seed, "config": name, "vocab_size": len(vocab),
               "mlm_loss": diag.get("mlm_loss"), "rank_unigram_loss": diag.get("rank_unigram_loss"),
               "top1": diag.get("top1"), "rank_unigram_top1": diag.get("rank_unigram_top1")}
        baseline = row["rank_unigram_top1"]
        row["top1_over_rank_baseline"] = row["top1"] / baseline if baseline else float("nan")
        finetune = C.ClassifyConfig(labels=labels, finetune=C.FinetuneConfig(
            max_steps=args.finetune_steps, batch_size=args.batch, learning_rate=args.finetune_lr,
            warmup_steps=max(1, args.finetune_steps // 10), pooling="mean", device=args.device))
        for s in SPECIES:
            row[f"knn_within_acc_{s}"] = knn_accuracy(within[s], emb[s], position[s])
            if args.finetune_steps > 0:
                result, _ = C.finetune(within[s], model, vocab, medians_b, finetune, tokens=(tokens[s], tokens[s]))
                row[f"finetune_within_acc_{s}"] = result.metrics["accuracy"]
        scores = cross_species_scores({s: data[s] for s in SPECIES}, emb, {s: tokens[s].rows for s in SPECIES}, LABEL,
                                      baseline=pca is None)
        pca = pca or {k: v for k, v in scores.items() if k.startswith("pca_")}  # the same for every configuration
        row.update({k: v for k, v in scores.items() if not k.startswith(("pca_", "transfer_acc"))})
        row.update(pca)
        row["marker_recall_at_20"], row["marker_recall_chance"] = marker_recall(
            data.human, model, vocab, medians_b, tok_config, data.truth, types[0], data.truth.siblings[types[0]], args, seed)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    return rows


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds per configuration, with per-species columns averaged into one metric."""
    frame = frame.copy()
    for metric in ("knn_within_acc", "finetune_within_acc", "transfer_f1", "pca_f1"):
        columns = [c for c in frame.columns if c.startswith(metric + "_")]
        if columns:
            frame[metric] = frame[columns].mean(axis=1)
    out, mean = seed_table(frame)
    targets = []
    for metric in out.index:
        target = TARGETS.get(metric)
        if target is None:
            targets.append("")
            continue
        value, configs = target
        hits = [c for c in mean.index if c in configs and mean.loc[c, metric] >= value]
        targets.append(f">= {value:g} ({', '.join(configs) if len(configs) < len(CONFIGS) else 'all'}); met: {', '.join(hits) or 'none'}")
    out["target"] = targets
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    check_benchmark_out([args.out], args.overwrite)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mixgf-bench-planted-") as scratch:
        root = args.work_dir or Path(scratch)
        for seed in args.seeds:
            work = root / f"seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            rows += run_seed(seed, args, work)
    per_seed = pd.DataFrame(rows)
    table = summarize(per_seed)
    header = (
        f"Planted-truth benchmark: {args.types} types x {args.cells_per_type} cells per species, seeds {args.seeds}; "
        f"tiny model, {args.steps} steps x {args.batch} cells, lr {args.lr:g}, max_len {args.max_len}, cross-species "
        f"weight {args.cross_weight:g}; fine-tuning {args.finetune_steps} steps at lr {args.finetune_lr:g}; "
        f"{time.perf_counter() - started:.0f}s in all."
    )
    write_benchmark_text(header, table, per_seed, args.out, args.overwrite)
    return per_seed


if __name__ == "__main__":
    main()
