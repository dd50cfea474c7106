"""Audit of the benchmark scripts' statistics and cell selection (benchmarks/*.py, loaded by path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from mixgeneformer import classify as C

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """A benchmark script as a module (its ``main`` is not run)."""
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # the scripts drop their own folder from sys.path
    return module


def test_split_seeds_pairs_only_seeds_with_both_methods():
    split_seeds = load_script("split_seeds")
    rows = [
        (0, "logreg_counts", 0.90), (0, "finetune", 0.80),
        (1, "logreg_counts", 0.95), (1, "finetune", 0.90),
        (2, "logreg_counts", 0.92), (2, "finetune", 0.86),
        (3, "logreg_counts", 0.97),  # finetune missing for this seed
    ]
    per_seed = pd.DataFrame(rows, columns=["seed", "method", "macro_f1"])
    p = split_seeds.paired(per_seed, "finetune")
    diff = np.array([-0.10, -0.05, -0.06])
    half = scipy.stats.t.ppf(0.975, 2) * diff.std(ddof=1) / np.sqrt(3)
    assert p["n"] == 3
    assert p["mean"] == pytest.approx(diff.mean())
    assert p["lo"] == pytest.approx(diff.mean() - half)
    assert p["hi"] == pytest.approx(diff.mean() + half)


def test_seed_summary_does_not_average_fewer_seeds_than_it_counts():
    per_seed = pd.DataFrame({
        "seed": [0, 1, 2, 0, 1, 2],
        "method": ["a", "a", "a", "b", "b", "b"],
        "macro_f1": [0.5, np.nan, 0.7, 0.2, 0.4, 0.9],
    })
    table = C.seed_summary(per_seed, by=("method",), metrics=("macro_f1",)).set_index("method")
    assert table.at["a", "n_seeds"] == 3
    assert np.isnan(table.at["a", "macro_f1"]) and np.isnan(table.at["a", "macro_f1_sd"])
    assert table.at["b", "macro_f1"] == pytest.approx(0.5)
    assert table.at["b", "macro_f1_sd"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))


def test_classify_table_of_one_seed_has_no_nan_sd():
    classify = load_script("classify")
    per_seed = pd.DataFrame([{"setting": "within-human", "seed": 0, "method": "m", "accuracy": 0.9,
                              "macro_precision": 0.8, "macro_recall": 0.7, "macro_f1": 0.75}])
    table = classify.mean_sd_table(per_seed, ["within-human"])
    assert table.at[0, "macro_f1"] == "0.750"
    assert not any("nan" in str(v) for v in table.iloc[0])


def test_input_bound_counts_baseline_scores_the_cells_the_bags_score(monkeypatch):
    import datasets

    input_bound = load_script("input_bound")
    rng = np.random.default_rng(0)
    n = 40
    labels = np.array(["a", "b"] * (n // 2), dtype=object)
    adata = ad.AnnData(X=rng.poisson(3.0, size=(n, 12)).astype(np.float32), obs=pd.DataFrame({"t": labels}, index=[str(i) for i in range(n)]))
    task = C.Task("within", adata, np.arange(0, 30), labels[:30], adata, np.arange(30, 40), labels[30:])
    dropped = 35  # a test cell without any vocabulary gene

    def fake_tokenize_task(task, vocab, medians, config, max_len):  # noqa: ANN001
        kept = np.setdiff1d(np.arange(n), [dropped])
        tokens = C.TokenizedCells(datasets.Dataset.from_dict({"input_ids": [[1 + i % 5, 6 + i % 2] for i in kept]}), kept)
        return C.restrict_to_tokenized(task, tokens, tokens), tokens, tokens

    seen = []

    def fake_baseline(train, train_y, test, method):  # noqa: ANN001
        seen.append((train.shape[0], test.shape[0]))
        return C.Prediction(labels=np.asarray(["a"] * test.shape[0], dtype=object), probabilities=None, classes=["a", "b"])

    monkeypatch.setattr(input_bound.C, "tokenize_task", fake_tokenize_task)
    monkeypatch.setattr(input_bound.C, "baseline_predict", fake_baseline)

    class Vocab:
        tokens = list(range(10))

    row = input_bound.seed_scores(adata, task, Vocab(), None, [8])
    assert seen == [(30, 9)]  # the 9 test cells the bags are scored on, not all 10
    assert set(row) == {"bag_binary_8", "bag_rank_8", "logreg_counts"}


def test_finetune_cv_folds_never_read_a_test_cell_of_the_seeds_compared():
    finetune_cv = load_script("finetune_cv")
    rng = np.random.default_rng(1)
    n = 200
    labels = rng.choice(["alpha", "beta", "delta"], size=n).astype(object)
    adata = ad.AnnData(X=np.ones((n, 3), dtype=np.float32),
                       obs=pd.DataFrame({"cell_type1": labels}, index=[str(i) for i in range(n)]))
    seeds = finetune_cv.parse_args(["--bundle", "b", "--seeds", "0", "1", "2"]).exclude_test_seeds  # default: --seeds
    assert seeds == [0, 1, 2] and finetune_cv.parse_args(["--bundle", "b", "--exclude-test-seeds"]).exclude_test_seeds == []
    excluded = C.tested_rows(adata, C.LabelConfig(key="cell_type1"), seeds)
    for seed in seeds:
        task = C.within_task(adata, C.LabelConfig(key="cell_type1", seed=seed))
        pool = C.without_training_rows(task, excluded)
        for other in seeds:
            other_test = C.within_task(adata, C.LabelConfig(key="cell_type1", seed=other)).test_rows
            assert not np.isin(pool.train_rows, other_test).any()
        assert np.array_equal(pool.train_labels, labels[pool.train_rows])
        assert pool.train_rows.size > 0.3 * n


def test_classify_records_the_held_out_rows_of_a_pretraining_run(tmp_path, capsys):
    """benchmarks/classify.py --eval-fraction: every held-out evaluation of metrics.csv is kept with
    how far the model is below the rank-position baseline; training rows are not."""
    classify = load_script("classify")
    (tmp_path / "metrics.csv").write_text(
        "step,loss,eval_mlm_loss,eval_top1,eval_rank_unigram_loss,eval_unigram_loss\n"
        "10,9.5,,,,\n"
        "10,,9.0,0.01,8.75,8.8\n"
        "20,,8.25,0.02,8.75,8.8\n"
    )
    classify.HELD_OUT.clear()
    classify.record_held_out("both", tmp_path, type("Args", (), {"seed": 3})())
    rows = pd.DataFrame(classify.HELD_OUT)
    assert rows["step"].tolist() == [10, 20] and set(rows["model"]) == {"both"} and set(rows["seed"]) == {3}
    assert rows["below_rank_baseline"].tolist() == pytest.approx([-0.25, 0.5])
    assert rows["mlm_loss"].tolist() == [9.0, 8.25]
    assert "0.50 nats below the rank-position baseline" in capsys.readouterr().out
    classify.HELD_OUT.clear()
