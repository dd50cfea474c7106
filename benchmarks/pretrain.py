"""Pretraining throughput: our training step vs the authors' effective setup.

Baseline ("eager fp32"): a plain Hugging Face ``BertForMaskedLM`` with eager attention in fp32,
SimCSE as the authors run it (two separate forward passes, MLM logits at every position), torch
AdamW. Ours: :class:`mixgeneformer.model.MixGeneformerForPretraining` (both SimCSE views stacked in
one encoder call, MLM head only at masked positions, SDPA attention), bf16 autocast on GPU, fused
AdamW, optionally ``torch.compile``. Same model size, same batches of rank-value-like cells,
gradient clipping 1.0 in both.

Tokens/s counts cell tokens (``batch * seq_len`` per step, each cell counted once although it is
encoded twice). MFU uses :func:`mixgeneformer.trainer.training_flops` over the peak dense bf16
FLOP/s (790 TFLOP/s for an H100, the project's convention) for every row, fp32 rows included.

Usage::

    python benchmarks/pretrain.py                        # CPU, tiny preset (a minute or two)
    python benchmarks/pretrain.py --device cuda --quick  # H100: mix-geneformer + geneformer-v2-104m
    python benchmarks/pretrain.py --device cuda --corpus corpora/x --vocab corpora/vocab.json
    python benchmarks/pretrain.py --trainer --no-baseline      # + the `mixgf pretrain` path, alternating

``--trainer`` also measures the real ``mixgf pretrain`` path (:func:`mixgeneformer.pretrain.run_pretraining`
on a corpus folder of the same cells: sampler, collator with seeded masking, DataLoader, HF Trainer,
logging) at the same model, batch, length, precision and compile setting, alternating with the
standalone loop in one process (``--rounds``); its tokens/s is the median of the per-step
``tokens_per_s`` of ``metrics.csv`` after the warm-up steps.

Without ``--corpus`` the cells are synthetic rank-value-like sequences: each cell ranks genes by
a shared log-expression profile plus per-cell Gumbel noise and keeps the top ``seq_len`` genes,
so frequent genes sit near the front as in real corpora.
"""

from __future__ import annotations

import os
import sys

# Scripts in benchmarks/ must not shadow the standard library (benchmarks/tokenize.py would
# replace `tokenize`, which `inspect` needs): drop this folder from the import path first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

H100_BF16_PEAK = 790e12
N_SPECIAL = 6  # <pad> <mask> <cls> <eos> <human> <mouse>


@dataclass
class Row:
    preset: str
    variant: str
    batch: int
    seq_len: int
    step_s: float
    tokens_per_s: float
    mfu: float
    peak_mem_gb: float
    note: str = ""


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def synthetic_cells(n_cells: int, seq_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``(n_cells, seq_len)`` rank-value-like token ids: ``<cls>`` then genes by noisy rank."""
    gen = torch.Generator().manual_seed(seed)
    n_genes = vocab_size - N_SPECIAL
    profile = torch.randn(n_genes, generator=gen) * 2.0  # shared log-expression
    rows = []
    for start in range(0, n_cells, 256):
        b = min(256, n_cells - start)
        gumbel = -torch.log(-torch.log(torch.rand(b, n_genes, generator=gen).clamp_min(1e-9)))
        top = torch.topk(profile + gumbel, seq_len - 1, dim=1).indices + N_SPECIAL
        rows.append(torch.cat([torch.full((b, 1), 2), top], dim=1))
    return torch.cat(rows)


def corpus_cells(corpus: str, n_cells: int, seq_len: int) -> torch.Tensor:
    """The first ``n_cells`` cells of a corpus cut/padded to ``seq_len`` (longest cells first)."""
    import datasets

    ds = datasets.load_from_disk(corpus)
    lengths = np.asarray(ds.with_format("numpy")["length"])
    order = np.argsort(-lengths, kind="stable")[:n_cells]
    ids = torch.zeros(len(order), seq_len, dtype=torch.long)
    for i, j in enumerate(order.tolist()):
        x = torch.as_tensor(np.asarray(ds[j]["input_ids"][:seq_len], dtype=np.int64))
        ids[i, : x.numel()] = x
    return ids


def mask_batch(ids: torch.Tensor, mask_id: int = 1, p: float = 0.15, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    attention = (ids != 0).long()
    candidates = (ids >= N_SPECIAL) & attention.bool()
    selected = (torch.rand(ids.shape, generator=gen) < p) & candidates
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return ids.masked_fill(selected, mask_id), attention, labels


# ------------------------------------------------------------------------------------------
# Models and steps
# ------------------------------------------------------------------------------------------
def bert_config(preset: str, vocab_size: int, seq_len: int, attn: str):
    from transformers import BertConfig

    from mixgeneformer.model import PRESETS

    values = dict(PRESETS[preset])
    values["max_position_embeddings"] = max(values["max_position_embeddings"], seq_len)
    return BertConfig(vocab_size=vocab_size, pad_token_id=0, attn_implementation=attn, **values)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """Backward, clip to 1.0, step, zero: the same for every variant."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def baseline_step_fn(preset: str, vocab_size: int, seq_len: int, device: torch.device):
    """The authors' effective setup: BertForMaskedLM, eager attention, fp32, two forward passes."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(bert_config(preset, vocab_size, seq_len, "eager")).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001)

    def step(ids, attention, labels):
        out1 = model(input_ids=ids, attention_mask=attention, labels=labels, output_hidden_states=True)
        out2 = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        z1 = out1.hidden_states[-1][:, 0]
        z2 = out2.hidden_states[-1][:, 0]
        z = F.normalize(torch.cat([z1, z2]), dim=-1)
        sim = z @ z.T / 0.05
        sim.fill_diagonal_(-1e9)
        b = z1.shape[0]
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim.device)
        loss = out1.loss + F.cross_entropy(sim, target)
        return optimizer_step(loss, model, opt)

    return model, step


def ours_step_fn(preset: str, vocab_size: int, seq_len: int, device: torch.device, bf16: bool, compile_model: bool):
    from mixgeneformer.model import PRESETS, MixGeneformerConfig, MixGeneformerForPretraining

    values = dict(PRESETS[preset])
    values["max_position_embeddings"] = max(values["max_position_embeddings"], seq_len)
    config = MixGeneformerConfig(vocab_size=vocab_size, pad_token_id=0, attn_implementation="sdpa",
                                 special_token_ids=list(range(N_SPECIAL)), **values)
    model = MixGeneformerForPretraining(config).to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001, fused=fused)
    if compile_model:  # compile the encoder blocks (static shapes); the masked-position head stays eager
        for layer in model.bert.encoder.layer:
            layer.compile()
    forward = model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(ids, attention, labels):
        with autocast():
            loss = forward(input_ids=ids, attention_mask=attention, labels=labels).loss
        return optimizer_step(loss, model, opt)

    return model, step


def measure(make, cells: torch.Tensor, batch: int, steps: int, warmup: int, device: torch.device):
    """Seconds per step (median over ``steps`` after ``warmup``) and peak memory in GB."""
    model, step = make()
    batches = []
    for i in range(warmup + steps):
        start = (i * batch) % max(1, cells.shape[0] - batch + 1)
        ids, attention, labels = mask_batch(cells[start : start + batch], seed=i)
        batches.append((ids.to(device), attention.to(device), labels.to(device)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, b in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = step(*b)
        loss.item()  # syncs
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    n_params = _non_embedding_params(model)
    del model, step, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return float(np.median(times)), peak, n_params


def trainer_run(preset: str, cells: torch.Tensor, batch: int, steps: int, warmup: int, vocab_size: int,
                workdir: str, compile_blocks: bool, workers: int) -> tuple[float, float]:
    """Median tokens/s of ``mixgf pretrain`` (run_pretraining) after ``warmup`` steps, and peak GB."""
    import datasets

    from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining
    from mixgeneformer.vocab import Vocabulary

    root = os.path.join(workdir, f"trainer-{preset}")
    vocab_path, corpus = os.path.join(root, "vocab.json"), os.path.join(root, "corpus")
    if not os.path.isdir(corpus):
        specials = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]
        tokens = specials + [f"ENSG{i:011d}" for i in range(vocab_size - N_SPECIAL)]
        vocab = Vocabulary(tokens, {t: i for i, t in enumerate(tokens) if t.startswith("ENSG")})
        os.makedirs(root, exist_ok=True)
        vocab.save(vocab_path)
        n = batch * (steps + warmup)
        ids = cells[torch.arange(n) % cells.shape[0]].numpy().astype(np.int32)
        datasets.Dataset.from_dict({"input_ids": list(ids), "length": [ids.shape[1]] * n}).save_to_disk(corpus)
        with open(os.path.join(corpus, "mixgf_corpus.json"), "w") as handle:
            json.dump({"vocab_hash": vocab.hash}, handle)
    seq_len = int(cells.shape[1])
    config = pretrain_config_from_dict({
        "output_dir": os.path.join(root, "run"),
        "data": {"corpus": [corpus], "vocab": vocab_path, "workers": workers},
        "model": {"preset": preset, "overrides": {"max_position_embeddings": max(seq_len, 512)}},
        "train": {"max_steps": steps + warmup, "warmup_steps": 0, "per_device_batch_size": batch,
                  "compile_blocks": compile_blocks},
        "checkpoint": {"save_steps": 10**9, "keep": 0},
        "logging": {"logging_steps": 1, "progress_bar": False, "tensorboard": False},
    })
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = run_pretraining(config, overwrite=True)
    rates = [row["tokens_per_s"] for row in read_metrics(result.run_dir) if row.get("tokens_per_s") == row.get("tokens_per_s")]
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    gc.collect()
    return float(np.median(rates[warmup:])), peak


def _non_embedding_params(model) -> int:
    from mixgeneformer.trainer import count_flop_parameters

    return count_flop_parameters(model)


def run_variant(name, make, preset, cells, batch, seq_len, steps, warmup, device, vocab_size, n_layers, hidden,
                peak_flops, note="") -> Row:
    """Measure one variant, halving the batch on out-of-memory."""
    from mixgeneformer.trainer import training_flops

    while batch >= 1:
        out_of_memory = False
        try:
            step_s, mem, n_params = measure(make, cells, batch, steps, warmup, device)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if not out_of_memory:
            break
        # Outside the except block, so the traceback (and the tensors it holds) is gone.
        gc.collect()
        torch.cuda.empty_cache()
        note = (note + f" OOM at batch {batch};").strip()
        batch //= 2
    else:
        return Row(preset, name, 0, seq_len, math.nan, math.nan, math.nan, math.nan, note + " does not fit")
    tokens = batch * seq_len
    n_predicted = round(0.15 * batch * (seq_len - 1))
    flops = training_flops(n_params, n_layers, hidden, batch, seq_len, n_views=2, vocab_size=vocab_size,
                           n_predicted=n_predicted)
    mfu = flops / step_s / peak_flops if peak_flops else math.nan
    return Row(preset, name, batch, seq_len, step_s, tokens / step_s, mfu, mem, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a few minutes in total on one H100)")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: tiny on CPU; "
                        "mix-geneformer,geneformer-v2-104m on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="cells per step (default: 16 CPU, 32/8 CUDA)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per cell (default: preset max; 256 on CPU)")
    parser.add_argument("--vocab-size", type=int, default=25_426, help="synthetic vocabulary size (Geneformer V1's)")
    parser.add_argument("--corpus", default=None, help="tokenized corpus folder (else synthetic cells)")
    parser.add_argument("--vocab", default=None, help="the corpus vocab.json (sets the vocabulary size)")
    parser.add_argument("--compile", default="auto", choices=["auto", "yes", "no"],
                        help="also time torch.compile (auto: on CUDA)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak (default 790 on CUDA)")
    parser.add_argument("--trainer", action="store_true", help="also measure the `mixgf pretrain` Trainer path")
    parser.add_argument("--rounds", type=int, default=2, help="with --trainer: alternations loop/Trainer")
    parser.add_argument("--workers", type=int, default=0, help="with --trainer: DataLoader workers (data.workers)")
    parser.add_argument("--workdir", default=None, help="with --trainer: folder for the corpus and runs (default: temp)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline stays true fp32
        torch.backends.cudnn.allow_tf32 = False
    presets = (args.presets or ("mix-geneformer,geneformer-v2-104m" if cuda else "tiny")).split(",")
    steps, warmup = (8, 3) if args.quick else (20, 5)
    if not cuda:
        steps, warmup = (4, 1) if args.quick else (8, 2)
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (H100_BF16_PEAK if cuda else None)
    vocab_size = args.vocab_size
    if args.vocab:
        from mixgeneformer.vocab import Vocabulary

        vocab_size = len(Vocabulary.load(args.vocab))
    compile_too = args.compile == "yes" or (args.compile == "auto" and cuda)

    from mixgeneformer.model import PRESETS

    rows: list[Row] = []
    for preset in presets:
        spec = PRESETS[preset]
        seq_len = args.seq_len or (spec["max_position_embeddings"] if cuda else 256)
        batch = args.batch or ((32 if spec["hidden_size"] <= 256 else 8) if cuda else 16)
        n_cells = max(batch * (steps + warmup), batch)
        cells = (corpus_cells(args.corpus, n_cells, seq_len) if args.corpus
                 else synthetic_cells(min(n_cells, 4 * batch), seq_len, vocab_size))
        layers, hidden = spec["num_hidden_layers"], spec["hidden_size"]
        common = dict(preset=preset, cells=cells, seq_len=seq_len, steps=steps, warmup=warmup, device=device,
                      vocab_size=vocab_size, n_layers=layers, hidden=hidden, peak_flops=peak)
        if not args.no_baseline:
            rows.append(run_variant("eager fp32 (baseline)", lambda p=preset, s=seq_len: baseline_step_fn(p, vocab_size, s, device),
                                    batch=batch, **common))
            print(_fmt(rows[-1]), flush=True)
        label = "ours bf16 sdpa" if cuda else "ours fp32 sdpa"
        rows.append(run_variant(label, lambda p=preset, s=seq_len: ours_step_fn(p, vocab_size, s, device, cuda, False),
                                batch=batch, **common))
        print(_fmt(rows[-1]), flush=True)
        if compile_too:
            rows.append(run_variant(label + " +compile",
                                    lambda p=preset, s=seq_len: ours_step_fn(p, vocab_size, s, device, cuda, True),
                                    batch=batch, **common))
            print(_fmt(rows[-1]), flush=True)
        if args.trainer:
            rows.extend(trainer_rows(args, preset, cells, batch, seq_len, steps, warmup, vocab_size, compile_too, common))

    print()
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}; torch {torch.__version__}; "
          f"data: {'corpus ' + args.corpus if args.corpus else 'synthetic rank-value cells'}; vocab {vocab_size:,}; "
          f"steps {steps} after {warmup} warm-up; MFU vs {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16")
    header = f"{'preset':<20} {'variant':<28} {'batch':>5} {'seq':>5} {'s/step':>8} {'tokens/s':>11} " \
             f"{'vs base':>7} {'MFU':>6} {'mem GB':>7}  note"
    print(header)
    print("-" * len(header))
    base = {r.preset: r.tokens_per_s for r in rows if r.variant.startswith("eager")}
    for r in rows:
        speedup = r.tokens_per_s / base[r.preset] if r.preset in base and base[r.preset] == base[r.preset] else math.nan
        print(_fmt(r, speedup))


def trainer_rows(args, preset, cells, batch, seq_len, steps, warmup, vocab_size, compile_too, common) -> list[Row]:
    """The standalone loop and the `mixgf pretrain` path, alternating ``args.rounds`` times."""
    import tempfile

    from mixgeneformer.pretrain import training_flops

    device, cuda = common["device"], common["device"].type == "cuda"
    workdir = args.workdir or tempfile.mkdtemp(prefix="mixgf-bench-")
    loop_rates, trainer_rates, trainer_peak = [], [], float("nan")
    label = ("ours bf16 sdpa" if cuda else "ours fp32 sdpa") + (" +compile" if compile_too else "")
    for _ in range(args.rounds):
        loop = run_variant(label, lambda p=preset, s=seq_len: ours_step_fn(p, vocab_size, s, device, cuda, compile_too),
                           batch=batch, **common)
        loop_rates.append(loop.tokens_per_s)
        rate, trainer_peak = trainer_run(preset, cells, batch, steps, warmup, vocab_size, workdir, compile_too,
                                         args.workers)
        trainer_rates.append(rate)
        print(f"  round: loop {loop.tokens_per_s:,.0f} tokens/s, mixgf pretrain {rate:,.0f} tokens/s "
              f"({rate / loop.tokens_per_s:.3f})", flush=True)
    rows = []
    for name, rates, mem in (("loop, alternating", loop_rates, loop.peak_mem_gb),
                             (f"mixgf pretrain (workers {args.workers})", trainer_rates, trainer_peak)):
        rate = float(np.median(rates))
        n_predicted = round(0.15 * batch * (seq_len - 1))
        flops = training_flops(_flop_params_of(preset, vocab_size, seq_len), common["n_layers"], common["hidden"],
                               batch, seq_len, n_views=2, vocab_size=vocab_size, n_predicted=n_predicted)
        peak = common["peak_flops"]
        mfu = flops * rate / (batch * seq_len) / peak if peak else math.nan
        rows.append(Row(preset, name, batch, seq_len, batch * seq_len / rate, rate, mfu, mem,
                        f"{args.rounds} rounds"))
        print(_fmt(rows[-1]), flush=True)
    ratio = np.median(trainer_rates) / np.median(loop_rates)
    rows[-1].note += f"; mixgf pretrain / loop = {ratio:.3f}"
    return rows


def _flop_params_of(preset: str, vocab_size: int, seq_len: int) -> int:
    model, _ = ours_step_fn(preset, vocab_size, seq_len, torch.device("cpu"), False, False)
    return _non_embedding_params(model)


def _fmt(r: Row, speedup: float = math.nan) -> str:
    return (f"{r.preset:<20} {r.variant:<28} {r.batch:>5} {r.seq_len:>5} {r.step_s:>8.3f} {r.tokens_per_s:>11,.0f} "
            f"{speedup:>6.2f}x {r.mfu * 100:>5.1f}% {r.peak_mem_gb:>7.1f}  {r.note}")


if __name__ == "__main__":
    main()
