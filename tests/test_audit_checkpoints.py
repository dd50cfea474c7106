"""Checkpoints, resume and model folders (audit): what a resumed or restarted run may write over,
how much it trains, and what a COMPLETE marker promises.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_pretrain import params_of, synthetic, tiny_config  # noqa: F401  (synthetic is a fixture)

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining


def _run(synthetic, out, resume_from=None, overwrite=False, **sections):  # noqa: F811
    config = pretrain_config_from_dict(tiny_config(synthetic, out, **sections))
    return run_pretraining(config, resume_from=resume_from, overwrite=overwrite)


def test_resume_of_a_run_trained_for_epochs_trains_to_the_end(tmp_path, synthetic, monkeypatch):  # noqa: F811
    # train.max_steps=-1 (the default: train for train.epochs): a resume trained nothing and saved the
    # checkpoint's weights as the final model ("train.max_steps is -1: nothing to train").
    epochs = {"train": {"max_steps": -1, "epochs": 0.25}}  # 256 cells, batches of 8: 8 steps
    straight = _run(synthetic, tmp_path / "a", **epochs)
    assert straight.global_step == 8
    out = tmp_path / "b"
    monkeypatch.setenv("MIXGF_TEST_FAIL_AT_STEP", "0:5")
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(synthetic, out, **epochs)
    monkeypatch.delenv("MIXGF_TEST_FAIL_AT_STEP")
    resumed = run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, **epochs)), resume=True)
    assert resumed.resumed_from.name == "checkpoint-3" and resumed.global_step == 8
    a, b = params_of(straight.bundle_dir), params_of(resumed.bundle_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r["step"]) for r in read_metrics(out)] == list(range(1, 9))
    # resuming the finished run trains nothing (the Trainer would take a 9th step past a fractional epoch)
    again = run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, **epochs)), resume=True)
    assert again.global_step == 8 and [int(r["step"]) for r in read_metrics(out)] == list(range(1, 9))
    assert all(torch.equal(a[k], w) for k, w in params_of(again.bundle_dir).items())


def test_resume_from_another_runs_checkpoint_never_writes_into_an_occupied_folder(tmp_path, synthetic):  # noqa: F811
    source = tmp_path / "source"
    _run(synthetic, source, train={"max_steps": 3})
    checkpoint = source / "checkpoint-3"
    user = tmp_path / "user"  # the user's own folder: not a mixgeneformer output
    user.mkdir()
    (user / "metrics.csv").write_text("step,loss\n100,1.5\n")
    with pytest.raises(ArtifactError, match=r"already exists.*--overwrite"):
        _run(synthetic, user, resume_from=checkpoint, train={"max_steps": 6})
    assert sorted(p.name for p in user.iterdir()) == ["metrics.csv"]
    assert (user / "metrics.csv").read_text() == "step,loss\n100,1.5\n"
    with pytest.raises(ArtifactError, match="only replaces outputs of mixgeneformer"):
        _run(synthetic, user, resume_from=checkpoint, train={"max_steps": 6}, overwrite=True)

    other = tmp_path / "other"  # another run, further along: its history and checkpoints stay
    _run(synthetic, other, train={"max_steps": 9})
    rows = (other / "metrics.csv").read_text()
    with pytest.raises(ArtifactError, match=r"already exists.*--overwrite"):
        _run(synthetic, other, resume_from=checkpoint, train={"max_steps": 6})
    assert (other / "metrics.csv").read_text() == rows
    assert [p.name for _, p in ckpt.list_checkpoints(other)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    replaced = _run(synthetic, other, resume_from=checkpoint, train={"max_steps": 6}, overwrite=True)
    assert replaced.global_step == 6 and [p.name for _, p in ckpt.list_checkpoints(other)] == ["checkpoint-6"]
    assert [int(r["step"]) for r in read_metrics(other)] == [4, 5, 6]

    fresh = _run(synthetic, tmp_path / "new", resume_from=checkpoint, train={"max_steps": 6})  # a new folder: fine
    assert fresh.global_step == 6 and fresh.resumed_from == checkpoint


def test_resume_from_an_older_checkpoint_of_the_run_is_refused_while_newer_ones_exist(tmp_path, synthetic):  # noqa: F811
    # The newer checkpoints belong to the run continued after it: a later --resume took them over the
    # new run's, and checkpoint.keep rotated the new run's checkpoints away in their favour.
    out = tmp_path / "run"
    _run(synthetic, out, train={"max_steps": 9})
    with pytest.raises(ArtifactError, match=r"newer checkpoints \(checkpoint-6, checkpoint-9\).*[Dd]elete"):
        _run(synthetic, out, resume_from=out / "checkpoint-3", train={"max_steps": 9}, checkpoint={"keep": 1})
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    with pytest.raises(ConfigError, match="--overwrite"):  # it would set aside the folder holding the checkpoint
        _run(synthetic, out, resume_from=out / "checkpoint-3", train={"max_steps": 9}, overwrite=True)
    for step in (6, 9):  # the user deletes the abandoned continuation
        shutil.rmtree(out / f"checkpoint-{step}")
    result = _run(synthetic, out, resume_from=out / "checkpoint-3", train={"max_steps": 9}, checkpoint={"keep": 1})
    assert result.global_step == 9 and [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-9"]


def test_complete_marker_is_written_after_every_file_is_on_disk(tmp_path, monkeypatch):
    # A power cut after the marker must not find a checkpoint whose marker survived but whose files did not.
    checkpoint = tmp_path / "checkpoint-5"
    (checkpoint / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "sub/rng_state.pth"):
        (checkpoint / name).write_bytes(b"x" * 64)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckpt.write_complete_marker(checkpoint, 5)
    marker_sync = next(i for i, name in enumerate(synced) if name.startswith(f".{ckpt.COMPLETE}"))
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth"} <= set(synced[:marker_sync])


def test_resume_from_a_run_folder_or_a_model_bundle_names_the_checkpoint_to_pass(tmp_path):
    run = tmp_path / "run"
    for step in (3, 6):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
        ckpt.write_complete_marker(run / f"checkpoint-{step}", step)
    (run / "model").mkdir()
    (run / "model" / "mixgf.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"run folder.*checkpoint-6.*--resume") as info:
        ckpt.resolve_checkpoint(run)
    assert "interrupted" not in str(info.value)
    with pytest.raises(ArtifactError, match=r"model bundle.*checkpoint-") as info:
        ckpt.resolve_checkpoint(run / "model")
    assert "interrupted" not in str(info.value)


def test_a_full_disk_while_sealing_a_checkpoint_is_one_clear_error(tmp_path, synthetic, monkeypatch, capsys):  # noqa: F811
    # The COMPLETE marker is the last write of a save: a disk the weights just filled fails there too.
    import errno

    import yaml

    from mixgeneformer.cli import main

    out = tmp_path / "run"
    config = tiny_config(synthetic, out, train={"max_steps": 6})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    real = ckpt.write_complete_marker

    def full_at_step_6(checkpoint, step):
        if step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", str(checkpoint / f".{ckpt.COMPLETE}.tmp"))
        return real(checkpoint, step)

    monkeypatch.setattr(ckpt, "write_complete_marker", full_at_step_6)
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(tmp_path / "run.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "checkpoint-6" in err and "Traceback" not in err
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-3"]
    assert ckpt.checkpoint_problem(out / "checkpoint-3") is None and not (out / ckpt.STAGING).exists()


@pytest.mark.parametrize("at", [5, 32])  # 256 cells in batches of 8: step 32 ends the first epoch
def test_a_stop_signal_at_any_step_resumes_like_a_straight_run(tmp_path, synthetic, monkeypatch, at):  # noqa: F811
    # At the first step of an epoch the epoch's data loader has already drawn its seed from the torch RNG:
    # a checkpoint saved there restored another RNG state than a straight run had (dropout differed).
    from transformers import TrainerCallback

    import mixgeneformer.pretrain as pretrain_module
    from mixgeneformer.pretrain import TrainingInterrupted

    sections = {"train": {"max_steps": 36}, "checkpoint": {"save_steps": 100}}
    straight = _run(synthetic, tmp_path / "a", **sections)
    make_callbacks = pretrain_module._make_callbacks

    class SignalAt(TrainerCallback):  # SIGTERM arriving while the batch of step `at` + 1 is fetched
        def __init__(self, signals):
            self.signals = signals

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at:
                self.signals.received = 15

    def with_signal(run_dir, is_main, tensorboard, signals):
        callbacks, stopper = make_callbacks(run_dir, is_main, tensorboard, signals)
        return [SignalAt(signals), *callbacks], stopper

    out = tmp_path / "b"
    monkeypatch.setattr(pretrain_module, "_make_callbacks", with_signal)
    with pytest.raises(TrainingInterrupted):
        _run(synthetic, out, **sections)
    monkeypatch.setattr(pretrain_module, "_make_callbacks", make_callbacks)
    resumed = run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, **sections)), resume=True)
    assert resumed.global_step == 36
    a, b = params_of(straight.bundle_dir), params_of(resumed.bundle_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r["step"]) for r in read_metrics(out)] == list(range(1, 37))


def test_gathered_weights_that_do_not_fit_the_model_are_refused():
    """Under FSDP / DeepSpeed the final bundle is built from the gathered state dict with strict=False:
    keys under another name left those tensors random and the bundle was written without a word."""
    from test_pretrain import TINY, make_vocab

    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.trainer import model_from_gathered

    config = make_config("tiny", make_vocab(), **TINY)
    torch.manual_seed(3)
    trained = MixGeneformerForPretraining(config).state_dict()
    decoder = [k for k in trained if k.endswith("decoder.weight")]
    assert decoder  # tied to the input embeddings
    full = model_from_gathered(config, {k: v for k, v in trained.items() if k not in decoder})  # tied: may be absent
    assert all(torch.equal(full.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(ArtifactError, match=r"tensors missing .*unexpected .*not written"):
        model_from_gathered(config, {f"module.{k}": v for k, v in trained.items()})
    encoder = {k: v for k, v in trained.items() if ".encoder." not in k}
    with pytest.raises(ArtifactError, match="tensors missing"):
        model_from_gathered(config, encoder)


def test_a_crash_between_the_renames_of_a_replaced_checkpoint_restores_the_old_copy(tmp_path):
    """publish_checkpoint replaces a checkpoint of the same step by moving it aside, then renaming the
    new one in; a crash between the two left only the moved-aside copy, which clean_stale deleted."""
    run = tmp_path / "run"
    for name in ("checkpoint-4", ".checkpoint-8.old-1a2b3c4d", ".checkpoint-9.old-5e6f7a8b"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"weights")
    ckpt.write_complete_marker(run / ".checkpoint-8.old-1a2b3c4d", 8)  # complete: the step's only copy
    ckpt.clean_stale(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "checkpoint-8"]  # the incomplete one is gone
    assert ckpt.checkpoint_problem(run / "checkpoint-8") is None and ckpt.checkpoint_step(run / "checkpoint-8") == 8
    (run / ".checkpoint-8.old-99999999").mkdir()  # a moved-aside copy whose step was published: removed
    ckpt.write_complete_marker(run / ".checkpoint-8.old-99999999", 8)
    ckpt.clean_stale(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "checkpoint-8"]
