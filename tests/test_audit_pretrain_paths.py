"""Audit of the pretraining run paths: exact resume (the cross-species queue too), resume under another
number of processes, torchrun resume, MLM masking and SimCSE views as SPEC 4 says, held-out cells kept
out of training (RELIABILITY 15, 17, 27)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.errors import ConfigError
from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining

sys.path.insert(0, str(Path(__file__).parent))
from test_cross_species import ortholog_vocab as shared_ortholog_vocab  # noqa: E402
from test_pretrain import make_vocab, params_of, save_token_corpus, tiny_config, training_data  # noqa: E402

N_PAIRS = 24


def ortholog_vocab():
    """An ortholog vocabulary: N_PAIRS shared human|mouse tokens plus 8 genes of each species alone."""
    return shared_ortholog_vocab(N_PAIRS, range(8))


def ortholog_corpus(path: Path, vocab, n_cells: int = 96, seed: int = 0) -> Path:
    """Human and mouse cells of 3 types, each a ranking of shared ortholog tokens plus a few species genes."""
    rng = np.random.default_rng(seed)
    shared = np.arange(6, 6 + N_PAIRS)
    own = {"human": np.arange(6 + N_PAIRS, len(vocab), 2), "mouse": np.arange(7 + N_PAIRS, len(vocab), 2)}
    programs = [rng.permutation(shared) for _ in range(3)]
    ids, species = [], []
    for cell in range(n_cells):
        sp = ("human", "mouse")[cell % 2]
        genes = programs[rng.integers(3)][: int(rng.integers(12, N_PAIRS + 1))].copy()
        j = rng.integers(0, genes.size - 1)
        genes[[j, j + 1]] = genes[[j + 1, j]]
        ids.append(np.concatenate([[2, 4 if sp == "human" else 5], genes, rng.permutation(own[sp])[:3]]).astype(np.int32))
        species.append(sp)
    return save_token_corpus(path, ids, species, vocab.hash)


@pytest.fixture(scope="module")
def orthologs(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("orthologs"), ortholog_vocab(), ortholog_corpus)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("synthetic"), make_vocab(), n_cells=128)


QUEUE = {"cross_species_weight": 0.5, "cross_species_queue": 24, "pooling": "mean"}


def test_resume_with_a_cross_species_queue_equals_a_straight_run(tmp_path, orthologs, monkeypatch):
    """The queue of earlier cells is training state: a checkpoint that left it out resumed with an empty queue,
    so the cross-species loss of the next steps (and the weights) differed from a straight run's."""
    sections = {"objective": QUEUE, "train": {"max_steps": 10, "per_device_batch_size": 8},
                "checkpoint": {"save_steps": 4, "keep": 0}}
    straight = run_pretraining(pretrain_config_from_dict(tiny_config(orthologs, tmp_path / "a", **sections)))
    rows_a = read_metrics(tmp_path / "a")
    assert sum(r["cross_species_loss"] > 0 for r in rows_a) >= 5  # the term is at work, not a zero

    out = tmp_path / "b"
    config = pretrain_config_from_dict(tiny_config(orthologs, out, **sections))
    monkeypatch.setenv("MIXGF_TEST_FAIL_AT_STEP", "0:6")  # dies after checkpoint-4
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pretraining(config)
    monkeypatch.delenv("MIXGF_TEST_FAIL_AT_STEP")
    bank = out / "checkpoint-4" / "cell_bank_0.safetensors"
    assert bank.is_file() and "cell_bank_0.safetensors" in json.loads((out / "checkpoint-4" / ckpt.COMPLETE).read_text())["files"]
    resumed = run_pretraining(config, resume=True)
    assert resumed.resumed_from.name == "checkpoint-4"
    rows_b = read_metrics(out)
    for a, b in zip(rows_a, rows_b, strict=True):
        assert (a["step"], a["loss"], a["cross_species_loss"]) == (b["step"], b["loss"], b["cross_species_loss"])
    a, b = params_of(straight.bundle_dir), params_of(resumed.bundle_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.startswith("cell_bank") for p in resumed.bundle_dir.iterdir())  # not a model weight


def test_resume_under_another_number_of_processes_is_refused(tmp_path, synthetic):
    """A checkpoint of 2 ranks resumed by 1 process silently halved the global batch: the skipped batches,
    the data order of the epoch and the schedule's steps then meant other cells than the run had trained on."""
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 4}, checkpoint={"save_steps": 4}))
    run_pretraining(config)
    environment = out / "checkpoint-4" / "environment.json"
    record = json.loads(environment.read_text())
    record["world_size"] = 2  # as a torchrun --nproc_per_node 2 run records it
    environment.write_text(json.dumps(record))
    ckpt.write_complete_marker(out / "checkpoint-4", 4)
    before = sorted(p.name for p in out.iterdir())
    metrics = (out / "metrics.csv").read_text()
    longer = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 8}, checkpoint={"save_steps": 4}))
    with pytest.raises(ConfigError, match=r"2 processes.*nproc_per_node 2"):
        run_pretraining(longer, resume=True)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "metrics.csv").read_text() == metrics


# ------------------------------------------------------------------------------------------
# Two gloo ranks under torchrun: cells, averaged loss parts, the bundle, resume (RELIABILITY 15, 17)
# ------------------------------------------------------------------------------------------
# Runs in each rank: records the training cells it fetched and compares its live weights with the bundle.
WORKER = r'''
import json, os, sys
import datasets, torch, torch.distributed as dist
from safetensors.torch import load_file
import mixgeneformer.pretrain as P

seen, live = [], {}
getitems = datasets.Dataset.__getitems__
def record(self, keys):
    if len(self) == int(os.environ["N_TRAIN"]):
        seen.extend(int(k) for k in keys)
    return getitems(self, keys)
datasets.Dataset.__getitems__ = record
finish = P._finish
def keep_live(trainer, plan, config, output):
    live.update(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    return finish(trainer, plan, config, output)
P._finish = keep_live
result = P.run_pretraining(P.load_pretrain_config(sys.argv[1]), resume=sys.argv[2] == "resume")
bundle = load_file(str(result.bundle_dir / "model.safetensors"))
report = {"seen": seen, "step": result.global_step,
          "bundle_vs_live": max(float((bundle[k] - live[k]).abs().max()) for k in bundle)}
with open(os.path.join(os.environ["REPORT_DIR"], f"rank{dist.get_rank()}.json"), "w") as handle:
    json.dump(report, handle)
dist.barrier()
dist.destroy_process_group()
'''
DDP_CELLS = 96  # 12 steps of 2 ranks x 4 cells: one epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(folder: Path, config: dict, mode: str = "fresh", fail_at: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    (folder / "worker.py").write_text(WORKER)
    reports = folder / f"reports-{mode}"
    reports.mkdir(exist_ok=True)
    env = {**os.environ, "REPORT_DIR": str(reports), "N_TRAIN": str(DDP_CELLS), "OMP_NUM_THREADS": "1"}
    env.pop("MIXGF_TEST_FAIL_AT_STEP", None)
    if fail_at:
        env["MIXGF_TEST_FAIL_AT_STEP"] = fail_at
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(folder / "worker.py"), str(folder / "run.yaml"), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    return proc, [json.loads(p.read_text()) for p in sorted(reports.glob("rank*.json"))]


def ddp_config(root: Path, out: Path) -> dict:
    return tiny_config(root, out, objective={**QUEUE, "gather_negatives": True},
                       train={"max_steps": 12, "per_device_batch_size": 4}, checkpoint={"save_steps": 3, "keep": 0},
                       distributed={"timeout_s": 60})


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory, orthologs):
    folder = tmp_path_factory.mktemp("ddp-straight")
    proc, reports = torchrun(folder, ddp_config(orthologs, folder / "run"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder / "run", reports


def test_two_ranks_train_on_disjoint_cells_average_their_loss_parts_and_bundle_rank0s_weights(ddp_straight):
    out, reports = ddp_straight
    assert len(reports) == 2 and all(r["step"] == 12 for r in reports)
    seen0, seen1 = reports[0]["seen"], reports[1]["seen"]
    # one epoch: every training cell once, on one rank only
    assert len(seen0) == len(set(seen0)) == len(seen1) == len(set(seen1)) == DDP_CELLS // 2
    assert set(seen0) | set(seen1) == set(range(DDP_CELLS))
    assert all(r["bundle_vs_live"] == 0.0 for r in reports)  # the bundle holds the trained weights (equal on both ranks)
    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))  # rank 1 wrote no rows
    for row in rows:  # `loss` is averaged over ranks by the Trainer: the parts add up to it only if averaged too
        total = row["mlm_loss"] + row["contrastive_loss"] + QUEUE["cross_species_weight"] * row["cross_species_loss"]
        assert abs(total - row["loss"]) < 1e-4 * abs(row["loss"])
    for _, checkpoint in ckpt.list_checkpoints(out):
        assert {p.name for p in checkpoint.glob("cell_bank_*")} == {"cell_bank_0.safetensors", "cell_bank_1.safetensors"}


@pytest.mark.slow  # two torchrun launches (about 28 s on 2 cores), plus the straight run of the fixture
def test_a_torchrun_run_resumed_after_a_failing_rank_equals_the_straight_run(tmp_path, orthologs, ddp_straight):
    straight, _ = ddp_straight
    out = tmp_path / "run"
    proc, reports = torchrun(tmp_path, ddp_config(orthologs, out), fail_at="1:8")  # after checkpoint-6
    assert proc.returncode != 0 and not reports
    assert ckpt.latest_complete_checkpoint(out).name == "checkpoint-6"
    proc, reports = torchrun(tmp_path, ddp_config(orthologs, out), mode="resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(len(r["seen"]) == 6 * 4 for r in reports)  # steps 7-12 only: the first six batches are skipped unread
    a, b = params_of(straight / "model"), params_of(out / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "mlm_loss", "contrastive_loss", "cross_species_loss", "learning_rate")
    assert [[r[k] for k in keys] for r in read_metrics(out)] == [[r[k] for k in keys] for r in read_metrics(straight)]


# ------------------------------------------------------------------------------------------
# SPEC 4: masking, the SimCSE views; held-out cells never trained on
# ------------------------------------------------------------------------------------------
def test_training_batches_are_masked_as_spec_4_says(tmp_path, synthetic):
    """The run's own collator (seeded per batch): 15% of gene tokens, 80/10/10, never <cls>, species or padding."""
    from mixgeneformer.pretrain import DataOptions, make_mlm_collator
    from mixgeneformer.trainer import SeededMaskingCollator

    vocab = make_vocab()
    collator = SeededMaskingCollator(make_mlm_collator(vocab, DataOptions(), max_len=64), seed=7)
    rng = np.random.default_rng(0)
    genes = np.arange(6, len(vocab))
    rows = [{"input_ids": np.concatenate([[2, 4], rng.choice(genes, int(rng.integers(5, 60)), replace=False)]),
             "species": "human"} for _ in range(400)]
    selected = masked = random = kept = candidates = 0
    for start in range(0, len(rows), 16):
        batch_rows = rows[start:start + 16]
        batch = collator(batch_rows)
        original = torch.zeros_like(batch["input_ids"])
        for i, row in enumerate(batch_rows):
            original[i, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
        labelled = batch["labels"] != -100
        gene = batch["attention_mask"].bool() & (original >= 6)
        assert not (labelled & ~gene).any()  # no special token, no padding
        assert torch.equal(batch["labels"][labelled], original[labelled])
        assert torch.equal(batch["input_ids"][~labelled], original[~labelled])  # nothing else touched
        got = batch["input_ids"][labelled]
        candidates += int(gene.sum())
        selected += int(labelled.sum())
        masked += int((got == vocab.mask_id).sum())
        kept += int((got == original[labelled]).sum())
        random += int(((got != vocab.mask_id) & (got != original[labelled])).sum())
        assert int(got[got != vocab.mask_id].min()) >= 6  # random replacements are genes
    assert abs(selected / candidates - 0.15) < 0.02
    assert abs(masked / selected - 0.8) < 0.04 and abs(kept / selected - 0.1) < 0.03
    assert abs(random / selected - 0.1) < 0.03  # (a random gene may equal the original: counted as kept)
    again = collator(rows[:16])
    assert torch.equal(again["input_ids"], collator(rows[:16])["input_ids"])  # the same batch, the same masks


def test_the_two_simcse_views_differ_by_dropout_only():
    from mixgeneformer.model import MixGeneformerForPretraining, make_config

    vocab = make_vocab()
    ids = torch.tensor([[2, 4, *range(10, 20)], [2, 5, *range(70, 80)]])
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    views = {}
    for dropout in (0.0, 0.1):
        torch.manual_seed(0)
        config = make_config("tiny", vocab, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        model = MixGeneformerForPretraining(config).train()
        model.attach_vocabulary(vocab)
        captured = []
        model.bert.register_forward_hook(lambda _m, _a, kwargs, out, into=captured: into.append((kwargs, out)), with_kwargs=True)
        out = model(ids, torch.ones_like(ids), labels=labels)
        (kwargs, hidden), = captured
        stacked = kwargs["input_ids"]
        assert torch.equal(stacked[:2], ids) and torch.equal(stacked[2:], ids)  # the same masked batch, twice
        views[dropout] = hidden.last_hidden_state[:, 0]
        assert out.contrastive_loss > 0
    assert torch.equal(views[0.0][:2], views[0.0][2:])  # no dropout: the views are one
    assert not torch.allclose(views[0.1][:2], views[0.1][2:])


def test_held_out_cells_never_enter_training(tmp_path, synthetic, monkeypatch):
    import mixgeneformer.pretrain as pretrain_module

    fed = []
    collator_type = pretrain_module.SeededMaskingCollator

    class Recording(collator_type):
        def __call__(self, features):
            if self.epoch != pretrain_module.EVAL_MASK_EPOCH:
                fed.extend(tuple(int(t) for t in f["input_ids"]) for f in features)
            return super().__call__(features)

    monkeypatch.setattr(pretrain_module, "SeededMaskingCollator", Recording)
    splits = {}
    split = pretrain_module.split_train_eval

    def keep_split(dataset, fraction, seed):
        splits["all"] = [tuple(x) for x in dataset["input_ids"]]
        train, held_out = split(dataset, fraction, seed)
        splits["train"], splits["eval"] = ([tuple(x) for x in part["input_ids"]] for part in (train, held_out))
        return train, held_out

    monkeypatch.setattr(pretrain_module, "split_train_eval", keep_split)
    config = tiny_config(synthetic, tmp_path / "run", data={"eval_fraction": 0.25}, train={"max_steps": 14},
                         logging={"eval_steps": 7})
    run_pretraining(pretrain_config_from_dict(config))
    held_out = splits["eval"]
    assert len(held_out) == 32 and len(splits["train"]) == 96
    assert sorted(held_out + splits["train"]) == sorted(splits["all"])  # a split: every cell in one part
    only_held_out = {c for c in held_out if c not in splits["train"]}  # cells told apart by their tokens
    assert len(only_held_out) >= 28
    assert len(fed) >= 14 * 8 and not only_held_out & set(fed)  # 14 steps of 8 cells (and a prefetched batch), none held out
    assert set(fed) <= set(splits["train"])


def test_a_cross_species_term_on_cells_of_one_species_is_refused_before_any_output(tmp_path, orthologs):
    """On training cells of one species the cross-species term is 0 at every step: it was asked for and
    silently did nothing (seen with data.max_cells cutting a human-then-mouse corpus to its human cells)."""
    import datasets

    from mixgeneformer.errors import ConfigError

    both = datasets.load_from_disk(str(orthologs / "corpus"))
    root = tmp_path / "human"
    root.mkdir()
    (root / "vocab.json").write_bytes((orthologs / "vocab.json").read_bytes())
    human = both.filter(lambda row: row["species"] == "human")
    human.save_to_disk(str(root / "corpus"))
    (root / "corpus" / "mixgf_corpus.json").write_bytes((orthologs / "corpus" / "mixgf_corpus.json").read_bytes())
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"cross_species_weight=0.5 .* all human: train on cells of both species"):
        run_pretraining(pretrain_config_from_dict(tiny_config(root, out, objective=QUEUE)))
    assert not out.exists()
    # The same cells without the term train; both species with it train (the test above).
    run_pretraining(pretrain_config_from_dict(tiny_config(root, out, train={"max_steps": 2})))
    assert (out / "model" / "model.safetensors").is_file()


def test_an_invalid_objective_option_is_named_where_the_config_sets_it(tmp_path, synthetic):
    """The model-config check says model.<field>; a run config sets that field under objective (or
    model.overrides), and the message must name the key the user wrote."""
    from mixgeneformer.config import from_dict
    from mixgeneformer.errors import ConfigError
    from mixgeneformer.pretrain import PretrainConfig, build_model
    from mixgeneformer.vocab import Vocabulary

    vocab = Vocabulary.load(synthetic / "vocab.json")
    overrides = {**tiny_config(synthetic, tmp_path)["model"]["overrides"], "temperature": -1.0}
    for data, message in ((tiny_config(synthetic, tmp_path / "run", objective={"pooling": "bogus"}), r"objective\.pooling='bogus'"),
                          (tiny_config(synthetic, tmp_path / "run", model={"overrides": overrides}),
                           r"model\.overrides\.temperature=-1\.0 must be > 0")):
        with pytest.raises(ConfigError, match=message) as info:
            pretrain_config_from_dict(data)  # validate() checks the values too, before any file is read
        assert "model.pooling" not in str(info.value)
        with pytest.raises(ConfigError, match=message):
            build_model(from_dict(PretrainConfig, data), vocab)  # a config that skipped validate()


def test_a_resume_does_not_report_the_tied_decoder_as_missing(tmp_path, synthetic, monkeypatch):
    """The MLM decoder is tied to the word embeddings and never stored; a resume printed transformers'
    'There were missing keys in the checkpoint model loaded' for it, which reads as a damaged checkpoint."""
    import transformers.trainer as hf_trainer

    warnings: list[str] = []
    monkeypatch.setattr(hf_trainer.logger, "warning", lambda message, *args, **kwargs: warnings.append(str(message)))
    run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, tmp_path / "run", train={"max_steps": 4},
                                                          checkpoint={"save_steps": 2})))
    longer = pretrain_config_from_dict(tiny_config(synthetic, tmp_path / "run", train={"max_steps": 6},
                                                   checkpoint={"save_steps": 2}))
    result = run_pretraining(longer, resume=True)
    assert result.resumed_from.name == "checkpoint-4"
    assert not [w for w in warnings if "missing keys" in w]
    from mixgeneformer.bundle import load_bundle

    loaded, _, _ = load_bundle(result.bundle_dir)  # the decoder is still the word embedding matrix
    assert loaded.cls.predictions.decoder.weight.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
