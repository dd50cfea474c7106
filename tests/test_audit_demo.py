"""Demo, pretraining and merge-command mistakes an audit found: data deleted by --overwrite, options
ignored or checked only after pretraining, tracebacks for a file where a folder belongs, an empty
corpus, a merge option reported under another name."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from mixgeneformer.checkpoints import plan_run_dir
from mixgeneformer.cli import main
from mixgeneformer.corpus import load_corpus
from mixgeneformer.demo import DemoConfig, demo_data_dir
from mixgeneformer.errors import ArtifactError, ConfigError


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code)


def test_demo_overwrite_refuses_an_out_folder_holding_its_data(tmp_path, capsys):
    out = tmp_path / "run"
    data = out / "mydata"
    data.mkdir(parents=True)
    for path in demo_data_dir().glob("baron_pancreas_*.h5ad"):
        shutil.copy(path, data / path.name)
    assert _exit_code(["demo", "--quick", "--out", str(out), "--set", f"data_dir={data}", "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["baron_pancreas_human.h5ad", "baron_pancreas_mouse.h5ad"]


def test_demo_out_that_is_a_file_or_under_one(tmp_path, capsys):
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    for out in (note, note / "sub"):
        assert _exit_code(["demo", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "is a file" in err and "Traceback" not in err
    assert note.read_text() == "mine"


def test_demo_set_workers_and_device_are_kept_unless_the_flags_are_given(monkeypatch, tmp_path):
    import mixgeneformer.demo as demo_module

    seen = []
    monkeypatch.setattr(demo_module, "run_demo", lambda out, config, overwrite=False: seen.append(config) or out)
    main(["demo", "--quick", "--out", str(tmp_path / "a"), "--set", "workers=1", "--set", "device=cpu"])
    main(["demo", "--quick", "--out", str(tmp_path / "b"), "--set", "workers=1", "--workers", "3"])
    assert (seen[0].workers, seen[0].device) == (1, "cpu")
    assert (seen[1].workers, seen[1].device) == (3, None)


def test_demo_options_are_checked_before_pretraining(tmp_path, capsys):
    with pytest.raises(ConfigError, match="tinny"):
        DemoConfig(preset="tinny")
    with pytest.raises(ConfigError, match="layer=9 is out of range"):
        DemoConfig(embed_layer=9)
    DemoConfig(embed_layer=5, model_overrides={"num_hidden_layers": 6})  # layers from the overrides
    out = tmp_path / "run"
    assert _exit_code(["demo", "--quick", "--out", str(out), "--set", "perturb_start=betta"]) == 2
    err = capsys.readouterr().err
    assert "['betta']" in err and "'beta'" in err
    assert not (out / "pretrain").exists()  # refused in the data step


def test_pretrain_output_dir_file_and_resume_with_overwrite(tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    with pytest.raises(ArtifactError, match="is a file"):
        plan_run_dir(note, resume=False, overwrite=False, resume_from=None)
    with pytest.raises(ConfigError, match="pass one of them"):
        plan_run_dir(tmp_path / "run", resume=True, overwrite=True, resume_from=None)
    assert note.read_text() == "mine"


def test_an_empty_corpus_is_one_message(tmp_path):
    corpus = datasets.Dataset.from_dict({"input_ids": [[7, 8]], "length": [2]}).select([])
    corpus.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ArtifactError, match="holds no cells"):
        load_corpus(Path(tmp_path / "empty"))


def test_an_ortholog_vocabulary_of_one_species_is_refused():
    from mixgeneformer.vocab import build_vocabulary

    with pytest.raises(ConfigError, match="use mode='separate' for one"):
        build_vocabulary("ortholog", species=("human",))


def test_a_demo_folder_of_other_options_names_what_changed(tmp_path, capsys):
    from mixgeneformer.demo.context import _prepare_out_dir

    _prepare_out_dir(tmp_path / "run", DemoConfig.quick_config(), overwrite=False)
    with pytest.raises(ConfigError, match=r"pretrain_steps: 40 -> 41"):
        _prepare_out_dir(tmp_path / "run", DemoConfig.quick_config(pretrain_steps=41), overwrite=False)


def test_perturb_merge_names_its_stats_option(tmp_path, capsys):
    assert _exit_code(["perturb-merge", str(tmp_path), "--model", str(tmp_path), "--stats", "foo"]) == 2
    assert "--stats 'foo'" in capsys.readouterr().err
    assert _exit_code(["perturb-merge", str(tmp_path), "--model", str(tmp_path), "--stats", "vs_null"]) == 2
    assert "go together" in capsys.readouterr().err
