"""Sharded perturbation runs: each shard's table in OUT/shards, then one merged folder with statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import BertConfig, BertModel

from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.fileio import OUTPUT_MARKER
from mixgeneformer.genes import gene_table
from mixgeneformer.perturb import (
    PerturbConfig,
    finish_run,
    is_shard_run,
    merge_run,
    perturb_cells,
    read_cells,
    write_shard,
)
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]


@pytest.fixture(scope="module")
def setup():
    table = gene_table("human")
    ids = table.query("biotype == 'protein_coding'")["ensembl_id"].tolist()[:40]
    vocab = Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, attn_implementation="sdpa")
    bert = BertModel(config, add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2], rng.choice(np.arange(6, 46), 8, replace=False), [3]]).astype(np.int64) for _ in range(6)]
    return vocab, bert, cells


def test_shards_written_then_merged_equal_the_single_run(setup, tmp_path):
    vocab, bert, cells = setup
    single = perturb_cells(bert, cells, vocab, PerturbConfig(batch_size=8), progress=False)
    whole = finish_run(tmp_path / "single", single, PerturbConfig(), vocab)
    out = tmp_path / "sharded"
    for i in range(3):
        config = PerturbConfig(batch_size=8, shard_index=i, num_shards=3)
        assert is_shard_run(config)
        if i < 2:
            with pytest.raises(ArtifactError, match="wait for every shard"):
                write_shard(out, perturb_cells(bert, cells, vocab, config, progress=False), config)
                merge_run(out, vocab, PerturbConfig())
        else:
            write_shard(out, perturb_cells(bert, cells, vocab, config, progress=False), config)
    assert sorted(p.name for p in (out / "shards").glob("cells-*")) == [f"cells-{i:05d}-of-00003.parquet" for i in range(3)]
    assert len(list((out / "shards").glob("config-*-of-00003.yaml"))) == 3
    folder, merged, stats = merge_run(out, vocab, PerturbConfig())
    assert folder == out / "merged" and (folder / "genes.csv").exists()
    assert merged.summary == {"shards": 3, "cells_perturbed": 6}
    pd.testing.assert_frame_equal(read_cells(folder)[["cell", "perturbed"]], single.cells[["cell", "perturbed"]])
    assert np.abs(read_cells(folder)["shift"].to_numpy() - single.cells["shift"].to_numpy()).max() <= 1e-5
    assert sorted(stats["perturbed"]) == sorted(whole["perturbed"])
    assert merge_run(out, vocab, PerturbConfig())[0] == folder  # a second merge replaces its own folder
    (folder / OUTPUT_MARKER).unlink()  # now a folder the user may own
    (folder / "mine.txt").write_text("notes")
    with pytest.raises(ArtifactError, match="was not written by mixgeneformer.*Move that folder away"):
        merge_run(out, vocab, PerturbConfig())
    assert (folder / "mine.txt").read_text() == "notes"


def test_merge_without_shards_says_how_to_make_them(tmp_path):
    with pytest.raises(ArtifactError, match="--num-shards"):
        merge_run(tmp_path, None, PerturbConfig())


def test_merge_uses_the_options_the_shards_ran_with(setup, tmp_path):
    vocab, bert, cells = setup
    genes = [vocab.tokens[int(t)] for t in cells[0][1:4]]
    out = tmp_path / "sharded"
    for i in range(2):
        config = PerturbConfig(genes=genes, batch_size=4, shard_index=i, num_shards=2)
        write_shard(out, perturb_cells(bert, cells, vocab, config, progress=False), config)
    folder, _, stats = merge_run(out, vocab)  # no options given: the shards' own
    recorded = yaml.safe_load((folder / "config.yaml").read_text())
    assert recorded["genes"] == genes and recorded["shard_index"] is None
    assert sorted(stats["perturbed"]) == sorted(genes)
    merge_run(out, vocab, PerturbConfig(genes=genes, batch_size=64))  # the batch size changes nothing computed
    with pytest.raises(ConfigError, match="genes"):
        merge_run(out, vocab, PerturbConfig(genes=genes[:1]))
    for saved in (out / "shards").glob("config-*.yaml"):
        saved.unlink()  # shards of an older version saved no options
    with pytest.raises(ArtifactError, match="--config"):
        merge_run(out, vocab)
    assert merge_run(out, vocab, PerturbConfig(genes=genes))[2] is not None
