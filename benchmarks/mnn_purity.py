"""How often the cross-species term's positives are cells of the same type, by batch and queue size.

The ``"mnn"`` cross-species positives are found among each training batch plus, with
``model.cross_species_queue`` = P, the P cells of earlier batches
(:func:`mixgeneformer.losses.mutual_nearest_in_pool`). This script draws random batches of a
tokenized two-species corpus (the demo's, with its ``cell_type1`` column), adds P other random
cells as the queue, pairs cells exactly as pretraining does (rank-weighted one-to-one-ortholog
profiles of the model's vocabulary) and reports, per setup ``B`` or ``B+P``, the share of batch
cells that get a partner, the partners per step and the share of partners of the same cell type,
overall and per type (types matched by their canonical names). Labels are used only to score.

Usage::

    python benchmarks/mnn_purity.py --corpus demo_output/tokenize/corpus --model demo_output/pretrain/run/model \
        --setups 16,16+256,16+1024,1024
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer import losses  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.corpus import open_corpus  # noqa: E402
from mixgeneformer.inference import pad_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--label", default="cell_type1")
    parser.add_argument("--setups", default="16,16+256,16+1024,64,1024", help="batch size B, B+P (P queued cells), optionally kK (K-reciprocal pairs)")
    parser.add_argument("--cells", type=int, default=8192, help="batch cells drawn per setup (in batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, vocab, _ = load_bundle(args.model)
    corpus = open_corpus([args.corpus])
    ids, species_names = corpus["input_ids"], np.asarray(corpus["species"])
    types = C.canonical_labels(np.asarray(corpus[args.label]))
    codes = np.where(species_names == "human", 0, np.where(species_names == "mouse", 1, -1))
    lengths = np.asarray([len(x) for x in ids])
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    starts = np.cumsum(lengths) - lengths
    rng = np.random.default_rng(args.seed)
    rows, per_type = [], []
    for setup in [x.strip() for x in args.setups.split(",") if x.strip()]:
        setup_k, _, k = setup.partition("k")
        batch_size, _, queue = setup_k.partition("+")
        batch_size, queue, k = int(batch_size), int(queue or 0), int(k or 1)
        paired = same = total = steps = 0
        hits: dict[str, list[int]] = {}
        for _ in range(max(1, args.cells // batch_size)):
            pool = rng.choice(len(ids), size=min(batch_size + queue, len(ids)), replace=False)
            batch = pool[:batch_size]
            input_ids, mask = (torch.from_numpy(x) for x in pad_batch(flat, starts[pool], lengths[pool], vocab.pad_id))
            classes = model.ortholog_class[input_ids]
            weights = losses.rank_weights(classes, mask)
            norms = losses.sparse_rows_to_dense(classes, weights, model.config.vocab_size).norm(dim=1)
            partner = losses.mutual_nearest_in_pool(
                classes, weights, norms, torch.from_numpy(codes[pool]), n_queries=batch.size, n_classes=model.config.vocab_size, k=k
            ).numpy()
            has = partner >= 0
            match = types[batch][has] == types[pool][partner[has]]
            total, paired, same, steps = total + batch.size, paired + int(has.sum()), same + int(match.sum()), steps + 1
            for t, m in zip(types[batch][has], match, strict=True):
                hits.setdefault(str(t), []).append(int(m))
        rows.append({"setup": setup, "cells": total, "with_partner": round(paired / total, 3),
                     "pairs_per_step": round(paired / steps, 2), "same_type_partner": round(same / max(paired, 1), 3)})
        per_type.extend({"setup": setup, "type": t, "pairs": len(h), "same_type": round(float(np.mean(h)), 3)}
                        for t, h in sorted(hits.items()))
    table = pd.DataFrame(rows)
    by_type = pd.DataFrame(per_type).pivot(index="type", columns="setup", values="same_type")[list(table["setup"])]
    share = pd.Series(types).value_counts(normalize=True).round(3).rename("share_of_cells")
    by_type = by_type.join(share).sort_values("share_of_cells", ascending=False)
    text = "\n".join([
        f"Cross-species positives (mutual nearest cells by rank-weighted ortholog profiles) in random batches of {args.corpus}:",
        "", C.markdown_table(table), "", "Same-type share of the partners, per type (columns: batch B or B+P queued):", "",
        C.markdown_table(by_type.reset_index(), digits=3),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
