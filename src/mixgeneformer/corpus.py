"""The corpus folder contract: what tokenize writes and pretraining, embedding and perturbation read.

A corpus is a ``datasets.save_to_disk`` folder (columns ``input_ids``, ``length``, ``species``,
``cell_index`` + obs columns), its ``config.yaml`` (the TokenizeConfig) and ``mixgf_corpus.json``
(vocabulary and median hashes, counts). One opener, one vocabulary and median-table check."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from .errors import ArtifactError, ConfigError, InputDataError, VocabularyMismatchError
from .fileio import check_readable_file, read_json
from .medians import GeneMedians
from .readers.cells import COUNT_INPUTS, count_format, refused_folder
from .vocab import Vocabulary

CORPUS_JSON = "mixgf_corpus.json"
logger = logging.getLogger(__name__)


def _corpus_meta(corpus_dir: Path) -> dict:
    """A corpus's ``mixgf_corpus.json`` (an error naming the fix when it is missing)."""
    meta_path = Path(corpus_dir) / CORPUS_JSON
    if not meta_path.exists():
        raise ArtifactError(
            f"{corpus_dir} is not a mixgeneformer corpus ({CORPUS_JSON} missing). Create it with `mixgf tokenize`."
        )
    meta = read_json(meta_path, "corpus metadata")
    if not isinstance(meta, dict):
        raise ArtifactError(
            f"{meta_path} holds a JSON {type(meta).__name__}, not the corpus's metadata object; the folder was edited or "
            "damaged. Re-tokenize the cells (mixgf tokenize)."
        )
    return meta


def corpus_vocab_hash(corpus_dir: Path) -> str | None:
    """The vocabulary hash a corpus records in ``mixgf_corpus.json`` (None if it records none)."""
    return _corpus_meta(corpus_dir).get("vocab_hash")


def _tokenized_per_file(corpus_dir: Path) -> bool:
    """Whether the corpus's ``config.yaml`` (its TokenizeConfig) says ``medians: per_file``."""
    try:
        settings = yaml.safe_load((Path(corpus_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(settings, dict) and settings.get("medians") == "per_file"


def check_corpus_medians(paths: list[Path], medians: str | os.PathLike | None) -> None:
    """``medians`` (data.medians, which the model bundle ships to tokenize new cells) must be the table
    each corpus was tokenized with, as its ``mixgf_corpus.json`` records it (``GeneMedians.hash``).

    Not compared: a corpus recording no medians hash (written by other tools or older versions), and
    one tokenized with per-file medians (each input normalized by its own table: no single table is it).
    """
    if medians is None:
        return
    table_hash = GeneMedians.load(medians).hash
    for path in paths:
        recorded = _corpus_meta(Path(path)).get("medians_hash")
        if recorded in (None, table_hash):
            continue
        if _tokenized_per_file(Path(path)):
            logger.info("corpus %s was tokenized with per-file medians; data.medians %s is not compared with them", path, medians)
            continue
        raise ConfigError(
            f"corpus {path} was tokenized with gene medians {recorded}, but data.medians ({medians}) has hash "
            f"{table_hash}; the model bundle would ship a table its corpus was not normalized with. Set data.medians "
            "to the medians.tsv the corpus was tokenized with (mixgf tokenize --medians), or re-tokenize the corpus with this table."
        )


def check_corpora(paths: list[Path], vocab: Vocabulary, medians: str | os.PathLike | None = None) -> None:
    """Every corpus must exist and record the hash of ``vocab`` and (when given) of the ``medians``
    table (:func:`check_corpus_medians`); checked before training starts."""
    for path in paths:
        if not Path(path).is_dir():
            what = "is a file, not a corpus folder" if Path(path).is_file() else "not found"
            raise ArtifactError(f"corpus folder {what}: {path} (data.corpus). Check the path.")
        recorded = corpus_vocab_hash(Path(path))
        if recorded != vocab.hash:
            raise VocabularyMismatchError(
                f"corpus {path} was tokenized with vocabulary {recorded}, but data.vocab has hash {vocab.hash}. "
                "Use the vocab.json the corpus was built with, or re-tokenize the data."
            )
    check_corpus_medians(paths, medians)


_NOT_READ = {".mtx": "a Matrix Market file (pass the 10x folder that holds it, with features.tsv and barcodes.tsv)",
             ".gz": "a compressed file (pass the 10x folder that holds it, or decompress it)"}


def is_corpus_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder ``datasets.save_to_disk`` wrote (a tokenized corpus)."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def check_cells_input(path: str | os.PathLike, option: str = "input", corpus: bool = True) -> Path:
    """The cells a model command reads: any count input (:data:`readers.cells.COUNT_INPUTS`: an .h5ad,
    .loom or 10x .h5 file, a 10x matrix.mtx folder, a TileDB-SOMA experiment) or, with ``corpus``, a
    tokenized corpus folder. Any other folder, and a bare Matrix Market or compressed file, gets one
    message naming what the command reads, not a reader's error."""
    path = check_readable_file(path, option)
    kind = count_format(path)
    if path.is_dir():
        if kind is not None or (corpus and is_corpus_folder(path)):
            return path
        raise refused_folder(path, option, corpus)
    name = next((name for suffix, name in _NOT_READ.items() if path.name.lower().endswith(suffix)), None)
    if name is not None:
        reads = COUNT_INPUTS + (", or a tokenized corpus folder" if corpus else "")
        raise InputDataError(f"{option} {path} is {name}; this command reads {reads}.")
    return path


def open_corpus(paths: list[Path], max_cells: int | None = None):
    """Memory-map the corpora (``load_from_disk``) and concatenate them; no row is read here."""
    parts = []
    for path in paths:
        part = _load_one(path)
        if "input_ids" not in part.column_names:
            raise ArtifactError(f"corpus {path} has no 'input_ids' column (columns: {part.column_names}).")
        parts.append(part)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if max_cells is not None and max_cells < len(dataset):
        dataset = dataset.select(range(max_cells))
    if len(dataset) == 0:
        raise ArtifactError(f"the corpus {[str(p) for p in paths]} holds no cells.")
    return dataset


def _load_one(path: str | os.PathLike) -> datasets.Dataset:
    """One corpus folder, memory-mapped, with a clear error for a missing / partial / multi-split folder."""
    try:
        part = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ArtifactError(f"corpus {path} could not be opened ({exc}); it may be incomplete. Re-tokenize it (mixgf tokenize).") from exc
    except IndexError as exc:  # datasets concatenates the folder's data files, and it has none
        raise ArtifactError(f"corpus {path} holds no cells (no data files); tokenize cells into it (mixgf tokenize).") from exc
    if isinstance(part, datasets.DatasetDict):
        raise ArtifactError(f"corpus {path} holds several splits {list(part)}; point at one split's folder.")
    if len(part) == 0:
        raise ArtifactError(f"corpus {path} holds no cells; tokenize cells into it (mixgf tokenize).")
    return part


def corpus_lengths(dataset) -> np.ndarray:
    """Per-cell sequence lengths (the ``length`` column, or counted from ``input_ids``)."""
    if "length" in dataset.column_names:
        return np.asarray(dataset.with_format("numpy")["length"], dtype=np.int64)

    table = dataset.with_format("arrow")[:]
    return np.asarray(pc.list_value_length(table.column("input_ids")), dtype=np.int64)


def corpus_species_codes(dataset) -> tuple[np.ndarray, list[str]]:
    """Integer species codes per cell and the code -> species name list."""
    if "species" not in dataset.column_names:
        raise ArtifactError("the corpus has no 'species' column, needed for species-balanced sampling.")
    column = dataset.with_format("arrow")["species"]

    if isinstance(column, pa.Table):
        column = column.column(0)
    encoded = column.combine_chunks().dictionary_encode() if isinstance(column, pa.ChunkedArray) else column.dictionary_encode()
    return np.asarray(encoded.indices, dtype=np.int64), [str(s) for s in encoded.dictionary.to_pylist()]


def check_two_species(train_set: datasets.Dataset, weight: float, max_cells: int | None = None,
                      codes: np.ndarray | None = None) -> None:
    """Refuse a cross-species term (``weight`` > 0) on training cells of one species, where it would be 0
    at every step: a term asked for that silently does nothing (ConfigError). ``codes``: the cells'
    :func:`corpus_species_codes` where already read (species-balanced sampling), not read again."""
    if weight <= 0:
        return
    if "species" not in train_set.column_names:
        raise ConfigError(f"cross_species_weight={weight} pairs cells of two species, but the corpus has no 'species' "
                          "column: tokenize it with mixgf tokenize, or set objective.cross_species_weight: 0.")
    present = np.unique(corpus_species_codes(train_set)[0] if codes is None else codes)
    if present.size < 2:
        only = corpus_species_codes(train_set)[1][int(present[0])] if present.size else "none"
        cut = (f" (data.max_cells={max_cells} keeps the corpus's first cells, which may all be of one species)"
               if max_cells else "")
        raise ConfigError(f"cross_species_weight={weight} pairs cells of two species, but the training cells are all "
                          f"{only}{cut}: train on cells of both species, or set objective.cross_species_weight: 0.")


def load_corpus(corpus_dir: str | os.PathLike) -> datasets.Dataset:
    """Open a tokenized corpus folder (``datasets.save_to_disk`` layout) with a clear error."""
    folder = Path(corpus_dir)
    if folder.is_file():
        raise ArtifactError(f"corpus {folder} is a file; a corpus is the folder `mixgf tokenize --out` writes.")
    if not folder.is_dir():
        raise ArtifactError(f"corpus folder {folder} does not exist; tokenize first (mixgf tokenize)")
    return _load_one(folder)


def check_corpus_vocabulary(corpus_dir: str | os.PathLike, vocab_hash: str) -> None:
    """A corpus folder whose ``mixgf_corpus.json`` records another vocabulary is an error; a folder
    without one (a corpus written by other tools) passes."""
    if (Path(corpus_dir) / CORPUS_JSON).exists():
        recorded = _corpus_meta(Path(corpus_dir)).get("vocab_hash")
        if recorded not in (None, vocab_hash):
            raise VocabularyMismatchError(
                f"the corpus {corpus_dir} was tokenized with vocabulary {recorded} but the model uses {vocab_hash}; "
                "re-tokenize it with the model bundle's vocab.json"
            )


def refuse_tokenize_options(corpus_dir: str | os.PathLike, action: str, **given: object) -> None:
    """A tokenized corpus is used as it was tokenized: the options only tokenizing reads (``given``,
    name -> value; None, and species ``"auto"``, are not set) are refused, not ignored. ``action``:
    the verb of the command ("embed", "predict"), for the message."""
    set_ = [name for name, value in given.items() if value is not None and not (name == "species" and value == "auto")]
    if set_:
        flags = ", ".join(f"--{name.replace('_', '-')} ({name}=)" for name in set_)
        raise ConfigError(
            f"{flags}: only a count input (.h5ad, .loom, 10x, SOMA) is tokenized; {corpus_dir} is a tokenized corpus "
            f"folder, used as it was tokenized. Drop the option, or {action} the cells the corpus was made from."
        )


def check_token_input(dataset: object) -> None:
    """ConfigError unless ``dataset`` is a tokenized corpus or a list of token id sequences."""
    columns = None if isinstance(dataset, (list, tuple)) else getattr(dataset, "column_names", None)
    if columns is None and not isinstance(dataset, (list, tuple)):
        hint = " (a numpy array: pass array.tolist())" if isinstance(dataset, np.ndarray) else ""
        raise ConfigError("the cells must be a tokenized corpus (a datasets.Dataset with input_ids: tokenize_anndata, "
                          f"corpus.load_corpus) or a list of token id sequences, got {type(dataset).__name__}{hint}.")
    if columns is not None and "input_ids" not in columns:
        raise InputDataError(f"the corpus has no 'input_ids' column (columns: {columns}); tokenize it with mixgeneformer.tokenize")
