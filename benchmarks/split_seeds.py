"""The demo's classification on more split seeds than the demo runs: how much of a gap between the
fine-tuned model and count logistic regression is the split, and how much is the method.

The demo reports means over 3 split seeds. Within mouse, rare classes hold 1-2 test cells (T cells,
B cells, immune_other), so one seed's macro-F1 moves by 5-10 points with a few cells and 3 seeds
give a wide interval. This script reruns one setting of a finished demo folder, with the demo's
own model, classify configuration (``classify/config.yaml``) and tokenize configuration, for split
seeds ``--seeds``, and reports per method the mean ± sd, and per seed the paired difference to
count logistic regression with a t-interval over seeds. Nothing is selected here: every method and
setting is fixed before a seed's test cells are read.

Usage::

    python benchmarks/split_seeds.py --demo demo_output --species mouse --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --out benchmarks/results/split_seeds_mouse.txt
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.config import load_config  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    write_benchmark_files,
)
from mixgeneformer.tokenize import TokenizeConfig  # noqa: E402

METHODS = ("logreg", "finetune")
BASELINES = ("logreg_counts", "knn_pca", "logreg_tokens")


def run_seed(demo: Path, data: Path, species: str, seed: int, max_len: int | None = None) -> pd.DataFrame:
    """One split seed of ``species`` within, with the demo's model and configurations (``max_len``:
    fine-tune and tokenize on more genes per cell than the demo, up to the model's positions)."""
    model, vocab, medians = load_bundle(demo / "pretrain" / "run" / "model")
    config = load_config(C.ClassifyConfig, demo / "classify" / "config.yaml")
    config = dataclasses.replace(config, labels=dataclasses.replace(config.labels, seed=seed))
    tokenize = load_config(TokenizeConfig, demo / "tokenize" / "corpus" / "config.yaml")
    adata = ad.read_h5ad(data / f"baron_pancreas_{species}.h5ad")
    run = C.run_classification(adata, model, vocab, medians, methods=METHODS, baseline_methods=BASELINES,
                               config=config, tokenize_config=tokenize, device="cpu", max_len=max_len)
    table = run.table()
    table.insert(0, "seed", seed)
    return table


def paired(per_seed: pd.DataFrame, method: str, reference: str = "logreg_counts") -> dict[str, float]:
    """Mean macro-F1 difference ``method - reference`` over seeds, with its 95% t-interval.

    Only seeds where both methods have a score are paired; ``n`` is their number (a seed missing
    either method was counted in ``n`` while the mean and sd skipped it)."""
    wide = per_seed.pivot(index="seed", columns="method", values="macro_f1")
    diff = (wide[method] - wide[reference]).dropna()
    n = len(diff)
    half = float(scipy.stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / n**0.5) if n > 1 else float("nan")
    return {"mean": float(diff.mean()), "lo": float(diff.mean() - half), "hi": float(diff.mean() + half),
            "seeds_within_3_points": int((diff >= -0.03).sum()), "n": n}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `mixgf demo` output folder")
    parser.add_argument("--data", type=Path, default=None, help="folder with baron_pancreas_<species>.h5ad (default: the demo's)")
    parser.add_argument("--species", default="mouse")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="split seeds (default: 0 to 9)")
    parser.add_argument("--max-len", type=int, default=None, help="genes per cell (default: the demo's tokenize configuration)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (+ .csv per seed)")
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def outputs(out: Path | None) -> list[Path]:
    """The files a run writes: the report ``out`` and its per-seed CSV (none without ``--out``)."""
    return [] if out is None else [out, out.with_suffix(".csv")]


def main() -> None:
    args = parse_args()
    check_benchmark_out(outputs(args.out), args.overwrite)
    torch.set_num_threads(1)  # as the demo's classify jobs: results do not depend on the machine's cores
    data = args.data or Path(json.loads((args.demo / "data" / "STEP_DONE.json").read_text())["result"]["inputs"][args.species]).parent
    started = time.perf_counter()
    per_seed = pd.concat([run_seed(args.demo, data, args.species, s, args.max_len) for s in args.seeds], ignore_index=True)
    seconds = time.perf_counter() - started
    summary = C.seed_summary(per_seed, by=("method",), metrics=("macro_f1", "accuracy"))
    lines = [
        f"Within {args.species}, the demo's model and recipe ({args.demo}), split seeds {args.seeds}, "
        f"{f'{args.max_len} genes' if args.max_len else 'the demo’s genes'} per cell; {seconds:.0f}s.",
        "",
        C.markdown_table(summary),
        "",
        "Paired macro-F1 difference to count logistic regression over seeds (mean, 95% t-interval, seeds within 3 points):",
        "",
    ]
    for method in ("finetune", "logreg", "logreg_tokens", "knn_pca"):
        p = paired(per_seed, method)
        lines.append(f"- {method}: {p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}], {p['seeds_within_3_points']}/{p['n']} seeds")
    wide = per_seed.pivot(index="seed", columns="method", values="macro_f1").reset_index()
    lines += ["", "Macro-F1 per seed:", "", C.markdown_table(wide, digits=3)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        write_benchmark_files(dict(zip(outputs(args.out), [text, per_seed.to_csv(index=False)], strict=True)), args.overwrite)


if __name__ == "__main__":
    main()
