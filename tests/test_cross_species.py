"""The cross-species term pairs cells of two species (mutual nearest neighbours over orthologs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixgeneformer import losses
from mixgeneformer.genes import one_to_one_orthologs
from mixgeneformer.model import MixGeneformerForPretraining, make_config
from mixgeneformer.vocab import Vocabulary, build_vocabulary

N_PAIRS = 12


def ortholog_vocab(n_pairs: int, own: range) -> Vocabulary:
    """An ortholog vocabulary: ``n_pairs`` shared human|mouse tokens, then for each ``i`` of ``own`` a
    human-only gene ``ENSG9999999999<i>`` and a mouse-only gene ``ENSMUSG9999999999<i>``."""
    from mixgeneformer.vocab import SPECIAL_TOKENS, SPECIES_TOKENS

    pairs = one_to_one_orthologs().head(n_pairs)
    tokens = [*SPECIAL_TOKENS, SPECIES_TOKENS["human"], SPECIES_TOKENS["mouse"]]
    gene_to_id = {}
    for human, mouse in zip(pairs["human_id"], pairs["mouse_id"], strict=True):
        gene_to_id[human] = gene_to_id[mouse] = len(tokens)
        tokens.append(f"{human}|{mouse}")
    for i in own:
        for gene in (f"ENSG9999999999{i}", f"ENSMUSG9999999999{i}"):
            gene_to_id[gene] = len(tokens)
            tokens.append(gene)
    return Vocabulary(tokens, gene_to_id, "ortholog")


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    """Ortholog vocabulary: 12 shared pair tokens, plus one human-only and one mouse-only gene."""
    return ortholog_vocab(N_PAIRS, range(1, 2))


def model_of(vocab, **overrides) -> MixGeneformerForPretraining:
    config = make_config("tiny", vocab, max_position_embeddings=32, hidden_size=32, num_attention_heads=2,
                         intermediate_size=64, pooling="mean", **overrides)
    model = MixGeneformerForPretraining(config)
    model.attach_vocabulary(vocab)
    return model


def test_partners_are_mutual_nearest_cells_of_the_other_species():
    profiles = torch.tensor([
        [1.0, 0.0, 0.0],  # human, type a
        [0.0, 1.0, 0.0],  # human, type b
        [0.0, 0.9, 0.1],  # mouse, type b
        [0.9, 0.0, 0.1],  # mouse, type a
        [1.0, 0.0, 0.0],  # unknown species: never paired
    ])
    species = torch.tensor([0, 0, 1, 1, -1])
    assert losses.mutual_nearest_partners(profiles, species).tolist() == [3, 2, 1, 0, -1]
    # One species only: no partner at all, and the loss is 0 but attached to the graph.
    z = torch.randn(5, 4, requires_grad=True)
    alone = losses.mutual_nearest_partners(profiles, torch.zeros(5, dtype=torch.long))
    assert (alone == -1).all()
    loss = losses.cross_species_nce(z, alone)
    assert loss.item() == 0.0 and loss.requires_grad
    # Not mutual: both mice are nearest to the same human cell; only that pair survives.
    crowded = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.2]])
    assert losses.mutual_nearest_partners(crowded, torch.tensor([0, 0, 1, 1])).tolist() == [2, -1, 0, -1]


def test_the_loss_rewards_species_mixing_not_only_instance_identity():
    """Embeddings that separate the species score badly even when each species is well organised."""
    partner = torch.tensor([3, 2, 1, 0])
    species = torch.tensor([0, 0, 1, 1])
    types = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mixed = types
    separated = types + 3.0 * torch.tensor([[0, 0, 1.0]]) * (species[:, None] * 2 - 1)
    assert losses.cross_species_nce(mixed, partner).item() < 0.01
    assert losses.cross_species_nce(separated, partner).item() > 0.5


def test_cells_are_paired_across_species_by_their_ortholog_genes(vocab):
    model = model_of(vocab, cross_species_weight=1.0)
    shared = [vocab.gene_to_id[g] for g in one_to_one_orthologs().head(N_PAIRS)["human_id"]]
    human_only, mouse_only = vocab.gene_to_id["ENSG99999999991"], vocab.gene_to_id["ENSMUSG99999999991"]
    a, b = shared[:6], shared[6:]
    # V1-style cells without species tokens: species from the species-specific gene; types by gene sets.
    ids = torch.tensor([
        [*a, human_only], [*b, human_only],              # human a, human b
        [*b[::-1], mouse_only], [*a[::-1], mouse_only],  # mouse b, mouse a (other rank order)
    ])
    mask = torch.ones_like(ids)
    assert model.cell_species(ids, mask).tolist() == [0, 0, 1, 1]
    with_tokens = torch.cat([torch.tensor([[vocab.species_token_id("mouse")]] * 4), ids[:, :3]], dim=1)
    assert model.cell_species(with_tokens, torch.ones_like(with_tokens)).tolist() == [1, 1, 1, 1]
    profiles = model.ortholog_profiles(ids, mask)
    assert profiles[:, human_only].sum() == 0 and profiles[:, mouse_only].sum() == 0  # no ortholog: not compared
    assert losses.mutual_nearest_partners(profiles, model.cell_species(ids, mask)).tolist() == [3, 2, 1, 0]
    # The training forward computes the term from those pairs (labels restore masked genes first).
    labels = torch.full_like(ids, -100)
    labels[0, 0] = ids[0, 0]
    masked = ids.clone()
    masked[0, 0] = vocab.mask_id
    out = model.train()(masked, mask, labels=labels)
    assert out.cross_species_loss is not None and out.cross_species_loss.item() > 0
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad[shared].abs().sum() > 0


def test_separate_vocabulary_pairs_through_the_ortholog_map():
    vocab = build_vocabulary("separate", gene_set="medians", medians=_medians_for_pairs(4))
    model = model_of(vocab, cross_species_weight=0.5)
    pairs = one_to_one_orthologs().head(4)
    human = [vocab.gene_to_id[g] for g in pairs["human_id"]]
    mouse = [vocab.gene_to_id[g] for g in pairs["mouse_id"]]
    ids = torch.tensor([[human[0], human[1]], [human[2], human[3]], [mouse[2], mouse[3]], [mouse[0], mouse[1]]])
    mask = torch.ones_like(ids)
    species = model.cell_species(ids, mask)
    assert species.tolist() == [0, 0, 1, 1]
    assert losses.mutual_nearest_partners(model.ortholog_profiles(ids, mask), species).tolist() == [3, 2, 1, 0]


def _medians_for_pairs(k: int):
    from mixgeneformer.medians import GeneMedians

    pairs = one_to_one_orthologs().head(k)
    return GeneMedians({g: 1.0 for g in np.concatenate([pairs["human_id"], pairs["mouse_id"]])})


def test_projection_pairing_stays_available_and_is_validated(vocab):
    model = model_of(vocab, cross_species_weight=0.5, cross_species_positives="projection")
    assert model.config.cross_species_positives == "projection"
    from mixgeneformer.errors import ConfigError

    with pytest.raises(ConfigError, match="cross_species_positives"):
        model_of(vocab, cross_species_weight=0.5, cross_species_positives="labels")


def test_pool_pairing_equals_batch_pairing_when_the_pool_is_the_batch():
    generator = torch.Generator().manual_seed(0)
    classes = torch.stack([torch.randperm(40, generator=generator)[:8] for _ in range(12)])
    classes[0, -2:] = -1
    mask = torch.ones_like(classes)
    mask[1, -3:] = 0
    species = torch.tensor([0, 1] * 5 + [-1, 0])
    weights = losses.rank_weights(classes, mask)
    profiles = losses.sparse_rows_to_dense(classes, weights, 40)
    batch_only = losses.mutual_nearest_partners(profiles, species)
    pooled = losses.mutual_nearest_in_pool(classes, weights, profiles.norm(dim=1), species, n_queries=12, n_classes=40)
    assert torch.equal(batch_only, pooled) and (batch_only >= 0).any()
    # K as large as the pool: every cell of known species keeps its nearest other-species cell.
    everyone = losses.mutual_nearest_in_pool(classes, weights, profiles.norm(dim=1), species, n_queries=12, n_classes=40, k=12)
    unit = torch.nn.functional.normalize(profiles, dim=1)
    other = (species[:, None] != species[None, :]) & (species[:, None] >= 0) & (species[None, :] >= 0)
    nearest = (unit @ unit.T).masked_fill(~other, float("-inf")).argmax(dim=1)
    assert torch.equal(everyone, torch.where(species >= 0, nearest, -1))
    assert (everyone >= 0).sum() > (pooled >= 0).sum()
    # The sparse norms and cosines equal the dense ones, also when a class recurs within a row.
    assert torch.allclose(losses.sparse_row_norms(classes, weights), profiles.norm(dim=1), atol=1e-6)
    repeated = classes.clone()
    repeated[2, 1] = repeated[2, 5]
    dense = losses.sparse_rows_to_dense(repeated, weights, 40).norm(dim=1)
    assert torch.allclose(losses.sparse_row_norms(repeated, weights), dense, atol=1e-6) and dense[2] > profiles.norm(dim=1)[2]
    rows = (classes, weights, profiles.norm(dim=1))
    assert torch.allclose(losses.sparse_cosine(rows, rows, 40), unit @ unit.T, atol=1e-6)


def test_the_bank_supplies_same_type_partners_a_small_batch_lacks():
    """A batch of human cells alone has no partner; with mouse cells of the same types in the bank,
    each cell is paired with the bank cell of its own type, whose stored key is the positive."""
    from mixgeneformer.cell_bank import CellBank

    a, b = [0, 1, 2, 3], [4, 5, 6, 7]
    human = torch.tensor([a, b])
    mouse = torch.tensor([b[::-1], a[::-1]])  # same types, other rank order, pushed earlier
    mask = torch.ones_like(human)
    bank = CellBank(size=3)
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    weights = losses.rank_weights(mouse, mask)
    bank.push(mouse, weights, losses.sparse_rows_to_dense(mouse, weights, 8).norm(dim=1), torch.tensor([1, 1]), keys)
    weights = losses.rank_weights(human, mask)
    norms = losses.sparse_rows_to_dense(human, weights, 8).norm(dim=1)
    pool = bank.pool(human, weights, norms, torch.tensor([0, 0]), dim=2)
    assert pool[3].tolist() == [0, 0, 1, 1, -1]  # batch, two bank cells, one empty slot
    partner = losses.mutual_nearest_in_pool(*pool, n_queries=2, n_classes=8)
    assert partner.tolist() == [3, 2]  # human a -> bank row 1 (mouse a), human b -> bank row 0 (mouse b)
    assert losses.mutual_nearest_partners(losses.sparse_rows_to_dense(human, weights, 8), torch.tensor([0, 0])).tolist() == [-1, -1]
    # The positive is the bank key: embeddings that sit on their partner's key score low, swapped ones high.
    aligned = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    low = losses.cross_species_nce(aligned, partner, 0.1, bank=bank.keys)
    high = losses.cross_species_nce(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), partner, 0.1, bank=bank.keys)
    assert low.item() < 0.01 and high.item() > 0.5
    low.backward()
    assert aligned.grad is not None and bank.keys.grad is None
    # The ring buffer overwrites its oldest slot first and widens for longer cells.
    bank.push(human, weights, norms, torch.tensor([0, 0]), torch.eye(2))
    assert bank.species.tolist() == [0, 1, 0] and bank.keys[1].tolist() == [1.0, 0.0]
    wide = torch.tensor([[0, 1, 2, 3, 4, 5]])
    pool = bank.pool(wide, losses.rank_weights(wide, torch.ones_like(wide)), norms[:1], torch.tensor([1]), dim=2)
    assert pool[0].shape == (4, 6) and bank.classes.shape == (3, 6)


def test_training_with_a_queue_fills_it_and_scoring_leaves_it_alone(vocab):
    from mixgeneformer.errors import ConfigError

    model = model_of(vocab, cross_species_weight=1.0, cross_species_queue=8)
    shared = [vocab.gene_to_id[g] for g in one_to_one_orthologs().head(N_PAIRS)["human_id"]]
    ids = torch.tensor([shared[:6], shared[6:], shared[6:][::-1], shared[:6][::-1]])
    mask, species = torch.ones_like(ids), torch.tensor([0, 0, 1, 1])
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]
    out = model.train()(ids, mask, labels=labels, species=species)
    out.loss.backward()
    assert out.cross_species_loss.item() > 0
    assert model._cell_bank.species.tolist() == [0, 0, 1, 1] + [-1] * 4
    model.eval()(ids, mask, labels=labels, species=species)
    assert model._cell_bank.species.tolist() == [0, 0, 1, 1] + [-1] * 4  # not pushed when scoring
    assert "_cell_bank" not in "".join(model.state_dict())  # training state, never saved
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="cross_species_queue"):
            model_of(vocab, cross_species_weight=1.0, cross_species_queue=bad)
    with pytest.raises(ConfigError, match="cross_species_queue"):
        model_of(vocab, cross_species_weight=1.0, cross_species_queue=4, cross_species_positives="projection")
