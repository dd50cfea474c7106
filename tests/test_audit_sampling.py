"""Audit of batching, sampling, held-out baselines, the cell bank and the FLOP count, each checked
against an independent count (brute force over what the model is actually fed, torch's own FLOP
counter, a reference ring buffer)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from mixgeneformer import diagnostics
from mixgeneformer.cell_bank import CellBank
from mixgeneformer.collator import PretrainingCollator, pad_sequences
from mixgeneformer.flops import count_flop_parameters, device_peak_flops, training_flops
from mixgeneformer.sampling import PretrainSampler
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]


def make_vocab(n_genes: int) -> Vocabulary:
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    return Vocabulary(SPECIALS + genes, {g: i + len(SPECIALS) for i, g in enumerate(genes)}, "separate")


def v2_cells(vocab: Vocabulary, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    """Cells ``<cls> <species> genes... <eos>`` of the given numbers of genes."""
    rng = np.random.default_rng(seed)
    genes = np.arange(len(SPECIALS), len(vocab))
    return [np.r_[vocab.cls_id, vocab.species_token_id("human"), rng.choice(genes, n, replace=False), vocab.eos_id]
            for n in lengths]


# ------------------------------------------------------------------------------------------
# Faults found (each test failed before its fix)
# ------------------------------------------------------------------------------------------
def test_rank_baseline_counts_the_tokens_the_model_is_fed_after_truncation():
    """A V2 cell cut to ``max_len`` gets ``<eos>`` back at its last kept position (the collator), so
    the gene the tokenizer put there is never seen: the baselines must not count it either."""
    vocab = make_vocab(40)
    max_len, bucket = 12, 4
    cells = v2_cells(vocab, [20, 15, 10, 5, 9, 30])  # four are longer than max_len once wrapped
    ids, mask = pad_sequences(cells, vocab.pad_id, pad_to_multiple_of=8, max_len=max_len, eos_id=vocab.eos_id)
    # Brute force over the batch the model sees: every attended gene token at its position.
    expected = np.zeros((max_len // bucket, len(vocab)), dtype=np.int64)
    for b, p in zip(*np.nonzero(mask.numpy()), strict=True):
        token = int(ids[b, p])
        if not vocab.is_special[token]:
            expected[p // bucket, token] += 1
    flat = np.concatenate(cells)
    lengths = np.array([c.size for c in cells])
    counts = diagnostics.count_tokens(flat, lengths, len(vocab), vocab.special_ids, bucket, max_len)
    assert np.array_equal(counts, expected)
    baselines = diagnostics.frequency_baselines(cells, len(vocab), vocab.special_ids, max_len=max_len,
                                                bucket_size=bucket, prior_strength=3.0)
    assert baselines.n_tokens == expected.sum()
    # V1 cells (no <eos>) keep their gene at the last position.
    v1 = [c[2:-1] for c in cells]
    counts = diagnostics.count_tokens(np.concatenate(v1), np.array([c.size for c in v1]), len(vocab),
                                      vocab.special_ids, bucket, max_len)
    assert counts.sum() == sum(min(c.size, max_len) for c in v1)


def test_flop_count_matches_torch_flop_counter_of_a_forward():
    """6 N T counts the parameters every token goes through (the encoder layers), not the pooler
    (one position per cell, frozen by default), the MLM head (masked positions only) or its bias."""
    from torch.utils.flop_counter import FlopCounterMode

    from mixgeneformer.model import MixGeneformerForPretraining, make_config

    vocab = make_vocab(4000)
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=256, contrastive="none"))
    model.attach_vocabulary(vocab)
    model.train()
    torch.manual_seed(1)
    batch = PretrainingCollator(vocab)([{"input_ids": c} for c in v2_cells(vocab, [120] * 8)])
    with FlopCounterMode(display=False) as counter:
        model(**batch)
    measured = counter.get_total_flops()  # matmuls of one forward
    cfg = model.config
    n_batch, seq_len = batch["input_ids"].shape
    predicted = int((batch["labels"] != -100).sum())
    flops = training_flops(count_flop_parameters(model), cfg.num_hidden_layers, cfg.hidden_size, n_batch, seq_len,
                           1, cfg.vocab_size, predicted)
    assert flops / 3 == pytest.approx(measured, rel=0.01)  # was 10% over (MFU flattered)
    encoder = sum(p.numel() for p in model.bert.encoder.parameters())
    assert count_flop_parameters(model) == encoder


def test_no_peak_flops_for_a_cpu_device_on_a_host_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops("cuda:0") == 790e12
    assert device_peak_flops(torch.device("cpu")) is None  # was the GPU's peak: an MFU for a CPU run
    assert device_peak_flops("cpu", override_tflops=2.0) == 2e12


# ------------------------------------------------------------------------------------------
# Regression guards: checked by brute force and found right
# ------------------------------------------------------------------------------------------
def test_masking_touches_only_attended_genes_and_held_out_masks_repeat():
    vocab = make_vocab(30)
    rows = [{"input_ids": c} for c in v2_cells(vocab, [3, 25, 7, 12], seed=2)]
    collator = PretrainingCollator(vocab, mlm_probability=0.99, mask_fraction=0.0, random_fraction=1.0, max_len=16)
    torch.manual_seed(0)
    batch = collator(rows)
    ids, mask = pad_sequences([r["input_ids"] for r in rows], vocab.pad_id, 8, 16, vocab.eos_id)
    genes = mask.bool() & ~torch.from_numpy(vocab.is_special)[ids]
    assert ((batch["labels"] != -100) <= genes).all() and ((batch["labels"] != -100) == genes).sum() > 0.9 * genes.sum()
    assert torch.equal(batch["input_ids"][~genes], ids[~genes])  # specials, <eos> and padding untouched
    assert not torch.from_numpy(vocab.is_special)[batch["input_ids"][genes]].any()  # replacements are genes
    assert batch["input_ids"].shape == (4, 16) and torch.equal(batch["attention_mask"], mask)
    held_out = PretrainingCollator(vocab, mask_fraction=1.0, random_fraction=0.0, max_len=16)
    torch.manual_seed(5)
    first = held_out(rows)
    torch.manual_seed(5)
    assert all(torch.equal(first[k], v) for k, v in held_out(rows).items())


@pytest.mark.parametrize("n", [96, 101])
def test_rank_shards_of_an_epoch_cover_every_cell_and_resume_replays_the_order(n):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    lengths = np.random.default_rng(n).integers(1, 60, n)
    world, per_device = 3, 4
    shards = []
    for rank in range(world):  # one sampler per rank, as each process builds its own
        sampler = PretrainSampler(n, per_device * world, seed=11, lengths=lengths, mega_batch_mult=2)
        sampler.set_epoch(4)
        shard = BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=True), num_processes=world, process_index=rank)
        shards.append([i for batch in shard for i in batch])
    seen = np.concatenate(shards)
    assert seen.size == len(set(seen.tolist())) == n // (per_device * world) * per_device * world  # no duplicate
    order = sampler.epoch_order()
    assert np.array_equal(np.sort(order), np.arange(n))  # every cell once per epoch
    assert set(seen.tolist()) == set(order[: seen.size].tolist())  # only the last partial step is dropped
    resumed = PretrainSampler(n, per_device * world, seed=11, lengths=lengths, mega_batch_mult=2)
    resumed.set_epoch(4)
    assert list(resumed)[40:] == order[40:].tolist()
    resumed.set_epoch(5)
    assert list(resumed) != order.tolist()


def test_cell_bank_equals_a_reference_ring_buffer():
    torch.manual_seed(0)
    size, dim = 5, 3
    bank, reference, uid = CellBank(size), collections.deque(maxlen=size), 0
    for _ in range(25):
        n, width = int(torch.randint(1, 9, ())), int(torch.randint(2, 7, ()))
        classes, weights = torch.randint(0, 50, (n, width)), torch.rand(n, width)
        norms, species = torch.rand(n), torch.randint(0, 2, (n,))
        pool = bank.pool(classes, weights, norms, species, dim=dim)
        stored = {int(bank.keys[slot, 0]): slot for slot in range(size) if bank.species[slot] >= 0}
        assert sorted(stored) == sorted(r[0] for r in reference)
        for key, c, w, nm, s in reference:  # each stored vector sits beside its own profile and species
            row = n + stored[key]
            assert torch.equal(pool[0][row, : c.numel()], c) and (pool[0][row, c.numel():] == -1).all()
            assert torch.equal(pool[1][row, : c.numel()], w) and pool[2][row] == nm and pool[3][row] == s
        bank.push(classes, weights, norms, species, torch.arange(uid, uid + n).float()[:, None].expand(n, dim))
        reference.extend((uid + i, classes[i], weights[i], norms[i], species[i]) for i in range(n))
        uid += n
