"""Model folders: save and load pretrained bundles, their tokenize config, loading for inference.

A bundle is ``config.json`` + ``model.safetensors`` (Hugging Face layout, BertForMaskedLM-compatible
keys), ``vocab.json``, ``medians.tsv`` (when known), ``tokenize.yaml`` (how the training corpus was
tokenized, written by pretraining) and ``mixgf.json`` (written last: marks a complete folder and
records its ``kind``). Pretrained models and fine-tuned classifiers share this one format; a
classifier folder adds its ``config.yaml`` and training log (``classify.load_classifier`` reads
it). A plain Hugging Face BERT folder (e.g. Geneformer's) loads too, given a vocabulary."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .config import load_config, to_dict
from .errors import ArtifactError, ConfigError, OfflineError, VocabularyMismatchError, check_config
from .fileio import atomic_directory, check_readable_file, read_json, write_json
from .medians import GeneMedians
from .model import (
    MixGeneformerConfig,
    MixGeneformerForCellClassification,
    MixGeneformerForPretraining,
    check_vocabulary,
)
from .model_config import CONFIG_VALUE_ERRORS
from .tokenize import TokenizeConfig, load_tokenize_config
from .vocab import Vocabulary

logger = logging.getLogger(__name__)


BUNDLE_FORMAT = "mixgeneformer-model"


BUNDLE_MARKER = "mixgf.json"


TOKENIZE_CONFIG_NAME = "tokenize.yaml"  # how the training corpus was tokenized (written by pretraining)


WEIGHTS_NAME = "model.safetensors"


WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


PICKLE_WEIGHTS_NAME = "pytorch_model.bin"


PRETRAINED_KIND = "pretrained"


CLASSIFIER_KIND = "classifier"


#: The file that marks this package's pretraining checkpoints (RUN/checkpoint-N), checkpoints.COMPLETE,
#: written last. Such a folder holds weights but no tokenize.yaml. (Another Trainer's checkpoint, without
#: it, loads as any Hugging Face BERT folder.)
CHECKPOINT_MARKER = "COMPLETE"


RUN_BUNDLE_DIR = "model"  # where a pretraining run writes its bundle (pretrain.BUNDLE_DIR)


def save_bundle(
    model: MixGeneformerForPretraining | MixGeneformerForCellClassification,
    directory: str | os.PathLike,
    vocab: Vocabulary,
    medians: GeneMedians | None = None,
    overwrite: bool = False,
    *,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a model bundle atomically and return its folder: ``config.json``, ``model.safetensors``,
    ``vocab.json``, ``medians.tsv`` (when given) and ``mixgf.json`` (written last: its presence
    marks a complete bundle).

    Parameters
    ----------
    model
        The pretraining model or a fine-tuned classifier (any device / dtype; weights are saved as
        they are); ``mixgf.json`` records which (``kind``).
    directory
        Target folder; must not exist unless ``overwrite``.
    vocab
        The model's vocabulary (size and hash are checked and recorded in the config).
    medians
        The gene medians used to tokenize its corpus, so users tokenize new data identically.
    overwrite
        Replace an existing folder (only after the new one is complete).
    extra_files
        Writes further files into the staging folder (it is called with its path) before the
        marker, so they are part of the same atomic write.
    """
    check_vocabulary(model.config, vocab)
    model.config.vocab_hash = vocab.hash
    if getattr(model.config, "special_token_ids", None) is None:
        model.config.special_token_ids = [int(i) for i in vocab.special_ids]

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / WEIGHTS_NAME).exists() and not (tmp / WEIGHTS_INDEX_NAME).exists():
            raise ArtifactError(f"transformers did not write {WEIGHTS_NAME} in {tmp}; cannot create the bundle.")
        vocab.save(tmp / "vocab.json")
        if medians is not None:
            medians.save(tmp / "medians.tsv")
        if extra_files is not None:
            extra_files(tmp)
        write_json(
            tmp / BUNDLE_MARKER,
            {
                "format": BUNDLE_FORMAT,
                "version": 1,
                "kind": CLASSIFIER_KIND if isinstance(model, MixGeneformerForCellClassification) else PRETRAINED_KIND,
                "mixgeneformer_version": __version__,
                "vocab_hash": vocab.hash,
                "vocab_size": len(vocab),
                "medians_hash": medians.hash if medians is not None else None,
            },
        )
    return Path(directory)


def bundle_tokenize_config(directory: str | os.PathLike) -> TokenizeConfig | None:
    """The ``TokenizeConfig`` a bundle's training corpus was made with, or None if it records none.

    Embedding, classification and perturbation tokenize new cells with it by default, so a model
    trained on V2-style cells with species tokens sees such cells again. Its ``obs_filter`` (which
    cells of a SOMA experiment the corpus holds) is left out: it chose training cells, not how cells
    are tokenized, and would refuse every new input that is not a SOMA experiment.
    """
    path = Path(directory) / TOKENIZE_CONFIG_NAME
    if not path.is_file():
        return None

    config = load_config(TokenizeConfig, path)
    return dataclasses.replace(config, obs_filter=None) if config.obs_filter is not None else config


class TokenizeOverrides(TokenizeConfig):
    """Tokenize options that override a bundle's ``tokenize.yaml`` key by key (CLI ``--tokenize-config``).

    Built like a :class:`TokenizeConfig` from the options a file sets (``load_config(TokenizeOverrides,
    path)``); :func:`resolve_tokenize_config` puts exactly those options over the bundle's recorded
    ones, so ``layer: counts`` alone keeps the bundle's ``max_len``, ``style`` and species token. A plain
    :class:`TokenizeConfig` passed to an API replaces the bundle's settings as a whole.
    """

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.given = frozenset(options)

    def __repr__(self) -> str:
        return f"TokenizeOverrides({', '.join(f'{k}={getattr(self, k)!r}' for k in sorted(self.given))})"

    def options(self) -> dict[str, object]:
        """The options given here, name -> value (what a new :class:`TokenizeOverrides` is built from)."""
        return {name: getattr(self, name) for name in self.given}

    def over(self, base: TokenizeConfig | None) -> TokenizeConfig:
        """``base`` (defaults where None) with the options given here set."""
        values = to_dict(base) if base is not None else {}
        values.update(self.options())
        return load_tokenize_config(values)


def resolve_tokenize_config(given: TokenizeConfig | None, recorded: TokenizeConfig | None) -> TokenizeConfig | None:
    """The tokenize options to use: ``recorded`` (a bundle's) when nothing is given, ``given`` laid over
    it when it is a :class:`TokenizeOverrides`, else ``given`` as a whole."""
    if given is None:
        return recorded
    if isinstance(given, TokenizeOverrides):
        return given.over(recorded)
    return given


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """The model folder ``path`` names, checked before anything is read: an :class:`ArtifactError` for a file, a
    missing folder or a pretraining run / checkpoint folder, an :class:`OfflineError` for a Hub ID."""
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ArtifactError(f"model path {folder} is a file; pass the folder that holds config.json and model.safetensors.")
        _refuse_training_folder(folder)
        return folder
    refuse_hub_id(path)
    raise ArtifactError(f"model folder not found: {folder}. Check the path (relative paths are taken from {Path.cwd()}).")


def refuse_hub_id(path: str | os.PathLike) -> None:
    """An :class:`OfflineError` for a model ``path`` that does not exist and looks like a Hub ID."""
    path = os.fspath(path)  # a Path too: the CLI passes one
    if _HUB_ID.match(path) and not path.startswith((".", "/", "~")) and not Path(path).exists():
        raise OfflineError(
            f"{path!r} is not a local folder and looks like a Hugging Face Hub ID; mixgeneformer never downloads at "
            f"run time. Download it first (e.g. `huggingface-cli download {path} --local-dir ./{path.split('/')[-1]}`) "
            "and pass the local folder. If you meant a local path, it does not exist (relative to "
            f"{Path.cwd()})."
        )


def _refuse_training_folder(folder: Path) -> None:
    """A pretraining checkpoint (RUN/checkpoint-N) or run folder (RUN) is no model to use: it records no
    tokenize settings, so new cells would be tokenized unlike the training corpus. Name RUN/model."""
    if (folder / CHECKPOINT_MARKER).exists():
        run = folder.parent.parent if folder.parent.name == ".staging" else folder.parent
        raise ArtifactError(
            f"{folder} is a pretraining checkpoint (for resuming training with --resume-from), not a model bundle: it "
            "lacks the tokenize settings of the training corpus. Pass the run's model bundle "
            f"{run / RUN_BUNDLE_DIR} (written when the run finishes)."
        )
    if not (folder / "config.json").exists() and (
        (folder / RUN_BUNDLE_DIR / "config.json").exists() or any(folder.glob("checkpoint-*"))
    ):
        raise ArtifactError(
            f"{folder} is a pretraining run folder, not a model bundle; pass its model bundle {folder / RUN_BUNDLE_DIR} "
            "(written when the run finishes)."
        )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The ``mixgf.json`` marker of a bundle folder (None when it has none); an error unless it is a mapping."""
    path = folder / BUNDLE_MARKER
    if not path.exists():
        return None
    marker = read_json(path, "bundle marker")
    if not isinstance(marker, dict):
        raise ArtifactError(
            f"bundle marker {path} holds a JSON {type(marker).__name__}, not an object; the folder was edited or "
            "damaged. Re-save the model (save_bundle) or re-download it."
        )
    return marker


def check_bundle_vocabulary(folder: Path, marker: dict[str, Any] | None, config: MixGeneformerConfig, vocab: Vocabulary) -> None:
    """The vocabulary fits the bundle: the hash its ``mixgf.json`` records and the model's ``vocab_size``
    (:func:`model.check_vocabulary`); shared by :func:`load_bundle` and ``classify.load_classifier``."""
    if marker is not None and marker.get("vocab_hash") not in (None, vocab.hash):
        raise VocabularyMismatchError(
            f"{folder / BUNDLE_MARKER} records vocabulary hash {marker.get('vocab_hash')} but vocab.json has {vocab.hash}; "
            "the bundle was edited by hand. Re-save it with save_bundle."
        )
    check_vocabulary(config, vocab)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a folder: safetensors (single or sharded) or, for old HF folders, a torch
    pickle read with ``weights_only=True`` (never executes code)."""

    def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
        check_readable_file(path, "model weights")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"model weights {path} could not be read ({exc}); the file is truncated or corrupt. "
                                "Re-download or re-save the model.") from exc

    if (folder / WEIGHTS_NAME).exists():
        return load_safetensors(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).exists():
        index = read_json(folder / WEIGHTS_INDEX_NAME, "safetensors index")
        weight_map = index.get("weight_map", {}) if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ArtifactError(f"{folder / WEIGHTS_INDEX_NAME} is damaged: it must be a JSON object whose 'weight_map' maps "
                                "tensor names to shard file names. Re-save or re-download the model.")
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise ArtifactError(f"{folder / WEIGHTS_INDEX_NAME} lists no weight shards; re-save the model.")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(folder / shard))
        return state
    if (folder / PICKLE_WEIGHTS_NAME).exists():
        path = check_readable_file(folder / PICKLE_WEIGHTS_NAME, "model weights")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for code-carrying pickles, EOFError/RuntimeError if truncated
            raise ArtifactError(
                f"model weights {path} were refused or unreadable ({type(exc).__name__}: {str(exc)[:200]}). Only plain "
                "tensor pickles are accepted (weights_only=True); convert trusted weights to model.safetensors."
            ) from exc
        if not isinstance(state, dict):
            raise ArtifactError(f"model weights {path} hold a {type(state).__name__}, not a state dict.")
        return state
    raise ArtifactError(f"model weights not found in {folder}: expected {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}).")


def _load_weights(model: MixGeneformerForPretraining, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Load a BertForMaskedLM / BertForPreTraining / our state dict into ``model`` (keys with or without the
    ``bert.`` prefix). A bare BertModel's weights lack the MLM head: refused as incomplete.

    Tensors the model has no place for are dropped when they are heads it does not use (BERT's
    next-sentence head, a task head) or old ``position_ids`` buffers; an encoder or embedding tensor
    without a place means config.json describes a smaller model than the weights: an error."""
    expected = set(model.state_dict())
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel checkpoint
        state = {f"bert.{k}": v for k, v in state.items()}
    unused = sorted(k for k in state if k not in expected and k.startswith(("bert.encoder.", "bert.embeddings."))
                    and not k.endswith("position_ids"))
    if unused:
        raise ArtifactError(
            f"model weights in {folder} hold {len(unused)} encoder tensors that config.json has no place for (e.g. "
            f"{unused[:3]}); config.json (num_hidden_layers={model.config.num_hidden_layers}) does not describe these "
            "weights. Restore the config.json saved with them."
        )
    state = {k: v for k, v in state.items() if k in expected}
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = sorted(expected - set(state) - tied)
    pooler_missing = [k for k in missing if k.startswith("bert.pooler.")]
    other_missing = [k for k in missing if not k.startswith("bert.pooler.") and not k.endswith("position_ids")]
    if other_missing:
        raise ArtifactError(
            f"model weights in {folder} lack {len(other_missing)} tensors (e.g. {other_missing[:3]}); the checkpoint is "
            "incomplete or not a BERT masked-LM model."
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ArtifactError(f"model weights in {folder} do not fit config.json: {str(exc)[:300]}") from exc
    model.tie_weights()
    if pooler_missing:
        # The pooler stays randomly initialised; it only matters for pooling="pooler".
        model.pooler_is_trained = False
        logger.warning("checkpoint %s has no BERT pooler weights; pooling='pooler' would use an untrained pooler.", folder)


def _read_config(folder: Path) -> MixGeneformerConfig:
    """The folder's ``config.json`` as a config; an error naming the file when it is no valid BERT config."""
    config_path = check_readable_file(folder / "config.json", "model config")
    raw_config = read_json(config_path, "model config")
    model_type = raw_config.get("model_type", "bert") if isinstance(raw_config, dict) else type(raw_config).__name__
    if model_type != "bert":
        raise ArtifactError(f"{config_path} is not a BERT config (model_type={model_type!r}); pass a BERT / Geneformer model folder.")
    try:
        return MixGeneformerConfig.from_dict(raw_config)
    except CONFIG_VALUE_ERRORS as exc:
        raise ArtifactError(f"{config_path} is not a valid BERT config ({exc}); restore the config.json saved with the weights.") from exc


def _build_model(config: MixGeneformerConfig, config_path: Path) -> MixGeneformerForPretraining:
    """The model ``config`` describes; values no model can be built from (e.g. an unknown ``hidden_act``)
    are an error naming ``config_path``."""
    try:
        return MixGeneformerForPretraining(config)
    except (KeyError, *CONFIG_VALUE_ERRORS) as exc:
        raise ArtifactError(
            f"{config_path} describes no model that can be built ({type(exc).__name__}: {str(exc)[:200]}); "
            "restore the config.json saved with the weights."
        ) from exc


# long: a 20-line docstring; the body is one validation sequence (config, vocabulary, marker, weights).
def load_bundle(
    path: str | os.PathLike,
    vocab: Vocabulary | str | os.PathLike | None = None,
    *,
    medians: GeneMedians | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[MixGeneformerForPretraining, Vocabulary, GeneMedians | None]:
    """Load a model bundle (or a plain Hugging Face BERT folder such as Geneformer's).

    Parameters
    ----------
    path
        Local folder. A string that is no local path but looks like a Hub ID raises
        :class:`OfflineError` at once (nothing is ever downloaded).
    vocab
        A :class:`Vocabulary` or a path to its JSON. Optional for our bundles (their
        ``vocab.json`` is used and must match when both are given); required for plain HF
        folders (e.g. ``vocab.import_geneformer(...)`` for Geneformer).
    medians
        A :class:`GeneMedians` or a path to its TSV, used instead of the bundle's ``medians.tsv``
        (needed to tokenize new cells for a plain HF folder, which has none).
    device, dtype
        Where and in which dtype to put the model.

    Returns
    -------
    (model, vocab, medians)
        The model in eval mode with its vocabulary attached, and the bundle's medians (None when
        the folder has none).
    """

    folder = resolve_model_folder(path)
    config = _read_config(folder)
    bundle_vocab = None
    if (folder / "vocab.json").exists() or (folder / BUNDLE_MARKER).exists():
        bundle_vocab = Vocabulary.load(check_readable_file(folder / "vocab.json", "bundle vocabulary"))
    if vocab is not None and not isinstance(vocab, Vocabulary):
        vocab = Vocabulary.load(vocab)
    if vocab is None:
        if bundle_vocab is None:
            raise ArtifactError(
                f"{folder} has no vocab.json (a plain Hugging Face folder); pass its vocabulary, e.g. for Geneformer "
                "`vocab.import_geneformer(token_dictionary.pkl, gene_median_dictionary.pkl)` / CLI --vocab VOCAB.json "
                "(and --medians MEDIANS.tsv to tokenize new cells)."
            )
        vocab = bundle_vocab
    elif bundle_vocab is not None and bundle_vocab.hash != vocab.hash:
        raise VocabularyMismatchError(
            f"the vocabulary given (hash {vocab.hash}) differs from the bundle's vocab.json (hash {bundle_vocab.hash}); "
            "omit the vocabulary argument to use the bundle's own."
        )
    marker = read_marker(folder)
    if marker is not None and marker.get("kind") == CLASSIFIER_KIND:
        raise ArtifactError(
            f"{folder} holds a fine-tuned classifier, not a pretrained model: predict with it by `mixgf predict "
            f"--classifier {folder}` (classify.load_classifier), or pass the pretrained model folder it was fine-tuned from."
        )
    check_bundle_vocabulary(folder, marker, config, vocab)
    if medians is not None and not isinstance(medians, GeneMedians):
        medians = GeneMedians.load(medians)
    elif medians is None and (folder / "medians.tsv").exists():
        medians = GeneMedians.load(check_readable_file(folder / "medians.tsv", "bundle gene medians"))
        if marker is not None and marker.get("medians_hash") not in (None, medians.hash):
            raise ArtifactError(
                f"{folder / 'medians.tsv'} (hash {medians.hash}) is not the median table the model was saved with "
                f"({BUNDLE_MARKER} records {marker['medians_hash']}): cells tokenized with it would not match the model's "
                "corpus. Restore the bundle's own medians.tsv, or pass the table the corpus was tokenized with."
            )

    state = _read_state_dict(folder)
    model = _build_model(config, folder / "config.json")
    _load_weights(model, state, folder)
    model.attach_vocabulary(vocab)
    # The tokenize settings of its training corpus travel with the loaded model, so passing it (not the
    # folder) to run_classification / embed_anndata / perturb_anndata tokenizes cells the same way.
    model.bundle_tokenize_config = bundle_tokenize_config(folder)

    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, vocab, medians


def load_model(
    path: str | os.PathLike, vocab: Vocabulary | str | os.PathLike | None = None, **kwargs: Any
) -> MixGeneformerForPretraining:
    """Like :func:`load_bundle` but return only the model."""
    return load_bundle(path, vocab, **kwargs)[0]


def load_for_inference(
    model_or_bundle_dir: str | os.PathLike | torch.nn.Module,
    vocab: Vocabulary | str | os.PathLike | None,
    medians: GeneMedians | str | os.PathLike | None,
    tokenize_config: TokenizeConfig | None = None,
) -> tuple[torch.nn.Module, Vocabulary, GeneMedians | None, TokenizeConfig | None, str]:
    """(model, vocab, medians, tokenize config, name) from a bundle folder or an in-memory model.

    The one loader behind every model command (CLI ``--vocab`` / ``--medians``). ``vocab`` and
    ``medians`` are objects or paths to their files; arguments given explicitly win; otherwise a
    bundle folder supplies its vocabulary, medians and the tokenize configuration of its training
    corpus (None where it records none). A model :func:`load_bundle` returned supplies only that
    tokenize configuration: pass its ``vocab`` (required) and ``medians`` (needed to tokenize cells). A
    :class:`TokenizeConfig` given replaces the bundle's as a whole; a :class:`TokenizeOverrides`
    (CLI ``--tokenize-config``) sets only its options over the bundle's (:func:`resolve_tokenize_config`).
    """
    check_config(tokenize_config, TokenizeConfig, "tokenize_config")
    if isinstance(model_or_bundle_dir, (str, os.PathLike)):
        model, vocab, medians = load_bundle(model_or_bundle_dir, vocab, medians=medians)
        name = str(model_or_bundle_dir)
    elif isinstance(model_or_bundle_dir, torch.nn.Module):
        model, name = model_or_bundle_dir, type(model_or_bundle_dir).__name__
        if vocab is not None and not isinstance(vocab, Vocabulary):
            vocab = Vocabulary.load(vocab)
        if medians is not None and not isinstance(medians, GeneMedians):
            medians = GeneMedians.load(medians)
        vocab = vocab if vocab is not None else getattr(model, "vocab", None)
        if vocab is None:
            raise ConfigError("an in-memory model needs its vocabulary: pass vocab= (or a bundle folder instead)")
    else:
        raise ConfigError(
            f"model_or_bundle_dir must be a model bundle folder or a torch model, got {type(model_or_bundle_dir).__name__}"
        )
    recorded = getattr(model, "bundle_tokenize_config", None)  # set by load_bundle: the bundle's tokenize.yaml
    return model, vocab, medians, resolve_tokenize_config(tokenize_config, recorded), name
