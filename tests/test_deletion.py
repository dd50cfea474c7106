"""Shared first block of single-gene deletions: equal to the sequence-by-sequence forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from mixgeneformer.inference import continue_encoder, hidden_at_layer
from mixgeneformer.perturb import PerturbConfig, perturb_cells
from mixgeneformer.perturb import engine as perturb_module
from mixgeneformer.perturb.deletion import DeletionScan, supports_shared_first_block


def _bert(**overrides) -> BertModel:
    torch.manual_seed(0)
    values = dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=80, attn_implementation="sdpa",
    )
    values.update(overrides)
    return BertModel(BertConfig(**values), add_pooling_layer=False).eval()


def _deleted(tokens: torch.Tensor, position: int) -> torch.Tensor:
    return torch.cat([tokens[:position], tokens[position + 1 :]])


def _reference(bert, tokens: torch.Tensor, positions) -> torch.Tensor:
    """First-block states of each deletion, one sequence per forward pass."""
    out = []
    for p in positions:
        seq = _deleted(tokens, int(p))[None]
        out.append(hidden_at_layer(bert, seq, torch.ones_like(seq), 1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("length", [2, 3, 40, 75])
def test_every_deletion_equals_its_own_forward_pass(length):
    bert = _bert()
    tokens = torch.randperm(110)[:length] + 5
    with torch.inference_mode():
        scan = DeletionScan(bert, tokens)
        got = scan.first_block(range(length))
        want = _reference(bert, tokens, range(length))
    assert got.shape == (length, length - 1, 32)
    assert (got - want).abs().max() <= 1e-5


def test_positions_in_any_order_and_across_calls():
    bert = _bert()
    tokens = torch.randperm(110)[:30] + 5
    with torch.inference_mode():
        scan = DeletionScan(bert, tokens)
        calls = [[7, 3, 3, 29], [10, 11, 12], [0, 28], [5]]  # unsorted, repeated, backwards
        for positions in calls:
            got = scan.first_block(positions)
            assert (got - _reference(bert, tokens, positions)).abs().max() <= 1e-5
        assert scan.first_block([]).shape == (0, 29, 32)
        with pytest.raises(ValueError, match="positions"):
            scan.first_block([30])


def test_large_attention_logits_stay_finite_and_exact():
    """Sharp attention (large query/key weights) must not overflow the running sums."""
    bert = _bert()
    with torch.no_grad():
        attention = bert.encoder.layer[0].attention.self
        attention.query.weight.mul_(12.0)
        attention.key.weight.mul_(12.0)
    tokens = torch.randperm(110)[:25] + 5
    with torch.inference_mode():
        got = DeletionScan(bert, tokens).first_block(range(25))
        want = _reference(bert, tokens, range(25))
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_continue_encoder_from_the_scan_gives_the_full_forward():
    bert = _bert()
    tokens = torch.randperm(110)[:20] + 5
    with torch.inference_mode():
        first = DeletionScan(bert, tokens).first_block([4, 9])
        for k, p in enumerate([4, 9]):
            seq = _deleted(tokens, p)[None]
            full = hidden_at_layer(bert, seq, torch.ones_like(seq), -1)
            continued = continue_encoder(bert, first[k : k + 1], torch.ones_like(seq), 1, -1)
            assert (continued - full).abs().max() <= 1e-5
    with pytest.raises(Exception, match="below"):
        continue_encoder(bert, first[:1], torch.ones(1, 19), 1, 0)


def test_supports_only_bert_encoders():
    assert supports_shared_first_block(_bert())
    assert not supports_shared_first_block(_bert(is_decoder=True))
    assert not supports_shared_first_block(torch.nn.Linear(2, 2))


def test_perturb_cells_with_and_without_the_shared_block_agree(monkeypatch):
    """Single-gene deletions scored through the scan equal the plain batched path (cells of
    different lengths share batches, so padding after the first block is exercised too)."""
    bert = _bert()
    rng = np.random.default_rng(1)
    cells = [np.concatenate([[2], rng.choice(np.arange(10, 120), n, replace=False)]) for n in (9, 17, 33, 12)]
    from mixgeneformer.vocab import Vocabulary

    specials = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>"] + [f"s{i}" for i in range(5)]
    genes = [f"ENSG{i:011d}" for i in range(110)]
    vocab = Vocabulary(specials + genes, {g: i + 10 for i, g in enumerate(genes)})
    config = PerturbConfig(batch_size=7, gene_shifts=False)
    built = []
    original_scan = perturb_module.DeletionScan

    def counting_scan(*args, **kwargs):
        built.append(1)
        return original_scan(*args, **kwargs)

    monkeypatch.setattr(perturb_module, "DeletionScan", counting_scan)
    shared = perturb_cells(bert, cells, vocab, config, progress=False).cells
    assert len(built) == len(cells)  # every cell went through the scan
    monkeypatch.setattr(perturb_module, "_MIN_SCAN_VARIANTS", 10**9)
    plain = perturb_cells(bert, cells, vocab, config, progress=False).cells
    assert len(built) == len(cells)
    assert shared[["cell", "perturbed"]].equals(plain[["cell", "perturbed"]])
    assert np.abs(shared["shift"].to_numpy() - plain["shift"].to_numpy()).max() <= 1e-6


def test_chunked_keys_and_positions_give_the_same_states(monkeypatch):
    """Sparse positions (many keys moved per step) and small chunks: same result, bounded memory."""
    from mixgeneformer.perturb import deletion

    monkeypatch.setattr(deletion, "_KEY_CHUNK", 7)
    monkeypatch.setattr(deletion, "_POSITION_CHUNK", 2)
    bert = _bert()
    tokens = torch.randperm(110)[:60] + 5
    positions = [0, 31, 32, 59, 45, 2]
    with torch.inference_mode():
        got = DeletionScan(bert, tokens).first_block(positions)
    assert (got - _reference(bert, tokens, positions)).abs().max() <= 1e-5


def test_underflowing_rows_fall_back_to_the_block():
    """If the shared sums underflow for a deletion (forced here), that deletion is still exact."""
    bert = _bert()
    tokens = torch.randperm(110)[:20] + 5
    with torch.inference_mode():
        scan = DeletionScan(bert, tokens)
        scan.row_max = {a: m + 200.0 for a, m in scan.row_max.items()}  # every weight underflows
        scan._reset()
        got = scan.first_block([0, 7, 19])
        want = _reference(bert, tokens, [0, 7, 19])
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5
