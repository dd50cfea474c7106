"""In silico deletion throughput: batched variants vs one variant per forward, and screening.

Real cells (Baron pancreas, human, ../shared/data) are tokenized with a vocabulary and gene
medians built from the data themselves. A Geneformer-V1-sized BERT (6 layers, 256 wide, 4 heads,
512 FFN, 2,048 positions; random init — speed and exactness do not depend on the weights) deletes
every gene of each perturbed beta cell, scoring the cosine shift and the shift towards the mean
alpha-cell embedding (layer -2, mean pooling).

* exact, batched: :func:`mixgeneformer.perturb.perturb_cells` (variants of a cell built as one
  array, many per forward, length-sorted batches, inference mode, only the layers needed, the
  first block's attention shared by all deletions of a cell: :mod:`mixgeneformer.perturb.deletion`);
* loop: one variant per forward pass (the Geneformer-style baseline), on the first
  ``--loop-variants`` deletions of each cell (its rate is per deletion, so it extrapolates);
  its scores must equal the batched ones (max |diff| printed, fp32: ~1e-7);
* screen: first-order estimates of every deletion from one forward and one batched backward
  pass per cell, top ``--top-k`` re-scored exactly; Spearman correlation of the estimates with
  the exact scores, per cell (median over cells), and the speed-up over exact.

Usage::

    python benchmarks/perturb.py                                # CPU, 2 threads, cells capped at 512 tokens
    python benchmarks/perturb.py --device cuda --max-len 2048 --cells 8 --precision fp32,bf16
    python benchmarks/perturb.py --bundle BUNDLE --layer -1     # screening accuracy on a trained model
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize module for this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mixgeneformer.bundle import bundle_tokenize_config, load_bundle  # noqa: E402
from mixgeneformer.inference import hidden_at_layer  # noqa: E402
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.model import MixGeneformerForPretraining, make_config, pool_cells  # noqa: E402
from mixgeneformer.perturb import PerturbConfig, perturb_cells  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "baron_pancreas_human.h5ad"


def build_corpus(path: Path, n_cells: int, n_goal: int, max_len: int, seed: int, bundle: Path | None = None):
    """Tokenize ``n_cells`` beta cells (perturbed) and ``n_goal`` alpha cells (goal state).

    Without ``bundle`` the vocabulary and medians come from the data; with one, from the bundle
    (and its recorded tokenize options, capped at ``max_len`` tokens).
    """
    import dataclasses

    import anndata as ad

    adata = ad.read_h5ad(path)
    tokenize_config = TokenizeConfig(max_len=max_len)
    if bundle is None:
        medians = compute_medians([adata])
        vocab = build_vocabulary("separate", "protein_coding", medians, species=("human",))
    else:
        _model, vocab, medians = load_bundle(bundle)
        recorded = bundle_tokenize_config(bundle)
        if recorded is not None:
            tokenize_config = dataclasses.replace(recorded, max_len=min(max_len, recorded.max_len))
    rng = np.random.default_rng(seed)
    labels = adata.obs["cell_type1"].astype(str).to_numpy()
    beta = rng.choice(np.flatnonzero(labels == "beta"), n_cells, replace=False)
    alpha = rng.choice(np.flatnonzero(labels == "alpha"), n_goal, replace=False)
    pick = np.sort(np.concatenate([beta, alpha]))
    corpus = tokenize_anndata(adata[pick].copy(), vocab, medians, tokenize_config, obs_columns=["cell_type1"])
    return corpus, vocab


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def loop_baseline(model, corpus, vocab, exact, n_variants: int, device: torch.device, precision: str, layer: int):
    """One deletion per forward pass; returns (deletions/s, max |shift diff| vs the batched table)."""
    special = vocab.special_ids
    diffs, count, seconds = [], 0, 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device.type, enabled=False)
    for cell, group in exact.groupby("cell"):
        tokens = np.asarray(corpus[int(cell)]["input_ids"], dtype=np.int64)
        group = group.head(n_variants)

        def run(tokens=tokens, group=group):
            out = []
            with torch.inference_mode(), autocast:
                ids = torch.as_tensor(tokens, device=device)[None]
                original = pool_cells(hidden_at_layer(model.bert, ids, torch.ones_like(ids), layer), ids, torch.ones_like(ids), special)[0]
                for gene in group["gene_token"].tolist():
                    kept = torch.as_tensor(tokens[tokens != gene], device=device)[None]
                    mask = torch.ones_like(kept)
                    emb = pool_cells(hidden_at_layer(model.bert, kept, mask, layer), kept, mask, special)[0]
                    out.append(1.0 - torch.nn.functional.cosine_similarity(original.double(), emb.double(), dim=0).item())
            return np.asarray(out)

        shifts, dt = timed(run, device)
        seconds += dt
        count += len(group)
        diffs.append(np.abs(shifts - group["shift"].to_numpy()).max())
    return count / seconds, float(max(diffs))


def spearman_per_cell(screen, exact, column: str) -> float:
    from scipy.stats import spearmanr

    rhos = []
    for cell, group in screen.groupby("cell"):
        truth = exact.loc[exact["cell"] == cell, column].to_numpy()
        rhos.append(spearmanr(group[f"{column}_estimate"].to_numpy(), truth)[0])
    return float(np.median(rhos))


def top_k_recall(screen, exact, column: str, k: int) -> float:
    """Fraction of each cell's exact top-k genes that screening also put in its top-k."""
    hits = []
    for cell, group in screen.groupby("cell"):
        truth = exact[exact["cell"] == cell]
        true_top = set(truth.nlargest(k, column)["gene_token"])
        est_top = set(group.nlargest(k, f"{column}_estimate")["gene_token"])
        hits.append(len(true_top & est_top) / k)
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cells", type=int, default=2, help="beta cells whose every gene is deleted")
    parser.add_argument("--goal-cells", type=int, default=16, help="alpha cells averaged into the goal state")
    parser.add_argument("--max-len", type=int, default=512, help="tokens per cell (2048 = Geneformer V1, full cells)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=16, help="variants per forward pass")
    parser.add_argument("--precision", default="fp32", help="comma list: fp32, bf16")
    parser.add_argument("--loop-variants", type=int, default=48, help="deletions per cell timed one per forward")
    parser.add_argument("--top-k", type=int, default=20, help="genes re-scored exactly per cell in screening")
    parser.add_argument("--probes", type=int, default=8, help="random probe directions of the screening shift estimate")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="a trained model bundle (its vocabulary, medians, tokenize options) instead of a random V1-sized model")
    parser.add_argument("--layer", type=int, default=-2, help="hidden state pooled into the cell embedding")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus, vocab = build_corpus(args.data, args.cells, args.goal_cells, args.max_len, args.seed, args.bundle)
    torch.manual_seed(args.seed)
    if args.bundle is None:
        model, model_name = MixGeneformerForPretraining(make_config("geneformer-v1", vocab)), "geneformer-v1 (random init)"
    else:
        model, model_name = load_bundle(args.bundle)[0], f"bundle {args.bundle}"
    model = model.eval().to(device)
    labels = np.asarray(corpus["cell_type1"])
    lengths = np.asarray(corpus["length"])[labels == "beta"]
    print(f"device={device} threads={torch.get_num_threads()} perturbed cells={args.cells} "
          f"tokens/cell={lengths.tolist()} goal cells={args.goal_cells} model={model_name} layer={args.layer}")

    # warm-up (kernels, allocator, thread pool) on a batch shaped like a cell's deletions, not timed
    cell = torch.as_tensor(corpus[0]["input_ids"], device=device)[1:].repeat(args.batch_size, 1)
    with torch.inference_mode():
        for _ in range(3):
            hidden_at_layer(model, cell, torch.ones_like(cell), args.layer)

    rows = []
    for precision in args.precision.split(","):
        base = dict(state_column="cell_type1", start="beta", goal="alpha", batch_size=args.batch_size,
                    device=str(device), precision=precision, seed=args.seed, layer=args.layer)
        exact, t_exact = timed(lambda base=base: perturb_cells(model, corpus, vocab, PerturbConfig(**base), progress=False), device)
        table = exact.cells
        n = len(table)
        loop_rate, loop_diff = loop_baseline(model, corpus, vocab, table, args.loop_variants, device, precision, args.layer)
        screen, t_screen = timed(
            lambda base=base: perturb_cells(
                model, corpus, vocab,
                PerturbConfig(mode="screen", screen_top_k=args.top_k, screen_probes=args.probes, **base), progress=False,
            ),
            device,
        )
        s = screen.cells
        rows.append({
            "precision": precision,
            "deletions": n,
            "exact del/s": n / t_exact,
            "loop del/s": loop_rate,
            "batched/loop": (n / t_exact) / loop_rate,
            "max|diff| vs loop": loop_diff,
            "screen del/s": n / t_screen,
            "screen speed-up": t_exact / t_screen,
            "rho shift": spearman_per_cell(s, table, "shift"),
            "rho goal": spearman_per_cell(s, table, "goal_shift"),
            f"top{args.top_k} recall goal": top_k_recall(s, table, "goal_shift", args.top_k),
        })
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    print("Timings on a shared machine are noisy; the exact rate includes the state-embedding pass.")


if __name__ == "__main__":
    main()
