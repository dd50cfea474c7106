"""Whether a resumed pretraining run continues the run its checkpoint belongs to.

A checkpoint's weights, optimizer state, learning-rate schedule and data order were made with one
configuration, one set of training cells and one number of processes. :func:`check_resume_config`
compares the settings (only :data:`RESUME_MAY_CHANGE` may differ, e.g. a larger ``train.max_steps``)
and :func:`check_resume_corpus` the training cells and the number of processes; every other
difference is one :class:`~mixgeneformer.errors.ConfigError` before any step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from .config import changed_settings, from_dict, to_dict
from .errors import ArtifactError, ConfigError, VocabularyMismatchError
from .fileio import read_json, read_text
from .pretrain_config import PretrainConfig
from .vocab import Vocabulary

logger = logging.getLogger(__name__)

#: Settings a resumed run may change (prefixes end in "."): how long to train, where and how often
#: to write. Every other setting shapes the model, the optimizer, the learning-rate schedule or the
#: data order that the checkpoint was made with.
RESUME_MAY_CHANGE = (
    "output_dir", "train.max_steps", "train.epochs", "checkpoint.", "logging.", "data.workers", "distributed.timeout_s",
)
RESUME_KEEPS = ("logging.rank_bucket", "logging.baseline_cells")  # the held-out baselines: one for every row of metrics.csv


def check_resume_config(config: PretrainConfig, checkpoint: Path, vocab: Vocabulary) -> list[str]:
    """Compare a resumed run's settings with those its checkpoint was saved with.

    Returns the changes that are allowed on resume (:data:`RESUME_MAY_CHANGE`, e.g. a larger
    ``train.max_steps``), one line each; every other difference is a :class:`ConfigError`, since
    the checkpoint's weights, optimizer and schedule were made with the old values and the run
    folder's ``config.yaml`` must record the settings really in effect.
    """
    saved_vocab = checkpoint / "vocab.json"
    if saved_vocab.is_file() and Vocabulary.load(saved_vocab).hash != vocab.hash:
        raise VocabularyMismatchError(
            f"data.vocab ({config.data.vocab}) is not the vocabulary {checkpoint.name} was trained with "
            f"({saved_vocab}); resume with that vocabulary, or start a new run."
        )
    saved_config = checkpoint / "config.yaml"
    if not saved_config.is_file():
        logger.warning("%s records no config.yaml; the resumed settings cannot be compared with it", checkpoint)
        return []
    try:  # read_text: a binary (corrupt) file is an ArtifactError too, not a bare UnicodeDecodeError
        text = read_text(saved_config, "the checkpoint's config", "a YAML file")[1]
        previous = to_dict(from_dict(PretrainConfig, yaml.safe_load(text) or {}, str(saved_config)))
    except (ConfigError, ArtifactError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{saved_config} cannot be read as a pretraining config ({exc}); resume from another checkpoint.") from exc
    changed = [change for change in changed_settings(previous, to_dict(config)) if not _same_files(*change)]
    lines = [f"{key}: {old!r} -> {new!r}" for key, old, new in changed]
    allowed = [key.startswith(RESUME_MAY_CHANGE) and not key.startswith(RESUME_KEEPS) for key, _, _ in changed]
    refused = [line for line, ok in zip(lines, allowed, strict=True) if not ok]
    if refused:
        raise ConfigError(
            f"cannot resume from {checkpoint} with changed settings ({'; '.join(refused)}): the checkpoint's weights, "
            f"optimizer and learning-rate schedule were made with the values in {saved_config}. Restore them, or start "
            "a new run (another output_dir, or --overwrite). On resume only these may change: "
            f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUME_MAY_CHANGE)} "
            f"(but not {' or '.join(RESUME_KEEPS)}: the held-out baselines of the earlier rows of metrics.csv)."
        )
    return [line for line, ok in zip(lines, allowed, strict=True) if ok]


def check_resume_corpus(checkpoint: Path, corpus: dict[str, Any], world_size: int) -> None:
    """The training cells are those the checkpoint was trained on (their lengths' hash; its data order refers to them),
    by as many processes (the global batch, the batches to skip and each rank's RNG state refer to that number)."""
    environment = read_json(checkpoint / "environment.json") if (checkpoint / "environment.json").is_file() else {}
    if not isinstance(environment, dict) or not isinstance(environment.get("corpus") or {}, dict):
        raise ArtifactError(f"{checkpoint / 'environment.json'} is not this package's run record (a JSON object with "
                            "world_size and corpus); resume from another checkpoint, or start a new run.")
    if (processes := environment.get("world_size", world_size)) != world_size:
        raise ConfigError(
            f"{checkpoint.name} was trained by {processes} processes and this run has {world_size}: its global batch, data "
            f"order and RNG states are those of {processes} processes. Resume with {processes} processes (e.g. torchrun "
            f"--nproc_per_node {processes} on one node), or start a new run (another output_dir, or --overwrite)."
        )
    saved = environment.get("corpus")
    if saved is not None and saved != corpus:
        raise ConfigError(
            f"the corpus is not the one {checkpoint.name} was trained on ({_count(saved, 'cells')} training cells, "
            f"{_count(saved, 'tokens')} tokens then; {_count(corpus, 'cells')} and {_count(corpus, 'tokens')} now): the data "
            "order it restores would refer to other "
            "cells. Resume with that corpus, or start a new run (another output_dir, or --overwrite)."
        )


#: settings that name files or folders: the same ones spelled another way (relative / absolute) are no change
_PATH_SETTINGS = ("output_dir", "data.corpus", "data.vocab", "data.medians", "distributed.deepspeed_config")


def _same_files(key: str, old: Any, new: Any) -> bool:
    """Whether a changed ``key`` names the same files as before, only spelled otherwise (``corpus`` and
    ``/work/corpus``; a relative path is taken from the current folder). The files' contents are checked
    apart: the vocabulary by its hash, the training cells by :func:`check_resume_corpus`."""
    def resolved(value: Any) -> Any:
        if isinstance(value, list):
            return [resolved(item) for item in value]
        return str(Path(value).expanduser().resolve()) if isinstance(value, str) else value

    return key in _PATH_SETTINGS and resolved(old) == resolved(new)


def _count(record: dict[str, Any], key: str) -> str:
    """``record[key]`` with thousands separators; 'an unrecorded number of' when the record lacks it."""
    value = record.get(key)
    return f"{value:,}" if isinstance(value, int) else "an unrecorded number of"


__all__ = ["RESUME_KEEPS", "RESUME_MAY_CHANGE", "check_resume_config", "check_resume_corpus"]
