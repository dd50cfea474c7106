"""PretrainingCollator: padding, masking statistics, special tokens, species, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgeneformer.collator import PretrainingCollator, pad_sequences
from mixgeneformer.errors import ConfigError, InputDataError
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]


def make_vocab(n_genes: int = 1000) -> Vocabulary:
    genes = [f"ENSG{i:011d}" for i in range(n_genes // 2)] + [f"ENSMUSG{i:011d}" for i in range(n_genes - n_genes // 2)]
    tokens = SPECIALS + genes
    return Vocabulary(tokens, {g: i + len(SPECIALS) for i, g in enumerate(genes)}, "separate")


def v2_cells(n_cells: int, length: int, vocab: Vocabulary, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cells):
        genes = rng.choice(np.arange(len(SPECIALS), len(vocab)), size=length, replace=False)
        species = "human" if i % 2 == 0 else "mouse"
        ids = [vocab.cls_id, vocab.species_token_id(species), *genes.tolist(), vocab.eos_id]
        rows.append({"input_ids": ids, "species": species})
    return rows


def test_padding_shapes_attention_mask_and_multiple_of_8():
    ids, mask = pad_sequences([[5, 6, 7], [8], [9, 10, 11, 12, 13]], pad_id=0, pad_to_multiple_of=8)
    assert ids.shape == (3, 8) and ids.dtype == torch.int64
    assert ids[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert mask.sum(1).tolist() == [3, 1, 5]
    assert (ids[mask == 0] == 0).all()


def test_truncation_keeps_top_genes_and_the_eos_token():
    ids, mask = pad_sequences([[2, 10, 11, 12, 13, 3], [2, 10, 3]], pad_id=0, pad_to_multiple_of=8, max_len=4, eos_id=3)
    assert ids.shape == (2, 4)  # never padded beyond max_len
    assert ids[0].tolist() == [2, 10, 11, 3]
    assert ids[1].tolist() == [2, 10, 3, 0]
    assert mask.sum(1).tolist() == [4, 3]


def test_masking_statistics_follow_bert_15_80_10_10():
    vocab = make_vocab(2000)
    collator = PretrainingCollator(vocab)
    rows = v2_cells(400, 500, vocab)
    torch.manual_seed(0)
    batch = collator(rows)
    original, _ = pad_sequences([r["input_ids"] for r in rows], vocab.pad_id, 8)
    labels, masked = batch["labels"], batch["input_ids"]
    is_special = torch.from_numpy(vocab.is_special)[original]
    gene_positions = (batch["attention_mask"].bool() & ~is_special).sum().item()
    selected = labels != -100

    assert selected.sum().item() / gene_positions == pytest.approx(0.15, abs=0.004)
    assert torch.equal(labels[selected], original[selected])
    n = selected.sum().item()
    to_mask = (masked == vocab.mask_id) & selected
    unchanged = (masked == original) & selected
    randomised = selected & ~to_mask & ~unchanged
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.01)
    assert randomised.sum().item() / n == pytest.approx(0.1 * (1 - 1 / 2000), abs=0.008)
    assert unchanged.sum().item() / n == pytest.approx(0.1 + 0.1 / 2000, abs=0.008)
    # Unselected positions are untouched; specials and padding are never selected or sampled.
    assert torch.equal(masked[~selected], original[~selected])
    assert not selected[is_special | ~batch["attention_mask"].bool()].any()
    assert not torch.from_numpy(vocab.is_special)[masked[randomised]].any()


def test_specials_never_masked_even_with_high_probability():
    vocab = make_vocab(50)
    collator = PretrainingCollator(vocab, mlm_probability=0.99, mask_fraction=0.0, random_fraction=1.0)
    torch.manual_seed(1)
    batch = collator(v2_cells(50, 20, vocab))
    special = torch.from_numpy(vocab.is_special)
    # every gene position became a random gene; cls/species/eos/pad stay where they were
    assert (batch["labels"][:, :2] == -100).all()
    assert (batch["input_ids"][:, 0] == vocab.cls_id).all()
    genes = batch["attention_mask"].bool() & ~special[batch["input_ids"]]
    assert not special[batch["input_ids"][batch["labels"] != -100]].any()
    assert genes.sum() == 50 * 20


def test_species_are_carried_as_codes():
    vocab = make_vocab(40)
    batch = PretrainingCollator(vocab)(v2_cells(4, 5, vocab))
    assert batch["species"].tolist() == [0, 1, 0, 1]
    rows = [{"input_ids": [10, 11], "species": 1}, {"input_ids": [12], "species": 0}]
    assert PretrainingCollator(vocab)(rows)["species"].tolist() == [1, 0]
    assert "species" not in PretrainingCollator(vocab)([{"input_ids": [10, 11]}])


def test_same_seed_same_batch_different_seed_different_batch():
    vocab = make_vocab(200)
    collator = PretrainingCollator(vocab)
    rows = v2_cells(16, 60, vocab)
    torch.manual_seed(7)
    first = collator(rows)
    torch.manual_seed(7)
    second = collator(rows)
    torch.manual_seed(8)
    third = collator(rows)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["labels"], third["labels"])


def test_bad_rows_raise_clear_errors():
    vocab = make_vocab(20)
    collator = PretrainingCollator(vocab)
    with pytest.raises(InputDataError, match="outside 0..25"):
        collator([{"input_ids": [7, 26]}])
    with pytest.raises(InputDataError, match="no tokens"):
        collator([{"input_ids": [7]}, {"input_ids": []}])
    with pytest.raises(InputDataError, match="species 'rat'"):
        collator([{"input_ids": [7], "species": "rat"}])
    with pytest.raises(InputDataError, match="input_ids"):
        collator([{"tokens": [7]}])
    with pytest.raises(InputDataError, match="empty batch"):
        collator([])


def test_bad_options_raise_config_errors():
    vocab = make_vocab(20)
    with pytest.raises(ConfigError, match="mlm_probability"):
        PretrainingCollator(vocab, mlm_probability=1.5)
    with pytest.raises(ConfigError, match="mask_fraction"):
        PretrainingCollator(vocab, mask_fraction=0.95, random_fraction=0.1)
    with pytest.raises(ConfigError, match="max_len"):
        PretrainingCollator(vocab, max_len=0)


def test_max_len_longer_than_the_batch_keeps_sequences_whole():
    from mixgeneformer.collator import pad_sequences

    ids, mask = pad_sequences([[2, 10, 11, 3], [2, 12, 3]], pad_id=0, pad_to_multiple_of=None, max_len=16, eos_id=3)
    assert ids.tolist() == [[2, 10, 11, 3], [2, 12, 3, 0]] and mask.sum().item() == 7
    ids, _ = pad_sequences([[2, 10, 11, 3], [2, 12, 3]], pad_id=0, pad_to_multiple_of=None, max_len=3, eos_id=3)
    assert ids.tolist() == [[2, 10, 3], [2, 12, 3]]
