"""The demo report: metrics.json, report.md and report.html from a finished demo folder."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .. import __version__
from ..classify import mean_sd_text
from ..config import to_dict
from ..diagnostics import diagnostics_markdown
from ..fileio import atomic_file, write_json, written_together
from .config import DEMO_STEPS, SPECIES, DemoConfig, finetune_config
from .context import _Context, _load_context
from .markdown import frame_markdown, markdown_to_html, md_text, shell_word
from .steps import CLASSIFY_SETTINGS, _setting_slug

_METHOD_NAMES = {
    "mixgf_knn": "Mix-Geneformer embedding + kNN (k=5, cosine; zero-shot)",
    "mixgf_logreg": "Mix-Geneformer embedding + logistic regression",
    "mixgf_finetune": "Mix-Geneformer fine-tuned",
    "logreg_counts": "baseline: log-counts + logistic regression (CellTypist-style)",
    "knn_pca": "baseline: log-counts PCA + kNN",
    "logreg_tokens": "input bound: logistic regression on the genes the model reads (its tokens)",
}


def _commands(ctx: _Context) -> dict[str, list[str]]:
    """CLI commands that redo each step with the options the demo used (same Python API), every
    value shell-quoted."""
    out, cfg, r = ctx.out_dir, ctx.config, ctx.results
    inputs = r["data"]["inputs"]
    human, mouse = inputs["human"], inputs["mouse"]
    vocab, medians = out / "vocab" / "vocab.json", out / "medians" / "medians.tsv"
    corpus, bundle = out / "tokenize" / "corpus", out / "pretrain" / "run" / "model"
    tok = corpus / "config.yaml"  # the TokenizeConfig the corpus was made with
    dev = f" --device {shell_word(cfg.device)}" if cfg.device else ""
    fin = "" if cfg.finetune_epochs > 0 else " --mode zero-shot"
    classify = []
    for seed in cfg.classify_seeds:
        for source, target in CLASSIFY_SETTINGS:
            test = f" --test {shell_word(inputs[target])}" if source != target else ""
            classify.append(
                f"mixgf classify {shell_word(inputs[source])}{test} --model {shell_word(bundle)} --label {shell_word(cfg.label_key)}{fin} --baselines "
                f"--config {shell_word(out / 'classify' / 'config.yaml')} --set labels.seed={shell_word(seed)} --tokenize-config {shell_word(tok)} "
                f"--out {shell_word(out / 'classify' / _setting_slug(source, target) / f'seed_{seed}')} --overwrite{dev}"
            )
    return {
        "vocab": [f"mixgf vocab build --out {shell_word(vocab)} --mode {shell_word(cfg.vocab_mode)} --gene-set {shell_word(cfg.gene_set)}"],
        "medians": [f"mixgf medians {shell_word(human)} {shell_word(mouse)} --out {shell_word(medians)} --workers {shell_word(cfg.workers)}"],
        "tokenize": [
            f"mixgf tokenize {shell_word(human)} {shell_word(mouse)} --vocab {shell_word(vocab)} --medians {shell_word(medians)} --out {shell_word(corpus)} "
            f"--max-len {shell_word(cfg.max_len)} --obs-columns {shell_word(cfg.label_key)} --workers {shell_word(cfg.workers)}"
        ],
        "pretrain": [f"mixgf pretrain --config {shell_word(out / 'pretrain' / 'pretrain.yaml')} --resume"],
        "embed": [
            f"mixgf embed {shell_word(inputs[s])} --model {shell_word(bundle)} --species {shell_word(s)} --tokenize-config {shell_word(tok)} "
            f"--layer {shell_word(cfg.embed_layer)} --pooling {shell_word(cfg.pooling)} "
            f"--out {shell_word(out / 'embed' / (s + '.h5ad'))} --umap {shell_word(out / 'embed' / ('umap_' + s + '.png'))} "
            f"--color {shell_word(cfg.label_key)} --overwrite{dev}"
            for s in SPECIES
        ],
        "classify": classify,
        "perturb": [
            f"mixgf perturb {shell_word(inputs[cfg.perturb_species])} --model {shell_word(bundle)} --perturb delete --genes all "
            f"--state-column {shell_word(cfg.label_key)} --start {shell_word(cfg.perturb_start)} --goal {shell_word(cfg.perturb_goal)} "
            f"--alternatives {shell_word(','.join(cfg.perturb_alternatives))} --cells-per-state {shell_word(cfg.perturb_cells)} "
            f"--species {shell_word(cfg.perturb_species)} --tokenize-config {shell_word(tok)} --layer {shell_word(cfg.embed_layer)} "
            f"--pooling {shell_word(cfg.pooling)} --set seed={shell_word(cfg.seed)} --stats vs_all "
            f"--out {shell_word(out / 'perturb' / 'results')} --overwrite{dev}"
        ],
        "demo": [
            f"mixgf demo --out {shell_word(out)}{' --quick' if cfg.quick else ''}{dev}"
            + "".join(f" --set {shell_word(f'{k}={v}')}" for k, v in _non_default_options(cfg).items())
        ],
    }


def _non_default_options(cfg: DemoConfig) -> dict[str, Any]:
    """Options that differ from the (quick or full) defaults, as ``--set`` would give them (JSON, which
    ``--set`` reads back as the same value: a label ``"1"`` stays a string)."""
    base = to_dict(DemoConfig.quick_config() if cfg.quick else DemoConfig())
    mine = to_dict(cfg)
    skip = {"device", "workers", "quick"}
    return {k: json.dumps(v) for k, v in mine.items() if k not in skip and v != base[k]}


def _figures(ctx: _Context) -> dict[str, Path]:
    """Copy every step's figures into ``report/figures`` (the report folder stands alone)."""
    target = ctx.out_dir / "report" / "figures"
    target.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    for step in DEMO_STEPS:
        for name, path in ctx.results.get(step, {}).get("figures", {}).items():
            copy = target / f"{name}.png"
            with open(path, "rb") as source, atomic_file(copy, "wb") as handle:  # never half a figure
                shutil.copyfileobj(source, handle)
            figures[name] = copy
    return figures


def _classification_text(cfg: DemoConfig, pretrain: dict[str, Any]) -> str:
    """How the classification table was made: splits, seeds, fine-tuning recipe, what is tested."""
    seeds = ", ".join(map(str, cfg.classify_seeds))
    ft = finetune_config(cfg)
    selection = (
        f"at most {ft.epochs:g} epochs, the epoch kept the best by validation "
        f"{'macro-F1' if ft.selection_metric == 'macro_f1' else 'loss'} on "
        f"{ft.validation_fraction:.0%} of the training cells"
        if ft.validation_fraction > 0
        else f"{ft.epochs:g} epochs on every training cell, the last one kept"
    )
    finetune = (
        f"fine-tuned ({selection}; {'the head started at the frozen-embedding probe' if ft.head_init == 'probe' else 'a random head'}, "
        f"class-weighted loss, the encoder at a rate fitted to its width and the head at {ft.head_lr_multiplier:g}× that rate)"
        if cfg.finetune_epochs > 0
        else "not fine-tuned (finetune_epochs=0)"
    )
    return (
        f"Every number is the mean ± sd over {len(cfg.classify_seeds)} split seeds ({seeds}) of one model "
        f"pretrained with seed {cfg.seed} ({pretrain['steps']} steps). Within species: a stratified 80/20 split per "
        "seed; across species: the source's training cells → the target's test cells of the same seed (labels "
        "matched by canonical name; count baselines on one-to-one-ortholog genes, each cell scaled over them). "
        f"Classes under 0.5% of cells or under {cfg.min_class_count} cells are dropped (the notes name them). "
        "Every method of a seed sees the same cells and nothing of a seed "
        "is chosen on its test cells; the fine-tuning recipe was chosen by cross-validation on the cells that no "
        "split of seeds 0-2 tests on (`benchmarks/finetune_cv.py`, `finetune_cv_clean_*.txt`). "
        f"Mix-Geneformer rows use the frozen embedding ({cfg.pooling} pooling, hidden state {cfg.embed_layer}), "
        f"except the one {finetune}. The demo pretrains on all shipped cells, test cells included (without labels); "
        "`benchmarks/classify.py` pretrains on training cells only. The input-bound row fits the count baseline's "
        f"logistic regression to which of the vocabulary's genes are among a cell's {cfg.max_len} tokens: where it falls "
        "short of the count baseline, the genes beyond the model's input length carry the difference."
    )


def _seeds_markdown(table: pd.DataFrame) -> str:
    """The classification table as mean ± sd over seeds (columns of :func:`mixgeneformer.classify.seed_summary`)."""
    metrics = ("accuracy", "macro_f1", "macro_precision", "macro_recall")
    lines = [
        "| setting | train / test cells | method | seeds | accuracy | macro F1 | macro precision | macro recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.to_dict(orient="records"):
        scores = " | ".join(mean_sd_text(row[m], row.get(m + "_sd")) for m in metrics)  # one seed: the mean alone
        lines.append(
            f"| {md_text(row['setting'])} | {row['n_train']:g} / {row['n_test']:g} | "
            f"{md_text(_METHOD_NAMES.get(row['method'], row['method']))} | {row.get('n_seeds', 1)} | {scores} |"
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

    ctx = _load_context(Path(out_dir).resolve())
    if record is not None:
        ctx.record = record
    folder = ctx.out_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = _figures(ctx)
    commands = _commands(ctx)
    metrics = report_metrics(ctx, folder, figures, commands, wall_seconds)
    sections = report_sections(ctx, metrics, folder, figures, commands, wall_seconds)
    markdown = "\n".join(sections)
    page = markdown_to_html(markdown, title=sections[0].lstrip("# "))
    path = folder / "report.md"
    with written_together():  # all three or none: a failure never pairs a new metrics.json with an old report
        write_json(folder / "metrics.json", metrics)
        with atomic_file(path) as handle:
            handle.write(markdown)
        with atomic_file(folder / "report.html") as handle:
            handle.write(page)
    return path


def report_metrics(
    ctx: _Context, folder: Path, figures: dict[str, Path], commands: dict[str, list[str]], wall_seconds: float | None
) -> dict[str, Any]:
    """The machine-readable numbers of the report (``metrics.json``)."""
    cfg, r = ctx.config, ctx.results
    step_seconds = {rec["step"]: rec["seconds"] for rec in ctx.record}
    total_compute = round(sum(step_seconds.values()), 2)
    return {
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
        "pretrain": {**{k: r["pretrain"][k] for k in ("steps", "first_loss", "final_loss")},
                     "held_out": r["pretrain"].get("held_out")},
        "embed": {k: r["embed"][k] for k in ("n_cells", "dim", "cells_without_embedding", "species_mixing") if k in r["embed"]},
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


def report_sections(
    ctx: _Context, metrics: dict[str, Any], folder: Path, figures: dict[str, Path], commands: dict[str, list[str]],
    wall_seconds: float | None,
) -> list[str]:
    """The lines of ``report.md``: overview, results, how to reproduce."""

    def fig(name: str, alt: str) -> str:
        return f"![{alt}]({figures[name].relative_to(folder).as_posix()})" if name in figures else f"({alt}: not produced)"


    return [
        *_overview_section(ctx, metrics, wall_seconds),
        *_pretrain_embed_sections(ctx, fig),
        *_classify_perturb_sections(ctx, figures, fig),
        *_reproduce_sections(ctx, commands),
    ]


def _overview_section(ctx: _Context, metrics: dict[str, Any], wall_seconds: float | None) -> list[str]:
    cfg, r = ctx.config, ctx.results
    total_compute = metrics["seconds_total_steps"]
    steps_md = "\n".join(
        f"| {rec['step']} | {rec['status']} | {rec['seconds']:.1f} |" for rec in ctx.record
    )
    return [
        f"# Mix-Geneformer demo report ({metrics['mode']})",
        "",
        f"Human and mouse pancreas cells (Baron et al. 2016, GEO GSE84133; {r['data']['cells']['human']:,} human + "
        f"{r['data']['cells']['mouse']:,} mouse cells) → one {cfg.vocab_mode} vocabulary of {r['vocab']['size']:,} "
        f"tokens → gene medians over both species → one mixed rank-value corpus (≤{cfg.max_len} genes per cell) → "
        f"a `{cfg.preset}` model pretrained for {r['pretrain']['steps']} steps ({_objective(cfg)}) → embeddings, "
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
    ]


def _pretrain_embed_sections(ctx: _Context, fig: Callable[[str, str], str]) -> list[str]:
    cfg, r = ctx.config, ctx.results
    return [
        "## Pretraining",
        "",
        f"Loss {_fmt(r['pretrain']['first_loss'])} at the first logged step → {_fmt(r['pretrain']['final_loss'])} "
        f"after {r['pretrain']['steps']} steps.",
        "",
        fig("training_curves", "training curves"),
        "",
        diagnostics_markdown(r["pretrain"].get("held_out")),
        "",
        "## Cell embeddings",
        "",
        f"{_embedded_cells(r['embed'])} ({r['embed']['dim']} dimensions, {cfg.pooling} pooling of hidden "
        f"state {cfg.embed_layer}), UMAP coloured by cell type (left) and by species (right).",
        "",
        fig("umap", "UMAP by cell type and by species"),
        "",
        *_mixing_lines(r["embed"].get("species_mixing")),
    ]


def _embedded_cells(embed: dict[str, Any]) -> str:
    """How many cells have an embedding: ``n_cells`` counts every input cell, also those the tokenizer
    dropped (no vocabulary gene), whose rows are NaN (``cells_without_embedding``)."""
    missing = int(embed.get("cells_without_embedding") or 0)
    if not missing:
        return f"{embed['n_cells']:,} cells embedded"
    return (f"{embed['n_cells'] - missing:,} of {embed['n_cells']:,} cells embedded ({missing:,} without an embedding: "
            "the tokenizer kept none of their genes; left out of the UMAP and the scores)")


def _objective(cfg: DemoConfig) -> str:
    terms = ["MLM (output bias started at the log gene frequencies)" if cfg.mlm_bias_init == "unigram" else "MLM"]
    if cfg.contrastive_weight > 0:  # 0: no contrastive term in the pretraining
        terms.append("SimCSE" if cfg.contrastive_weight == 1 else f"SimCSE × {cfg.contrastive_weight:g}")
    if cfg.cross_species_weight > 0:
        pairs = "mutual nearest cells" if cfg.cross_species_k == 1 else f"{cfg.cross_species_k}-reciprocal nearest cells"
        pool = f" of the batch and {cfg.cross_species_queue:,} earlier cells" if cfg.cross_species_queue else " of the batch"
        terms.append(f"cross-species term × {cfg.cross_species_weight:g}, {pairs}{pool} as positives")
    return " + ".join(terms)


def _mixing_source(backend: str) -> str:
    """Where the mixing scores come from: scib's batch-ASW definition computed with scikit-learn, iLISI by scib-metrics."""
    if backend == "scib-metrics":
        return "ASW: scib's definition with scikit-learn; iLISI: scib-metrics"
    return "ASW: scib's definition with scikit-learn; iLISI needs the metrics extra"


def _mixing_lines(mixing: dict[str, Any] | None) -> list[str]:
    """The species-mixing scores of the embed step (absent in folders written before they existed)."""
    if not mixing:
        return []
    scores = []
    for key, name in (("species_asw", "species ASW"), ("ilisi", "iLISI")):
        if key in mixing:
            shuffled = f" (shuffled: {_fmt(mixing[key + '_shuffled'])})" if key + "_shuffled" in mixing else ""
            scores.append(f"{name} {_fmt(mixing[key])}{shuffled}")
    return [
        f"Species mixing of the {mixing['n_cells']:,} cells of the {len(mixing['shared_types'])} cell types both "
        f"species share ({_mixing_source(mixing['backend'])}): {', '.join(scores)}. Higher is more mixed, 0 = separated; "
        "'shuffled' is the same score with the species labels shuffled within each type, i.e. what complete "
        "mixing inside every type gives on these cells (`benchmarks/species.py` compares vocabularies and the "
        "cross-species term).",
        "",
    ]


def _classify_perturb_sections(ctx: _Context, figures: dict[str, Path], fig: Callable[[str, str], str]) -> list[str]:
    cfg, r = ctx.config, ctx.results
    table = pd.DataFrame(r["classify"]["table"])
    top = pd.DataFrame(r["perturb"]["top_genes"])
    top_md = frame_markdown(top) if len(top) else "(no genes)"
    return [
        "## Cell-type classification",
        "",
        _classification_text(cfg, r["pretrain"]),
        "",
        _seeds_markdown(table),
        "",
        *[f"- {md_text(setting)}: {md_text('; '.join(n))}" for setting, n in r["classify"]["notes"].items()],
        "",
        "Confusion matrices (Mix-Geneformer embedding + kNN, rows = true type, normalized per row):",
        "",
        *[fig(name, name.replace("_", " ")) + "\n" for name in figures if name.startswith("confusion_")],
        "## In silico perturbation",
        "",
        f"Every gene of {r['perturb']['summary'].get('cells_perturbed', r['perturb']['summary'].get('cells_selected', '?'))} "
        f"{cfg.perturb_species} “{md_text(cfg.perturb_start)}” cells was deleted in turn; the score is the cosine shift of "
        f"the cell embedding toward the mean “{md_text(cfg.perturb_goal)}” embedding, tested per gene against all deletions "
        "(Wilcoxon rank-sum, Benjamini–Hochberg FDR). "
        f"{r['perturb']['n_genes_tested']:,} genes tested; "
        f"{r['perturb']['n_significant_fdr_0.05']} with FDR < 0.05.",
        "",
        fig("perturbation_ranking", "perturbation ranking"),
        "",
        top_md,
        "",
    ]


def _reproduce_sections(ctx: _Context, commands: dict[str, list[str]]) -> list[str]:
    out, cfg, r = ctx.out_dir, ctx.config, ctx.results
    pretrain_yaml = _config_yaml(Path(r["pretrain"]["config"]))
    classify_yaml = _config_yaml(out / "classify" / "config.yaml")
    perturb_yaml = _config_yaml(out / "perturb" / "results" / "config.yaml")
    demo_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return [
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


def _fmt(value: Any) -> str:
    return mean_sd_text(value, None)  # "n/a" unless a finite number


def _version() -> str:
    return str(__version__)
