"""Sharded perturbation runs: each shard's table in OUT/shards, then one merged folder with statistics."""

from __future__ import annotations

import dataclasses

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
            with pytest.raises(ArtifactError, match="have not finished: wait for them"):
                write_shard(out, perturb_cells(bert, cells, vocab, config, progress=False), config)
                merge_run(out, vocab, PerturbConfig())
        else:
            write_shard(out, perturb_cells(bert, cells, vocab, config, progress=False), config)
    assert sorted(p.name for p in (out / "shards").glob("cells-*")) == [f"cells-{i:05d}-of-00003.parquet" for i in range(3)]
    assert len(list((out / "shards").glob("config-*-of-00003.yaml"))) == 3
    folder, merged, stats = merge_run(out, vocab, PerturbConfig())
    assert folder == out / "merged" and (folder / "genes.csv").exists()
    expected = {k: v for k, v in single.summary.items() if k not in ("seconds", "shard")}
    assert merged.summary == {"shards": 3, **expected}  # the shards' counts summed
    pd.testing.assert_frame_equal(read_cells(folder)[["cell", "perturbed"]], single.cells[["cell", "perturbed"]])
    assert np.abs(read_cells(folder)["shift"].to_numpy() - single.cells["shift"].to_numpy()).max() <= 1e-5
    assert sorted(stats["perturbed"]) == sorted(whole["perturbed"])
    # A second merge is refused without overwrite (it silently replaced the first; embed-merge and
    # predict-merge refuse a rerun too) and replaces its own folder with it.
    with pytest.raises(ArtifactError, match="merged before.*--overwrite"):
        merge_run(out, vocab, PerturbConfig())
    assert merge_run(out, vocab, PerturbConfig(), overwrite=True)[0] == folder
    genes = [vocab.tokens[int(t)] for t in cells[0][1:3]]
    shifted = dataclasses.replace(config, gene_shifts=True, genes=genes)
    write_shard(out, perturb_cells(bert, cells, vocab, shifted, progress=False), shifted)
    assert (out / "shards" / "gene_shifts-00002-of-00003.parquet").is_file()
    write_shard(out, perturb_cells(bert, cells, vocab, config, progress=False), config)  # rerun without them
    assert merge_run(out, vocab, PerturbConfig(), overwrite=True)[1].gene_shifts is None  # no stale table merged
    (folder / OUTPUT_MARKER).unlink()  # now a folder the user may own
    (folder / "mine.txt").write_text("notes")
    with pytest.raises(ArtifactError, match="was not written by mixgeneformer.*Move that folder away"):
        merge_run(out, vocab, PerturbConfig(), overwrite=True)
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
    # (each merge below replaces the one before: overwrite=True, without which a rerun is refused)
    merge_run(out, vocab, PerturbConfig(genes=genes, batch_size=64), overwrite=True)  # the batch size changes nothing computed
    with pytest.raises(ConfigError, match="genes"):
        merge_run(out, vocab, PerturbConfig(genes=genes[:1]), overwrite=True)
    for saved in (out / "shards").glob("config-*.yaml"):
        saved.unlink()  # shards of an older version saved no options
    with pytest.raises(ArtifactError, match="--config"):
        merge_run(out, vocab, overwrite=True)
    assert merge_run(out, vocab, PerturbConfig(genes=genes), overwrite=True)[2] is not None


def test_sharded_cli_run_merges_to_the_single_run_with_gene_shifts_and_empty_shards(setup, tmp_path, capsys):
    import json

    from test_audit_files import run_cli
    from test_perturb import bundle_and_cells

    vocab = setup[0]
    genes = bundle_and_cells(tmp_path, vocab)
    args = ["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--genes", ",".join(genes[:4]),
            "--state-column", "kind", "--start", "x", "--goal", "y", "--gene-shifts", "--device", "cpu", "--no-progress"]
    assert run_cli(capsys, *args, "--out", tmp_path / "single")[0] == 0
    sharded = tmp_path / "sharded"
    for index in range(8):  # 6 'x' cells over 8 shards: shards 6 and 7 hold none
        code, err = run_cli(capsys, *args, "--out", sharded, "--shard-index", str(index), "--num-shards", "8")
        assert code == 0, err
    assert run_cli(capsys, "perturb-merge", sharded, "--model", tmp_path / "bundle")[0] == 0
    merged, single = sharded / "merged", tmp_path / "single"
    for table in ("cells.parquet", "genes.parquet", "gene_shifts.parquet"):
        a, b = pd.read_parquet(single / table), pd.read_parquet(merged / table)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-8)  # float32 batches differ
    summary = {k: v for k, v in json.loads((single / "summary.json").read_text()).items() if k not in ("seconds", "shard")}
    assert summary.items() <= json.loads((merged / "summary.json").read_text()).items()

    (tmp_path / "other").mkdir()
    bundle_and_cells(tmp_path / "other", vocab, seed=1)  # another model
    assert run_cli(capsys, *[tmp_path / "other" / "bundle" if a == tmp_path / "bundle" else a for a in args],
                   "--out", sharded, "--shard-index", "3", "--num-shards", "8")[0] == 0
    # --overwrite: merged/ exists, and a rerun merge is refused without it before the shards are read
    code, err = run_cli(capsys, "perturb-merge", sharded, "--model", tmp_path / "bundle", "--overwrite")
    assert code == 2 and "cells-00003-of-00008.parquet read other inputs" in err

    for out in (tmp_path / "in.h5ad", tmp_path / "bundle"):  # a shard never writes into an input
        code, err = run_cli(capsys, *args, "--out", out, "--shard-index", "0", "--num-shards", "2")
        assert code == 2 and "is the input" in err and not (out / "shards").exists()


def test_merge_names_missing_shards_and_shards_of_other_runs(tmp_path):
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    for name in ("cells-00000-of-00003.parquet", "cells-00002-of-00003.parquet"):
        pd.DataFrame({"cell": [0]}).to_parquet(shards / name)
    with pytest.raises(ArtifactError, match=r"2 of 3 shard tables .* shards \[1\] have not finished"):
        merge_run(tmp_path / "run", None, PerturbConfig())
    pd.DataFrame({"cell": [0]}).to_parquet(shards / "cells-00000-of-00002.parquet")
    with pytest.raises(ArtifactError, match=r"runs with \[2, 3\] shards .* delete the files of the run you do not want"):
        merge_run(tmp_path / "run", None, PerturbConfig())
