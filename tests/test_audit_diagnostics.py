"""Audit of the held-out pretraining diagnostics: masking per held-out cell, top-k over genes, the report's wording."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixgeneformer import diagnostics
from mixgeneformer.corpus import open_corpus
from mixgeneformer.pretrain import make_eval_collator, pretrain_config_from_dict, split_train_eval

sys.path.insert(0, str(Path(__file__).parent))
from test_pretrain import SPECIALS, make_vocab, synthetic, tiny_config, training_data  # noqa: E402, F401 (synthetic: a fixture)


def _held_out_rows(root: Path, fraction: float = 0.25, seed: int = 7) -> list[dict]:
    _train, held_out = split_train_eval(open_corpus([root / "corpus"]), fraction, seed)
    held_out = held_out.select_columns(["input_ids"]).with_format("numpy")
    return [held_out[i] for i in range(len(held_out))]


def _labels_per_cell(collator, rows: list[dict], batch_size: int) -> list[torch.Tensor]:
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        labels = collator(part)["labels"]
        out += [labels[i, : len(row["input_ids"])] for i, row in enumerate(part)]
    return out


def test_a_held_out_cell_is_masked_the_same_whatever_batch_it_is_in(synthetic):  # noqa: F811
    """The held-out masks were seeded per batch: under 2 processes (each rank's batches hold other cells), another
    batch size or order, a cell was scored on other positions, so held-out numbers (the baselines' too) changed."""
    vocab = make_vocab()
    config = pretrain_config_from_dict(tiny_config(synthetic, synthetic / "unused", data={"eval_fraction": 0.25}))
    collator = make_eval_collator(vocab, config.data, 64, 7)
    rows = _held_out_rows(synthetic)
    assert len(rows) == 64
    by8, by4, by3 = (_labels_per_cell(collator, rows, b) for b in (8, 4, 3))
    backwards = _labels_per_cell(collator, rows[::-1], 8)[::-1]
    for cell in range(len(rows)):
        for other in (by4, by3, backwards):
            assert torch.equal(by8[cell], other[cell]), cell
    n_masked = sum(int((labels != -100).sum()) for labels in by8)
    n_genes = sum(int((~vocab.is_special[row["input_ids"]]).sum()) for row in rows)
    assert 0.1 < n_masked / n_genes < 0.2  # mlm_probability 0.15 of the gene tokens
    batch = collator(rows[:8])
    chosen = batch["labels"] != -100
    assert bool((batch["input_ids"][chosen] == vocab.mask_id).all())  # every held-out position is <mask>
    assert not bool(torch.from_numpy(vocab.is_special)[batch["labels"][chosen]].any())  # never a special token
    other_seed = make_eval_collator(vocab, config.data, 64, 8)(rows[:8])["labels"]
    assert not torch.equal(other_seed, batch["labels"])  # the run's seed still chooses the positions


def test_model_top_k_ranks_gene_tokens_only():
    """The model's top-k ran over the whole vocabulary: a special token ranked high (<mask>, <pad>) took a place
    of its top 1 / top 10 that the baselines (gene tokens only) never give up."""
    cells = [np.array([2, 6, 7, 8]), np.array([2, 6, 6, 7])]
    special = np.arange(len(SPECIALS))
    base = diagnostics.frequency_baselines(cells, 9, special, bucket_size=2, max_len=4, prior_strength=3.0)
    labels = torch.full((1, 4), -100)
    labels[0, 1] = 7
    logits = torch.zeros((1, 9))
    logits[0, 1] = 9.0  # <mask> first
    logits[0, 7] = 5.0  # then the right gene
    metrics = diagnostics.summarize(diagnostics.masked_gene_stats(logits, labels, base))
    assert metrics["top1"] == 1.0 and metrics["top10"] == 1.0
    # The loss stays the model's MLM loss over the whole vocabulary (its mass on <mask> counts against it).
    assert metrics["mlm_loss"] == pytest.approx(float(torch.logsumexp(logits[0], 0) - 5.0), rel=1e-6)
    # With 3 genes only, the baselines' top 10 are those 3 genes (no special token filling the list).
    tables = base.tables("cpu")
    assert tables["unigram_top"].numel() == 3 and set(tables["unigram_top"].tolist()) == {6, 7, 8}
    assert tables["rank_top"].shape == (2, 3) and int(tables["rank_top"].min()) >= 6


def test_the_report_states_the_runs_rank_bucket():
    """The report said "per rank bucket of 8 positions" whatever logging.rank_bucket the run used."""
    rows = [{"step": 4, "eval_mlm_loss": 4.0, "eval_top1": 0.2, "eval_top10": 0.5, "eval_unigram_loss": 6.0,
             "eval_unigram_top1": 0.01, "eval_unigram_top10": 0.05, "eval_rank_unigram_loss": 5.5,
             "eval_rank_unigram_top1": 0.02, "eval_rank_unigram_top10": 0.1}]
    final = diagnostics.final_evaluation(rows, rank_bucket=4)
    text = diagnostics.diagnostics_markdown(final)
    assert "per rank bucket of 4 positions" in text and "of 8 positions" not in text
    assert "| model | 4.000 | 0.200 | 0.500 |" in text  # the numbers of metrics.csv's last evaluation
    unknown = diagnostics.diagnostics_markdown(diagnostics.final_evaluation(rows))  # a record without the size
    assert "per rank bucket of positions" in unknown and "8" not in unknown.split("\n")[0]


def test_a_split_leaving_less_than_one_batch_to_train_is_one_clear_error_before_training(tmp_path, capsys):
    """10 cells with data.eval_fraction=0.5 and batches of 8 (or one cell and no held-out cells) trained 0 steps
    without a word (every batch was the dropped partial one) and saved an untrained model as the run's bundle."""
    import yaml

    from mixgeneformer.cli import main
    from mixgeneformer.errors import ConfigError
    from mixgeneformer.pretrain import run_pretraining

    for n_cells, fraction in ((10, 0.5), (1, 0.0)):
        root = training_data(tmp_path / f"data{n_cells}", make_vocab(), n_cells=n_cells)
        out = tmp_path / f"run{n_cells}"
        config = tiny_config(root, out, data={"eval_fraction": fraction}, train={"max_steps": 2})
        with pytest.raises(ConfigError, match="fewer than one batch of 8"):
            run_pretraining(pretrain_config_from_dict(config))
        assert not out.exists()  # refused before the run folder (or a model bundle) was written
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(tmp_path / "run.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "1 training cells" in err and "train.per_device_batch_size" in err and "Traceback" not in err
    # A split that leaves a batch trains (3 cells, one held out, batches of 2).
    root = training_data(tmp_path / "data3", make_vocab(), n_cells=3)
    config = tiny_config(root, tmp_path / "run3", data={"eval_fraction": 0.3}, train={"max_steps": 1, "per_device_batch_size": 2},
                         checkpoint={"save_steps": 1, "keep": 1})
    assert run_pretraining(pretrain_config_from_dict(config)).global_step == 1


def test_resume_refuses_another_definition_of_the_baselines_but_takes_more_steps(tmp_path, synthetic):  # noqa: F811
    """logging.rank_bucket / logging.baseline_cells could change on resume (as any logging.* setting): the rank
    baseline of the rows after the resume was another predictor than that of the rows before, on one curve."""
    from mixgeneformer.config import save_config
    from mixgeneformer.errors import ConfigError
    from mixgeneformer.pretrain import check_resume_config

    vocab = make_vocab()
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    saved = tiny_config(synthetic, tmp_path / "run", data={"eval_fraction": 0.1})
    save_config(pretrain_config_from_dict(saved), checkpoint)
    for change in ({"rank_bucket": 4}, {"baseline_cells": 1000}):
        config = tiny_config(synthetic, tmp_path / "run", data={"eval_fraction": 0.1}, logging=change)
        with pytest.raises(ConfigError, match=f"logging.{next(iter(change))}"):
            check_resume_config(pretrain_config_from_dict(config), checkpoint, vocab)
    config = tiny_config(synthetic, tmp_path / "run", data={"eval_fraction": 0.1}, train={"max_steps": 24},
                         logging={"eval_steps": 5})
    changes = check_resume_config(pretrain_config_from_dict(config), checkpoint, vocab)
    assert sorted(line.split(":")[0] for line in changes) == ["logging.eval_steps", "train.max_steps"]
