"""Strict typed configurations (RELIABILITY 18) and atomic file helpers (RELIABILITY 13-14)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from mixgeneformer.config import apply_overrides, from_dict, load_config, save_config
from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.fileio import atomic_directory, atomic_file, check_readable_file


@dataclass
class Inner:
    rate: float = 1e-3
    steps: int = 10


@dataclass
class Outer:
    name: str = "run"
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_unknown_keys_and_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['lr'\]"):
        from_dict(Outer, {"lr": 1})
    with pytest.raises(ConfigError, match="inner.steps: expected an integer"):
        from_dict(Outer, {"inner": {"steps": "ten"}})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(Outer, {"mode": "c"})
    with pytest.raises(ConfigError, match=r"\[.rat.\] in config\.inner"):
        from_dict(Outer, {"inner": {"rat": 1}})


def test_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "inner": {"rate": 0.5}}))
    cfg = load_config(Outer, path, ["inner.steps=7", "tags=[a, b]", "limit=3"])
    assert cfg == Outer(name="x", inner=Inner(rate=0.5, steps=7), tags=["a", "b"], limit=3)
    saved = save_config(cfg, tmp_path / "out")
    assert load_config(Outer, saved) == cfg
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "corpus"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("disk full")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "part").write_text("whole")
    assert (target / "part").read_text() == "whole"
    with pytest.raises(ArtifactError, match="overwrite"):
        with atomic_directory(target):
            pass


def test_atomic_file_keeps_previous_version_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_file(target) as handle:
            handle.write("new")
            raise OSError("no space left on device")
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_missing_empty_and_lfs_files_named(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        check_readable_file(tmp_path / "nope.bin", "weights")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match="empty"):
        check_readable_file(tmp_path / "empty.bin", "weights")
    (tmp_path / "lfs.bin").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(ArtifactError, match="lfs.bin is a Git-LFS pointer"):
        check_readable_file(tmp_path / "lfs.bin", "weights")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    cfg = load_config(Outer, None, ["inner.rate=5e-4"])
    assert cfg.inner.rate == 5e-4
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(Outer, None, ["inner.rate=fast"])


def test_a_dotted_override_sets_one_key_of_a_mapping_and_keeps_its_other_defaults(tmp_path):
    from mixgeneformer.demo import DemoConfig

    default = DemoConfig().finetune_overrides
    assert len(default) > 1
    one = load_config(DemoConfig, None, ["finetune_overrides.epochs=5"])
    assert one.finetune_overrides == {**default, "epochs": 5}
    assert load_config(DemoConfig, None, ["model_overrides.attention_probs_dropout_prob=0.1"]).model_overrides == {
        **DemoConfig().model_overrides, "attention_probs_dropout_prob": 0.1}
    # a whole mapping, on the command line or in a file, replaces the default
    assert load_config(DemoConfig, None, ['model_overrides={"max_position_embeddings": 512}']).model_overrides == {
        "max_position_embeddings": 512}
    path = tmp_path / "demo.yaml"
    path.write_text("model_overrides:\n  max_position_embeddings: 256\n")
    assert load_config(DemoConfig, path, ["max_len=64"]).model_overrides == {"max_position_embeddings": 256}
    assert load_config(DemoConfig, path, ["model_overrides.num_hidden_layers=1"]).model_overrides == {
        "max_position_embeddings": 256, "num_hidden_layers": 1}
