"""Pretraining settings that must not be silently ignored (outside audit, part A).

Resume with a changed configuration is refused (or, for the settings meant to change, said in one
line and recorded); ``train.max_steps=0`` is refused instead of saving an untrained model.
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from test_pretrain import TINY, synthetic, tiny_config  # noqa: F401  (synthetic is a fixture)

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.errors import ConfigError, VocabularyMismatchError
from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining


def _recorded(out) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


def test_resume_with_changed_settings_is_refused_and_allowed_changes_are_said(tmp_path, synthetic, caplog, capsys):  # noqa: F811
    from mixgeneformer.cli import main

    out = tmp_path / "run"
    run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 6})))
    recorded = (out / "config.yaml").read_text()
    checkpoints = [p.name for _, p in ckpt.list_checkpoints(out)]

    lr = tiny_config(synthetic, out, train={"max_steps": 9, "learning_rate": 0.5})
    with pytest.raises(ConfigError, match=r"train\.learning_rate: 0\.001 -> 0\.5.*--overwrite.*train\.max_steps"):
        run_pretraining(pretrain_config_from_dict(lr), resume=True)
    wider = tiny_config(synthetic, out, model={"preset": "tiny", "overrides": {**TINY, "hidden_size": 64, "intermediate_size": 128}})
    with pytest.raises(ConfigError, match=r"model\.overrides\.hidden_size: 32 -> 64"):  # not a raw load_state_dict error
        run_pretraining(pretrain_config_from_dict(wider), resume=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config(synthetic, out, train={"max_steps": 6})))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--resume", "train.learning_rate=0.5"])
    assert exit_info.value.code == 2 and "train.learning_rate" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == recorded  # nothing rewritten, nothing trained
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == checkpoints

    longer = tiny_config(synthetic, out, train={"max_steps": 9}, logging={"logging_steps": 3})
    with caplog.at_level(logging.WARNING, logger="mixgeneformer.pretrain"):
        result = run_pretraining(pretrain_config_from_dict(longer), resume=True)
    assert result.global_step == 9
    said = [r.getMessage() for r in caplog.records if "changed setting" in r.getMessage()]
    assert any("train.max_steps: 6 -> 9" in line for line in said), said
    assert any("logging.logging_steps: 1 -> 3" in line for line in said), said
    assert _recorded(out)["train"]["max_steps"] == 9  # the recorded configuration is the one in effect
    assert yaml.safe_load((result.bundle_dir / "pretrain_config.yaml").read_text())["train"]["max_steps"] == 9


def test_resume_with_another_vocabulary_is_refused(tmp_path, synthetic):  # noqa: F811
    from test_pretrain import make_corpus, make_vocab

    out = tmp_path / "run"
    run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 3})))
    other = make_vocab(61)
    other.save(tmp_path / "vocab.json")
    make_corpus(tmp_path / "corpus", other)
    changed = tiny_config(synthetic, out, data={"corpus": [str(tmp_path / "corpus")], "vocab": str(tmp_path / "vocab.json")})
    with pytest.raises(VocabularyMismatchError, match="not the vocabulary checkpoint-3 was trained with"):
        run_pretraining(pretrain_config_from_dict(changed), resume=True)


@pytest.mark.parametrize("steps", [0, -2])
def test_max_steps_that_train_nothing_are_refused(tmp_path, synthetic, steps, capsys):  # noqa: F811
    from mixgeneformer.cli import main

    with pytest.raises(ConfigError, match=rf"train\.max_steps={steps} would train no step.*-1 to train for train\.epochs"):
        pretrain_config_from_dict(tiny_config(synthetic, tmp_path / "run", train={"max_steps": steps}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_config(synthetic, tmp_path / "run")))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(tmp_path / "run.yaml"), f"train.max_steps={steps}"])
    assert exit_info.value.code == 2 and "train.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_at_or_past_max_steps_trains_nothing(tmp_path, synthetic, caplog):  # noqa: F811
    from safetensors.torch import load_file

    out = tmp_path / "run"
    first = run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 4})))
    weights = load_file(first.bundle_dir / "model.safetensors")
    for steps in (4, 2):  # the same run again; a lowered max_steps
        with caplog.at_level(logging.WARNING, logger="mixgeneformer.pretrain"):
            again = run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": steps})), resume=True)
        assert again.global_step == 4 and "nothing to train" in caplog.text
        assert [p.name for _, p in ckpt.list_checkpoints(out)][-1] == "checkpoint-4"
        resaved = load_file(again.bundle_dir / "model.safetensors")
        assert all(torch.equal(resaved[k], weights[k]) for k in weights)


def test_resume_on_another_corpus_at_the_same_path_is_refused(tmp_path, synthetic):  # noqa: F811
    import shutil

    from test_pretrain import make_corpus, make_vocab

    out = tmp_path / "run"
    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic / "corpus", corpus)
    config = tiny_config(synthetic, out, train={"max_steps": 3}, data={"corpus": [str(corpus)], "vocab": str(synthetic / "vocab.json")})
    run_pretraining(pretrain_config_from_dict(config))
    shutil.rmtree(corpus)
    make_corpus(corpus, make_vocab(), n_cells=100, seed=5)  # re-tokenized: other cells, same path
    config["train"]["max_steps"] = 6
    with pytest.raises(ConfigError, match="the corpus is not the one checkpoint-3 was trained on"):
        run_pretraining(pretrain_config_from_dict(config), resume=True)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, synthetic):  # noqa: F811
    from test_audit_files import lock_holder

    from mixgeneformer.errors import ArtifactError

    out = tmp_path / "run"
    with lock_holder(out) as pid, pytest.raises(ArtifactError, match=f"being written by another process \\(pid {pid}\\)"):
        run_pretraining(pretrain_config_from_dict(tiny_config(synthetic, out, train={"max_steps": 2})), resume=True)
    assert not out.exists()
