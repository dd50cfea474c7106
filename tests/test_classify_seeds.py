"""Classification over seeds: transfer on the within-species splits of a seed, mean ± sd tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_classify import baron_subset

from mixgeneformer import classify as C
from mixgeneformer.demo.report import _seeds_markdown


@pytest.mark.realdata
def test_transfer_split_trains_on_the_source_training_split_and_tests_on_the_target_test_split(shared_data):
    human = baron_subset(shared_data / "baron_pancreas_human.h5ad", 40, ["alpha", "beta", "ductal", "acinar"])
    mouse = baron_subset(shared_data / "baron_pancreas_mouse.h5ad", 40, ["alpha", "beta", "ductal", "B_cell"])
    for seed in (0, 1):
        labels = C.LabelConfig(min_class_fraction=0, seed=seed, transfer_split=True)
        run = C.run_classification(mouse, test=human, methods=(), baseline_methods=("logreg_counts",),
                                   config=C.ClassifyConfig(labels=labels))
        source_split, target_split = C.within_task(mouse, labels), C.within_task(human, labels)
        shared = np.isin(C.canonical_labels(source_split.train_labels), run.task.classes)
        assert np.array_equal(run.task.train_rows, source_split.train_rows[shared])
        target_shared = np.isin(C.canonical_labels(target_split.test_labels), run.task.classes)
        assert np.array_equal(run.task.test_rows, target_split.test_rows[target_shared])
        assert np.intersect1d(run.task.test_rows, target_split.train_rows).size == 0
    # Without the option every cell of each side takes part (the former behaviour).
    everything = C.run_classification(mouse, test=human, methods=(), baseline_methods=("logreg_counts",),
                                      config=C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0)))
    assert everything.task.test_rows.size == 120  # alpha, beta, ductal of human; acinar unseen, dropped


def test_seed_summary_is_mean_and_sample_sd_per_setting_and_method():
    per_seed = pd.DataFrame({
        "setting": ["a"] * 4 + ["b"] * 2,
        "seed": [0, 0, 1, 1, 0, 1],
        "method": ["x", "y", "x", "y", "x", "x"],
        "n_train": [10, 10, 12, 12, 5, 5],
        "n_test": [3, 3, 3, 3, 2, 2],
        "accuracy": [0.5, 0.9, 0.7, 0.9, 0.2, 0.4],
        "macro_precision": [0.1] * 6,
        "macro_recall": [0.1] * 6,
        "macro_f1": [0.4, 0.8, 0.6, 0.8, 0.1, 0.3],
    })
    table = C.seed_summary(per_seed)
    assert table[["setting", "method"]].values.tolist() == [["a", "x"], ["a", "y"], ["b", "x"]]
    row = table.iloc[0]
    assert row["n_seeds"] == 2 and row["n_train"] == 11
    assert row["accuracy"] == pytest.approx(0.6) and row["accuracy_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert table.iloc[1]["macro_f1_sd"] == 0.0
    text = _seeds_markdown(table)
    assert "0.600 ± 0.141" in text and "| 11 / 3 |" in text and "| 2 |" in text


def test_one_seed_has_no_sd_rather_than_a_zero_one():
    per_seed = pd.DataFrame({"setting": ["a", "a", "b"], "seed": [0, 1, 0], "method": ["x"] * 3,
                             "n_train": [4] * 3, "n_test": [2] * 3, "accuracy": [0.5, 0.7, 0.25],
                             "macro_precision": [0.5] * 3, "macro_recall": [0.5] * 3, "macro_f1": [0.5, 0.5, 0.125]})
    table = C.seed_summary(per_seed)
    assert table.iloc[0]["macro_f1_sd"] == 0.0 and np.isnan(table.iloc[1]["macro_f1_sd"])  # two equal seeds vs one seed
    text = _seeds_markdown(table)
    assert "| 0.500 ± 0.000 |" in text and "| 0.125 |" in text and "nan" not in text
    assert C.mean_sd_text(float("nan"), 0.1) == "n/a"


def test_benchmark_seed_tables_use_the_same_statistics_as_the_classification_tables():
    from mixgeneformer.integration import seed_table

    per_seed = pd.DataFrame({
        "config": ["p", "p", "p", "q"], "seed": [0, 1, 2, 0], "score": [0.2, 0.4, 0.9, 0.5], "backend": ["s"] * 4,
    })
    table, mean = seed_table(per_seed)
    assert list(table.columns) == ["p", "q"] and list(table.index) == ["score"]
    assert table.at["score", "p"] == f"0.500 ± {np.std([0.2, 0.4, 0.9], ddof=1):.3f}"  # sample sd, as seed_summary
    assert table.at["score", "q"] == "0.500" and mean.at["p", "score"] == pytest.approx(0.5)  # one seed: no sd


def test_demo_seed_and_finetune_options_are_validated_and_reach_the_classify_config(tmp_path):
    from mixgeneformer.demo.config import DemoConfig
    from mixgeneformer.demo.context import _Context
    from mixgeneformer.demo.steps import _classify_config
    from mixgeneformer.errors import ConfigError

    with pytest.raises(ConfigError, match="classify_seeds"):
        DemoConfig(classify_seeds=[])
    with pytest.raises(ConfigError, match="classify_seeds"):
        DemoConfig(classify_seeds=[1, 1])
    with pytest.raises(ConfigError, match="finetune_overrides"):
        DemoConfig(finetune_overrides={"no_such_option": 1})
    with pytest.raises(ConfigError, match="validation_fraction"):
        DemoConfig(finetune_overrides={"validation_fraction": 0.9})
    with pytest.raises(ConfigError, match="finetune_epochs"):
        DemoConfig(finetune_epochs=-1)
    config = DemoConfig(finetune_epochs=3, finetune_overrides={"freeze_embeddings": True}, classify_seeds=[4, 5])
    assert config.fingerprint() != DemoConfig().fingerprint()
    ctx = _Context(out_dir=tmp_path, config=config, progress=False)
    first, other = _classify_config(ctx.config), _classify_config(ctx.config, 5)
    assert first.labels.seed == 4 and other.labels.seed == 5 and first.labels.transfer_split
    assert first.finetune.epochs == 3 and first.finetune.freeze_embeddings
    assert first.finetune.learning_rate is None  # the library's width-fitted default
    # The report describes the fine-tuning the demo resolved: by default every training cell fits and
    # the last epoch is kept; with a validation split, the epoch is selected on it.
    from mixgeneformer.demo.report import _classification_text

    assert "10 epochs on every training cell, the last one kept" in _classification_text(DemoConfig(), {"steps": 1600})
    split = DemoConfig(finetune_overrides={"validation_fraction": 0.1, "selection_metric": "loss"})
    text = _classification_text(split, {"steps": 1600})
    assert "at most 10 epochs, the epoch kept the best by validation loss on 10% of the training cells" in text
