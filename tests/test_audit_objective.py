"""Audit of the pretraining objective and loop against SPEC §4 (each test recomputes its expectation
independently: by hand, with torch.nn.functional, or by counting).

* The contrastive similarities stay float32 under the Trainer's bf16 autocast (they were bf16
  products on GPU, and a dtype clash on CPU).
* No batch runs past the model's positions (padding to a multiple of 8; held-out cells longer than
  every training cell).
* Every held-out cell is scored, and the held-out metrics equal a brute-force recount with the
  model's full logits and hand-counted frequency baselines of the training cells.
* The FLOPs (MFU) count the encoder passes a step really makes.
* Regression guards for what was found right: the two SimCSE views are the same masked batch under
  independent dropout; a resume across an epoch boundary with gradient accumulation equals a
  straight run.
"""

from __future__ import annotations

import json
import math
import os

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from test_model import (
    batch_of,
    tiny_model,
    vocab,  # noqa: F401  (a fixture)
)
from test_pretrain import make_corpus, make_vocab, params_of, synthetic, tiny_config  # noqa: F401  (synthetic is a fixture)

from mixgeneformer import losses
from mixgeneformer.bundle import load_bundle
from mixgeneformer.corpus import load_corpus
from mixgeneformer.pretrain import (
    make_eval_collator,
    pretrain_config_from_dict,
    read_metrics,
    run_pretraining,
    split_train_eval,
)
from mixgeneformer.trainer import MixGeneformerTrainer
from mixgeneformer.vocab import Vocabulary


# ------------------------------------------------------------------------------------------
# Float32 similarities under mixed precision
# ------------------------------------------------------------------------------------------
def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_contrastive_losses_and_pairing_are_float32_under_bf16_autocast():
    """The Trainer runs the whole forward under autocast with bf16 / fp16; the losses must not follow it."""
    torch.manual_seed(0)
    centre = torch.randn(1, 64)
    z1 = centre + 0.3 * torch.randn(16, 64)  # similar cells: cosines near 1, where bf16 rounds hardest
    z2 = z1 + 0.05 * torch.randn(16, 64)
    partner = torch.tensor([3, -1, 5, 0, -1, 2] + [-1] * 10)
    calls = {
        "nt_xent": lambda: losses.nt_xent(z1, z2, 0.05),
        "info_nce": lambda: losses.info_nce(z1, z2, 0.1),
        "cross_species_nce": lambda: losses.cross_species_nce(z1, partner, 0.1),
        "dimension": lambda: losses.simcse_pp_dimension_loss(z1, z2),
    }
    for name, call in calls.items():
        reference = call()
        with _bf16_autocast():
            got = call()  # nt_xent / cross_species_nce raised a dtype error here; the others were bf16 products
        assert got.dtype == torch.float32, name
        assert got.item() == pytest.approx(reference.item(), rel=1e-6), name

    # The cross-species pairing: cosines of near-identical profiles (bf16 can flip the nearest cell).
    profiles = torch.rand(12, 300) + 5.0
    profiles[6:] += 1e-3 * torch.rand(6, 300)
    species = torch.tensor([0] * 6 + [1] * 6)
    reference_sim = F.normalize(profiles.double(), dim=-1) @ F.normalize(profiles.double(), dim=-1).T
    with _bf16_autocast():
        partners = losses.mutual_nearest_partners(profiles, species)
    assert int((partners >= 0).sum()) >= 2
    for i, j in enumerate(partners.tolist()):
        if j >= 0:  # a partner is the true nearest cell of the other species
            other = reference_sim[i, species != species[i]]
            assert reference_sim[i, j] == pytest.approx(float(other.max()), abs=1e-9)


def test_a_pretraining_forward_under_bf16_autocast_matches_float32(vocab):  # noqa: F811
    model = tiny_model(vocab, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    batch = batch_of(vocab)
    reference = model(**batch)
    with _bf16_autocast():
        mixed = model(**batch)  # raised a dtype error in nt_xent before
    assert torch.isfinite(mixed.loss)
    # only the encoder runs in bf16: the terms agree to its rounding
    assert mixed.mlm_loss.item() == pytest.approx(reference.mlm_loss.item(), rel=2e-2)
    assert mixed.contrastive_loss.item() == pytest.approx(reference.contrastive_loss.item(), rel=5e-2)


# ------------------------------------------------------------------------------------------
# Batches never run past the model's positions
# ------------------------------------------------------------------------------------------
def _toy_vocab(path):
    tokens = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"] + [f"ENSG{i:011d}" for i in range(1, 61)]
    toy = Vocabulary(tokens, {g: i for i, g in enumerate(tokens) if not g.startswith("<")})
    toy.save(path)
    return toy


def test_no_batch_is_padded_or_left_longer_than_the_model_positions(tmp_path):
    """34 positions (not a multiple of 8), training cells of up to 34 tokens, one held-out cell of 50:
    padding to a multiple of 8 reached 40 positions and the held-out cell was not cut (IndexError-like
    crash in the position embeddings)."""
    toy = _toy_vocab(tmp_path / "vocab.json")
    n, eval_fraction, seed = 60, 0.1, 7
    _, held = split_train_eval(datasets.Dataset.from_dict({"i": list(range(n))}), eval_fraction, seed)
    rng = np.random.default_rng(0)
    lengths = rng.integers(29, 35, size=n)
    lengths[held["i"][0]] = 50
    ids = [np.concatenate([[2], rng.permutation(np.arange(6, 66))[: k - 1]]).astype(np.int32) for k in lengths]
    datasets.Dataset.from_dict({"input_ids": ids, "length": lengths.tolist()}).save_to_disk(str(tmp_path / "corpus"))
    (tmp_path / "corpus" / "mixgf_corpus.json").write_text(json.dumps({"vocab_hash": toy.hash}))
    config = pretrain_config_from_dict({
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": [str(tmp_path / "corpus")], "vocab": str(tmp_path / "vocab.json"), "eval_fraction": eval_fraction},
        "model": {"preset": "tiny", "overrides": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                                                   "max_position_embeddings": 34}},
        "train": {"max_steps": 2, "warmup_steps": 0, "per_device_batch_size": 8, "seed": seed},
        "checkpoint": {"save_steps": 2, "keep": 1},
        "logging": {"logging_steps": 1, "progress_bar": False, "tensorboard": False},
    })
    run_pretraining(config)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any(math.isfinite(r.get("eval_mlm_loss", float("nan"))) for r in rows)


# ------------------------------------------------------------------------------------------
# Held-out metrics: every held-out cell, recounted by brute force
# ------------------------------------------------------------------------------------------
def _hand_baselines(cells, vocab_size, special, bucket, prior):
    """Add-one unigram and the rank-bucket unigram with a Dirichlet prior, counted cell by cell."""
    n_buckets = -(-max(len(c) for c in cells) // bucket)
    counts = np.zeros((n_buckets, vocab_size))
    for cell in cells:
        for position, token in enumerate(cell):
            if token not in special:
                counts[position // bucket, token] += 1
    genes = np.array([t not in special for t in range(vocab_size)])
    unigram = np.where(genes, (counts.sum(0) + 1) / (counts.sum() + genes.sum()), 0.0)
    rank = (counts + prior * unigram) / (counts.sum(1, keepdims=True) + prior)
    return unigram, rank


def _in_top_k(p, target, k=10):
    """(surely, possibly) in the top k of ``p``: ties at the target's value may go either way."""
    above, tied = int((p > p[target]).sum()), int((p == p[target]).sum())
    return above + tied <= k, above < k


def test_held_out_metrics_score_every_held_out_cell_and_equal_a_brute_force_recount(tmp_path, synthetic):  # noqa: F811
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 3}, data={"eval_fraction": 0.1},
                                                   checkpoint={"save_steps": 3, "keep": 1}, logging={"rank_bucket": 4}))
    result = run_pretraining(config)
    final = [r for r in read_metrics(out) if "eval_mlm_loss" in r][-1]
    assert final["step"] == 3  # evaluated after the last step: the bundle's weights
    saved = Vocabulary.load(synthetic / "vocab.json")
    train, held = split_train_eval(load_corpus(synthetic / "corpus"), 0.1, 7)
    assert len(held) % 8 != 0  # 26 held-out cells: the last batch is partial (it was dropped)
    special = set(saved.special_ids.tolist())
    prior = json.loads((out / "frequency_baselines.json").read_text())["prior_strength"]
    unigram, rank = _hand_baselines([list(c) for c in train["input_ids"]], len(saved), special, 4, prior)

    model = load_bundle(result.bundle_dir)[0].eval()
    collator = make_eval_collator(saved, config.data, int(model.config.max_position_embeddings), 7)
    sums = {k: 0.0 for k in ("n", "nll", "top1", "top10", "uni", "rank")}
    bounds = {k: [0, 0] for k in ("uni1", "uni10", "rank1", "rank10")}
    cells = list(held["input_ids"])
    for start in range(0, len(cells), 8):  # the evaluation's order and batch size
        batch = collator([{"input_ids": np.asarray(c, dtype=np.int32)} for c in cells[start : start + 8]])
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"]).logits.double()  # full logits, no loss path
        for b, p in zip(*torch.nonzero(batch["labels"] != -100, as_tuple=True), strict=True):
            t = int(batch["labels"][b, p])
            assert int(batch["input_ids"][b, p]) == saved.mask_id  # held-out positions are all <mask>
            row = logits[b, p]
            sums["n"] += 1
            sums["nll"] += float(F.cross_entropy(row[None], torch.tensor([t])))
            sums["top1"] += float(int(row.argmax()) == t)
            sums["top10"] += float(int((row > row[t]).sum()) < 10)
            bucket = min(int(p) // 4, rank.shape[0] - 1)
            sums["uni"] += -math.log(unigram[t])
            sums["rank"] += -math.log(rank[bucket, t])
            for name, table, k in (("uni1", unigram, 1), ("uni10", unigram, 10), ("rank1", rank[bucket], 1), ("rank10", rank[bucket], 10)):
                surely, possibly = _in_top_k(table, t, k)
                bounds[name][0] += surely
                bounds[name][1] += possibly
    n = sums["n"]
    assert final["eval_mlm_loss"] == pytest.approx(sums["nll"] / n, rel=1e-5)
    assert final["eval_top1"] == pytest.approx(sums["top1"] / n, abs=1e-9)
    assert final["eval_top10"] == pytest.approx(sums["top10"] / n, abs=1e-9)
    assert final["eval_unigram_loss"] == pytest.approx(sums["uni"] / n, rel=1e-5)
    assert final["eval_rank_unigram_loss"] == pytest.approx(sums["rank"] / n, rel=1e-5)
    for name, key in (("uni1", "unigram_top1"), ("uni10", "unigram_top10"), ("rank1", "rank_unigram_top1"),
                      ("rank10", "rank_unigram_top10")):
        low, high = bounds[name]
        assert low / n - 1e-9 <= final[f"eval_{key}"] <= high / n + 1e-9, name


# ------------------------------------------------------------------------------------------
# FLOPs: the encoder passes a training step really makes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", [
    {"contrastive": "none"},
    {},
    {"contrastive": "simcse++"},
    {"contrastive": "simcse", "contrastive_weight": 0.0},
    {"cross_species_weight": 0.5},
    {"cross_species_weight": 0.5, "cross_species_positives": "projection"},
    {"contrastive": "none", "cross_species_weight": 0.5, "cross_species_positives": "projection"},
])
def test_the_flop_count_uses_the_encoder_passes_of_a_training_step(vocab, objective, tmp_path):  # noqa: F811
    model = tiny_model(vocab, **objective).train()
    batch = batch_of(vocab)
    rows = []
    hook = model.bert.embeddings.register_forward_hook(lambda _m, _i, output: rows.append(output.shape[0]))
    try:
        model(**batch)
    finally:
        hook.remove()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = MixGeneformerTrainer(model=model, args=args, run_extras={}, sampler_options={})
    assert trainer._n_views * batch["input_ids"].shape[0] == sum(rows)  # was 2 for contrastive "none", 2 with a projection


# ------------------------------------------------------------------------------------------
# Regression guards: what was checked and found right
# ------------------------------------------------------------------------------------------
def test_the_two_simcse_views_are_the_masked_batch_under_independent_dropout(vocab):  # noqa: F811
    model = tiny_model(vocab).train()
    batch = batch_of(vocab)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(11)
    out = model(**batch)
    torch.manual_seed(11)  # the same dropout draws, by hand: both views of the masked cells in one encoder call
    hidden = model.bert(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask])).last_hidden_state
    b = ids.shape[0]
    z1, z2 = hidden[:b, 0], hidden[b:, 0]  # <cls> pooling
    assert not torch.allclose(z1, z2, atol=1e-4)  # independent dropout masks
    torch.testing.assert_close(out.cell_embeddings, z1)
    # NT-Xent over 2B, both views as queries, temperature 0.05, by brute force
    z = F.normalize(torch.cat([z1, z2]).double(), dim=-1)
    sim = (z @ z.T / 0.05).detach()
    sim.fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    assert out.contrastive_loss.item() == pytest.approx(float(F.cross_entropy(sim, target)), rel=1e-5)
    labelled = batch["labels"] != -100
    mlm = F.cross_entropy(model.cls(hidden[:b])[labelled].double(), batch["labels"][labelled]).detach()
    assert out.mlm_loss.item() == pytest.approx(float(mlm), rel=1e-5)  # MLM on view 1 of the masked batch
    assert out.loss.item() == pytest.approx(out.mlm_loss.item() + out.contrastive_loss.item(), rel=1e-6)


def test_resume_across_an_epoch_boundary_with_accumulation_equals_a_straight_run(tmp_path, monkeypatch):
    toy = make_vocab()
    toy.save(tmp_path / "vocab.json")
    make_corpus(tmp_path / "corpus", toy, n_cells=40)  # 5 optimizer steps an epoch at 4 x 2
    train = {"max_steps": 12, "per_device_batch_size": 4, "gradient_accumulation_steps": 2}
    straight = run_pretraining(pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "a", train=train)))
    config = pretrain_config_from_dict(tiny_config(tmp_path, tmp_path / "b", train=train))
    monkeypatch.setenv("MIXGF_TEST_FAIL_AT_STEP", "0:7")  # checkpoint-6 is one step into epoch 2
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pretraining(config)
    monkeypatch.delenv("MIXGF_TEST_FAIL_AT_STEP")
    resumed = run_pretraining(config, resume=True)
    assert resumed.resumed_from.name == "checkpoint-6"
    a, b = params_of(straight.bundle_dir), params_of(resumed.bundle_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = {int(r["step"]): r for r in read_metrics(tmp_path / "a") if "loss" in r}
    rows_b = {int(r["step"]): r for r in read_metrics(tmp_path / "b") if "loss" in r}
    for step in range(7, 13):
        assert rows_a[step]["loss"] == rows_b[step]["loss"] and rows_a[step]["mlm_loss"] == rows_b[step]["mlm_loss"]
    assert os.path.isdir(tmp_path / "b" / "model")


@pytest.mark.parametrize("first", ["species", "gene"])
def test_cls_pooling_on_cells_without_cls_is_refused(tmp_path, synthetic, first):  # noqa: F811
    """The default pooling ('cls') trained the contrastive term on whatever sat at position 0 of a
    style-v1 corpus (a species token, or the top-ranked gene); it is refused with the two fixes,
    before any step, and pooling 'mean' on the same corpus trains."""
    from mixgeneformer.errors import ConfigError

    cells = load_corpus(synthetic / "corpus")["input_ids"]  # each cell: <cls>, species, genes...
    cut = 1 if first == "species" else 2
    corpus = tmp_path / "v1"
    datasets.Dataset.from_dict({"input_ids": [list(c)[cut:] for c in cells]}).save_to_disk(str(corpus))
    (corpus / "mixgf_corpus.json").write_text((synthetic / "corpus" / "mixgf_corpus.json").read_text())
    data = {"corpus": [str(corpus)], "vocab": str(synthetic / "vocab.json")}
    refused = tiny_config(synthetic, tmp_path / "run", data=data, train={"max_steps": 2})
    with pytest.raises(ConfigError, match=r"pooling='cls'.*do not start with <cls>.*style='v2'.*objective.pooling to 'mean'"):
        run_pretraining(pretrain_config_from_dict(refused))
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    mean = tiny_config(synthetic, tmp_path / "mean", data=data, train={"max_steps": 2},
                       objective={"pooling": "mean"})
    assert run_pretraining(pretrain_config_from_dict(mean)).global_step == 2
