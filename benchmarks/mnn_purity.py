"""How often the cross-species term's positives are cells of the same type, by batch size.

The ``"mnn"`` cross-species positives (:func:`mixgeneformer.losses.mutual_nearest_partners`) are
found inside each training batch. This script draws random batches of a tokenized two-species
corpus (the demo's, with its ``cell_type1`` column), pairs cells exactly as pretraining does
(rank-weighted one-to-one-ortholog profiles of the model's vocabulary) and reports, per batch
size, the share of cells that get a partner and the share of partners of the same cell type,
overall and per type (types matched by their canonical names). Labels are used only to score.

Usage::

    python benchmarks/mnn_purity.py --corpus demo_output/tokenize/corpus --model demo_output/pretrain/run/model
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
    parser.add_argument("--batch-sizes", default="16,64,256,1024")
    parser.add_argument("--cells", type=int, default=8192, help="cells drawn per batch size (in batches)")
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
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        paired = same = total = 0
        hits: dict[str, list[int]] = {}
        for _ in range(max(1, args.cells // batch_size)):
            batch = rng.choice(len(ids), size=min(batch_size, len(ids)), replace=False)
            input_ids, mask = pad_batch(flat, starts[batch], lengths[batch], vocab.pad_id)
            with torch.no_grad():
                profiles = model.ortholog_profiles(torch.from_numpy(input_ids), torch.from_numpy(mask))
            partner = losses.mutual_nearest_partners(profiles, torch.from_numpy(codes[batch])).numpy()
            has = partner >= 0
            match = types[batch][has] == types[batch][partner[has]]
            total, paired, same = total + batch.size, paired + int(has.sum()), same + int(match.sum())
            for t, m in zip(types[batch][has], match, strict=True):
                hits.setdefault(str(t), []).append(int(m))
        rows.append({"batch": batch_size, "cells": total, "with_partner": round(paired / total, 3),
                     "same_type_partner": round(same / max(paired, 1), 3)})
        per_type.extend({"batch": batch_size, "type": t, "pairs": len(h), "same_type": round(float(np.mean(h)), 3)}
                        for t, h in sorted(hits.items()))
    table = pd.DataFrame(rows)
    by_type = pd.DataFrame(per_type).pivot(index="type", columns="batch", values="same_type")
    share = pd.Series(types).value_counts(normalize=True).round(3).rename("share_of_cells")
    by_type = by_type.join(share).sort_values("share_of_cells", ascending=False)
    text = "\n".join([
        f"Cross-species positives (mutual nearest cells by rank-weighted ortholog profiles) in random batches of {args.corpus}:",
        "", C.markdown_table(table), "", "Same-type share of the partners, per type (columns: batch size):", "",
        C.markdown_table(by_type.reset_index(), digits=3),
    ])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
