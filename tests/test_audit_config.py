"""Audit of typed-config loading, config saving, atomic writes, output locks and the CLI wrapper
(RELIABILITY 18, 23-26, 28): each user error is one clear ConfigError / ArtifactError (CLI: exit 2),
a config file or override never silently drops or bends a value, writes leave no litter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tokenize_helpers import cli_exit_code

from mixgeneformer.classify.config import ClassifyConfig
from mixgeneformer.config import from_dict, load_config, save_config
from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.fileio import (
    atomic_directory,
    output_lock,
    read_json,
    write_json,
    write_output_marker,
)
from mixgeneformer.pretrain_config import PretrainConfig


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ config loading
@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n", "- a\n- b\n", "just words\n"])
def test_a_config_file_that_is_no_mapping_is_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PretrainConfig, _config_file(tmp_path, text))


def test_an_empty_or_comment_only_config_file(tmp_path):
    with pytest.raises(ArtifactError, match="is empty"):
        load_config(PretrainConfig, _config_file(tmp_path, ""))
    assert load_config(PretrainConfig, _config_file(tmp_path, "# nothing set yet\n")) == PretrainConfig()


@pytest.mark.parametrize("data", [[1, 2], [("output_dir", "x")], "ab"])
def test_from_dict_refuses_what_is_not_a_mapping(data):
    with pytest.raises(ConfigError, match="must be a mapping"):
        from_dict(PretrainConfig, data)


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_position(tmp_path):
    path = _config_file(tmp_path, "train:\n  learning_rate: [1e-3,\n  seed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "line " in message
    assert "<unicode string>" not in message


def test_a_number_too_large_for_a_float_is_a_config_error():
    with pytest.raises(ConfigError, match="train.learning_rate: expected a finite number"):
        load_config(PretrainConfig, None, ["train.learning_rate=1" + "0" * 400])


@pytest.mark.parametrize("override", ["output_dir=", "data.vocab=''", "data.corpus=['']"])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(override):
    with pytest.raises(ConfigError, match="empty"):
        load_config(PretrainConfig, None, [override])


@pytest.mark.parametrize(
    ("text", "override", "where"),
    [("train: 5\n", "train.seed=3", "train"), ("objective: {temperature: 3}\n", "objective.temperature.x=1", "objective.temperature")],
)
def test_a_dotted_override_never_hides_a_wrong_value_in_the_file(tmp_path, text, override, where):
    with pytest.raises(ConfigError, match=rf"{where}\b"):
        load_config(PretrainConfig, _config_file(tmp_path, text), [override])


def test_override_values_null_bool_numbers_lists_and_mappings():
    config = load_config(PretrainConfig, None, [
        "logging.eval_steps=null", "train.torch_compile=true", "train.learning_rate=1e-3",
        "data.corpus=[a, b]", "model.overrides={num_hidden_layers: 2}", "objective.temperature=5e-2",
    ])
    assert config.logging.eval_steps is None and config.train.torch_compile is True
    assert config.train.learning_rate == 1e-3 and config.data.corpus == [Path("a"), Path("b")]
    assert config.model.overrides == {"num_hidden_layers": 2} and config.objective == {"temperature": 0.05}
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['learnin_rate'\] in config.train"):
        load_config(PretrainConfig, None, ["train.learnin_rate=1"])


def test_save_config_round_trips_exactly(tmp_path):
    config = load_config(ClassifyConfig, None, [
        "labels.key='yes'", "synonyms={'T cell': 'T-cell', 'on': 'null', '1': '~'}", "finetune.learning_rate=3.0e-20",
        "baselines.target_sum=1e16",
    ])
    back = load_config(ClassifyConfig, save_config(config, tmp_path))
    assert back == config and back.labels.key == "yes" and back.synonyms["on"] == "null"


# ------------------------------------------------------------------------------ files and locks
def test_overwriting_a_symlinked_output_folder_leaves_no_litter_and_keeps_the_linked_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    write_output_marker(real)
    (real / "data.txt").write_text("keep")
    (tmp_path / "link").symlink_to(real)
    with atomic_directory(tmp_path / "link", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert (real / "data.txt").read_text() == "keep" and (tmp_path / "link" / "new.txt").read_text() == "new"


def test_writing_onto_a_folder_or_under_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="folder"):
        write_json(tmp_path / "folder", {"a": 1})
    with pytest.raises(ArtifactError, match="not a folder"):
        write_json(tmp_path / "file" / "x.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_a_stale_lock_of_a_killed_process_does_not_block(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from mixgeneformer.fileio import output_lock
        with output_lock({str(tmp_path / 'out')!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ArtifactError, match=f"pid {child.pid}"), output_lock(tmp_path / "out"):
            pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert (tmp_path / ".out.lock").exists()  # left behind by kill -9 ...
    with output_lock(tmp_path / "out"):  # ... and no obstacle
        pass
    assert not (tmp_path / ".out.lock").exists()


# ------------------------------------------------------------------------------ the CLI wrapper
def test_keyboard_interrupt_in_a_command_exits_130(monkeypatch, capsys):
    import mixgeneformer.vocab as vocab

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(vocab.Vocabulary, "load", staticmethod(interrupted))
    assert cli_exit_code(["vocab", "info", "vocab.json"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_unreadable_input_is_not_called_unwritable(tmp_path, monkeypatch):
    """A vocabulary named in a config file is read without typer's own check: without read permission
    the error says so (it used to reach the CLI as "cannot write ...: permission denied")."""
    path = tmp_path / "vocab.json"
    path.write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path and mode & os.R_OK else real_access(p, mode, **kw))
    with pytest.raises(ArtifactError, match="vocabulary .* is not readable"):
        read_json(path, "vocabulary")


def test_a_programming_error_is_a_real_crash_and_a_user_error_is_one_line(monkeypatch, capsys):
    import mixgeneformer.vocab as vocab

    def broken(path):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(vocab.Vocabulary, "load", staticmethod(broken))
    with pytest.raises(ZeroDivisionError):
        cli_exit_code(["vocab", "info", "vocab.json"])
    monkeypatch.setattr(vocab.Vocabulary, "load", staticmethod(lambda path: load_config(PretrainConfig, None, ["x=1"])))
    assert cli_exit_code(["vocab", "info", "vocab.json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: unknown option(s) ['x']")


def test_help_of_every_command_exits_0(capsys):
    import typer.main

    from mixgeneformer.cli import app

    def commands(group, path):
        yield path
        for name, sub in getattr(group, "commands", {}).items():
            yield from commands(sub, [*path, name])

    paths = list(commands(typer.main.get_command(app), []))
    assert len(paths) > 10
    for path in paths:
        assert cli_exit_code([*path, "--help"]) == 0, path
        assert "Usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text",
    [
        "train:\n  seed: 1\n  learning_rate: 0.001\n  seed: 2\n",  # YAML: PyYAML kept seed 2 without a word
        '{"train": {"seed": 1,\n\t"seed": 2}}',  # tab-indented JSON (read by json): json kept the last value
    ],
)
def test_an_option_given_twice_in_a_config_file_is_refused(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"run\.yaml: option 'seed' is given twice.*Keep one of them"):
        load_config(PretrainConfig, path)


def test_yaml_merge_keys_may_still_override_merged_values(tmp_path):
    from mixgeneformer.config import _parse_config_text

    text = "base: &b {seed: 1, key: cell_type1}\nlabels:\n  <<: *b\n  seed: 4\n"
    assert _parse_config_text(text, tmp_path / "c.yaml")["labels"] == {"seed": 4, "key": "cell_type1"}


def test_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    """A JSON vocabulary, a YAML config or a median table saved by an editor that writes a UTF-8 BOM
    was 'not valid JSON; it may be truncated' (or a header mismatch)."""
    from mixgeneformer.fileio import read_json
    from mixgeneformer.medians import GeneMedians

    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}')
    assert read_json(tmp_path / "a.json") == {"a": 1}
    (tmp_path / "c.yaml").write_bytes(b"\xef\xbb\xbf" + b"labels: {seed: 4}\n")
    assert load_config(ClassifyConfig, tmp_path / "c.yaml").labels.seed == 4
    GeneMedians({"ENSG00000000003": 2.5}).save(tmp_path / "m.tsv")
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "m.tsv").read_bytes())
    assert GeneMedians.load(tmp_path / "bom.tsv").hash == GeneMedians.load(tmp_path / "m.tsv").hash


def test_an_output_another_writer_finished_before_the_lock_is_not_replaced(tmp_path, monkeypatch):
    """atomic_directory checked the target before taking the lock only: an output another process
    finished in between was replaced without --overwrite."""
    import contextlib

    from mixgeneformer import fileio

    target = tmp_path / "out"
    real_lock = fileio.output_lock

    @contextlib.contextmanager
    def lock_after_another_writer(path):
        target.mkdir()  # the other writer's finished output (ours too: it carries the marker)
        write_output_marker(target)
        (target / "theirs.txt").write_text("kept")
        with real_lock(path):
            yield

    monkeypatch.setattr(fileio, "output_lock", lock_after_another_writer)
    with pytest.raises(ArtifactError, match="already exists"):
        with fileio.atomic_directory(target) as tmp:
            (tmp / "ours.txt").write_text("new")
    assert (target / "theirs.txt").read_text() == "kept" and not (target / "ours.txt").exists()
