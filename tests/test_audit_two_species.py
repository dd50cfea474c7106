"""Audit of a user with cells of both species (human and mouse): gene names of the other species,
species recorded in outputs. Each test failed on the code before its fix."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch
from test_sharding import data  # noqa: F401  (fixture)
from transformers import BertConfig, BertModel

from mixgeneformer.cli import main
from mixgeneformer.errors import GeneIdError
from mixgeneformer.perturb import PerturbConfig, perturb_cells
from mixgeneformer.perturb.variants import resolve_genes
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]
CLS, EOS, MOUSE_TOKEN = 2, 3, 5
GCG, INS = "ENSG00000115263", "ENSG00000254647"  # human; GCG's one-to-one mouse ortholog is Gcg
GCG_M, INS1_M, INS2_M = "ENSMUSG00000000394", "ENSMUSG00000035804", "ENSMUSG00000000215"  # mouse; INS has none 1:1


def _vocab(mode: str) -> Vocabulary:
    genes = [GCG, INS, GCG_M, INS1_M, INS2_M]
    if mode == "separate":
        return Vocabulary(SPECIALS + genes, {g: i + len(SPECIALS) for i, g in enumerate(genes)}, mode="separate")
    tokens = SPECIALS + [f"{GCG}|{GCG_M}", INS, INS1_M, INS2_M]
    ids = {GCG: 6, GCG_M: 6, INS: 7, INS1_M: 8, INS2_M: 9}
    return Vocabulary(tokens, ids, mode="ortholog")


@pytest.mark.parametrize("mode", ["separate", "ortholog"])
def test_a_human_gene_without_a_mouse_ortholog_is_refused_for_mouse_cells(mode):
    # Before: INS (human-only token) given for mouse cells resolved to a token no mouse cell holds, and the run
    # silently scored only the other genes (`--genes INS,GCG` on mouse cells: INS dropped without a word).
    vocab = _vocab(mode)
    for name in (INS, "INS"):
        with pytest.raises(GeneIdError, match="human gene with no one-to-one mouse ortholog.*cells are mouse"):
            resolve_genes([name, GCG_M], vocab, "mouse", "mouse")
    # Without the cells' species (a list of token sequences) the pure lookup is unchanged.
    assert resolve_genes([INS], vocab, "auto").tolist() == [vocab.gene_to_id[INS]]


def test_a_human_gene_is_mapped_to_its_mouse_ortholog_for_mouse_cells_in_a_separate_vocabulary(caplog):
    # Before: a separate vocabulary gave GCG's human token, which mouse cells never hold.
    vocab = _vocab("separate")
    with caplog.at_level(logging.WARNING, logger="mixgeneformer.perturb.variants"):
        tokens = resolve_genes([GCG, f"{INS1_M}.3"], vocab, "mouse", "mouse")
    assert tokens.tolist() == [vocab.gene_to_id[GCG_M], vocab.gene_to_id[INS1_M]]
    assert "one-to-one ortholog ENSMUSG00000000394" in caplog.text and "cells are mouse" in caplog.text
    # ... and the other way: a mouse ID for human cells.
    assert resolve_genes([GCG_M], vocab, "human", "human").tolist() == [vocab.gene_to_id[GCG]]


@pytest.fixture(scope="module")
def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(SPECIALS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, attn_implementation="sdpa")
    return BertModel(config, add_pooling_layer=False).eval()


def _mouse_corpus(vocab: Vocabulary, species: str = "mouse") -> datasets.Dataset:
    genes = [vocab.gene_to_id[g] for g in (GCG_M, INS1_M, INS2_M)]
    cells = [[CLS, MOUSE_TOKEN, *np.roll(genes, k).tolist(), EOS] for k in range(3)]
    return datasets.Dataset.from_dict({"input_ids": cells, "species": [species] * 3})


def test_perturbing_mouse_cells_with_a_human_id_scores_its_ortholog(bert):
    vocab = _vocab("separate")
    result = perturb_cells(bert, _mouse_corpus(vocab), vocab, PerturbConfig(genes=[GCG]), progress=False)
    assert len(result.cells) == 3  # before: "none of the 3 selected cells expresses" GCG's human token
    with pytest.raises(GeneIdError, match="cells are mouse"):
        perturb_cells(bert, _mouse_corpus(vocab), vocab, PerturbConfig(genes=["INS", "Gcg"]), progress=False)


def test_one_object_mixing_both_species_is_one_error_naming_a_fix_that_works_for_every_command():
    # Before: mixed symbols said only "Pass species='human' or 'mouse' (CLI: --species) to choose", and doing so
    # was refused next as a mixed file; and "--allow-mixed-species" is no option of embed / classify / perturb /
    # predict (they read allow_mixed_species from --tokenize-config).
    from mixgeneformer.genes import map_gene_ids

    symbols = ["INS", "GCG", "ACTB", "GAPDH", "SST", "Ins1", "Gcg", "Actb", "Gapdh", "Sst"]
    with pytest.raises(GeneIdError, match="Split it by species") as error:
        map_gene_ids(symbols, species="auto", min_coverage=0.0)
    assert "allow_mixed_species: true in their --tokenize-config" in str(error.value)
    with pytest.raises(GeneIdError, match="mix species.*--tokenize-config"):
        map_gene_ids([GCG, INS, GCG_M, INS1_M], species="auto", min_coverage=0.0)


def test_species_balanced_on_a_corpus_of_one_species_says_it_does_nothing(tmp_path, caplog):
    # Before: data.species_balanced on mouse cells only trained without a word, as if balanced.
    from test_pretrain import make_vocab, save_token_corpus, tiny_config

    from mixgeneformer.pretrain import _open_data, pretrain_config_from_dict

    vocab = make_vocab(10)
    vocab.save(tmp_path / "vocab.json")
    cells = [np.array([2, 5, *range(16 + k % 3, 26)], dtype=np.int32) for k in range(20)]
    save_token_corpus(tmp_path / "corpus", cells, ["mouse"] * 20, vocab.hash)
    config = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "run", data={"species_balanced": True}))
    with caplog.at_level(logging.WARNING, logger="mixgeneformer.pretrain"):
        _open_data(config, vocab, 64)
    assert "species_balanced: the training cells are all mouse" in caplog.text


def test_embedding_and_perturbation_outputs_record_the_cells_species(tmp_path, bert):
    # Before: an embedding of a count file recorded tokenize species 'auto' and no species; summary.json of a
    # perturbation neither, so a mouse and a human run could not be told apart from their outputs.
    import anndata as ad
    from test_perturb import bundle_and_cells

    from mixgeneformer.embed import embed_anndata

    human_vocab = Vocabulary(SPECIALS + [GCG, INS], {GCG: 6, INS: 7})
    bundle_and_cells(tmp_path, human_vocab)
    adata = ad.read_h5ad(tmp_path / "in.h5ad")
    with pytest.warns(UserWarning, match="dropped by the tokenizer"):  # cells without counts on the two genes
        embed_anndata(adata, tmp_path / "bundle", progress=False)
    params = adata.uns["X_mixgeneformer_params"]
    assert params["species"] == {"human": 12 - params["n_dropped"]} and params["n_dropped"] < 12
    vocab = _vocab("separate")
    result = perturb_cells(bert, _mouse_corpus(vocab), vocab, PerturbConfig(genes=[GCG_M]), progress=False)
    assert result.summary["species"] == {"mouse": 3}


def test_a_corpus_of_both_species_takes_gene_symbols_of_either(bert):
    # Before: the corpus's majority species (here human) was taken as the species of every name, and the mouse
    # symbol 'Gcg' was refused with "species='human' ... Pass species='mouse'", a setting the user never made.
    vocab = _vocab("separate")
    mouse = _mouse_corpus(vocab)
    human = [[CLS, 4, vocab.gene_to_id[GCG], vocab.gene_to_id[INS], EOS]] * 4
    both = datasets.Dataset.from_dict({"input_ids": human + list(mouse["input_ids"]), "species": ["human"] * 4 + ["mouse"] * 3})
    result = perturb_cells(bert, both, vocab, PerturbConfig(genes=["Gcg", "INS"]), progress=False)
    assert len(result.cells) == 4 + 3 and result.summary["species"] == {"human": 4, "mouse": 3}


def _counts(symbols: list[str]):
    import anndata as ad

    rng = np.random.default_rng(0)
    return ad.AnnData(rng.integers(1, 9, (6, len(symbols))).astype(np.float32),
                      var=__import__("pandas").DataFrame(index=symbols))


def test_species_given_for_inputs_of_both_species_says_it_applies_to_every_input(tmp_path):
    # Before: `mixgf tokenize human.h5ad mouse.h5ad --species human` said only "Pass species='mouse' (CLI: --species
    # mouse)" for the mouse file, which would then misread the human one.
    from mixgeneformer.medians import GeneMedians, compute_medians
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    human = _counts(["INS", "GCG", "ACTB", "GAPDH", "SST", "PPY"])
    mouse = _counts(["Ins1", "Gcg", "Actb", "Gapdh", "Sst", "Ppy"])
    with pytest.raises(GeneIdError, match="applies to every one of the 2 inputs.*leave it at 'auto'"):
        compute_medians([human, mouse], species="human", min_coverage=0.0)
    human.write_h5ad(tmp_path / "h.h5ad")
    mouse.write_h5ad(tmp_path / "m.h5ad")
    vocab = _vocab("separate")
    with pytest.raises(GeneIdError, match="applies to every one of the 2 inputs"):
        tokenize_files([tmp_path / "h.h5ad", tmp_path / "m.h5ad"], tmp_path / "corpus", vocab,
                       GeneMedians({g: 1.0 for g in vocab.gene_to_id}), TokenizeConfig(species="human", min_coverage=0.0))
    with pytest.raises(GeneIdError) as one:  # one input: the message is as before
        compute_medians([mouse], species="human", min_coverage=0.0)
    assert "every one" not in str(one.value)


def test_a_sharded_embedding_records_the_species_of_every_shard(data, tmp_path):  # noqa: F811
    # Before the fix the merge copied the first shard's record: its species counts would be those of one shard.
    import anndata as ad
    from test_sharding import N_CELLS, _embed

    out = tmp_path / "sharded.h5ad"
    for index in range(2):
        _embed(data["h5ad"], data["bundle"], out, "--shard-index", str(index), "--num-shards", "2")
    main(["embed-merge", str(out)])
    params = ad.read_h5ad(out).uns["X_mixgeneformer_params"]
    assert params["species"] == {"human": N_CELLS - 2} and params["n_dropped"] == 2
