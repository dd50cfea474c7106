"""The end-to-end demo: shipped human + mouse pancreas cells → a pretrained model → a report.

:func:`run_demo` is a thin orchestration over the same Python API the ``mixgf`` commands use; it
re-implements nothing. Each step writes into ``out_dir/<step>/`` and, last, a ``STEP_DONE.json``
marker holding its results and timing, so an interrupted or repeated run resumes after the last
finished step (the pretraining step also resumes from its newest complete checkpoint)::

    out_dir/
      mixgf_demo.json   the resolved DemoConfig and its hash (a rerun must use the same config)
      data/             the input files used (quick mode: a per-cell-type subsample of them)
      vocab/            vocab.json                               (mixgf vocab build)
      medians/          medians.tsv                              (mixgf medians)
      tokenize/         corpus/ (both species, one HF dataset)   (mixgf tokenize)
      pretrain/         pretrain.yaml, run/ (checkpoints, metrics.csv, model/ bundle)  (mixgf pretrain)
      embed/            <species>.h5ad with obsm["X_mixgeneformer"], umap.png           (mixgf embed)
      classify/         metrics.csv, per-class reports, confusion matrices              (mixgf classify)
      perturb/          per-cell shifts, per-gene statistics, ranking figure            (mixgf perturb)
      report/           report.md, report.html, metrics.json, figures/

Steps, in order: ``data``, ``vocab``, ``medians``, ``tokenize``, ``pretrain``, ``embed``,
``classify``, ``perturb``, then the report (always rewritten).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .config import from_dict, save_config, to_dict
from .errors import ArtifactError, ConfigError
from .fileio import content_hash, read_json, write_json

logger = logging.getLogger(__name__)

__all__ = ["DEMO_STEPS", "DemoConfig", "capped_rows", "demo_data_dir", "run_demo", "write_report"]

DEMO_STEPS = ("data", "vocab", "medians", "tokenize", "pretrain", "embed", "classify", "perturb")
SPECIES = ("human", "mouse")
DONE_MARKER = "STEP_DONE.json"
DEMO_MARKER = "mixgf_demo.json"
EMBED_KEY = "X_mixgeneformer"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    """Sizes and options of the demo (the defaults fit a 2-core CPU in well under 15 minutes).

    Attributes
    ----------
    data_dir
        Folder with ``baron_pancreas_human.h5ad`` and ``baron_pancreas_mouse.h5ad`` (raw counts,
        gene symbols, obs ``cell_type1``); default the dataset shipped in the package.
    cells_per_type
        Cap each cell type at this many cells (seeded); ``None`` uses every shipped cell.
    label_key
        obs column of cell types.
    vocab_mode, gene_set
        :func:`mixgeneformer.vocab.build_vocabulary` options. ``"ortholog"`` ties each 1:1
        human–mouse ortholog pair to one token, which a small demo model needs to transfer
        labels across species; ``"separate"`` is the paper's vocabulary.
    max_len
        Tokens kept per cell (top-ranked genes); short sequences keep CPU pretraining cheap.
    preset, model_overrides
        Model preset of :data:`mixgeneformer.model.PRESETS` and config overrides.
    pretrain_steps, batch_size, learning_rate, warmup_steps, contrastive_weight
        Pretraining budget and objective (MLM + SimCSE with this weight).
    pooling, embed_layer
        Cell representation: the SimCSE term is trained on ``pooling`` of the last layer, and cells
        are embedded (UMAP, zero-shot classification, perturbation) from hidden state
        ``embed_layer``. The demo pools by the mean over genes of the last layer, so the contrastive
        objective shapes exactly the embedding used downstream (a 2-layer model's second-to-last
        layer, Geneformer's default, is only its first block).
    finetune_epochs
        Most fine-tuning epochs per classification setting and seed, with the library's recipe
        (validation split from the training cells, best epoch by validation macro-F1, early
        stopping, class weights; :class:`mixgeneformer.classify.FinetuneConfig`). 0 skips
        fine-tuning; zero-shot kNN / logistic regression and the count baselines always run.
    finetune_overrides
        Further :class:`~mixgeneformer.classify.FinetuneConfig` options of the demo's fine-tuning
        (``benchmarks/results/demo_budget_finetune.txt`` measured them).
    classify_seeds
        Seeds of the classification splits (and of fine-tuning): every classification number in
        the report is a mean ± sd over them. Cross-species settings train on the source's
        training split and test on the target's test split of the same seed.
    perturb_species, perturb_start, perturb_goal, perturb_alternatives, perturb_cells
        In silico deletion of every gene in ``perturb_cells`` cells of type ``perturb_start``,
        scored by the shift toward the mean embedding of ``perturb_goal`` cells.
    umap_neighbors
        ``n_neighbors`` of the UMAP figures.
    seed
        Seed of subsampling, pretraining, splits and perturbation cell sampling.
    device
        Torch device for embedding, classification and perturbation (``None``: CUDA when
        available). Pretraining uses the Trainer's device choice.
    workers
        Worker processes of the median and tokenization stages.
    quick
        Set by :meth:`quick_config` (recorded in the report).
    """

    data_dir: Path | None = None
    cells_per_type: int | None = None
    label_key: str = "cell_type1"
    vocab_mode: Literal["separate", "ortholog"] = "ortholog"
    gene_set: Literal["protein_coding", "all"] = "protein_coding"
    max_len: int = 128
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"max_position_embeddings": 512})
    pretrain_steps: int = 1600
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 40
    contrastive_weight: float = 1.0
    pooling: Literal["mean"] = "mean"
    embed_layer: int = -1
    finetune_epochs: float = 5.0
    finetune_overrides: dict[str, Any] = field(default_factory=dict)
    classify_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    perturb_species: Literal["human", "mouse"] = "human"
    perturb_start: str = "beta"
    perturb_goal: str = "alpha"
    perturb_alternatives: list[str] = field(default_factory=lambda: ["ductal"])
    perturb_cells: int = 20
    umap_neighbors: int = 15
    seed: int = 0
    device: str | None = None
    workers: int = 1
    quick: bool = False

    def __post_init__(self) -> None:
        positive = {
            "max_len": self.max_len,
            "pretrain_steps": self.pretrain_steps,
            "batch_size": self.batch_size,
            "perturb_cells": self.perturb_cells,
            "umap_neighbors": self.umap_neighbors,
            "workers": self.workers,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"demo.{name} must be >= 1, got {value}.")
        if self.cells_per_type is not None and self.cells_per_type < 2:
            raise ConfigError(f"demo.cells_per_type must be >= 2 (or None for all cells), got {self.cells_per_type}.")
        if self.finetune_epochs < 0 or self.warmup_steps < 0:
            raise ConfigError("demo.finetune_epochs and demo.warmup_steps must be >= 0.")
        from .classify import FinetuneConfig

        from_dict(FinetuneConfig, {"epochs": max(self.finetune_epochs, 1.0), **self.finetune_overrides}, "demo.finetune_overrides")
        if not self.classify_seeds or len(set(self.classify_seeds)) != len(self.classify_seeds):
            raise ConfigError(f"demo.classify_seeds must be distinct seeds, at least one; got {self.classify_seeds}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"demo.learning_rate must be > 0, got {self.learning_rate}.")
        if self.perturb_start == self.perturb_goal:
            raise ConfigError(
                f"demo.perturb_start and demo.perturb_goal are both {self.perturb_start!r}; choose two cell types."
            )

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """A reduced demo for CI (a few minutes on 2 cores): fewer cells, steps and genes per cell."""
        values: dict[str, Any] = dict(
            cells_per_type=30,
            max_len=64,
            pretrain_steps=40,
            batch_size=16,
            warmup_steps=5,
            finetune_epochs=2.0,
            classify_seeds=[0, 1],
            perturb_cells=4,
            umap_neighbors=10,
            quick=True,
        )
        values.update(overrides)
        return from_dict(cls, values, "demo")

    def fingerprint(self) -> str:
        """Hash of every option that changes results (``device`` and ``workers`` do not)."""
        values = to_dict(self)
        values.pop("device")
        values.pop("workers")
        return content_hash(json.dumps(values, sort_keys=True))


def demo_data_dir() -> Path:
    """The folder of the shipped demo dataset (Baron et al. 2016 pancreas, human + mouse)."""
    return Path(str(resources.files("mixgeneformer") / "data" / "demo"))


def capped_rows(labels: pd.Series | np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Row positions keeping at most ``cap`` cells per label (a seeded random subset), ascending.

    Labels with at most ``cap`` cells are kept whole, so rare types survive.
    """
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(pd.Series(np.asarray(labels)).astype(str), sort=True)
    keep = np.zeros(codes.size, dtype=bool)
    for code in range(uniques.size):  # one iteration per label, not per cell
        rows = np.flatnonzero(codes == code)
        if rows.size > cap:
            rows = rng.choice(rows, size=cap, replace=False)
        keep[rows] = True
    return np.flatnonzero(keep)


# --------------------------------------------------------------------------------------------
# Step bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class _Context:
    out_dir: Path
    config: DemoConfig
    progress: bool
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    record: list[dict[str, Any]] = field(default_factory=list)

    def step_dir(self, step: str) -> Path:
        return self.out_dir / step


def _banner(text: str) -> None:
    line = "=" * 78
    print(f"\n{line}\n{text}\n{line}", flush=True)


def _run_step(ctx: _Context, index: int, step: str, func: Callable[[_Context, Path], dict[str, Any]]) -> None:
    """Run one step unless its marker says it finished; record its results and timing."""
    folder = ctx.step_dir(step)
    marker = folder / DONE_MARKER
    title = f"[{index}/{len(DEMO_STEPS)}] {step}"
    if marker.exists():
        done = read_json(marker, f"{step} step marker")
        ctx.results[step] = done["result"]
        ctx.record.append({"step": step, "status": "resumed", "seconds": done["seconds"], "finished_at": done["finished_at"]})
        _banner(f"{title}: already finished in {done['seconds']:.1f}s (resumed from {marker})")
        return
    _banner(f"{title}: {_STEP_TITLES[step]}")
    if folder.exists() and step != "pretrain":  # a half-finished step starts over (pretrain resumes)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = func(ctx, folder)
    seconds = round(time.perf_counter() - started, 2)
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(marker, {"step": step, "seconds": seconds, "finished_at": finished, "result": result})
    ctx.results[step] = result
    ctx.record.append({"step": step, "status": "ran", "seconds": seconds, "finished_at": finished})
    print(f"{step}: done in {seconds:.1f}s", flush=True)


def _load_context(out_dir: Path) -> _Context:
    """Config and step results of a demo folder, from its markers."""
    demo = read_json(out_dir / DEMO_MARKER, "demo marker")
    ctx = _Context(out_dir=out_dir, config=from_dict(DemoConfig, demo["config"], "demo"), progress=False)
    for step in DEMO_STEPS:
        marker = out_dir / step / DONE_MARKER
        if not marker.exists():
            raise ArtifactError(f"demo step {step!r} has not finished in {out_dir} ({marker} missing); run the demo first.")
        done = read_json(marker, f"{step} step marker")
        ctx.results[step] = done["result"]
        ctx.record.append({"step": step, "status": "resumed", "seconds": done["seconds"], "finished_at": done["finished_at"]})
    return ctx


def _prepare_out_dir(out_dir: Path, config: DemoConfig, overwrite: bool) -> None:
    marker = out_dir / DEMO_MARKER
    if out_dir.exists() and any(out_dir.iterdir()):
        if overwrite:
            shutil.rmtree(out_dir)
        elif not marker.exists():
            raise ArtifactError(
                f"{out_dir} exists and is not a demo output folder; choose another --out or pass --overwrite."
            )
        else:
            recorded = read_json(marker, "demo marker")
            if recorded.get("fingerprint") != config.fingerprint():
                raise ConfigError(
                    f"{out_dir} holds a demo run with other options ({recorded.get('config')}); pass --overwrite "
                    "to start it over with the current options, or choose another --out."
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json(marker, {"fingerprint": config.fingerprint(), "config": to_dict(config)})


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def _input_paths(ctx: _Context) -> dict[str, Path]:
    return {s: Path(p) for s, p in ctx.results["data"]["inputs"].items()}


def _tokenize_config(ctx: _Context) -> Any:
    from .tokenize import TokenizeConfig

    return TokenizeConfig(max_len=ctx.config.max_len)


def _step_data(ctx: _Context, folder: Path) -> dict[str, Any]:
    import anndata as ad

    cfg = ctx.config
    source = Path(cfg.data_dir) if cfg.data_dir is not None else demo_data_dir()
    inputs, cells, types = {}, {}, {}
    for species in SPECIES:
        path = source / f"baron_pancreas_{species}.h5ad"
        if not path.is_file():
            raise ArtifactError(f"demo input {path} not found; set data_dir to a folder holding baron_pancreas_{species}.h5ad.")
        adata = ad.read_h5ad(path)
        if cfg.label_key not in adata.obs.columns:
            raise ConfigError(f"{path} has no obs column {cfg.label_key!r} (label_key); columns: {list(adata.obs.columns)}.")
        if cfg.cells_per_type is not None:
            adata = adata[capped_rows(adata.obs[cfg.label_key], cfg.cells_per_type, cfg.seed)].copy()
            path = folder / f"baron_pancreas_{species}.h5ad"
            adata.write_h5ad(path, compression="gzip")
        inputs[species] = str(path.resolve())
        cells[species] = int(adata.n_obs)
        types[species] = {str(k): int(v) for k, v in adata.obs[cfg.label_key].value_counts().items()}
        print(f"{species}: {adata.n_obs} cells x {adata.n_vars} genes from {path}", flush=True)
    write_json(folder / "inputs.json", {"inputs": inputs, "cells": cells, "cell_types": types})
    return {"inputs": inputs, "cells": cells, "cell_types": types, "source": str(source)}


def _step_vocab(ctx: _Context, folder: Path) -> dict[str, Any]:
    from .vocab import build_vocabulary

    vocab = build_vocabulary(ctx.config.vocab_mode, ctx.config.gene_set)
    path = vocab.save(folder / "vocab.json")
    print(f"vocabulary: {vocab}", flush=True)
    return {"path": str(Path(path).resolve()), "size": len(vocab), "mode": vocab.mode, "hash": vocab.hash}


def _step_medians(ctx: _Context, folder: Path) -> dict[str, Any]:
    from .medians import compute_medians

    paths = _input_paths(ctx)
    medians, stats = compute_medians(
        [str(paths[s]) for s in SPECIES], workers=ctx.config.workers, return_stats=True, progress=ctx.progress
    )
    path = folder / "medians.tsv"
    medians.save(path)
    print(f"medians of {len(medians):,} genes from {stats.total_cells:,} cells", flush=True)
    return {"path": str(path.resolve()), "n_genes": len(medians), "n_cells": int(stats.total_cells), "hash": medians.hash}


def _step_tokenize(ctx: _Context, folder: Path) -> dict[str, Any]:
    from .medians import GeneMedians
    from .tokenize import tokenize_files
    from .vocab import Vocabulary

    vocab = Vocabulary.load(ctx.results["vocab"]["path"])
    medians = GeneMedians.load(ctx.results["medians"]["path"])
    paths = _input_paths(ctx)
    corpus = folder / "corpus"
    tokenize_files(
        [str(paths[s]) for s in SPECIES], corpus, vocab, medians, _tokenize_config(ctx),
        obs_columns=(ctx.config.label_key,), workers=ctx.config.workers, overwrite=True, progress=ctx.progress,
    )
    import datasets

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
    from .pretrain import pretrain_config_from_dict

    cfg = ctx.config
    steps = cfg.pretrain_steps
    return pretrain_config_from_dict(
        {
            "output_dir": str((folder / "run").resolve()),
            "data": {
                "corpus": [ctx.results["tokenize"]["corpus"]],
                "vocab": ctx.results["vocab"]["path"],
                "medians": ctx.results["medians"]["path"],
                "eval_fraction": 0.0,
            },
            "model": {"preset": cfg.preset, "overrides": dict(cfg.model_overrides)},
            "objective": {"contrastive_weight": cfg.contrastive_weight, "pooling": cfg.pooling},
            "train": {
                "learning_rate": cfg.learning_rate,
                "warmup_steps": cfg.warmup_steps,
                "per_device_batch_size": cfg.batch_size,
                "max_steps": steps,
                "seed": cfg.seed,
            },
            "checkpoint": {"save_steps": max(1, steps // 2), "keep": 1},
            "logging": {"logging_steps": max(1, min(10, steps // 10)), "tensorboard": False, "progress_bar": ctx.progress},
        }
    )


def _step_pretrain(ctx: _Context, folder: Path) -> dict[str, Any]:
    from . import plots
    from .pretrain import read_metrics, run_pretraining

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
        "figures": {"training_curves": str(figure.resolve())},
    }


def _load_inputs(ctx: _Context) -> dict[str, Any]:
    import anndata as ad

    return {s: ad.read_h5ad(p) for s, p in _input_paths(ctx).items()}


def _step_embed(ctx: _Context, folder: Path) -> dict[str, Any]:
    import anndata as ad

    from . import plots
    from .embed import embed_anndata

    cfg = ctx.config
    bundle = ctx.results["pretrain"]["bundle"]
    parts, files = [], {}
    for species, adata in _load_inputs(ctx).items():
        embed_anndata(
            adata, bundle, key=EMBED_KEY, layer=cfg.embed_layer, pooling=cfg.pooling, species=species,
            tokenize_config=_tokenize_config(ctx),
            device=cfg.device, progress=ctx.progress,
        )
        path = folder / f"{species}.h5ad"
        adata.write_h5ad(path, compression="gzip")
        files[species] = str(path.resolve())
        obs = pd.DataFrame({"cell_type": adata.obs[cfg.label_key].astype(str).to_numpy(), "species": species},
                           index=adata.obs_names)
        parts.append(ad.AnnData(obs=obs, obsm={EMBED_KEY: np.asarray(adata.obsm[EMBED_KEY])}))
    both = ad.concat(parts, index_unique="-")
    both.write_h5ad(folder / "both_species.h5ad")
    figure = folder / "umap.png"
    plots.umap(both, color="cell_type", species="species", key=EMBED_KEY, n_neighbors=cfg.umap_neighbors,
               random_state=cfg.seed, title="Mix-Geneformer cell embeddings (human + mouse)", save=figure)
    n_nan = int((~np.isfinite(both.obsm[EMBED_KEY]).all(axis=1)).sum())
    return {
        "files": files,
        "n_cells": int(both.n_obs),
        "dim": int(both.obsm[EMBED_KEY].shape[1]),
        "cells_without_embedding": n_nan,
        "figures": {"umap": str(figure.resolve())},
    }


CLASSIFY_SETTINGS = (("human", "human"), ("mouse", "mouse"), ("mouse", "human"), ("human", "mouse"))


def _setting_name(source: str, target: str) -> str:
    return f"{source} (within)" if source == target else f"{source} → {target}"


def _setting_slug(source: str, target: str) -> str:
    return f"{source}_within" if source == target else f"{source}_to_{target}"


def _classify_config(ctx: _Context, seed: int | None = None) -> Any:
    from . import classify as clf

    cfg = ctx.config
    return clf.ClassifyConfig(
        labels=clf.LabelConfig(
            key=cfg.label_key, seed=cfg.classify_seeds[0] if seed is None else seed, transfer_split=True
        ),
        embedding=clf.EmbeddingConfig(layer=cfg.embed_layer, pooling=cfg.pooling),
        finetune=from_dict(
            clf.FinetuneConfig,
            {"epochs": max(cfg.finetune_epochs, 1.0), "device": cfg.device, **cfg.finetune_overrides},
            "demo.finetune_overrides",
        ),
    )


def _step_classify(ctx: _Context, folder: Path) -> dict[str, Any]:
    from . import classify as clf
    from .model import load_bundle

    cfg = ctx.config
    adatas = _load_inputs(ctx)
    model, vocab, medians = load_bundle(ctx.results["pretrain"]["bundle"])
    save_config(_classify_config(ctx), folder)
    methods = ("knn", "logreg", "finetune") if cfg.finetune_epochs > 0 else ("knn", "logreg")
    tables, figures, notes = [], {}, {}
    for seed in cfg.classify_seeds:
        # One split per species and seed; transfer trains on the source's training cells and tests
        # on the target's test cells (labels.transfer_split), so every row of a target species is
        # scored on the same cells.
        classify_config = _classify_config(ctx, seed)
        for source, target in CLASSIFY_SETTINGS:
            name, slug = _setting_name(source, target), _setting_slug(source, target)
            print(f"-- {name}, seed {seed}", flush=True)
            run = clf.run_classification(
                adatas[source], model, vocab, medians, test=None if source == target else adatas[target],
                methods=methods, baseline_methods=("logreg_counts", "knn_pca"), config=classify_config,
                tokenize_config=_tokenize_config(ctx), device=cfg.device,
            )
            if seed == cfg.classify_seeds[0]:  # one seed's full outputs; the others' scores are in metrics_per_seed.csv
                clf.save_run(run, folder / slug / f"seed_{seed}", overwrite=True)
            table = run.table()
            print(clf.markdown_table(table), flush=True)
            table["method"] = table["method"].map(lambda m: f"mixgf_{m}" if m in methods else m)
            table.insert(0, "setting", table.pop("setting").map(lambda _s, n=name: n))
            table.insert(1, "seed", seed)
            table.insert(3, "n_train", int(run.task.train_rows.size))
            table.insert(4, "n_test", int(run.task.test_rows.size))
            tables.append(table)
            notes.setdefault(name, list(run.task.notes))
            figure = folder / slug / f"seed_{seed}" / "confusion_knn.png"  # kNN on frozen embeddings: the paper's zero-shot protocol
            if figure.exists() and f"confusion_{slug}" not in figures:
                figures[f"confusion_{slug}"] = str(figure.resolve())
    per_seed = pd.concat(tables, ignore_index=True)
    per_seed.to_csv(folder / "metrics_per_seed.csv", index=False)
    table = seed_summary(per_seed)
    table.to_csv(folder / "metrics.csv", index=False)
    write_json(folder / "notes.json", notes)
    return {
        "table": table.to_dict(orient="records"),
        "per_seed": per_seed.to_dict(orient="records"),
        "seeds": list(cfg.classify_seeds),
        "figures": figures,
        "notes": notes,
    }


def seed_summary(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd over seeds of every metric, per (setting, method), in first-seen order.

    Columns: setting, method, n_seeds, n_train, n_test (means), then ``<metric>`` (mean) and
    ``<metric>_sd`` for accuracy and the macro scores.
    """
    from .classify import METRIC_COLUMNS

    keys = ["setting", "method"]
    grouped = per_seed.groupby(keys, sort=False)
    table = grouped[["n_train", "n_test"]].mean().round(1)
    table.insert(0, "n_seeds", grouped.size())
    for metric in METRIC_COLUMNS:
        table[metric] = grouped[metric].mean()
        table[f"{metric}_sd"] = grouped[metric].std(ddof=1).fillna(0.0)
    return table.reset_index()


def _step_perturb(ctx: _Context, folder: Path) -> dict[str, Any]:
    from . import perturb as pt
    from . import plots
    from .model import load_bundle

    cfg = ctx.config
    adata = _load_inputs(ctx)[cfg.perturb_species]
    model, vocab, medians = load_bundle(ctx.results["pretrain"]["bundle"])
    config = pt.PerturbConfig(
        perturb="delete", state_column=cfg.label_key, start=cfg.perturb_start, goal=cfg.perturb_goal,
        alternatives=list(cfg.perturb_alternatives), cells_per_state=cfg.perturb_cells, layer=cfg.embed_layer,
        pooling=cfg.pooling, device=cfg.device, species=cfg.perturb_species, seed=cfg.seed,
    )
    result, _ = pt.perturb_anndata(
        adata, model, config, vocab=vocab, medians=medians, tokenize_config=_tokenize_config(ctx),
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


_STEP_TITLES = {
    "data": "load the shipped human + mouse pancreas cells",
    "vocab": "build the unified human + mouse vocabulary",
    "medians": "compute gene medians over both species",
    "tokenize": "rank-value tokenize both species into one mixed corpus",
    "pretrain": "pretrain a small mixed-species model (MLM + SimCSE)",
    "embed": "embed both species; UMAP by cell type and by species",
    "classify": "classify cell types: within species, mouse → human, human → mouse, vs baselines",
    "perturb": "in silico deletion of every gene, toward another cell state",
}
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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def run_demo(
    out_dir: str | os.PathLike = "demo_output",
    config: DemoConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the whole demo and write its report; return the path of ``report/report.md``.

    Parameters
    ----------
    out_dir
        Output folder. An existing demo folder made with the same options is resumed: finished
        steps are skipped.
    config
        Sizes and options (default :class:`DemoConfig`; :meth:`DemoConfig.quick_config` for CI).
    overwrite
        Delete ``out_dir`` first and run every step again.
    progress
        Show the stages' progress bars.

    Raises
    ------
    ConfigError
        ``out_dir`` holds a demo made with other options (pass ``overwrite=True``).
    ArtifactError
        ``out_dir`` exists and is not a demo folder, or an input is missing.
    """
    config = config or DemoConfig()
    out_dir = Path(out_dir).resolve()
    _prepare_out_dir(out_dir, config, overwrite)
    ctx = _Context(out_dir=out_dir, config=config, progress=progress)
    started = time.perf_counter()
    mode = "quick" if config.quick else "full"
    _banner(f"Mix-Geneformer demo ({mode}) → {out_dir}")
    for index, step in enumerate(DEMO_STEPS, start=1):
        _run_step(ctx, index, step, _STEP_FUNCS[step])
    wall = round(time.perf_counter() - started, 2)
    _banner("report")
    report = write_report(out_dir, ctx.record, wall)
    print(f"\nreport: {report}\nwall time of this run: {wall:.1f}s", flush=True)
    return report


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
_METHOD_NAMES = {
    "mixgf_knn": "Mix-Geneformer embedding + kNN (k=5, cosine; zero-shot)",
    "mixgf_logreg": "Mix-Geneformer embedding + logistic regression",
    "mixgf_finetune": "Mix-Geneformer fine-tuned",
    "logreg_counts": "baseline: log-counts + logistic regression (CellTypist-style)",
    "knn_pca": "baseline: log-counts PCA + kNN",
}


def _commands(ctx: _Context) -> dict[str, list[str]]:
    """CLI commands that redo each step with the options the demo used (same Python API)."""
    out, cfg, r = ctx.out_dir, ctx.config, ctx.results
    inputs = r["data"]["inputs"]
    human, mouse = inputs["human"], inputs["mouse"]
    vocab, medians = out / "vocab" / "vocab.json", out / "medians" / "medians.tsv"
    corpus, bundle = out / "tokenize" / "corpus", out / "pretrain" / "run" / "model"
    tok = corpus / "config.yaml"  # the TokenizeConfig the corpus was made with
    dev = f" --device {cfg.device}" if cfg.device else ""
    fin = "" if cfg.finetune_epochs > 0 else " --mode zero-shot"
    classify = []
    for seed in cfg.classify_seeds:
        for source, target in CLASSIFY_SETTINGS:
            test = f" --test {inputs[target]}" if source != target else ""
            classify.append(
                f"mixgf classify {inputs[source]}{test} --model {bundle} --label {cfg.label_key}{fin} --baselines "
                f"--config {out / 'classify' / 'config.yaml'} --set labels.seed={seed} --tokenize-config {tok} "
                f"--out {out / 'classify' / _setting_slug(source, target) / f'seed_{seed}'} --overwrite{dev}"
            )
    return {
        "vocab": [f"mixgf vocab build --out {vocab} --mode {cfg.vocab_mode} --gene-set {cfg.gene_set}"],
        "medians": [f"mixgf medians {human} {mouse} --out {medians} --workers {cfg.workers}"],
        "tokenize": [
            f"mixgf tokenize {human} {mouse} --vocab {vocab} --medians {medians} --out {corpus} "
            f"--max-len {cfg.max_len} --obs-columns {cfg.label_key} --workers {cfg.workers}"
        ],
        "pretrain": [f"mixgf pretrain --config {out / 'pretrain' / 'pretrain.yaml'} --resume"],
        "embed": [
            f"mixgf embed {inputs[s]} --model {bundle} --species {s} --tokenize-config {tok} "
            f"--layer {cfg.embed_layer} --pooling {cfg.pooling} "
            f"--out {out / 'embed' / (s + '.h5ad')} --umap {out / 'embed' / ('umap_' + s + '.png')} "
            f"--color {cfg.label_key} --overwrite{dev}"
            for s in SPECIES
        ],
        "classify": classify,
        "perturb": [
            f"mixgf perturb {inputs[cfg.perturb_species]} --model {bundle} --perturb delete --genes all "
            f"--state-column {cfg.label_key} --start {cfg.perturb_start} --goal {cfg.perturb_goal} "
            f"--alternatives {','.join(cfg.perturb_alternatives)} --cells-per-state {cfg.perturb_cells} "
            f"--species {cfg.perturb_species} --tokenize-config {tok} --layer {cfg.embed_layer} "
            f"--pooling {cfg.pooling} --set seed={cfg.seed} --stats vs_all "
            f"--out {out / 'perturb' / 'results'} --overwrite{dev}"
        ],
        "demo": [
            f"mixgf demo --out {out}{' --quick' if cfg.quick else ''}{dev}"
            + "".join(f" --set {k}={v}" for k, v in _non_default_options(cfg).items())
        ],
    }


def _non_default_options(cfg: DemoConfig) -> dict[str, Any]:
    """Options that differ from the (quick or full) defaults, as ``--set`` would give them."""
    base = to_dict(DemoConfig.quick_config() if cfg.quick else DemoConfig())
    mine = to_dict(cfg)
    skip = {"device", "workers", "quick"}
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in mine.items() if k not in skip and v != base[k]}


def _figures(ctx: _Context) -> dict[str, Path]:
    """Copy every step's figures into ``report/figures`` (the report folder stands alone)."""
    target = ctx.out_dir / "report" / "figures"
    target.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    for step in DEMO_STEPS:
        for name, path in ctx.results.get(step, {}).get("figures", {}).items():
            copy = target / f"{name}.png"
            shutil.copyfile(path, copy)
            figures[name] = copy
    return figures


def _classification_text(cfg: DemoConfig, pretrain: dict[str, Any]) -> str:
    """How the classification table was made: splits, seeds, fine-tuning recipe, what is tested."""
    seeds = ", ".join(map(str, cfg.classify_seeds))
    finetune = (
        f"fine-tuned (at most {cfg.finetune_epochs:g} epochs; the epoch kept is the best by macro-F1 on a "
        "validation set carved from the training cells, class-weighted loss, the encoder at a rate fitted to "
        "its width and the head at 10× that rate)"
        if cfg.finetune_epochs > 0
        else "not fine-tuned (finetune_epochs=0)"
    )
    return (
        f"Every number is the mean ± sd over {len(cfg.classify_seeds)} split seeds ({seeds}) of one model "
        f"pretrained with seed {cfg.seed} ({pretrain['steps']} steps). Within species: a stratified 80/20 split per "
        "seed; across species: the source's training cells → the target's test cells of the same seed (labels "
        "matched by canonical name; count baselines on one-to-one-ortholog genes). Classes under 0.5% of cells "
        "are dropped. Every method of a seed sees the same cells and nothing is chosen on test cells. "
        f"Mix-Geneformer rows use the frozen embedding ({cfg.pooling} pooling, hidden state {cfg.embed_layer}), "
        f"except the one {finetune}. The demo pretrains on all shipped cells, test cells included (without labels); "
        "`benchmarks/classify.py` pretrains on training cells only."
    )


def _seeds_markdown(table: pd.DataFrame) -> str:
    """The classification table as mean ± sd over seeds (columns of :func:`seed_summary`)."""
    metrics = ("accuracy", "macro_f1", "macro_precision", "macro_recall")
    lines = [
        "| setting | train / test cells | method | seeds | accuracy | macro F1 | macro precision | macro recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.to_dict(orient="records"):
        scores = " | ".join(f"{row[m]:.3f} ± {row.get(m + '_sd', 0.0):.3f}" for m in metrics)
        lines.append(
            f"| {row['setting']} | {row['n_train']:g} / {row['n_test']:g} | "
            f"{_METHOD_NAMES.get(row['method'], row['method'])} | {row.get('n_seeds', 1)} | {scores} |"
        )
    return "\n".join(lines)


def _config_yaml(path: Path) -> str:
    return path.read_text() if path.exists() else "(not written)"


def write_report(
    out_dir: str | os.PathLike, record: list[dict[str, Any]] | None = None, wall_seconds: float | None = None
) -> Path:
    """Write ``report/report.md``, ``report/report.html`` and ``report/metrics.json`` of a demo folder.

    Parameters
    ----------
    out_dir
        A demo output folder whose steps have all finished (their ``STEP_DONE.json`` markers are read).
    record
        Per-step status and timing of the current run (default: read from the markers, "resumed").
    wall_seconds
        Wall time of the current run, if known.

    Returns
    -------
    Path
        ``out_dir/report/report.md``.
    """
    import yaml

    ctx = _load_context(Path(out_dir).resolve())
    if record is not None:
        ctx.record = record
    out, cfg, r = ctx.out_dir, ctx.config, ctx.results
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = _figures(ctx)
    commands = _commands(ctx)
    table = pd.DataFrame(r["classify"]["table"])
    step_seconds = {rec["step"]: rec["seconds"] for rec in ctx.record}
    total_compute = round(sum(step_seconds.values()), 2)

    metrics = {
        "mixgeneformer_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if cfg.quick else "full",
        "config": to_dict(cfg),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "steps": ctx.record,
        "steps_completed": [rec["step"] for rec in ctx.record],
        "seconds_total_steps": total_compute,
        "seconds_this_run": wall_seconds,
        "data": {k: r["data"][k] for k in ("cells", "cell_types")},
        "vocab": {k: r["vocab"][k] for k in ("size", "mode", "hash")},
        "medians": {k: r["medians"][k] for k in ("n_genes", "n_cells")},
        "tokenize": {k: r["tokenize"][k] for k in ("n_cells", "cells_per_species", "mean_length", "max_length")},
        "pretrain": {k: r["pretrain"][k] for k in ("steps", "first_loss", "final_loss")},
        "embed": {k: r["embed"][k] for k in ("n_cells", "dim", "cells_without_embedding")},
        "classification": r["classify"]["table"],
        "classification_seeds": r["classify"].get("seeds"),
        "classification_per_seed": r["classify"].get("per_seed"),
        "perturbation": {
            "summary": r["perturb"]["summary"],
            "n_genes_tested": r["perturb"]["n_genes_tested"],
            "n_significant_fdr_0.05": r["perturb"]["n_significant_fdr_0.05"],
            "top_genes": r["perturb"]["top_genes"],
        },
        "figures": {name: str(path.relative_to(folder)) for name, path in figures.items()},
        "commands": commands,
    }
    write_json(folder / "metrics.json", metrics)

    def fig(name: str, alt: str) -> str:
        return f"![{alt}]({figures[name].relative_to(folder).as_posix()})" if name in figures else f"({alt}: not produced)"

    steps_md = "\n".join(
        f"| {rec['step']} | {rec['status']} | {rec['seconds']:.1f} |" for rec in ctx.record
    )
    top = pd.DataFrame(r["perturb"]["top_genes"])
    top_md = _frame_markdown(top) if len(top) else "(no genes)"
    pretrain_yaml = _config_yaml(Path(r["pretrain"]["config"]))
    classify_yaml = _config_yaml(out / "classify" / "config.yaml")
    perturb_yaml = _config_yaml(out / "perturb" / "results" / "config.yaml")
    demo_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    sections = [
        f"# Mix-Geneformer demo report ({metrics['mode']})",
        "",
        f"Human and mouse pancreas cells (Baron et al. 2016, GEO GSE84133; {r['data']['cells']['human']:,} human + "
        f"{r['data']['cells']['mouse']:,} mouse cells) → one {cfg.vocab_mode} vocabulary of {r['vocab']['size']:,} "
        f"tokens → gene medians over both species → one mixed rank-value corpus (≤{cfg.max_len} genes per cell) → "
        f"a `{cfg.preset}` model pretrained for {r['pretrain']['steps']} steps (MLM + SimCSE) → embeddings, "
        "classification and in silico perturbation.",
        "",
        f"Created {metrics['created']} with mixgeneformer {metrics['mixgeneformer_version']} on {metrics['machine']['platform']} "
        f"({metrics['machine']['cpus']} CPUs). Time of all steps: {total_compute:.1f}s"
        + (f"; wall time of this run: {wall_seconds:.1f}s." if wall_seconds is not None else "."),
        "",
        "## Steps",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
        steps_md,
        "",
        "## Pretraining",
        "",
        f"Loss {_fmt(r['pretrain']['first_loss'])} at the first logged step → {_fmt(r['pretrain']['final_loss'])} "
        f"after {r['pretrain']['steps']} steps.",
        "",
        fig("training_curves", "training curves"),
        "",
        "## Cell embeddings",
        "",
        f"{r['embed']['n_cells']:,} cells embedded ({r['embed']['dim']} dimensions, {cfg.pooling} pooling of hidden "
        f"state {cfg.embed_layer}), UMAP coloured by cell type (left) and by species (right).",
        "",
        fig("umap", "UMAP by cell type and by species"),
        "",
        "## Cell-type classification",
        "",
        _classification_text(cfg, r["pretrain"]),
        "",
        _seeds_markdown(table),
        "",
        *[f"- {setting}: {'; '.join(n)}" for setting, n in r["classify"]["notes"].items()],
        "",
        "Confusion matrices (Mix-Geneformer embedding + kNN, rows = true type, normalized per row):",
        "",
        *[fig(name, name.replace("_", " ")) + "\n" for name in figures if name.startswith("confusion_")],
        "## In silico perturbation",
        "",
        f"Every gene of {r['perturb']['summary'].get('cells_perturbed', r['perturb']['summary'].get('cells_selected', '?'))} "
        f"{cfg.perturb_species} `{cfg.perturb_start}` cells was deleted in turn; the score is the cosine shift of the "
        f"cell embedding toward the mean `{cfg.perturb_goal}` embedding, tested per gene against all deletions "
        "(Wilcoxon rank-sum, Benjamini–Hochberg FDR). "
        f"{r['perturb']['n_genes_tested']:,} genes tested; "
        f"{r['perturb']['n_significant_fdr_0.05']} with FDR < 0.05.",
        "",
        fig("perturbation_ranking", "perturbation ranking"),
        "",
        top_md,
        "",
        "## Reproduce",
        "",
        "Everything at once:",
        "",
        "```bash",
        *commands["demo"],
        "```",
        "",
        "Step by step (the same Python API the demo calls):",
        "",
        *[line for step in DEMO_STEPS[1:] for line in (f"**{step}**", "", "```bash", *commands[step], "```", "")],
        "### Resolved configurations",
        "",
        "Demo (`DemoConfig`):",
        "",
        "```yaml",
        demo_yaml.rstrip(),
        "```",
        "",
        "Pretraining (`PretrainConfig`, `pretrain/pretrain.yaml`):",
        "",
        "```yaml",
        pretrain_yaml.rstrip(),
        "```",
        "",
        "Classification (`ClassifyConfig`, `classify/config.yaml`):",
        "",
        "```yaml",
        classify_yaml.rstrip(),
        "```",
        "",
        "Perturbation (`PerturbConfig`, `perturb/results/config.yaml`):",
        "",
        "```yaml",
        perturb_yaml.rstrip(),
        "```",
        "",
        "Machine-readable numbers: `metrics.json`. Data: Baron M. et al. (2016) Cell Systems 3:346–360, GEO "
        "GSE84133, as re-bundled in the MIT-licensed PyPI package `came==0.1.13`.",
        "",
    ]
    markdown = "\n".join(sections)
    path = folder / "report.md"
    from .fileio import atomic_file

    with atomic_file(path) as handle:
        handle.write(markdown)
    with atomic_file(folder / "report.html") as handle:
        handle.write(_markdown_to_html(markdown, title=sections[0].lstrip("# ")))
    return path


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _frame_markdown(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value).replace("|", "/")  # ortholog tokens are "HUMAN|mouse"; "|" would split the table cell

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _version() -> str:
    from . import __version__

    return str(__version__)


def _markdown_to_html(markdown: str, title: str) -> str:
    """A small converter for the subset of Markdown the report uses (headings, tables, images,
    code blocks, lists, paragraphs), so no extra dependency is needed."""
    import re

    out: list[str] = []
    lines = markdown.splitlines()
    i = 0

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(html.escape(lines[i]))
                i += 1
            out.append("<pre><code>" + "\n".join(block) + "</code></pre>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            i -= 1
            body = [r for r in rows[2:]] if len(rows) > 1 else []
            out.append(
                "<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</tbody></table>"
            )
        elif (match := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line)) is not None:
            out.append(f'<p><img src="{html.escape(match.group(2))}" alt="{html.escape(match.group(1))}" style="max-width:100%"></p>')
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            i -= 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:90%}"
        "pre{background:#f5f5f5;padding:8px;overflow-x:auto}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


