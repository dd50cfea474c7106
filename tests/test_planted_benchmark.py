"""The planted-truth benchmark runs end to end on a very small budget (benchmarks/planted.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "planted.py"


@pytest.mark.slow
def test_planted_benchmark_smoke(tmp_path, monkeypatch):
    from mixgeneformer import integration

    monkeypatch.setattr(integration, "scib_available", lambda: False)  # the sklearn score; no jax compile
    spec = importlib.util.spec_from_file_location("planted_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "table.txt"
    per_seed = module.main([
        "--seeds", "0", "--configs", "ortholog+xs", "--types", "3", "--cells-per-type", "30", "--steps", "8",
        "--batch", "16", "--finetune-steps", "2", "--perturb-cells", "2", "--work-dir", str(tmp_path / "work"),
        "--out", str(out),
    ])
    row = per_seed.iloc[0]
    assert row["config"] == "ortholog+xs" and row["backend"] == "sklearn"
    for column in ("mlm_loss", "rank_unigram_loss", "knn_within_acc_human", "finetune_within_acc_mouse",
                   "transfer_f1_mouse->human", "pca_f1_human->mouse", "species_asw", "marker_recall_at_20"):
        assert 0 <= row[column] < 20, column
    text = out.read_text()
    assert "| transfer_f1 |" in text and ">= 0.9 (ortholog+xs)" in text
