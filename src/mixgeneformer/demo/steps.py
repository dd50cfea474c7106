"""The demo steps: each calls one stage's public API (the same functions its CLI command calls)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import torch

from .. import classify as clf
from .. import perturb as pt
from .. import plots
from ..bundle import load_bundle
from ..config import save_config
from ..devices import resolve_device
from ..diagnostics import final_evaluation
from ..embed import embed_anndata
from ..errors import ArtifactError, ConfigError
from ..fileio import read_h5ad, write_h5ad, write_json
from ..integration import shared_type_mixing
from ..medians import GeneMedians, compute_medians
from ..parallel import worker_pool
from ..pretrain import pretrain_config_from_dict, read_metrics, run_pretraining
from ..tokenize import TokenizeConfig, tokenize_files
from ..vocab import Vocabulary, build_vocabulary
from .config import (
    DEMO_EVAL_FRACTION,
    EMBED_KEY,
    SPECIES,
    DemoConfig,
    capped_rows,
    demo_data_dir,
    finetune_config,
)
from .context import _Context


def _input_paths(ctx: _Context) -> dict[str, Path]:
    return {s: Path(p) for s, p in ctx.results["data"]["inputs"].items()}


def _tokenize_config(cfg: DemoConfig) -> TokenizeConfig:
    return TokenizeConfig(max_len=cfg.max_len)


def _step_data(ctx: _Context, folder: Path) -> dict[str, Any]:
    cfg = ctx.config
    source = Path(cfg.data_dir) if cfg.data_dir is not None else demo_data_dir()
    inputs, cells, types = {}, {}, {}
    for species in SPECIES:
        path = source / f"baron_pancreas_{species}.h5ad"
        if not path.is_file():
            raise ArtifactError(f"demo input {path} not found; set data_dir to a folder holding baron_pancreas_{species}.h5ad.")
        adata = read_h5ad(path, "demo input")
        if cfg.label_key not in adata.obs.columns:
            raise ConfigError(f"{path} has no obs column {cfg.label_key!r} (label_key); columns: {list(adata.obs.columns)}.")
        if cfg.cells_per_type is not None:
            adata = adata[capped_rows(adata.obs[cfg.label_key], cfg.cells_per_type, cfg.seed)].copy()
            path = folder / f"baron_pancreas_{species}.h5ad"
            write_h5ad(adata, path)
        inputs[species] = str(path.resolve())
        cells[species] = int(adata.n_obs)
        types[species] = {str(k): int(v) for k, v in adata.obs[cfg.label_key].value_counts().items()}
        print(f"{species}: {adata.n_obs} cells x {adata.n_vars} genes from {path}", flush=True)
    _check_perturb_states(cfg, types[cfg.perturb_species])
    write_json(folder / "inputs.json", {"inputs": inputs, "cells": cells, "cell_types": types})
    return {"inputs": inputs, "cells": cells, "cell_types": types, "source": str(source)}


def _check_perturb_states(cfg: DemoConfig, types: dict[str, int]) -> None:
    """The perturbation's cell types exist, checked here rather than after pretraining."""
    missing = [t for t in (cfg.perturb_start, cfg.perturb_goal, *cfg.perturb_alternatives) if t not in types]
    if missing:
        raise ConfigError(
            f"demo perturb_start / perturb_goal / perturb_alternatives name cell types {missing} that the "
            f"{cfg.perturb_species} data lacks; its {cfg.label_key} types: {sorted(types)}."
        )


def _step_vocab(ctx: _Context, folder: Path) -> dict[str, Any]:
    vocab = build_vocabulary(ctx.config.vocab_mode, ctx.config.gene_set)
    path = vocab.save(folder / "vocab.json")
    print(f"vocabulary: {vocab}", flush=True)
    return {"path": str(Path(path).resolve()), "size": len(vocab), "mode": vocab.mode, "hash": vocab.hash}


def _step_medians(ctx: _Context, folder: Path) -> dict[str, Any]:
    paths = _input_paths(ctx)
    medians = compute_medians([str(paths[s]) for s in SPECIES], workers=ctx.config.workers, progress=ctx.progress)
    stats = medians.stats
    path = folder / "medians.tsv"
    medians.save(path)
    print(f"medians of {len(medians):,} genes from {stats.total_cells:,} cells", flush=True)
    return {"path": str(path.resolve()), "n_genes": len(medians), "n_cells": int(stats.total_cells), "hash": medians.hash}


def _step_tokenize(ctx: _Context, folder: Path) -> dict[str, Any]:
    vocab = Vocabulary.load(ctx.results["vocab"]["path"])
    medians = GeneMedians.load(ctx.results["medians"]["path"])
    paths = _input_paths(ctx)
    corpus = folder / "corpus"
    tokenize_files(
        [str(paths[s]) for s in SPECIES], corpus, vocab, medians, _tokenize_config(ctx.config),
        obs_columns=(ctx.config.label_key,), workers=ctx.config.workers, overwrite=True, progress=ctx.progress,
    )

    dataset = datasets.load_from_disk(str(corpus))
    lengths = np.asarray(dataset.with_format("numpy")["length"])
    species = pd.Series(dataset["species"]).value_counts()
    return {
        "corpus": str(corpus.resolve()),
        "n_cells": len(dataset),
        "cells_per_species": {str(k): int(v) for k, v in species.items()},
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
    }


def _pretrain_config(ctx: _Context, folder: Path) -> Any:
    cfg = ctx.config
    steps = cfg.pretrain_steps
    return pretrain_config_from_dict(
        {
            "output_dir": str((folder / "run").resolve()),
            "data": {
                "corpus": [ctx.results["tokenize"]["corpus"]],
                "vocab": ctx.results["vocab"]["path"],
                "medians": ctx.results["medians"]["path"],
                "eval_fraction": DEMO_EVAL_FRACTION,
            },
            "model": {"preset": cfg.preset, "overrides": dict(cfg.model_overrides)},
            "objective": {"contrastive_weight": cfg.contrastive_weight, "pooling": cfg.pooling,
                          "cross_species_weight": cfg.cross_species_weight,
                          "cross_species_queue": cfg.cross_species_queue, "cross_species_k": cfg.cross_species_k},
            "train": {
                "learning_rate": cfg.learning_rate,
                "warmup_steps": cfg.warmup_steps,
                "mlm_bias_init": cfg.mlm_bias_init,
                "per_device_batch_size": cfg.batch_size,
                "max_steps": steps,
                "seed": cfg.seed,
            },
            "checkpoint": {"save_steps": max(1, steps // 2), "keep": 1},
            "logging": {"logging_steps": max(1, min(10, steps // 10)), "eval_steps": max(1, steps // 8),
                        "tensorboard": False, "progress_bar": ctx.progress},
        }
    )


def _step_pretrain(ctx: _Context, folder: Path) -> dict[str, Any]:
    config = _pretrain_config(ctx, folder)
    save_config(config, folder, "pretrain.yaml")
    result = run_pretraining(config, resume=True)
    figure = folder / "training_curves.png"
    plots.training_curves(result.metrics_csv, title="Mix-Geneformer demo pretraining (MLM + SimCSE)", save=figure)
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "config": str((folder / "pretrain.yaml").resolve()),
        "bundle": str(result.bundle_dir),
        "metrics_csv": str(result.metrics_csv),
        "steps": int(result.global_step),
        "first_loss": float(losses[0]) if losses else None,
        "final_loss": float(losses[-1]) if losses else result.final_loss,
        "held_out": final_evaluation(rows, config.logging.rank_bucket),
        "figures": {"training_curves": str(figure.resolve())},
    }


def _load_inputs(ctx: _Context) -> dict[str, ad.AnnData]:
    return _read_inputs(ctx.results["data"]["inputs"])


def _read_inputs(paths: dict[str, str | Path]) -> dict[str, ad.AnnData]:
    return {s: read_h5ad(p, f"demo input ({s})") for s, p in paths.items()}


def _step_embed(ctx: _Context, folder: Path) -> dict[str, Any]:
    cfg = ctx.config
    bundle = ctx.results["pretrain"]["bundle"]
    parts, files = [], {}
    for species, adata in _load_inputs(ctx).items():
        embed_anndata(
            adata, bundle, key=EMBED_KEY, layer=cfg.embed_layer, pooling=cfg.pooling, species=species,
            tokenize_config=_tokenize_config(ctx.config),
            device=cfg.device, progress=ctx.progress,
        )
        path = folder / f"{species}.h5ad"
        write_h5ad(adata, path)
        files[species] = str(path.resolve())
        obs = pd.DataFrame({"cell_type": adata.obs[cfg.label_key].astype(str).to_numpy(), "species": species},
                           index=adata.obs_names)
        parts.append(ad.AnnData(obs=obs, obsm={EMBED_KEY: np.asarray(adata.obsm[EMBED_KEY])}))
    both = ad.concat(parts, index_unique="-")
    write_h5ad(both, folder / "both_species.h5ad")
    mixing = _species_mixing(both)
    figure = folder / "umap.png"
    plots.umap(both, color="cell_type", species="species", key=EMBED_KEY, n_neighbors=cfg.umap_neighbors,
               random_state=cfg.seed, title="Mix-Geneformer cell embeddings (human + mouse)", save=figure)
    n_nan = int((~np.isfinite(both.obsm[EMBED_KEY]).all(axis=1)).sum())
    return {
        "files": files,
        "n_cells": int(both.n_obs),
        "dim": int(both.obsm[EMBED_KEY].shape[1]),
        "cells_without_embedding": n_nan,
        "species_mixing": mixing,
        "figures": {"umap": str(figure.resolve())},
    }


def _species_mixing(both: ad.AnnData) -> dict[str, Any]:
    """Species mixing of the embedding within the cell types both species share (integration.shared_type_mixing)."""
    species = both.obs["species"].to_numpy().astype(str)
    by_species = {s: species == s for s in SPECIES}
    scores, n_cells, shared = shared_type_mixing(
        {s: both.obsm[EMBED_KEY][rows] for s, rows in by_species.items()},
        {s: both.obs["cell_type"].to_numpy()[rows] for s, rows in by_species.items()},
    )
    return {**scores, "n_cells": n_cells, "shared_types": shared}


CLASSIFY_SETTINGS = (("human", "human"), ("mouse", "mouse"), ("mouse", "human"), ("human", "mouse"))


def _setting_name(source: str, target: str) -> str:
    return f"{source} (within)" if source == target else f"{source} → {target}"


def _setting_slug(source: str, target: str) -> str:
    return f"{source}_within" if source == target else f"{source}_to_{target}"


def _classify_config(cfg: DemoConfig, seed: int | None = None) -> clf.ClassifyConfig:
    return clf.ClassifyConfig(
        labels=clf.LabelConfig(
            key=cfg.label_key, seed=cfg.classify_seeds[0] if seed is None else seed, transfer_split=True,
            min_class_count=cfg.min_class_count,
        ),
        embedding=clf.EmbeddingConfig(layer=cfg.embed_layer, pooling=cfg.pooling),
        finetune=finetune_config(cfg),
    )


@dataclass(frozen=True)
class _ClassifyJob:
    """One classification setting of one seed: everything a worker process needs to run it."""

    config: DemoConfig
    bundle: str
    inputs: dict[str, str]
    seed: int
    source: str
    target: str
    folder: Path


@functools.lru_cache(maxsize=1)
def _job_inputs(bundle: str, inputs: tuple[tuple[str, str], ...]) -> tuple[Any, Vocabulary, GeneMedians | None, dict[str, ad.AnnData]]:
    """The model and the data of a worker (loaded once per process)."""
    model, vocab, medians = load_bundle(bundle)
    return model, vocab, medians, _read_inputs(dict(inputs))


def _run_classify_job(job: _ClassifyJob) -> tuple[pd.DataFrame, list[str], str | None]:
    """Run one setting with one torch thread, whichever process runs it, so results do not depend on
    ``workers``. Returns its score table, the task's notes and its kNN confusion figure (first seed)."""
    cfg, source, target = job.config, job.source, job.target
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, vocab, medians, adatas = _job_inputs(job.bundle, tuple(sorted(job.inputs.items())))
        run = clf.run_classification(
            adatas[source], model, vocab, medians, test=None if source == target else adatas[target],
            methods=_classify_methods(cfg), baseline_methods=("logreg_counts", "knn_pca", "logreg_tokens"),
            config=_classify_config(cfg, job.seed), tokenize_config=_tokenize_config(cfg), device=cfg.device,
        )
    finally:
        torch.set_num_threads(threads)
    name, slug = _setting_name(source, target), _setting_slug(source, target)
    figure = None
    if job.seed == cfg.classify_seeds[0]:  # one seed's full outputs; the others' scores are in metrics_per_seed.csv
        clf.save_run(run, job.folder / slug / f"seed_{job.seed}", overwrite=True)
        knn = job.folder / slug / f"seed_{job.seed}" / "confusion_knn.png"  # kNN on frozen embeddings: the paper's zero-shot protocol
        figure = str(knn.resolve()) if knn.exists() else None
    table = run.table()
    print(f"-- {name}, seed {job.seed}\n{clf.markdown_table(table)}", flush=True)
    table["method"] = table["method"].map(lambda m: f"mixgf_{m}" if m in _classify_methods(cfg) else m)
    table.insert(0, "setting", table.pop("setting").map(lambda _s, n=name: n))
    table.insert(1, "seed", job.seed)
    table.insert(3, "n_train", int(run.task.train_rows.size))
    table.insert(4, "n_test", int(run.task.test_rows.size))
    return table, list(run.task.notes), figure


def _classify_methods(cfg: DemoConfig) -> tuple[str, ...]:
    return ("knn", "logreg", "finetune") if cfg.finetune_epochs > 0 else ("knn", "logreg")


def _step_classify(ctx: _Context, folder: Path) -> dict[str, Any]:
    cfg = ctx.config
    save_config(_classify_config(cfg), folder)
    # One split per species and seed; transfer trains on the source's training cells and tests on
    # the target's test cells (labels.transfer_split), so every row of a target species is scored
    # on the same cells. Settings run in `workers` processes of one thread each (on CPU).
    jobs = [
        _ClassifyJob(cfg, ctx.results["pretrain"]["bundle"], ctx.results["data"]["inputs"], seed, source, target, folder)
        for seed in cfg.classify_seeds
        for source, target in CLASSIFY_SETTINGS
    ]
    if cfg.workers > 1 and resolve_device(cfg.device).type == "cpu":
        with worker_pool(min(cfg.workers, len(jobs))) as pool:
            outputs = list(pool.map(_run_classify_job, jobs))
    else:
        outputs = [_run_classify_job(job) for job in jobs]
        _job_inputs.cache_clear()  # the model and data of the jobs are not kept for the later steps
    tables, figures, notes = [], {}, {}
    for job, (table, job_notes, figure) in zip(jobs, outputs, strict=True):
        name, slug = _setting_name(job.source, job.target), _setting_slug(job.source, job.target)
        tables.append(table)
        notes.setdefault(name, job_notes)
        if figure is not None:
            figures.setdefault(f"confusion_{slug}", figure)
    per_seed = pd.concat(tables, ignore_index=True)
    per_seed.to_csv(folder / "metrics_per_seed.csv", index=False)
    table = clf.seed_summary(per_seed)
    table.to_csv(folder / "metrics.csv", index=False)
    write_json(folder / "notes.json", notes)
    return {
        "table": table.to_dict(orient="records"),
        "per_seed": per_seed.to_dict(orient="records"),
        "seeds": list(cfg.classify_seeds),
        "figures": figures,
        "notes": notes,
    }


def _step_perturb(ctx: _Context, folder: Path) -> dict[str, Any]:
    cfg = ctx.config
    adata = _load_inputs(ctx)[cfg.perturb_species]
    model, vocab, medians = load_bundle(ctx.results["pretrain"]["bundle"])
    config = pt.PerturbConfig(
        perturb="delete", state_column=cfg.label_key, start=cfg.perturb_start, goal=cfg.perturb_goal,
        alternatives=list(cfg.perturb_alternatives), cells_per_state=cfg.perturb_cells, layer=cfg.embed_layer,
        pooling=cfg.pooling, device=cfg.device, species=cfg.perturb_species, seed=cfg.seed,
    )
    result, _ = pt.perturb_anndata(
        adata, model, config, vocab=vocab, medians=medians, tokenize_config=_tokenize_config(ctx.config),
        stats_mode="aggregate", progress=ctx.progress,
    )
    stats = pt.perturbation_statistics(result.cells, vocab, mode="vs_all")
    pt.write_results(folder / "results", result, stats, config, vocab, overwrite=True)
    # The report ranks genes deleted in enough cells to be tested meaningfully (a gene seen in a
    # single cell cannot reach significance, and its one shift is noise).
    min_cells = max(2, min(cfg.perturb_cells // 4, int(stats["n_cells"].max())))
    ranked = stats[stats["n_cells"] >= min_cells]
    score = _first_present(ranked, ("mean_goal_shift", "mean_shift"))
    figure = folder / "perturbation_ranking.png"
    plots.perturbation_ranking(
        ranked, top=20, score=score, label=_first_present(ranked, ("symbol", "perturbed")),
        title=f"Deleting each gene in {cfg.perturb_species} {cfg.perturb_start} cells: shift toward "
        f"{cfg.perturb_goal}\n(genes deleted in ≥{min_cells} cells; * FDR < 0.05)",
        save=figure,
    )
    columns = [c for c in ("symbol", "ensembl_id", "n_cells", "mean_goal_shift", "mean_shift", "p_value", "fdr") if c in ranked]
    top = ranked.reindex(ranked[score].abs().sort_values(ascending=False).index).head(10)[columns]
    return {
        "summary": result.summary,
        "n_genes_tested": int(len(stats)),
        "min_cells_ranked": int(min_cells),
        "n_significant_fdr_0.05": int((stats["fdr"] < 0.05).sum()) if "fdr" in stats.columns else None,
        "top_genes": top.to_dict(orient="records"),
        "figures": {"perturbation_ranking": str(figure.resolve())},
    }


def _first_present(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


_STEP_FUNCS: dict[str, Callable[[_Context, Path], dict[str, Any]]] = {
    "data": _step_data,
    "vocab": _step_vocab,
    "medians": _step_medians,
    "tokenize": _step_tokenize,
    "pretrain": _step_pretrain,
    "embed": _step_embed,
    "classify": _step_classify,
    "perturb": _step_perturb,
}
