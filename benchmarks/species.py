"""Species alignment on the demo data: which vocabulary / cross-species objective mixes species?

The demo's pancreas cells (shipped Baron et al. 2016 subset, human + mouse, ``cell_type1``) are
pretrained on at the demo's budget and settings (tiny preset, ≤128 genes per cell, batch 16,
lr 1e-3, MLM + SimCSE on the mean over genes, 5% of cells held out for the masked-gene
diagnostics), once per configuration and seed:

* ``separate``          the paper's vocabulary (every gene its own token)
* ``ortholog``          one token per one-to-one ortholog pair (the demo's default)
* ``ortholog+xs``       plus the cross-species term (weight ``--cross-weight``), pairs = mutual nearest
                        cells of the other species by their ortholog genes (``cross_species_positives="mnn"``)
* ``ortholog+xs-proj``  the same weight with the earlier pairing: a cell and its own ortholog projection

A ``+xs`` name may add options after colons: the weight, ``qP`` a pairing queue of P earlier cells
(``cross_species_queue``) and ``kK`` K-reciprocal pairs (``cross_species_k``), e.g.
``ortholog+xs:0.1:q1024:k20``.

Every score reads only the cells that no split of ``--exclude-test-seeds`` (the demo's classify
seeds 0-2) tests on, so a configuration chosen here is chosen without the demo's test cells.
Per model (:func:`mixgeneformer.integration.cross_species_scores`): kNN label transfer (k=5,
cosine, last layer mean over genes) mouse→human and human→mouse on shared types (macro-F1),
beside kNN on 50 PCs of one-to-one-ortholog counts; species mixing within cell types (scib-metrics
iLISI / batch ASW / kBET when installed, else the batch ASW with scikit-learn); the held-out MLM
loss beside the rank-position baseline.

Usage::

    python benchmarks/species.py                               # 3 seeds x 4 configurations at the demo budget
    python benchmarks/species.py --steps 400 --configs ortholog ortholog+xs --seeds 0
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
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.demo import demo_data_dir  # noqa: E402
from mixgeneformer.diagnostics import final_evaluation  # noqa: E402
from mixgeneformer.embed import embed_corpus  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    cross_species_scores,
    seed_table,
    write_benchmark_files,
    write_benchmark_text,
)
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

SPECIES = ("human", "mouse")
LABEL = "cell_type1"
RESULTS = Path(__file__).resolve().parent / "results"
# name -> (vocabulary mode, cross-species positives or None)
CONFIGS = {
    "separate": ("separate", None),
    "ortholog": ("ortholog", None),
    "ortholog+xs": ("ortholog", "mnn"),
    "ortholog+xs-proj": ("ortholog", "projection"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with baron_pancreas_{human,mouse}.h5ad (default: the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help=f"of {list(CONFIGS)}; a cross-species one may name its weight, e.g. ortholog+xs:0.1 (default --cross-weight)")
    parser.add_argument("--steps", type=int, default=1600, help="pretraining steps (the demo's budget)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--mlm-bias-init", choices=["zero", "unigram"], default="zero",
                        help="train.mlm_bias_init: the MLM output bias starts at zero or at the log gene frequencies")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="score the held-out cells every N steps (default: once, at the end)")
    parser.add_argument("--cross-weight", type=float, default=0.5)
    parser.add_argument("--exclude-test-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="split seeds of the demo's classification whose test cells no score reads (none given: every cell)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="score the models already pretrained in --work-dir (run_<config>_<seed>/model) instead of pretraining again")
    parser.add_argument("--out", default=str(RESULTS / "species_cpu.txt"), help="table (markdown); '' to skip")
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def finished_run(work: Path):
    """(bundle, final held-out evaluation, last cross-species loss) of a finished run folder."""
    rows = read_metrics(work)
    cross = [r["cross_species_loss"] for r in rows if "cross_species_loss" in r]
    return work / "model", final_evaluation(rows) or {}, (cross[-1] if cross else float("nan"))


def parse_config(name: str, default_weight: float) -> tuple[str, dict]:
    """'ortholog+xs:0.1:q1024:k20' -> (vocabulary mode, objective options): weight, then optionally
    ``q`` the pairing queue (``cross_species_queue``) and ``k`` its reciprocity (``cross_species_k``)."""
    base, *parts = name.split(":")
    if base not in CONFIGS or (parts and CONFIGS[base][1] is None):
        raise SystemExit(f"unknown configuration {name!r}; choose from {list(CONFIGS)} (options only after a +xs one)")
    mode, positives = CONFIGS[base]
    if positives is None:
        return mode, {}
    objective = {"cross_species_positives": positives, "cross_species_weight": default_weight}
    for part in parts:
        key = {"q": "cross_species_queue", "k": "cross_species_k"}.get(part[:1])
        objective.update({key: int(part[1:])} if key else {"cross_species_weight": float(part)})
    return mode, objective


def pretrain(work: Path, corpus: Path, vocab_path: Path, medians_path: Path, cross: dict, seed: int, args):
    if args.reuse and (work / "model" / "mixgf.json").is_file():
        return finished_run(work)
    objective = {"pooling": "mean", "contrastive_weight": 1.0, **cross}
    config = pretrain_config_from_dict({
        "output_dir": str(work),
        "data": {"corpus": [str(corpus)], "vocab": str(vocab_path), "medians": str(medians_path), "eval_fraction": 0.05},
        "model": {"preset": "tiny", "overrides": {"max_position_embeddings": 512}},
        "objective": objective,
        "train": {"max_steps": args.steps, "per_device_batch_size": args.batch, "learning_rate": args.lr,
                  "warmup_steps": 40, "seed": seed,
                  "mlm_bias_init": args.mlm_bias_init},
        "checkpoint": {"save_steps": args.steps, "keep": 1},
        "logging": {"logging_steps": max(1, args.steps // 10), "eval_steps": args.eval_steps or args.steps, "tensorboard": False,
                    "progress_bar": False},
    })
    result = run_pretraining(config, overwrite=True)
    return finished_run(result.run_dir)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    check_benchmark_out([args.out], args.overwrite)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    source = args.data or demo_data_dir()
    paths = {s: source / f"baron_pancreas_{s}.h5ad" for s in SPECIES}
    data = {s: ad.read_h5ad(paths[s]) for s in SPECIES}
    excluded = {s: C.tested_rows(data[s], C.LabelConfig(key=LABEL), args.exclude_test_seeds) for s in SPECIES}
    tok_config = TokenizeConfig(max_len=args.max_len)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mixgf-bench-species-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        medians = compute_medians([paths[s] for s in SPECIES])
        medians_path = work / "medians.tsv"
        medians.save(medians_path)
        for name in args.configs:
            mode, objective = parse_config(name, args.cross_weight)
            vocab = build_vocabulary(mode=mode, gene_set="protein_coding", medians=medians)
            vocab_path = Path(vocab.save(work / f"vocab_{mode}.json"))
            corpus = work / f"corpus_{mode}"
            if not corpus.exists():
                tokenize_files([paths[s] for s in SPECIES], corpus, vocab, medians, tok_config, obs_columns=(LABEL,))
            for seed in args.seeds:
                t0 = time.perf_counter()
                bundle, diag, cross = pretrain(work / f"run_{name}_{seed}", corpus, vocab_path, medians_path, objective, seed, args)
                model, model_vocab, model_medians = load_bundle(bundle)
                tokens = {s: C.tokenize_cells(data[s], model_vocab, model_medians, tok_config) for s in SPECIES}
                emb = {s: embed_corpus(model, tokens[s].dataset, model_vocab, layer=-1, pooling="mean", device=args.device,
                                       progress=False) for s in SPECIES}
                row = {"config": name, "seed": seed}
                keep = {s: ~np.isin(tokens[s].rows, excluded[s]) for s in SPECIES}  # no demo test cell is scored
                row.update(cross_species_scores(data, {s: emb[s][keep[s]] for s in SPECIES},
                                                {s: np.asarray(tokens[s].rows)[keep[s]] for s in SPECIES}, LABEL, per_type=True))
                row.update({"heldout_mlm_loss": diag.get("mlm_loss"), "rank_baseline_loss": diag.get("rank_unigram_loss"),
                            "final_cross_species_loss": cross, "seconds": round(time.perf_counter() - t0, 1)})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if "type_f1" not in k}, flush=True)
                rows.append(row)
    per_seed = pd.DataFrame(rows)
    typed = [c for c in per_seed.columns if "type_f1" in c]
    by_type = per_type_table(per_seed[["config", "seed", *typed]])
    per_seed = per_seed.drop(columns=typed)
    table, _ = seed_table(per_seed)
    header = (
        f"Species alignment on the demo data ({', '.join(f'{s} {data[s].n_obs}' for s in SPECIES)} cells): tiny model, "
        f"{args.steps} steps x {args.batch} cells, lr {args.lr:g}, max_len {args.max_len}, cross-species weight "
        f"{args.cross_weight:g} (or the one a configuration names after ':'); seeds {args.seeds}; backend of the mixing scores: {per_seed['backend'].iloc[0]}; "
        f"{time.perf_counter() - started:.0f}s in all."
    )
    text = write_benchmark_text(header, table, per_seed, None)
    by_type_text = "kNN transfer F1 per shared type, mean over seeds (pca: kNN on 50 PCs of one-to-one-ortholog counts):\n\n" + C.markdown_table(by_type, digits=3)
    print("\n" + by_type_text)
    if args.out:
        write_benchmark_files({args.out: text + "\n\n" + by_type_text + "\n"}, args.overwrite)
    return per_seed


def per_type_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Rows (direction, type), columns: each configuration's mean F1 over seeds, then the count PCA-kNN's."""
    long = per_seed.melt(id_vars=["config", "seed"], var_name="key", value_name="f1").dropna()
    long["source"] = np.where(long["key"].str.startswith("pca_"), "pca", long["config"])
    long[["direction", "type"]] = long["key"].str.replace("pca_", "").str.replace("type_f1_", "").str.split(":", n=1, expand=True)
    mean = long.groupby(["direction", "type", "source"], sort=False)["f1"].mean().unstack("source")
    ordered = [*dict.fromkeys(per_seed["config"]), "pca"]
    return mean[[c for c in ordered if c in mean.columns]].reset_index()


if __name__ == "__main__":
    main()
