"""Options of the demo and its shipped dataset."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..classify import FinetuneConfig
from ..config import from_dict, to_dict
from ..errors import ConfigError
from ..fileio import content_hash
from ..inference import layers_to_run
from ..model_config import PRESETS

DEMO_STEPS = ("data", "vocab", "medians", "tokenize", "pretrain", "embed", "classify", "perturb")


SPECIES = ("human", "mouse")


DONE_MARKER = "STEP_DONE.json"


DEMO_MARKER = "mixgf_demo.json"


EMBED_KEY = "X_mixgeneformer"


DEMO_EVAL_FRACTION = 0.05  # cells held out of pretraining, scored by the masked-gene diagnostics


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
        Model preset of :data:`mixgeneformer.model.PRESETS` and config overrides: 512 positions (fine-tuning
        may read more genes than pretraining) and no attention dropout in pretraining (SimCSE's two views
        keep the hidden-state dropout). On CPU the attention dropout's random numbers took 18% of the
        pretraining time; without it, 5-fold CV macro-F1 of the fine-tuned model moved by -0.004 within
        human and within mouse (sd 0.002-0.028 over split seeds), kNN transfer by -0.014 / +0.005 and the
        held-out MLM by +0.004 nats (``benchmarks/results/demo_attention_dropout.txt``; no test cell read).
    pretrain_steps, batch_size, learning_rate, warmup_steps, contrastive_weight
        Pretraining budget and objective (MLM + SimCSE with this weight).
    mlm_bias_init
        ``train.mlm_bias_init`` of the pretraining: ``"unigram"`` starts the MLM output bias at the
        corpus's log gene frequencies, ``"zero"`` is BERT's init. Over 3 seeds of the demo's
        pretraining, unigram gave a lower held-out MLM loss (0.31 nats below the rank baseline
        against 0.28), better cross-species transfer and mixing
        (``benchmarks/results/species_cpu_mlm_bias.txt``).
    cross_species_weight
        Weight of the cross-species term (each cell's positive is its nearest cell of the other
        species by ortholog genes; ``cross_species_positives="mnn"``); 0 turns it off.
        ``benchmarks/results/species_cpu_queue.txt`` measured the choice (``species_cpu_clean.txt`` without test cells): with the queue below,
        0.05 transfers labels across species as well as 0.1 and keeps more of the MLM learning.
    cross_species_queue, cross_species_k
        The pairing searches the batch plus this many earlier cells and keeps K-reciprocal pairs
        (model options of the same names). At the demo's batch of 16, 1,024 and 20 give 10 pairs a
        step, 77% of the same type, against 6 at 60% within the batch
        (``benchmarks/results/mnn_purity_demo.txt``), and raise cross-species kNN transfer above the
        count PCA-kNN baseline.
    pooling, embed_layer
        Cell representation: the SimCSE term is trained on ``pooling`` of the last layer, and cells
        are embedded (UMAP, zero-shot classification, perturbation) from hidden state
        ``embed_layer``. The demo pools by the mean over genes of the last layer, so the contrastive
        objective shapes exactly the embedding used downstream (a 2-layer model's second-to-last
        layer, Geneformer's default, is only its first block).
    finetune_epochs
        Fine-tuning epochs per classification setting and seed (the most, when a validation split
        selects the epoch), with the library's recipe (:class:`mixgeneformer.classify.FinetuneConfig`:
        head started at the probe, class weights, learning rates fitted to the width). 0 skips
        fine-tuning; zero-shot kNN / logistic regression and the count baselines always run.
    finetune_overrides
        Further :class:`~mixgeneformer.classify.FinetuneConfig` options of the demo's fine-tuning,
        chosen by 5-fold cross-validation on the cells no split of seeds 0-2 tests on, never on test cells
        (``benchmarks/results/finetune_cv_clean_{human,mouse}.txt``; first ``finetune_cv_{human,mouse}.txt``, ``finetune_cv_dropout_*.txt``):
        batch 32; every training cell fits, the last epoch is kept (``validation_fraction=0``: on
        these ~1,000-cell sets carving and selecting on a validation split cost 1-5 points of
        cross-validated macro-F1, its noisy macro-F1 stopping at epoch 3 of 10); no encoder dropout
        (as accurate within noise, and ~45% less fine-tuning time: PyTorch's fused attention runs
        without attention dropout).
    classify_seeds
        Seeds of the classification splits (and of fine-tuning): every classification number in
        the report is a mean ± sd over them. Cross-species settings train on the source's
        training split and test on the target's test split of the same seed.
    min_class_count
        Classes with fewer cells are dropped from classification, beside the authors' rule (under
        0.5% of cells). 10: on the full Baron sets the 0.5% rule alone drops exactly the classes
        under 10 cells, but the shipped subset caps beta and alpha at 400 cells, which lowers 0.5%
        to 7 mouse cells and would keep T cells (7) and other immune cells (8), one or two test
        cells per seed whose F1 of 0 or 1 moves macro-F1 by 8 points (the data's README: classes
        under ~10 cells need merging or dropping in a benchmark).
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
        Worker processes of the median, tokenization and classification stages (classification
        settings run one torch thread each, so results do not depend on ``workers``; on a GPU
        they run one after another in this process).
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
    model_overrides: dict[str, Any] = field(
        default_factory=lambda: {"max_position_embeddings": 512, "attention_probs_dropout_prob": 0.0}
    )
    pretrain_steps: int = 1600
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 40
    mlm_bias_init: Literal["zero", "unigram"] = "unigram"
    contrastive_weight: float = 1.0
    cross_species_weight: float = 0.05
    cross_species_queue: int = 1024
    cross_species_k: int = 20
    pooling: Literal["mean"] = "mean"
    embed_layer: int = -1
    finetune_epochs: float = 10.0
    finetune_overrides: dict[str, Any] = field(
        default_factory=lambda: {"batch_size": 32, "validation_fraction": 0.0, "attention_dropout": 0.0, "hidden_dropout": 0.0}
    )
    classify_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    min_class_count: int = 10
    perturb_species: Literal["human", "mouse"] = "human"
    perturb_start: str = "beta"
    perturb_goal: str = "alpha"
    perturb_alternatives: list[str] = field(default_factory=lambda: ["ductal"])
    perturb_cells: int = 20
    umap_neighbors: int = 15
    seed: int = 0
    device: str | None = None
    workers: int = 2
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
        nonneg = (self.finetune_epochs, self.warmup_steps, self.contrastive_weight, self.cross_species_weight, self.cross_species_queue)
        if not all(value >= 0 and math.isfinite(value) for value in nonneg):
            raise ConfigError(
                "demo.finetune_epochs, demo.warmup_steps, demo.contrastive_weight, demo.cross_species_weight and "
                f"demo.cross_species_queue must be finite and >= 0, got {list(nonneg)}."
            )
        if self.cross_species_k < 1:
            raise ConfigError(f"demo.cross_species_k must be >= 1 (1 = mutual nearest cells), got {self.cross_species_k}.")
        finetune_config(self)  # validates finetune_overrides
        if self.min_class_count < 2:
            raise ConfigError(f"demo.min_class_count={self.min_class_count} must be at least 2 (a class is split 80/20).")
        if not self.classify_seeds or len(set(self.classify_seeds)) != len(self.classify_seeds):
            raise ConfigError(f"demo.classify_seeds must be distinct seeds, at least one; got {self.classify_seeds}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"demo.learning_rate must be > 0, got {self.learning_rate}.")
        self._check_model()
        if self.perturb_start == self.perturb_goal:
            raise ConfigError(
                f"demo.perturb_start and demo.perturb_goal are both {self.perturb_start!r}; choose two cell types."
            )

    def _check_model(self) -> None:
        """The preset exists and ``embed_layer`` is one of its hidden states (before four steps run)."""
        if self.preset not in PRESETS:  # pretraining's check (check_model_options) takes presets only
            raise ConfigError(f"demo.preset={self.preset!r} is not one of {sorted(PRESETS)}.")
        overrides = self.model_overrides if isinstance(self.model_overrides, dict) else {}
        layers = overrides.get("num_hidden_layers", PRESETS.get(self.preset, {}).get("num_hidden_layers"))
        if isinstance(layers, int):
            layers_to_run(layers, self.embed_layer)

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


def finetune_config(config: DemoConfig) -> FinetuneConfig:
    """The demo's fine-tuning options: at most ``finetune_epochs`` epochs, its device, then ``finetune_overrides``."""
    values = {"epochs": max(config.finetune_epochs, 1.0), "device": config.device, **config.finetune_overrides}
    return from_dict(FinetuneConfig, values, "demo.finetune_overrides")


def demo_data_dir() -> Path:
    """The folder of the shipped demo dataset (Baron et al. 2016 pancreas, human + mouse)."""
    return Path(str(resources.files("mixgeneformer") / "data" / "demo"))


def capped_rows(labels: pd.Series | np.ndarray, cap: int, seed: int = 0) -> np.ndarray:
    """Row positions keeping at most ``cap`` cells per label (a seeded random subset), ascending.

    Labels with at most ``cap`` cells are kept whole, so rare types survive.
    """
    if cap < 0:
        raise ConfigError(f"cap must be >= 0 cells per label, got {cap}.")
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(pd.Series(np.asarray(labels)).astype(str), sort=True)
    keep = np.zeros(codes.size, dtype=bool)
    for code in range(uniques.size):  # one iteration per label, not per cell
        rows = np.flatnonzero(codes == code)
        if rows.size > cap:
            rows = rng.choice(rows, size=cap, replace=False)
        keep[rows] = True
    return np.flatnonzero(keep)


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
