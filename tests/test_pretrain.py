"""Pretraining engine: config validation, samplers, atomic checkpoints, resume, signals, real data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.errors import ArtifactError, ConfigError, VocabularyMismatchError
from mixgeneformer.pretrain import (
    TrainingInterrupted,
    load_pretrain_config,
    pretrain_config_from_dict,
    read_metrics,
    run_pretraining,
    training_flops,
)
from mixgeneformer.sampling import PretrainSampler, length_grouped_order, species_balanced_draw
from mixgeneformer.vocab import Vocabulary

SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]
TINY = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


# ------------------------------------------------------------------------------------------
# Small synthetic corpora (cell "types" = fixed gene rankings with a little noise)
# ------------------------------------------------------------------------------------------
def make_vocab(n_per_species: int = 60) -> Vocabulary:
    human = [f"ENSG{i:011d}" for i in range(1, n_per_species + 1)]
    mouse = [f"ENSMUSG{i:011d}" for i in range(1, n_per_species + 1)]
    tokens = SPECIALS + human + mouse
    return Vocabulary(tokens, {g: i for i, g in enumerate(tokens) if not g.startswith("<")})


def save_token_corpus(path: Path, ids: list[np.ndarray], species: list[str], vocab_hash: str) -> Path:
    """Cells of token ids, with their species, saved as a tokenized corpus of the vocabulary ``vocab_hash``."""
    import datasets

    lengths = [len(seq) for seq in ids]
    datasets.Dataset.from_dict({"input_ids": ids, "length": lengths, "species": species}).save_to_disk(str(path))
    (path / "mixgf_corpus.json").write_text(json.dumps({"vocab_hash": vocab_hash}))
    return path


def training_data(root: Path, vocab: Vocabulary, build=None, **kwargs) -> Path:
    """``root`` holding ``vocab.json`` and the corpus ``build`` (default :func:`make_corpus`) writes to
    ``root/corpus``: the data folder :func:`tiny_config` reads."""
    vocab.save(root / "vocab.json")
    (build or make_corpus)(root / "corpus", vocab, **kwargs)
    return root


def make_corpus(path: Path, vocab: Vocabulary, n_cells: int = 256, n_types: int = 4, seed: int = 0,
                min_len: int = 12, max_len: int = 40, vocab_hash: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    genes = np.arange(len(SPECIALS), len(vocab))
    half = genes.size // 2
    programs = [rng.permutation(half) for _ in range(n_types)]
    ids, species = [], []
    for cell in range(n_cells):
        sp = "human" if cell % 2 == 0 else "mouse"
        base = genes[:half] if sp == "human" else genes[half:]
        order = programs[rng.integers(n_types)].copy()
        swaps = rng.integers(0, order.size - 1, size=3)
        for j in swaps:
            order[[j, j + 1]] = order[[j + 1, j]]
        n = int(rng.integers(min_len, max_len + 1))
        ids.append(np.concatenate([[2, 4 if sp == "human" else 5], base[order[: n - 2]]]).astype(np.int32))
        species.append(sp)
    return save_token_corpus(path, ids, species, vocab_hash or vocab.hash)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("synthetic"), make_vocab())


def tiny_config(root: Path, out: Path, **sections) -> dict:
    config = {
        "output_dir": str(out),
        "data": {"corpus": [str(root / "corpus")], "vocab": str(root / "vocab.json")},
        "model": {"preset": "tiny", "overrides": dict(TINY)},
        "train": {"max_steps": 12, "warmup_steps": 2, "per_device_batch_size": 8, "seed": 7},
        "checkpoint": {"save_steps": 3, "keep": 0},
        "logging": {"logging_steps": 1, "progress_bar": False, "tensorboard": False},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def params_of(bundle_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(bundle_dir / "model.safetensors"))


# ------------------------------------------------------------------------------------------
# Configuration (RELIABILITY 18)
# ------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_wrong_types_before_reading_data(tmp_path):
    missing = tmp_path / "no-such-corpus"
    base = {"output_dir": str(tmp_path / "run"), "data": {"corpus": [str(missing)], "vocab": str(missing / "v.json")}}
    with pytest.raises(ConfigError, match="learning_rat"):
        pretrain_config_from_dict({**base, "train": {"learning_rat": 1e-3}})
    with pytest.raises(ConfigError, match="train.max_steps"):
        pretrain_config_from_dict({**base, "train": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match="precision"):
        pretrain_config_from_dict({**base, "train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="objective.temprature"):
        pretrain_config_from_dict({**base, "objective": {"temprature": 0.05}})
    with pytest.raises(ConfigError, match="preset"):
        pretrain_config_from_dict({**base, "model": {"preset": "giant"}})
    with pytest.raises(ConfigError, match="deepspeed_config"):
        pretrain_config_from_dict({**base, "distributed": {"strategy": "deepspeed"}})
    with pytest.raises(ConfigError, match="data.corpus"):
        pretrain_config_from_dict({"output_dir": str(tmp_path)})


def test_yaml_config_with_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "out", "data": {"corpus": ["c"], "vocab": "v.json"},
                                    "train": {"learning_rate": 0.001}}))
    config = load_pretrain_config(path, ["train.learning_rate=5.0e-4", "objective.gather_negatives=true",
                                         "data.corpus=[a, b]"])
    assert config.train.learning_rate == 5e-4
    assert config.objective == {"gather_negatives": True}
    assert [str(p) for p in config.data.corpus] == ["a", "b"]
    assert config.train.weight_decay == 0.001 and config.train.schedule == "cosine"  # the authors' defaults


def test_shipped_example_configs_validate():
    configs = Path(__file__).resolve().parents[1] / "configs"
    yamls = sorted(configs.glob("*.yaml"))
    assert len(yamls) >= 3
    for path in yamls:
        config = load_pretrain_config(path)
        if config.distributed.deepspeed_config is not None:
            assert (configs.parent / config.distributed.deepspeed_config).is_file()
    zero2 = json.loads((configs / "deepspeed_zero2.json").read_text())
    assert zero2["zero_optimization"]["stage"] == 2


def test_vocabulary_mismatch_fails_before_training(tmp_path, synthetic):
    other = make_corpus(tmp_path / "corpus", make_vocab(), n_cells=16, vocab_hash="0123456789abcdef")
    config = pretrain_config_from_dict(tiny_config(synthetic, tmp_path / "run", data={"corpus": [str(other)]}))
    with pytest.raises(VocabularyMismatchError, match="0123456789abcdef"):
        run_pretraining(config)
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_not_overwritten_without_a_flag(tmp_path, synthetic):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 2}))
    with pytest.raises(ArtifactError, match="--overwrite"):
        run_pretraining(config)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(ArtifactError, match="only replaces outputs of mixgeneformer"):  # not a run folder
        run_pretraining(config, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert run_pretraining(config).global_step == 2
    result = run_pretraining(config, overwrite=True)  # a run folder of this package is replaced
    assert result.global_step == 2


# ------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------
def test_length_grouping_cuts_padding_and_is_a_permutation():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 2048, size=5000)
    order = length_grouped_order(lengths, batch_size=8, rng=np.random.default_rng(1))
    assert np.array_equal(np.sort(order), np.arange(5000))
    assert order[0] == np.argmax(lengths)  # the longest cell first: OOM shows at step one

    def padded(idx):
        batches = lengths[idx[: 5000 // 8 * 8]].reshape(-1, 8)
        return (batches.max(1, keepdims=True) - batches).sum()

    assert padded(order) < 0.1 * padded(rng.permutation(5000))


def test_sampler_order_depends_only_on_seed_and_epoch():
    lengths = np.arange(100) % 37 + 1
    species = np.r_[np.zeros(90, int), np.ones(10, int)]
    a = PretrainSampler(100, 4, seed=3, lengths=lengths, species_codes=species)
    b = PretrainSampler(100, 4, seed=3, lengths=lengths, species_codes=species)
    torch.manual_seed(123)  # the global RNG plays no part
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_species_balanced_draws_each_species_equally():
    species = np.r_[np.zeros(900, int), np.ones(100, int)]
    draws = species_balanced_draw(species, 20000, np.random.default_rng(0))
    share = species[draws].mean()
    assert 0.47 < share < 0.53
    sampler = PretrainSampler(1000, 8, seed=0, lengths=np.full(1000, 5), species_codes=species,
                              species_balanced=True)
    assert 0.4 < species[sampler.epoch_order()].mean() < 0.6


def test_flop_formula():
    # 6 N T + 12 L H S T per view: N=10, T=2*4=8, L=2, H=3, S=4
    assert training_flops(10, 2, 3, batch=2, seq_len=4) == 6 * 10 * 8 + 12 * 2 * 3 * 4 * 8
    assert training_flops(10, 2, 3, batch=2, seq_len=4, n_views=2) == 2 * training_flops(10, 2, 3, 2, 4)
    # + 6 V H P for the decoder at P predicted positions
    assert training_flops(10, 2, 3, 2, 4, vocab_size=100, n_predicted=5) == training_flops(10, 2, 3, 2, 4) + 6 * 100 * 3 * 5


# ------------------------------------------------------------------------------------------
# Training, checkpoints, resume (RELIABILITY 13-16)
# ------------------------------------------------------------------------------------------
def test_run_writes_checkpoints_metrics_and_a_loadable_bundle(tmp_path, synthetic):
    from mixgeneformer.bundle import load_bundle

    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 6},
                                                   data={"eval_fraction": 0.1},
                                                   checkpoint={"save_steps": 3, "keep": 1},
                                                   logging={"tensorboard": True}))
    result = run_pretraining(config)
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-6"]  # keep=1 rotated step 3 away
    checkpoint = out / "checkpoint-6"
    assert ckpt.checkpoint_problem(checkpoint) is None
    for name in ("config.yaml", "vocab.json", "environment.json", "model.safetensors", "optimizer.pt"):
        assert (checkpoint / name).is_file(), name
    assert not (checkpoint / "training_args.bin").exists()
    assert not (out / ckpt.STAGING).exists()
    env = json.loads((checkpoint / "environment.json").read_text())
    assert env["precision"] == "fp32" and env["autocast_dtype"] == "float32"  # CPU: fp32, recorded
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"mlm_loss", "contrastive_loss", "learning_rate", "tokens_per_s"} <= set(r) for r in train_rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]  # held-out 10%, evaluated at each save
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    model, vocab, _ = load_bundle(result.bundle_dir)
    assert vocab.hash == Vocabulary.load(synthetic / "vocab.json").hash
    trained = params_of(result.bundle_dir)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, trained["bert.embeddings.word_embeddings.weight"])


def test_unigram_mlm_bias_starts_at_the_training_cells_log_gene_frequencies(tmp_path, synthetic):
    from mixgeneformer.corpus import load_corpus
    from mixgeneformer.pretrain import split_train_eval

    vocab = Vocabulary.load(synthetic / "vocab.json")
    # 2 warmup steps: the one step taken has learning rate 0, so the bundle holds the initial weights.
    sections = {"train": {"max_steps": 1, "warmup_steps": 2}, "data": {"eval_fraction": 0.1}, "checkpoint": {"save_steps": 1}}
    bias = {}
    for init in ("zero", "unigram"):
        config = tiny_config(synthetic, tmp_path / init, **sections)
        config["train"]["mlm_bias_init"] = init
        bias[init] = params_of(run_pretraining(pretrain_config_from_dict(config)).bundle_dir)["cls.predictions.bias"]
    assert torch.count_nonzero(bias["zero"]) == 0
    train, _ = split_train_eval(load_corpus(synthetic / "corpus"), 0.1, 7)
    counts = np.bincount(np.concatenate(train["input_ids"]), minlength=len(vocab)).astype(float)
    genes = np.setdiff1d(np.arange(len(vocab)), vocab.special_ids)
    expected = np.log((counts[genes] + 1) / (counts[genes].sum() + genes.size))  # add-one unigram of the training split
    got = bias["unigram"].numpy().astype(float)
    np.testing.assert_allclose(got[genes] - got[genes].mean(), expected - expected.mean(), atol=1e-5)
    assert np.all(got[vocab.special_ids] <= got[genes].min() + 1e-6)  # never a target: the lowest value
    assert abs(got.mean()) < 1e-5
    with pytest.raises(ConfigError, match="mlm_bias_init"):
        pretrain_config_from_dict(tiny_config(synthetic, tmp_path / "bad", train={"mlm_bias_init": "frequency"})).validate()


def test_resume_after_a_crash_equals_a_straight_run(tmp_path, synthetic, monkeypatch):
    straight = run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, tmp_path / "a")))

    out = tmp_path / "b"
    config = pretrain_config_from_dict(tiny_config(synthetic, out))
    monkeypatch.setenv("MIXGF_TEST_FAIL_AT_STEP", "0:7")  # dies after checkpoint-6, before step 9
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pretraining(config)
    monkeypatch.delenv("MIXGF_TEST_FAIL_AT_STEP")
    assert ckpt.latest_complete_checkpoint(out).name == "checkpoint-6"
    resumed = run_pretraining(config, resume=True)
    assert resumed.resumed_from.name == "checkpoint-6"

    a, b = params_of(straight.bundle_dir), params_of(resumed.bundle_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = {int(r["step"]): r for r in read_metrics(tmp_path / "a")}
    steps_b = [int(r["step"]) for r in read_metrics(out)]
    assert steps_b == list(range(1, 13))  # steps 1-6 of the crashed run, 7-12 resumed; step 7 not twice
    rows_b = {int(r["step"]): r for r in read_metrics(out)}
    for step in range(7, 13):
        for key in ("loss", "mlm_loss", "contrastive_loss", "learning_rate"):
            assert rows_a[step][key] == pytest.approx(rows_b[step][key], rel=0, abs=0), (step, key)


def test_overwrite_keeps_the_previous_run_until_the_new_one_finishes(tmp_path, synthetic, monkeypatch):
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out))
    first = run_pretraining(config)
    weights = params_of(first.bundle_dir)
    kept = ckpt.previous_run_dir(out)
    monkeypatch.setenv("MIXGF_TEST_FAIL_AT_STEP", "0:7")
    for _ in range(2):  # the second --overwrite drops the first one's partial run, not the kept run
        with pytest.raises(RuntimeError, match="injected failure"):
            run_pretraining(config, overwrite=True)
        restored = params_of(kept / first.bundle_dir.name)
        assert restored.keys() == weights.keys() and all(torch.equal(weights[k], restored[k]) for k in weights)
        assert not (out / first.bundle_dir.name).exists() and ckpt.latest_complete_checkpoint(out).name == "checkpoint-6"
    monkeypatch.delenv("MIXGF_TEST_FAIL_AT_STEP")
    assert run_pretraining(config, resume=True).global_step == 12
    assert not kept.exists() and (out / first.bundle_dir.name).is_dir()
    assert [p.name for p in out.glob(".*")] == [".mixgf-output"]
    shutil.copytree(out, kept)  # a kept run the user has not dealt with; the run folder deleted by hand
    shutil.rmtree(out)
    run_pretraining(config)  # a fresh run did not set it aside: it stays
    assert (kept / first.bundle_dir.name).is_dir()


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, synthetic, monkeypatch):
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 9}))
    monkeypatch.setenv("MIXGF_TEST_FAIL_IN_SAVE", "6")
    with pytest.raises(OSError, match="No space left"):
        run_pretraining(config)
    monkeypatch.delenv("MIXGF_TEST_FAIL_IN_SAVE")
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]
    assert ckpt.checkpoint_problem(out / "checkpoint-3") is None
    result = run_pretraining(config, resume=True)
    assert result.resumed_from.name == "checkpoint-3"
    assert result.global_step == 9
    assert not (out / ckpt.STAGING).exists()


def test_truncated_checkpoint_is_skipped_or_refused(tmp_path, synthetic):
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 6}))
    run_pretraining(config)
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after the save
    assert "truncated" in ckpt.checkpoint_problem(out / "checkpoint-6")
    assert ckpt.latest_complete_checkpoint(out).name == "checkpoint-3"
    with pytest.raises(ArtifactError, match="truncated"):
        run_pretraining(config, resume_from=out / "checkpoint-6")
    (out / "checkpoint-3" / ckpt.COMPLETE).unlink()  # an interrupted save: no marker
    with pytest.raises(ArtifactError, match="no intact checkpoint"):
        run_pretraining(config, resume=True)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_in_a_checkpoint_never_executes(tmp_path, synthetic):
    out = tmp_path / "run"
    config = pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 6}))
    run_pretraining(config)
    marker = tmp_path / "pwned"
    checkpoint = out / "checkpoint-6"
    torch.save({"python": _Evil(str(marker))}, checkpoint / "rng_state.pth")
    ckpt.write_complete_marker(checkpoint, 6)  # the attacker also fixes the manifest
    with pytest.raises(ArtifactError, match="weights_only"):
        run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 8})), resume=True)
    assert not marker.exists()


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path, synthetic):
    out = tmp_path / "run"
    cfg = tiny_config(synthetic, out, train={"max_steps": 100000}, checkpoint={"save_steps": 100000})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixgeneformer", "pretrain", "--config", str(tmp_path / "run.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.csv").exists():
            time.sleep(0.2)
        assert (out / "metrics.csv").exists(), "training did not start"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "--resume" in output
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1 and ckpt.checkpoint_problem(found[0][1]) is None
    assert not (out / "model").exists()  # no final bundle from an interrupted run


def test_training_interrupted_is_a_user_error():
    exc = TrainingInterrupted("stopped", signal.SIGINT)
    assert exc.signum == signal.SIGINT


# ------------------------------------------------------------------------------------------
# Real data: both losses fall on Baron human + mouse
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baron_corpus(tmp_path_factory, baron_data):
    """Baron pancreas human + mouse (symbols) -> medians -> one V2-style corpus with species tokens."""
    from mixgeneformer.medians import compute_medians
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files
    from mixgeneformer.vocab import build_vocabulary

    root = tmp_path_factory.mktemp("baron")
    files = [baron_data / "baron_pancreas_human.h5ad", baron_data / "baron_pancreas_mouse.h5ad"]
    medians = compute_medians(files)
    medians.save(root / "medians.tsv")
    vocab = build_vocabulary("separate", medians=medians)
    vocab.save(root / "vocab.json")
    config = TokenizeConfig(max_len=64, style="v2", add_species_token=True)  # top 61 genes: CPU-fast
    tokenize_files(files, root / "corpus", vocab, medians, config)
    return root


@pytest.mark.realdata
def test_losses_fall_on_real_baron_human_and_mouse(tmp_path, baron_corpus):
    """A tiny model on 3,134 real human + mouse cells (the shipped subset): MLM and SimCSE losses both drop clearly."""
    from mixgeneformer.bundle import load_bundle

    config = pretrain_config_from_dict({
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": [str(baron_corpus / "corpus")], "vocab": str(baron_corpus / "vocab.json"),
                 "medians": str(baron_corpus / "medians.tsv"), "species_balanced": True},
        "model": {"preset": "tiny", "overrides": {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
                                                   "max_position_embeddings": 64}},
        "train": {"max_steps": 120, "warmup_steps": 10, "per_device_batch_size": 16, "learning_rate": 3.0e-3},
        "checkpoint": {"save_steps": 1000},
        "logging": {"logging_steps": 10, "progress_bar": False, "tensorboard": False},
    })
    result = run_pretraining(config)
    rows = read_metrics(tmp_path / "run")
    first, last = rows[:2], rows[-2:]
    mlm0, mlm1 = np.mean([r["mlm_loss"] for r in first]), np.mean([r["mlm_loss"] for r in last])
    con0, con1 = np.mean([r["contrastive_loss"] for r in first]), np.mean([r["contrastive_loss"] for r in last])
    # Chance MLM loss is ln(vocab) ~ 10.7; contrastive starts near ln(2B - 1) ~ 3.4.
    # (Measured on the shipped subset: MLM 10.64 -> 9.68, contrastive 3.70 -> 2.19.)
    assert mlm1 < mlm0 - 0.5, (mlm0, mlm1)
    assert con1 < 0.75 * con0, (con0, con1)
    _, _, medians = load_bundle(result.bundle_dir)
    assert medians is not None  # the medians travel with the model
    # ... and so does the tokenization: new cells are encoded like the corpus (V2, species token).
    from mixgeneformer.bundle import bundle_tokenize_config

    recorded = bundle_tokenize_config(result.bundle_dir)
    assert (recorded.style, recorded.add_species_token, recorded.max_len) == ("v2", True, 64)


def test_cli_pretrain_says_whether_the_model_learned_beyond_frequency(tmp_path, synthetic, capsys):
    from mixgeneformer.cli import main
    from mixgeneformer.diagnostics import final_evaluation

    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(synthetic, out, train={"max_steps": 2})))
    main(["pretrain", "--config", str(path), "data.eval_fraction=0.25", "logging.eval_steps=2", "checkpoint.save_steps=2"])
    printed = capsys.readouterr()
    final = final_evaluation(read_metrics(out))
    gap = final["rank_unigram_loss"] - final["mlm_loss"]
    line = f"masked-gene loss {final['mlm_loss']:.3f} nats, rank-position baseline {final['rank_unigram_loss']:.3f}"
    # a model that has not beaten the baseline is told on stderr, with what to do
    assert line in (printed.out if gap > 0 else printed.err)
    assert (gap > 0) != ("learned nothing beyond gene frequency" in printed.err)


def test_cli_pretrain_applies_overrides_and_reports_config_errors(tmp_path, synthetic, capsys):
    from mixgeneformer.cli import main

    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(synthetic, out, train={"max_steps": 50})))
    main(["pretrain", "--config", str(path), "train.max_steps=2", "checkpoint.save_steps=2"])
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "no held-out cells (data.eval_fraction = 0)" in printed
    assert (out / "model" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 2  # resolved config saved
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(path), "train.warmup=3"])
    assert exit_info.value.code == 2
    assert "warmup" in capsys.readouterr().err
