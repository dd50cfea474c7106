"""Cell-embedding throughput: mixgeneformer.embed vs a Geneformer-EmbExtractor-style baseline.

Real cells (Baron pancreas, human, ../shared/data) are tokenized with a vocabulary and gene
medians built from the data themselves, then embedded with a Geneformer-V1-sized BERT (6 layers,
256 wide, 4 heads, 512 FFN, 2,048 positions; random init — speed and exactness do not depend on
the weights) at the second-to-last layer with mean pooling.

* baseline: Hugging Face ``BertModel`` with eager attention and ``output_hidden_states=True``
  (all 6 layers computed), cells in corpus order, fixed-size batches padded to 2,048 tokens —
  what Geneformer's ``EmbExtractor`` does;
* plain SDPA: the same ``BertModel`` with SDPA attention and length-sorted, dynamically padded
  batches, still computing all 6 layers (the issue's "plain SDPA forward", ≈5.6 cells/s);
* ours: :func:`mixgeneformer.embed.embed_corpus` — length-sorted batches with dynamic padding,
  SDPA attention with a padding mask, only the 5 layers needed, inference mode (bf16 autocast on
  CUDA with ``--precision auto``).

All must give the same embeddings: the maximum absolute difference is printed (fp32: ~1e-6).

``benchmarks/cpu_ceiling.py`` gives the fastest this workload can run on the CPU at hand.

Usage::

    python benchmarks/embed.py                       # CPU, 2 threads, 96 cells
    python benchmarks/embed.py --n-cells 2142 --device cuda    # fp32 and bf16-autocast rows
"""

from __future__ import annotations

import os
import sys

# Scripts here are run as `python benchmarks/embed.py`, which puts benchmarks/ first on sys.path;
# a sibling such as benchmarks/tokenize.py would then shadow the standard library's module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mixgeneformer.embed import embed_corpus  # noqa: E402
from mixgeneformer.medians import compute_medians  # noqa: E402
from mixgeneformer.model import MixGeneformerForPretraining, make_config  # noqa: E402
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata  # noqa: E402
from mixgeneformer.vocab import build_vocabulary  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "baron_pancreas_human.h5ad"


def build_corpus(path: Path, n_cells: int, seed: int):
    """Tokenize ``n_cells`` random Baron human cells with a vocabulary + medians from the data."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    medians = compute_medians([adata])
    vocab = build_vocabulary("separate", "protein_coding", medians, species=("human",))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    corpus = tokenize_anndata(adata[pick].copy(), vocab, medians, TokenizeConfig(max_len=2048))
    return corpus, vocab


def plain_bert_embed(
    model, corpus, vocab, batch_size: int, device: torch.device, attention: str, sort_by_length: bool
) -> np.ndarray:
    """A plain ``BertModel`` forward with every hidden state, mean of ``hidden_states[-2]``.

    ``attention="eager", sort_by_length=False``: Geneformer's ``EmbExtractor`` (corpus order,
    batches padded to 2,048). ``attention="sdpa", sort_by_length=True``: the plain SDPA forward
    with length-sorted, dynamically padded batches the issue quotes for scale.
    """
    from transformers import BertModel

    config = model.bert.config.__class__.from_dict(model.bert.config.to_dict())
    config._attn_implementation = attention
    bert = BertModel(config, add_pooling_layer=False)
    bert.load_state_dict(model.bert.state_dict(), strict=False)
    bert.to(device).eval()
    cells = corpus["input_ids"]
    lengths = np.array([len(cell) for cell in cells])
    order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(cells))
    out = np.zeros((len(cells), config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(cells), batch_size):
            rows = order[start : start + batch_size]
            pad_to = int(lengths[rows].max()) if sort_by_length else 2048
            ids = torch.full((len(rows), pad_to), vocab.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : lengths[row]] = torch.as_tensor(cells[row])
                mask[i, : lengths[row]] = 1
            ids, mask = ids.to(device), mask.to(device)
            hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            weights = mask.unsqueeze(-1).float()
            out[rows] = ((hidden * weights).sum(1) / weights.sum(1)).cpu().numpy()
    return out


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--n-cells", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=16, help="our batch size (cells)")
    parser.add_argument("--baseline-batch-size", type=int, default=8)
    parser.add_argument(
        "--precision", default=None, help="comma list of ours: fp32, bf16, auto (default: fp32 on CPU, fp32,auto on CUDA)"
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus, vocab = build_corpus(args.data, args.n_cells, args.seed)
    lengths = np.asarray(corpus["length"])
    torch.manual_seed(args.seed)
    model = MixGeneformerForPretraining(make_config("geneformer-v1", vocab)).eval().to(device)
    print(
        f"# {len(corpus)} Baron human cells, tokens/cell median {int(np.median(lengths))} (max {lengths.max()}), "
        f"vocab {len(vocab):,}; model 6x256, 4 heads, FFN 512; layer -2, mean pooling; device {device}"
        + (f", {args.threads} CPU threads" if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})")
    )
    if device.type == "cpu":
        print(f"# note: CPU timings on a shared machine are noisy (load average {os.getloadavg()[0]:.1f})")

    # warm-up (kernels, allocator) on a few cells, not timed
    embed_corpus(model, corpus.select(range(min(4, len(corpus)))), vocab, batch_size=args.batch_size, device=device, progress=False)

    rows = []
    reference = None
    if not args.skip_baseline:
        reference, seconds, cpu = timed(
            lambda: plain_bert_embed(model, corpus, vocab, args.baseline_batch_size, device, "eager", False), device
        )
        rows.append(("baseline: HF eager, all hidden states, pad 2048", args.baseline_batch_size, seconds, cpu, 0.0))
        plain, seconds, cpu = timed(
            lambda: plain_bert_embed(model, corpus, vocab, args.batch_size, device, "sdpa", True), device
        )
        rows.append(("plain HF SDPA, all 6 layers, length-sorted", args.batch_size, seconds, cpu,
                     float(np.abs(plain - reference).max())))
    precisions = args.precision or ("fp32,auto" if device.type == "cuda" else "fp32")
    for precision in [p.strip() for p in precisions.split(",") if p.strip()]:
        ours, seconds, cpu = timed(
            lambda precision=precision: embed_corpus(
                model, corpus, vocab, layer=-2, batch_size=args.batch_size, device=device, progress=False, precision=precision
            ),
            device,
        )
        diff = float(np.abs(ours - reference).max()) if reference is not None else float("nan")
        rows.append((f"mixgeneformer embed_corpus ({precision})", args.batch_size, seconds, cpu, diff))

    base = rows[0][2] if not args.skip_baseline else None
    # On a shared CPU, wall time includes waiting for the cores; CPU time / threads estimates the
    # wall time the same work would take on idle cores.
    cpu_note = device.type == "cpu"
    print(
        "| method | batch | seconds | cells/s | speed-up | max abs diff vs baseline |"
        + (" CPU s | cells/s from CPU time |" if cpu_note else "")
    )
    print("|---|---|---|---|---|---|" + ("---|---|" if cpu_note else ""))
    for name, batch, seconds, cpu, diff in rows:
        speed = f"{base / seconds:.2f}x" if base else "-"
        diff_text = "-" if name.startswith("baseline") else f"{diff:.2e}"
        line = f"| {name} | {batch} | {seconds:.1f} | {len(corpus) / seconds:.2f} | {speed} | {diff_text} |"
        if cpu_note:
            line += f" {cpu:.1f} | {len(corpus) / (cpu / args.threads):.2f} |"
        print(line)


if __name__ == "__main__":
    main()
