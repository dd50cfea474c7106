"""The pretraining model: configs, losses, views, cross-species gradients, bundles and safe loading."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM

from mixgeneformer import losses
from mixgeneformer.bundle import load_bundle, save_bundle
from mixgeneformer.collator import PretrainingCollator
from mixgeneformer.errors import ArtifactError, ConfigError, OfflineError, VocabularyMismatchError
from mixgeneformer.genes import one_to_one_orthologs
from mixgeneformer.medians import GeneMedians
from mixgeneformer.model import (
    PRESETS,
    MixGeneformerConfig,
    MixGeneformerForPretraining,
    make_config,
)
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]
N_PAIRS = 12


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    """6 specials, 12 human genes with a 1:1 mouse ortholog, their 12 mouse orthologs, 4 + 4 without."""
    pairs = one_to_one_orthologs().head(N_PAIRS)
    human = pairs["human_id"].tolist() + [f"ENSG9999999999{i}" for i in range(4)]
    mouse = pairs["mouse_id"].tolist() + [f"ENSMUSG9999999999{i}" for i in range(4)]
    genes = human + mouse
    return Vocabulary(SPECIALS + genes, {g: i + len(SPECIALS) for i, g in enumerate(genes)}, "separate")


def human_ids(vocab, k):
    return [vocab.gene_to_id[g] for g in vocab.tokens[6 : 6 + k]]


def tiny_model(vocab, **overrides) -> MixGeneformerForPretraining:
    torch.manual_seed(0)
    config = make_config("tiny", vocab, max_position_embeddings=64, **overrides)
    model = MixGeneformerForPretraining(config)
    model.attach_vocabulary(vocab)
    return model


def batch_of(vocab, n_cells=6, seed=0, mlm_probability=0.3):
    rng = np.random.default_rng(seed)
    gene_ids = np.flatnonzero(~vocab.is_special)
    rows = []
    for i in range(n_cells):
        species = "human" if i % 2 == 0 else "mouse"
        genes = rng.choice(gene_ids, size=int(rng.integers(5, 15)), replace=False)
        rows.append({"input_ids": [vocab.cls_id, vocab.species_token_id(species), *genes.tolist(), vocab.eos_id], "species": species})
    torch.manual_seed(seed)
    return PretrainingCollator(vocab, mlm_probability=mlm_probability)(rows)


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, sizes",
    [
        ("mix-geneformer", (6, 256, 4, 512, "silu", 0.1, 2048)),
        ("geneformer-v1", (6, 256, 4, 512, "relu", 0.02, 2048)),
        ("geneformer-v2-104m", (12, 768, 12, 3072, "relu", 0.1, 4096)),
        ("geneformer-v2-316m", (18, 1152, 18, 4608, "relu", 0.1, 4096)),
    ],
)
def test_presets_match_the_spec(vocab, preset, sizes):
    c = make_config(preset, vocab)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act,
            c.hidden_dropout_prob, c.max_position_embeddings) == sizes
    assert c.model_type == "bert" and c.vocab_size == len(vocab) and c.vocab_hash == vocab.hash
    assert c._attn_implementation == "sdpa"
    assert (c.pooling, c.contrastive, c.temperature, c.contrastive_weight) == ("cls", "simcse", 0.05, 1.0)


def test_config_errors_name_the_field(vocab):
    with pytest.raises(ConfigError, match="preset 'huge'"):
        make_config("huge", vocab)
    with pytest.raises(ConfigError, match="pooling='max'"):
        make_config("tiny", vocab, pooling="max")
    with pytest.raises(ConfigError, match="contrastive='simclr'"):
        make_config("tiny", vocab, contrastive="simclr")
    with pytest.raises(ConfigError, match="temperature"):
        make_config("tiny", vocab, temperature=0.0)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        make_config("tiny", vocab, hidden_size=65)
    with pytest.raises(ConfigError, match="vocab_size"):
        make_config("custom", None, hidden_size=64)
    assert "tiny" in PRESETS and make_config("custom", None, vocab_size=9, num_hidden_layers=1).num_hidden_layers == 1


# -- forward and losses ------------------------------------------------------------------------
def test_state_dict_matches_bert_for_masked_lm_and_decoder_is_tied(vocab):
    model = tiny_model(vocab)
    ours = set(model.state_dict())
    plain = set(BertForMaskedLM(model.config).state_dict())
    assert ours - plain == {k for k in ours if k.startswith("bert.pooler.")}
    assert plain <= ours
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_forward_shapes_and_loss_composition(vocab):
    model = tiny_model(vocab, cross_species_weight=0.5).train()
    batch = batch_of(vocab)
    out = model(**batch, output_logits=True)
    b, length = batch["input_ids"].shape
    assert out.logits.shape == (b, length, len(vocab))
    assert out.cell_embeddings.shape == (b, 64)
    parts = [out.mlm_loss, out.contrastive_loss, out.cross_species_loss]
    assert all(p is not None and torch.isfinite(p) and not p.requires_grad for p in parts)
    assert out.loss.item() == pytest.approx((out.mlm_loss + out.contrastive_loss + 0.5 * out.cross_species_loss).item(), rel=1e-5)
    assert list(out.keys())[0] == "loss"
    # an untrained model predicts roughly uniformly: MLM loss near log(vocab size)
    assert out.mlm_loss.item() == pytest.approx(np.log(len(vocab)), rel=0.3)


def test_mlm_loss_uses_view_one_and_full_vocabulary(vocab):
    model = tiny_model(vocab, contrastive="none").eval()
    batch = batch_of(vocab)
    out = model(**batch, output_logits=True)
    expected = losses.mlm_loss(out.logits, batch["labels"])
    assert out.mlm_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.contrastive_loss is None and out.cross_species_loss is None


def test_inference_without_labels_returns_logits_and_embeddings(vocab):
    model = tiny_model(vocab).eval()
    batch = batch_of(vocab)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out.loss is None and out.logits.shape == (*batch["input_ids"].shape, len(vocab))


def test_two_views_differ_only_by_dropout(vocab):
    batch = batch_of(vocab)
    no_dropout = tiny_model(vocab, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    out = no_dropout(**batch)
    z = out.cell_embeddings.detach()
    # identical views without dropout: the contrastive term equals NT-Xent of a batch with itself
    assert out.contrastive_loss.item() == pytest.approx(losses.nt_xent(z, z, 0.05).item(), rel=1e-5)

    with_dropout = tiny_model(vocab).train()
    torch.manual_seed(3)
    out = with_dropout(**batch)
    z1 = out.cell_embeddings.detach()
    assert out.contrastive_loss.item() != pytest.approx(losses.nt_xent(z1, z1, 0.05).item(), rel=1e-3)
    # ... and in eval mode (no dropout) view 2 is view 1
    with_dropout.eval()
    with torch.no_grad():
        out = with_dropout(**batch)
    z = out.cell_embeddings
    assert out.contrastive_loss.item() == pytest.approx(losses.nt_xent(z, z, 0.05).item(), rel=1e-5)


def test_simcse_pp_second_view_has_no_dropout(vocab):
    model = tiny_model(vocab, contrastive="simcse++")
    batch = batch_of(vocab)
    model.eval()
    with torch.no_grad():
        z_clean = model(batch["input_ids"], batch["attention_mask"]).cell_embeddings
    model.train()
    torch.manual_seed(5)
    out = model(**batch)
    assert model.training and model.bert.training  # dropout switched back on after view 2
    z1 = out.cell_embeddings.detach()
    assert not torch.allclose(z1, z_clean)  # view 1 had dropout
    expected = losses.nt_xent(z1, z_clean, 0.05) + 0.1 * losses.simcse_pp_dimension_loss(z1, z_clean)
    assert out.contrastive_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.dimension_loss is not None


def test_ortholog_projection_swaps_genes_species_token_and_drops_unmapped(vocab):
    model = tiny_model(vocab)
    h = human_ids(vocab, 3)
    no_ortholog = vocab.gene_to_id["ENSG99999999990"]
    ids = torch.tensor([[vocab.cls_id, vocab.species_token_id("human"), h[0], no_ortholog, h[2], vocab.mask_id, vocab.eos_id, 0],
                        [vocab.cls_id, no_ortholog, vocab.eos_id, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    projected, projected_mask, valid = model.project_to_orthologs(ids, mask)
    o = vocab.ortholog_map
    assert projected[0].tolist() == [vocab.cls_id, vocab.species_token_id("mouse"), o[h[0]], o[h[2]], vocab.mask_id, vocab.eos_id, 0, 0]
    assert projected_mask[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert projected[1].tolist()[:2] == [vocab.cls_id, vocab.eos_id]
    assert valid.tolist() == [True, False]  # the second cell has no gene with an ortholog


def test_cross_species_gradient_flows_through_both_branches(vocab):
    model = tiny_model(vocab, contrastive="none", cross_species_weight=1.0, cross_species_positives="projection").train()
    h = human_ids(vocab, N_PAIRS)
    ids = torch.tensor([[vocab.cls_id, vocab.species_token_id("human"), *h[i : i + 5], vocab.eos_id] for i in range(4)])
    mask = torch.ones_like(ids)
    out = model(ids, mask, labels=torch.full_like(ids, -100))  # no MLM target: the loss is the cross-species term
    assert out.mlm_loss.item() == 0.0 and out.cross_species_loss.item() > 0
    out.loss.backward()
    grad = model.bert.embeddings.word_embeddings.weight.grad
    used_human = sorted({t for row in ids.tolist() for t in row[2:-1]})
    used_mouse = [int(vocab.ortholog_map[t]) for t in used_human]
    # the original branch sees only human tokens, the projected branch only their mouse orthologs
    assert (grad[used_human].abs().sum(1) > 0).all()
    assert (grad[used_mouse].abs().sum(1) > 0).all()
    unused = [vocab.gene_to_id["ENSMUSG99999999990"]]
    assert grad[unused].abs().sum() == 0


def test_cross_species_needs_the_ortholog_map(vocab):
    config = make_config("tiny", vocab, max_position_embeddings=64, cross_species_weight=0.5)
    model = MixGeneformerForPretraining(config)
    with pytest.raises(ConfigError, match="attach_vocabulary"):
        model(**batch_of(vocab))


@pytest.mark.parametrize("pooling", ["cls", "pooler", "mean"])
def test_pooled_cell_is_independent_of_batch_padding(vocab, pooling):
    model = tiny_model(vocab, pooling=pooling).eval()
    batch = batch_of(vocab)
    with torch.no_grad():
        together = model(batch["input_ids"], batch["attention_mask"]).cell_embeddings
        n = int(batch["attention_mask"][1].sum())
        alone = model(batch["input_ids"][1:2, :n], batch["attention_mask"][1:2, :n]).cell_embeddings
    torch.testing.assert_close(alone[0], together[1], atol=1e-5, rtol=1e-5)


def test_mean_pooling_ignores_special_tokens(vocab):
    model = tiny_model(vocab, pooling="mean").eval()
    hidden = torch.randn(1, 4, 64)
    ids = torch.tensor([[vocab.cls_id, 10, 11, vocab.eos_id]])
    pooled = model.pool(hidden, ids, torch.ones_like(ids))
    torch.testing.assert_close(pooled[0], hidden[0, 1:3].mean(0))


def test_a_training_step_lowers_the_loss(vocab):
    model = tiny_model(vocab, cross_species_weight=0.5).train()
    batch = batch_of(vocab, n_cells=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(6):
        torch.manual_seed(step)
        loss = model(**batch).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first


# -- bundles -----------------------------------------------------------------------------------
def test_bundle_round_trip_and_plain_transformers_load(vocab, tmp_path):
    model = tiny_model(vocab, pooling="mean", cross_species_weight=0.5).eval()
    medians = GeneMedians({g: 1.0 + i for i, g in enumerate(sorted(vocab.gene_to_id))})
    folder = save_bundle(model, tmp_path / "bundle", vocab, medians)
    assert sorted(os.listdir(folder)) == [".mixgf-output", "config.json", "medians.tsv", "mixgf.json", "model.safetensors", "vocab.json"]
    assert json.loads((folder / "mixgf.json").read_text())["vocab_hash"] == vocab.hash

    loaded, loaded_vocab, loaded_medians = load_bundle(folder)
    assert loaded_vocab.hash == vocab.hash and loaded_medians == medians
    assert not loaded.training and loaded.config.pooling == "mean" and loaded.config.cross_species_weight == 0.5
    batch = batch_of(vocab)
    with torch.no_grad():
        before = model(batch["input_ids"], batch["attention_mask"])
        after = loaded(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(before.logits, after.logits) and torch.equal(before.cell_embeddings, after.cell_embeddings)
    assert torch.equal(loaded.ortholog_lookup, model.ortholog_lookup)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight

    plain = BertForMaskedLM.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain_logits, before.logits, rtol=0, atol=1e-6)


def test_save_bundle_refuses_to_overwrite_and_checks_the_vocabulary(vocab, tmp_path):
    model = tiny_model(vocab)
    save_bundle(model, tmp_path / "b", vocab)
    with pytest.raises(ArtifactError, match="already exists"):
        save_bundle(model, tmp_path / "b", vocab)
    save_bundle(model, tmp_path / "b", vocab, overwrite=True)
    other = Vocabulary(vocab.tokens[:-1], {g: i for g, i in vocab.gene_to_id.items() if i < len(vocab) - 1})
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        save_bundle(model, tmp_path / "c", other)
    assert not (tmp_path / "c").exists()


def test_vocabulary_mismatch_on_load(vocab, tmp_path):
    folder = save_bundle(tiny_model(vocab), tmp_path / "b", vocab)
    smaller = Vocabulary(vocab.tokens[:-1], {g: i for g, i in vocab.gene_to_id.items() if i < len(vocab) - 1})
    with pytest.raises(VocabularyMismatchError):
        load_bundle(folder, smaller)
    # same size, different content (two genes swapped) -> hash mismatch
    tokens = list(vocab.tokens)
    tokens[6], tokens[7] = tokens[7], tokens[6]
    swapped = Vocabulary(tokens, {t: i for i, t in enumerate(tokens) if i >= 6})
    with pytest.raises(VocabularyMismatchError, match="hash"):
        load_bundle(folder, swapped)
    # a plain HF folder (no vocab.json) with the wrong vocabulary size
    plain = tmp_path / "plain"
    BertForMaskedLM(BertConfig(vocab_size=len(vocab) + 3, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(plain)
    with pytest.raises(VocabularyMismatchError, match=f"vocab_size={len(vocab) + 3}"):
        load_bundle(plain, vocab)
    with pytest.raises(ArtifactError, match="no vocab.json"):
        load_bundle(plain)


def test_damaged_bundles_raise_artifact_errors_naming_the_file(vocab, tmp_path):
    folder = save_bundle(tiny_model(vocab), tmp_path / "b", vocab)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="model.safetensors.*truncated"):
        load_bundle(folder)

    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ArtifactError, match="model.safetensors.*Git-LFS"):
        load_bundle(folder)

    weights.unlink()
    with pytest.raises(ArtifactError, match="model weights not found"):
        load_bundle(folder)

    (folder / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json"):
        load_bundle(folder)


def test_missing_vocab_json_in_a_bundle_is_an_error(vocab, tmp_path):
    folder = save_bundle(tiny_model(vocab), tmp_path / "b", vocab)
    (folder / "vocab.json").unlink()
    with pytest.raises(ArtifactError, match="vocab.json"):
        load_bundle(folder)


def test_hub_ids_fail_fast_offline_and_missing_paths_are_artifact_errors(tmp_path):
    start = time.monotonic()
    with pytest.raises(OfflineError, match="Hub ID"):
        load_bundle("ctheodoris/Geneformer")
    assert time.monotonic() - start < 2
    with pytest.raises(ArtifactError, match="not found"):
        load_bundle(tmp_path / "nowhere")


class _Evil:
    """Pickles to a call that creates a file: what a malicious checkpoint would do."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_malicious_pickle_weights_never_execute(vocab, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(folder)
    marker = tmp_path / "pwned.txt"
    torch.save({"bert.embeddings.word_embeddings.weight": _Evil(str(marker))}, folder / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(ArtifactError, match="pytorch_model.bin.*refused"):
        load_bundle(folder, vocab)
    assert not marker.exists()


def test_plain_tensor_pickle_weights_load_with_weights_only(vocab, tmp_path):
    folder = tmp_path / "old"
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    source = BertForMaskedLM(config).eval()
    config.save_pretrained(folder)
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    model, _, _ = load_bundle(folder, vocab)
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-6)


# -- Geneformer checkpoints ---------------------------------------------------------------------
GENEFORMER_V1_CONFIG = {  # the published gf-6L-30M-i2048 config.json, including its legacy keys
    "architectures": ["BertForMaskedLM"],
    "attention_probs_dropout_prob": 0.02,
    "gradient_checkpointing": False,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "hidden_size": 256,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 2048,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 25426,
}


@pytest.mark.realdata
def test_geneformer_v1_checkpoint_loads_with_the_converted_vocabulary(shared_data, tmp_path):
    from mixgeneformer.vocab import import_geneformer

    gf_vocab, gf_medians = import_geneformer(
        shared_data / "geneformer_v1" / "token_dictionary.pkl", shared_data / "geneformer_v1" / "gene_median_dictionary.pkl"
    )
    assert len(gf_vocab) == 25426 and gf_vocab.cls_id is None

    torch.manual_seed(0)
    source = BertForMaskedLM(BertConfig(**{k: v for k, v in GENEFORMER_V1_CONFIG.items()
                                           if k not in ("architectures", "gradient_checkpointing", "transformers_version")})).eval()
    folder = tmp_path / "gf-6L-30M-i2048"
    source.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(GENEFORMER_V1_CONFIG, indent=2))
    assert "bert.pooler.dense.weight" not in load_file(str(folder / "model.safetensors"))

    model, vocab, medians = load_bundle(folder, gf_vocab)
    assert vocab is gf_vocab and medians is None
    assert model.config.hidden_act == "relu" and model.config.num_hidden_layers == 6
    assert model.pooler_is_trained is False  # Geneformer has no pooler weights: flagged, not hidden

    genes = [gf_vocab.gene_to_id[g] for g in sorted(gf_vocab.gene_to_id)[:300]]
    ids = torch.tensor([genes[:200], genes[100:300]])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids))
        reference = source(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-5)
    assert out.cell_embeddings.shape == (2, 256) and torch.isfinite(out.cell_embeddings).all()

    # Re-saved as a bundle, it carries the Geneformer vocabulary and medians from then on.
    bundle = save_bundle(model, tmp_path / "gf-bundle", gf_vocab, gf_medians)
    reloaded, reloaded_vocab, reloaded_medians = load_bundle(bundle)
    assert reloaded_vocab.hash == gf_vocab.hash and reloaded_medians == gf_medians


def test_config_json_is_plain_bert(vocab, tmp_path):
    folder = save_bundle(tiny_model(vocab), tmp_path / "b", vocab)
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["model_type"] == "bert" and config["vocab_hash"] == vocab.hash
    assert isinstance(MixGeneformerConfig.from_dict(config), BertConfig)


@pytest.mark.parametrize(
    "overrides",
    [dict(pooling="cls"), dict(pooling="pooler"), dict(pooling="mean", contrastive="simcse++"),
     dict(pooling="pooler", contrastive="none"), dict(pooling="cls", cross_species_weight=0.5)],
)
def test_every_trainable_parameter_gets_a_gradient(vocab, overrides):
    """What DDP needs without find_unused_parameters: no trainable parameter left out of the loss."""
    model = tiny_model(vocab, **overrides).train()
    model(**batch_of(vocab)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.bert.pooler.dense.weight.requires_grad == (overrides["pooling"] == "pooler" and overrides.get("contrastive") != "none")


def test_a_non_bert_config_is_rejected(vocab, tmp_path):
    folder = save_bundle(tiny_model(vocab), tmp_path / "b", vocab)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": len(vocab)}))
    with pytest.raises(ArtifactError, match="model_type='gpt2'"):
        load_bundle(folder)
    (folder / "config.json").write_text('{"model_type": "bert", "vocab_si')
    with pytest.raises(ArtifactError, match="config.json.*not valid JSON"):
        load_bundle(folder)
