"""Model-loading commands and perturbation scores (outside audit, part A).

Every command that loads a model takes ``--vocab`` / ``--medians`` (a plain Hugging Face folder
such as Geneformer's has neither), and Geneformer's InSilicoPerturber ``cell_emb`` score is offered
beside ours, checked against an independent computation with plain ``transformers``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from _tokenize_helpers import cli_exit_code, make_adata, make_medians
from transformers import BertConfig, BertForMaskedLM, BertModel

from mixgeneformer.errors import ConfigError
from mixgeneformer.perturb import PerturbConfig, perturb_cells, perturbation_statistics
from mixgeneformer.vocab import Vocabulary

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


# ------------------------------------------------------------------------------------------------
# 18. --vocab / --medians on every command that loads a model


@pytest.fixture(scope="module")
def plain_hf_model(tmp_path_factory):
    """A plain Hugging Face BERT folder (no vocab.json, no medians.tsv) plus its vocabulary, medians, cells."""
    root = tmp_path_factory.mktemp("plain")
    adata = make_adata(45, 60)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    genes = np.asarray(adata.var_names, dtype=object)
    vocab = Vocabulary(["<pad>", "<mask>", *genes], {g: i + 2 for i, g in enumerate(genes)}, "geneformer")
    vocab.save(root / "vocab.json")
    make_medians(genes).save(root / "medians.tsv")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), **TINY_BERT)).save_pretrained(root / "model")
    adata.write_h5ad(root / "cells.h5ad")
    return root, genes



@pytest.mark.parametrize("command", ["embed", "classify", "perturb"])
def test_every_model_command_loads_a_plain_hf_folder_with_vocab_and_medians(plain_hf_model, tmp_path, command, capsys):
    root, genes = plain_hf_model
    out = tmp_path / ("out.h5ad" if command == "embed" else "out")
    extra = {
        "embed": ["--no-progress"],
        "classify": ["--label", "cell_type", "--mode", "knn"],
        "perturb": ["--genes", ",".join(genes[:3]), "--no-progress"],
    }[command]
    base = [command, str(root / "cells.h5ad"), "--model", str(root / "model"), "--out", str(out), "--device", "cpu", *extra]
    assert cli_exit_code(base) == 2  # without them: one message naming the option
    err = capsys.readouterr().err
    assert "--vocab" in err and "Traceback" not in err and not out.exists()
    assert cli_exit_code([*base, "--vocab", str(root / "vocab.json"), "--medians", str(root / "medians.tsv")]) == 0
    assert out.exists()


def test_perturb_merge_takes_vocab_for_a_plain_hf_folder(plain_hf_model, tmp_path):
    root, genes = plain_hf_model
    out = tmp_path / "run"
    common = ["--model", str(root / "model"), "--vocab", str(root / "vocab.json")]
    for index in range(2):
        assert cli_exit_code(["perturb", str(root / "cells.h5ad"), *common, "--medians", str(root / "medians.tsv"), "--out", str(out),
                     "--genes", ",".join(genes[:4]), "--device", "cpu", "--no-progress",
                     "--shard-index", str(index), "--num-shards", "2"]) == 0
    assert cli_exit_code(["perturb-merge", str(out), *common]) == 0
    assert (out / "merged" / "cells.parquet").exists()


# ------------------------------------------------------------------------------------------------
# 19. Geneformer's cell_emb score


def _v1_vocab(n_genes: int) -> Vocabulary:
    ids = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    return Vocabulary(["<pad>", "<mask>", *ids], {g: i + 2 for i, g in enumerate(ids)}, "geneformer")


def _reference_cell_emb(bert: BertModel, cell: np.ndarray, position: int, perturb: str) -> float:
    """Geneformer's value, from plain transformers: mean over the remaining genes of
    cos(state before, state after), the perturbed gene's position removed (hidden_states[-2])."""

    def states(ids: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            out = bert(input_ids=torch.as_tensor(ids[None, :], dtype=torch.long), output_hidden_states=True)
        return out.hidden_states[-2][0].double()

    keep = np.delete(np.arange(len(cell)), position)
    before = states(cell)[keep]
    if perturb == "delete":
        after = states(cell[keep])
    else:  # overexpress: the gene moves to the front; compare the genes after it
        after = states(np.concatenate([[cell[position]], cell[keep]]))[1:]
    return float(torch.nn.functional.cosine_similarity(before, after, dim=-1).mean())


@pytest.mark.parametrize("perturb", ["delete", "overexpress"])
def test_cell_emb_score_equals_geneformer_computed_with_plain_transformers(perturb):
    vocab = _v1_vocab(40)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), **TINY_BERT), add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    cells = [rng.choice(np.arange(2, len(vocab)), size=n, replace=False) for n in (12, 7, 3)]
    # Every gene of every cell (12 and 7 deletions share the first block; 3 do not), or three named genes.
    genes = [] if perturb == "delete" else [vocab.tokens[t] for t in (cells[0][4], cells[1][0], cells[2][2])]
    config = PerturbConfig(perturb=perturb, genes=genes, score="cell_emb", device="cpu", batch_size=5)
    table = perturb_cells(bert, cells, vocab, config, progress=False).cells
    assert {"shift", "cell_emb", "cell_emb_shift"} <= set(table.columns)
    named = [vocab.gene_to_id[g] for g in genes]
    assert len(table) == (sum(len(c) for c in cells) if perturb == "delete" else sum(np.isin(c, named).sum() for c in cells))
    for row in table.itertuples():
        expected = _reference_cell_emb(bert, cells[row.cell], row.gene_rank, perturb)
        assert row.cell_emb == pytest.approx(expected, abs=1e-5), (row.cell, row.gene_rank)
        assert row.cell_emb_shift == pytest.approx(1.0 - row.cell_emb, abs=1e-12)
    # Ours stays the pooled-embedding shift; the two scores differ but agree in direction.
    assert not np.allclose(table["shift"], table["cell_emb_shift"])
    stats = perturbation_statistics(table, vocab, mode="aggregate", score=config.statistics_score)
    assert stats.attrs["score"] == "cell_emb_shift" and {"mean_cell_emb", "mean_cell_emb_shift"} <= set(stats.columns)
    assert stats["mean_cell_emb_shift"].is_monotonic_decreasing


def test_cell_emb_score_options_are_validated():
    assert PerturbConfig().statistics_score is None  # ours by default: shift (goal_shift with a goal)
    with pytest.raises(ConfigError, match="score='cosine'"):
        PerturbConfig(score="cosine")
    with pytest.raises(ConfigError, match="mode='exact'"):
        PerturbConfig(score="cell_emb", mode="screen")


def test_cli_perturb_score_cell_emb_ranks_by_geneformer_score(plain_hf_model, tmp_path):
    root, genes = plain_hf_model
    out = tmp_path / "out"
    assert cli_exit_code(["perturb", str(root / "cells.h5ad"), "--model", str(root / "model"), "--vocab", str(root / "vocab.json"),
                 "--medians", str(root / "medians.tsv"), "--out", str(out), "--genes", ",".join(genes[:5]),
                 "--score", "cell_emb", "--device", "cpu", "--no-progress"]) == 0
    cells = pd.read_parquet(out / "cells.parquet")
    table = pd.read_csv(out / "genes.csv")
    assert cells["cell_emb"].between(-1, 1).all() and "mean_cell_emb_shift" in table.columns
    ranked = table.sort_values(["significant", "mean_cell_emb_shift", "fdr"], ascending=[False, False, True], kind="stable")
    assert ranked.index.tolist() == table.index.tolist()  # the table is ranked by Geneformer's score
    assert "score: cell_emb" in (out / "config.yaml").read_text()
    assert ad.read_h5ad(root / "cells.h5ad").n_obs == 45  # input untouched


def test_cli_combine_with_vs_all_is_refused_before_work(plain_hf_model, tmp_path, capsys):
    root, genes = plain_hf_model
    out = tmp_path / "out"
    args = ["perturb", str(root / "cells.h5ad"), "--model", str(root / "model"), "--vocab", str(root / "vocab.json"),
            "--medians", str(root / "medians.tsv"), "--out", str(out), "--genes", ",".join(genes[:2]), "--combine",
            "--device", "cpu", "--no-progress"]
    assert cli_exit_code(args) == 2 and not out.exists()
    assert "--stats aggregate" in capsys.readouterr().err
    assert cli_exit_code([*args, "--stats", "aggregate"]) == 0 and (out / "genes.csv").exists()
