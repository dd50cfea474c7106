"""SIGTERM at any moment of a pretraining run: saved at once (or, before training, stopped at
once), no further step, then a non-zero exit (RELIABILITY 16)."""

from __future__ import annotations

import os
import signal

import pytest
from test_pretrain import make_vocab, tiny_config, training_data

from mixgeneformer import checkpoints as ckpt
from mixgeneformer import pretrain as pretrain_module
from mixgeneformer.pretrain import TrainingInterrupted, pretrain_config_from_dict, run_pretraining


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(tmp_path_factory.mktemp("signals"), make_vocab(), n_cells=128)


def _config(root, out, **sections):
    base = {"train": {"max_steps": 30}, "checkpoint": {"save_steps": 100}}
    return pretrain_config_from_dict(tiny_config(root, out, **{**base, **sections}))


def _term() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _steps(out) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(out)]


def test_sigterm_while_loading_data_stops_at_once(data, tmp_path, monkeypatch):
    real = pretrain_module.open_corpus

    def open_corpus(*args, **kwargs):
        _term()
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "open_corpus", open_corpus)
    with pytest.raises(TrainingInterrupted, match="outside a training step") as info:
        run_pretraining(_config(data, tmp_path / "run"))
    assert info.value.signum == signal.SIGTERM
    assert _steps(tmp_path / "run") == [] and not (tmp_path / "run" / "model").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_sigterm_during_evaluation_saves_that_step(data, tmp_path, monkeypatch):
    from transformers import Trainer

    real = Trainer.evaluate
    calls = []

    def evaluate(self, *args, **kwargs):
        calls.append(self.state.global_step)
        if len(calls) == 1:
            _term()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    config = _config(data, out, data={"eval_fraction": 0.1}, logging={"eval_steps": 3})
    with pytest.raises(TrainingInterrupted):
        run_pretraining(config)
    assert calls == [3]
    assert _steps(out) == [3] and ckpt.checkpoint_problem(out / "checkpoint-3") is None


def test_sigterm_right_after_a_checkpoint_does_not_run_another_step(data, tmp_path, monkeypatch):
    real = ckpt.rotate_checkpoints

    def rotate(run_dir, keep):
        _term()  # the signal lands as the save of checkpoint-3 finishes
        return real(run_dir, keep)

    monkeypatch.setattr(ckpt, "rotate_checkpoints", rotate)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run_pretraining(_config(data, out, checkpoint={"save_steps": 3}))
    assert _steps(out) == [3]
    rows = pretrain_module.read_metrics(out)
    assert max(int(r["step"]) for r in rows) == 3  # no step after the signal


def test_sigterm_while_fetching_the_next_batch_saves_the_last_step(data, tmp_path, monkeypatch):
    real = pretrain_module.SeededMaskingCollator.__call__
    calls = []

    def collate(self, features):
        calls.append(1)
        if len(calls) == 5:  # the batch of step 5 (before step 5 begins)
            _term()
        return real(self, features)

    monkeypatch.setattr(pretrain_module.SeededMaskingCollator, "__call__", collate)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        run_pretraining(_config(data, out))
    # The loader reads one batch ahead: the signal lands between step 3 or 4 and the next one.
    steps = _steps(out)
    assert len(steps) == 1 and steps[0] in (3, 4) and ckpt.checkpoint_problem(out / f"checkpoint-{steps[0]}") is None
    assert f"step {steps[0]}" in str(info.value)
    assert max(int(r["step"]) for r in pretrain_module.read_metrics(out)) == steps[0]


def test_sigterm_during_any_command_removes_its_temporary_file(tmp_path):
    # `mixgf vocab build` receives SIGTERM halfway through writing its JSON: the command exits 143
    # through Python, so the writer's cleanup removes the temporary file (the signal's default
    # action ended the process on the spot and left `.v.json.tmp-*` behind for good).
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from mixgeneformer import vocab
        from mixgeneformer.cli import main
        from mixgeneformer.fileio import atomic_file

        def save(self, path):
            with atomic_file(path) as handle:
                handle.write('{{"half": ')
                handle.flush()
                os.kill(os.getpid(), signal.SIGTERM)
                handle.write('"written"}}')

        vocab.Vocabulary.save = save
        main(["vocab", "build", "--out", {str(tmp_path / "v.json")!r}, "--species", "mouse"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-2000:]
    assert "terminated" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_before_the_first_step_says_nothing_was_saved(data, tmp_path, monkeypatch):
    """A signal as the first batch is fetched stops at step 0: the message said 'checkpoint saved'."""
    real = pretrain_module.SeededMaskingCollator.__call__
    calls = []

    def collate(self, features):
        calls.append(1)
        if len(calls) == 1:  # the batch of step 1
            _term()
        return real(self, features)

    monkeypatch.setattr(pretrain_module.SeededMaskingCollator, "__call__", collate)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=r"at step 0; no step had run, so no checkpoint was saved") as info:
        run_pretraining(_config(data, out))
    assert "checkpoint saved" not in str(info.value) and _steps(out) == []
