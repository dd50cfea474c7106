"""How often the cross-species term's positives are cells of the same type, by batch and queue size.

The ``"mnn"`` cross-species positives are found among each training batch plus, with
``model.cross_species_queue`` = P, the P cells of earlier batches
(:func:`mixgeneformer.losses.mutual_nearest_in_pool`). This script draws random batches of a
tokenized two-species corpus (the demo's, with its ``cell_type1`` column), adds P other random
cells as the queue, pairs cells exactly as pretraining does (rank-weighted one-to-one-ortholog
profiles of the model's vocabulary) and reports, per setup ``B`` or ``B+P``, the share of batch
cells that get a partner, the partners per step and the share of partners of the same cell type,
overall and per type (types matched by their canonical names). Labels are used only to score.

Batches and queues are drawn only from the cells that no split of ``--exclude-test-seeds`` (the
demo's classify seeds 0-2) tests on (:func:`mixgeneformer.classify.tested_rows` on the files of
``--data``, which the corpus must have been tokenized from; its rows are matched by ``species`` and
``cell_index``), so a pairing setup chosen here is chosen without the demo's test cells.

Usage::

    python benchmarks/mnn_purity.py --corpus demo_output/tokenize/corpus --model demo_output/pretrain/run/model \
        --setups 16,16+256,16+1024,1024 --out benchmarks/results/mnn_purity.txt
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py must not shadow the standard library's ``tokenize``: drop this folder.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mixgeneformer import classify as C  # noqa: E402
from mixgeneformer import losses  # noqa: E402
from mixgeneformer.bundle import load_bundle  # noqa: E402
from mixgeneformer.classify.labels import MISSING_TEXT  # noqa: E402
from mixgeneformer.corpus import open_corpus  # noqa: E402
from mixgeneformer.demo import demo_data_dir  # noqa: E402
from mixgeneformer.errors import InputDataError  # noqa: E402
from mixgeneformer.inference import pad_batch  # noqa: E402
from mixgeneformer.integration import (  # noqa: E402
    add_overwrite_argument,
    check_benchmark_out,
    write_benchmark_files,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with the baron_pancreas_<species>.h5ad the corpus was tokenized from (default: the demo's)")
    parser.add_argument("--label", default="cell_type1")
    parser.add_argument("--setups", default="16,16+256,16+1024,64,1024", help="batch size B, B+P (P queued cells), optionally kK (K-reciprocal pairs)")
    parser.add_argument("--cells", type=int, default=8192, help="batch cells drawn per setup (in batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude-test-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="split seeds of the demo's classification whose test cells are never drawn (none given: every cell)")
    parser.add_argument("--out", type=Path, default=None)
    add_overwrite_argument(parser)
    return parser.parse_args(argv)


def read_data(folder: Path, species: np.ndarray) -> dict[str, ad.AnnData]:
    """``baron_pancreas_<species>.h5ad`` of ``folder`` for each species of the corpus."""
    paths = {str(s): folder / f"baron_pancreas_{s}.h5ad" for s in species}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputDataError(f"no {', '.join(missing)}: the corpus's cells are matched to the files they were tokenized "
                             "from. Pass --data the folder holding baron_pancreas_<species>.h5ad for each species of the corpus.")
    return {s: ad.read_h5ad(p) for s, p in paths.items()}


def _no_missing(types: np.ndarray) -> np.ndarray:
    """Canonical labels with every text that means "no label" (a file's NaN, a corpus's None) as ""."""
    return np.where(np.isin(types, list(MISSING_TEXT)), "", types)


def scored_cells(species: np.ndarray, cell_index: np.ndarray, types: np.ndarray, data: dict[str, ad.AnnData],
                 label: str, seeds: list[int]) -> np.ndarray:
    """Corpus positions of the cells that no split of ``seeds`` tests on (:func:`C.tested_rows` on
    ``data[species]``, labels ``label``); ``types`` (the corpus's canonical labels) must match
    ``data``'s at each row's ``cell_index``, else the corpus was not tokenized from ``data``."""
    keep = np.ones(species.size, dtype=bool)
    for name in np.unique(species):
        mine = species == name
        adata = data.get(str(name))
        rows = cell_index[mine]
        if adata is None or rows.max() >= adata.n_obs or (
            _no_missing(C.canonical_labels(np.asarray(adata.obs[label], dtype=object)[rows])) != _no_missing(types[mine])
        ).any():
            raise InputDataError(
                f"the corpus's {name} cells do not match {'any file' if adata is None else 'their file'} of --data (their "
                f"{label!r} labels at their cell_index differ): the corpus was tokenized from other files. "
                "Pass --data the folder of the files the corpus was tokenized from."
            )
        keep[mine] = ~np.isin(rows, C.tested_rows(adata, C.LabelConfig(key=label), seeds))
    return np.flatnonzero(keep)


def setup_scores(setup: str, cells: np.ndarray, corpus: dict, model, vocab, args, rng) -> tuple[dict, list[dict]]:  # noqa: ANN001
    """One setup ``B[+P][kK]``: batches (and queues) drawn from ``cells`` only -> (summary row, per-type rows)."""
    setup_k, _, k = setup.partition("k")
    batch_size, _, queue = setup_k.partition("+")
    batch_size, queue, k = int(batch_size), int(queue or 0), int(k or 1)
    flat, starts, lengths, codes, types = (corpus[key] for key in ("flat", "starts", "lengths", "codes", "types"))
    paired = same = total = steps = 0
    hits: dict[str, list[int]] = {}
    for _ in range(max(1, args.cells // batch_size)):
        pool = cells[rng.choice(cells.size, size=min(batch_size + queue, cells.size), replace=False)]
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
    row = {"setup": setup, "cells": total, "with_partner": round(paired / total, 3),
           "pairs_per_step": round(paired / steps, 2), "same_type_partner": round(same / max(paired, 1), 3)}
    return row, [{"setup": setup, "type": t, "pairs": len(h), "same_type": round(float(np.mean(h)), 3)} for t, h in sorted(hits.items())]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_benchmark_out([args.out], args.overwrite)
    model, vocab, _ = load_bundle(args.model)
    dataset = open_corpus([args.corpus])
    ids, species_names = dataset["input_ids"], np.asarray(dataset["species"])
    types = C.canonical_labels(np.asarray(dataset[args.label]))
    data = read_data(args.data or demo_data_dir(), np.unique(species_names))
    cells = scored_cells(species_names, np.asarray(dataset["cell_index"]), types, data, args.label, args.exclude_test_seeds)
    lengths = np.asarray([len(x) for x in ids])
    corpus = {"flat": np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]), "starts": np.cumsum(lengths) - lengths,
              "lengths": lengths, "types": types,
              "codes": np.where(species_names == "human", 0, np.where(species_names == "mouse", 1, -1))}
    rng = np.random.default_rng(args.seed)
    rows, per_type = [], []
    for setup in [x.strip() for x in args.setups.split(",") if x.strip()]:
        row, setup_types = setup_scores(setup, cells, corpus, model, vocab, args, rng)
        rows.append(row)
        per_type.extend(setup_types)
    table = pd.DataFrame(rows)
    by_type = pd.DataFrame(per_type).pivot(index="type", columns="setup", values="same_type")[list(table["setup"])]
    share = pd.Series(types[cells]).value_counts(normalize=True).round(3).rename("share_of_cells")
    by_type = by_type.join(share).sort_values("share_of_cells", ascending=False)
    text = "\n".join([
        f"Cross-species positives (mutual nearest cells by rank-weighted ortholog profiles) in random batches of {args.corpus}, "
        f"drawn from its {cells.size} of {len(ids)} cells that no split of seeds {args.exclude_test_seeds or 'none'} tests on:",
        "", C.markdown_table(table), "", "Same-type share of the partners, per type (columns: batch B or B+P queued):", "",
        C.markdown_table(by_type.reset_index(), digits=3),
    ])
    print(text)
    if args.out:
        write_benchmark_files({args.out: text + "\n"}, args.overwrite)


if __name__ == "__main__":
    main()
