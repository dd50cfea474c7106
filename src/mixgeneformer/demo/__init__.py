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

from .config import DEMO_STEPS, DemoConfig, capped_rows, demo_data_dir
from .report import write_report
from .run import run_demo

__all__ = ["DEMO_STEPS", "DemoConfig", "capped_rows", "demo_data_dir", "run_demo", "write_report"]
