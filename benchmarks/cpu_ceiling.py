"""The fastest a Geneformer-V1-sized forward pass can run on this CPU: a roofline for embed/perturb.

``benchmarks/embed.py`` and ``benchmarks/perturb.py`` report what the package reaches; this script
says how far that is from what the hardware allows. It times, with ``--threads`` torch threads:

* the fp32 matrix-multiply peak (a 4,096-square GEMM, the best case for the BLAS);
* the model's own kernels at the shapes they run at: the 256->256, 256->512 and 512->256 linear
  layers on a batch of token states, and SDPA attention (4 heads of 64) on cells of the
  workload's length;

then counts the floating-point work of the two workloads (multiply-adds of every linear layer
and of QK^T and PV in attention, for the blocks that have to run: 5 of 6 at layer -2; nothing
else is counted, so the bounds are optimistic):

* ``embed``: the Baron human cells of ``benchmarks/embed.py`` (same seed and count), each at its
  own length;
* ``perturb``: one deletion of a ``--perturb-len``-token cell (a sequence one token shorter).

A row's "cells/s at GEMM peak" is the rate if every FLOP ran at the GEMM peak; "cells/s at kernel
rates" if the linear layers and attention ran at their measured rates and all other work
(embeddings, LayerNorm, activation, residual adds, pooling) were free.

Usage::

    python benchmarks/cpu_ceiling.py                  # 2 threads, the embed workload's 96 cells
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize module for this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HIDDEN, HEADS, FFN, LAYERS_RUN = 256, 4, 512, 5  # Geneformer V1, pooled at layer -2


def _sibling(name: str):
    """Import another benchmark script of this folder as a module (for its corpus builder)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rate(fn, flops: float, repeats: int) -> float:
    """GFLOP/s of ``fn`` (best of ``repeats`` after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def linear_flops_per_token() -> float:
    """Q, K, V and output projections plus the two FFN layers, 2 FLOPs per multiply-add."""
    return 2.0 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)


def attention_flops(length: np.ndarray) -> np.ndarray:
    """QK^T and PV over all heads for one sequence of each length."""
    return 2.0 * 2.0 * length.astype(np.float64) ** 2 * HIDDEN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-cells", type=int, default=96, help="cells of the embed workload (as benchmarks/embed.py)")
    parser.add_argument("--perturb-len", type=int, default=768, help="tokens of a perturbed cell (as benchmarks/perturb.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with torch.inference_mode():
        n = 4096
        a, b = torch.randn(n, n), torch.randn(n, n)
        gemm_peak = rate(lambda: a @ b, 2.0 * n**3, args.repeats)

        def kernel_rates(length: int) -> tuple[float, float]:
            batch = max(1, 16 * 2048 // length)
            tokens = torch.randn(batch * length, HIDDEN)
            wide = torch.randn(batch * length, FFN)
            w_hh, w_fh, w_hf = torch.randn(HIDDEN, HIDDEN), torch.randn(FFN, HIDDEN), torch.randn(HIDDEN, FFN)

            def linears():
                for _ in range(4):
                    F.linear(tokens, w_hh)
                F.linear(tokens, w_fh)
                F.linear(wide, w_hf)

            linear_rate = rate(linears, batch * length * linear_flops_per_token(), args.repeats)
            q, k, v = (torch.randn(batch, HEADS, length, HIDDEN // HEADS) for _ in range(3))
            attn = attention_flops(np.array([length]))[0] * batch
            attention_rate = rate(lambda: F.scaled_dot_product_attention(q, k, v), attn, args.repeats)
            return linear_rate, attention_rate

        embed_bench = _sibling("embed")
        corpus, _vocab = embed_bench.build_corpus(embed_bench.DATA, args.n_cells, args.seed)
        embed_lengths = np.asarray(corpus["length"], dtype=np.int64)
        workloads = {
            f"embed ({len(embed_lengths)} Baron cells, median {int(np.median(embed_lengths))} tokens)": (
                embed_lengths, int(np.median(embed_lengths)), 8.0),
            f"perturb (one deletion of a {args.perturb_len}-token cell)": (
                np.array([args.perturb_len - 1]), args.perturb_len - 1, 20.0),
        }
        print(f"# {args.threads} torch threads; fp32 GEMM peak (4096^3): {gemm_peak:.0f} GFLOP/s; "
              f"model 6x{HIDDEN}, {HEADS} heads, FFN {FFN}, {LAYERS_RUN} blocks run (layer -2)")
        print("| workload | GFLOP/cell | linear GFLOP/s | SDPA GFLOP/s | cells/s at GEMM peak | "
              "cells/s at kernel rates | target |")
        print("|---|---|---|---|---|---|---|")
        for name, (lengths, typical, target) in workloads.items():
            linear_rate, attention_rate = kernel_rates(typical)
            lin = LAYERS_RUN * lengths * linear_flops_per_token()
            att = LAYERS_RUN * attention_flops(lengths)
            per_cell = float((lin + att).mean())
            seconds = float(lin.sum() / (linear_rate * 1e9) + att.sum() / (attention_rate * 1e9))
            print(f"| {name} | {per_cell / 1e9:.1f} | {linear_rate:.0f} | {attention_rate:.0f} | "
                  f"{gemm_peak * 1e9 / per_cell:.2f} | {len(lengths) / seconds:.2f} | {target:g} |")


if __name__ == "__main__":
    main()
