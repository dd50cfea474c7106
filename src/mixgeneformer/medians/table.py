"""The finished median table: Ensembl ID → median, a TSV with a content hash."""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import ArtifactError, InputDataError, VocabularyMismatchError
from ..fileio import atomic_file, content_hash, read_text
from ..filekinds import MEDIANS_HEADER
from ..genes import ensembl_species, strip_versions

if TYPE_CHECKING:  # the run module builds tables; a table only names its stats type
    from .run import MedianRunStats

logger = logging.getLogger(__name__)


#: The vocabulary and median table of one tokenization share at least this fraction of genes (or
#: ``min_coverage``, when lower): :meth:`GeneMedians.check_vocabulary`.
MAX_MIN_SHARED = 0.5

_RECORDED = re.compile(r"# (\d+) genes, hash ([0-9a-f]{16})")


def _recorded_in_header(path: Path, header: str) -> tuple[int, str] | None:
    """The (gene count, hash) a median table's header records; None (and a warning) when it records
    none; :class:`ArtifactError` when the line is no median table header."""
    fields = header.split("\t")
    match = _RECORDED.fullmatch(fields[2]) if len(fields) == 3 else None
    if "\t".join(fields[:2]) != MEDIANS_HEADER or (len(fields) == 3 and match is None) or len(fields) > 3:
        raise ArtifactError(
            f"gene median table {path} must start with the header {MEDIANS_HEADER!r} (then, from `mixgf medians`, "
            f"'<TAB># N genes, hash H'), found {header[:80]!r}. Create it with `mixgf medians` or GeneMedians.save()."
        )
    if match is None:
        warnings.warn(
            f"gene median table {path} does not record its number of genes (written by an earlier mixgeneformer, or "
            "by hand), so a copy cut short at a line break cannot be detected. Save it again "
            "(GeneMedians.load(path).save(path)) or recompute it with `mixgf medians` to record it.",
            UserWarning, stacklevel=3,
        )
        return None
    return int(match.group(1)), match.group(2)


def _check_recorded(path: Path, table: GeneMedians, recorded: tuple[int, str] | None) -> None:
    """:class:`ArtifactError` when ``table`` is not what the header of ``path`` recorded."""
    if recorded is None:
        return
    count, digest = recorded
    if len(table) != count:
        raise ArtifactError(
            f"gene median table {path} holds {len(table):,} genes, and its header records {count:,}: the file was "
            f"{'cut short (truncated)' if len(table) < count else 'edited'}. Copy it again or recompute it with `mixgf medians`."
        )
    if table.hash != digest:
        raise ArtifactError(
            f"gene median table {path} does not match the hash its header records ({digest}): a median was changed or "
            "corrupted. Copy it again or recompute it with `mixgf medians` (if you edited it on purpose, remove the "
            "third field of its header)."
        )


def _unversioned(ids: np.ndarray) -> np.ndarray:
    """Ensembl IDs upper-cased without versions (``ensg….12`` → ``ENSG…``), as every lookup spells them;
    other keys unchanged. Two keys that name one gene are an :class:`InputDataError`."""
    ids = ids.copy()
    ensembl = ensembl_species(ids) != ""
    ids[ensembl] = strip_versions(ids[ensembl])
    repeated = pd.Series(ids).duplicated(keep=False).to_numpy()
    if repeated.any():
        raise InputDataError(
            f"gene medians are given twice for gene {ids[repeated][0]} (as versions or spellings of one Ensembl ID); "
            "a gene has one median. Keep one of them, or recompute the medians with `mixgf medians`."
        )
    return ids


class GeneMedians:
    """Ensembl ID → median of the gene's nonzero normalized values (count / total × 10,000).

    Parameters
    ----------
    values
        Mapping of unversioned upper-case Ensembl IDs to positive finite medians.
    """

    def __init__(self, values: Mapping[str, float]):
        ids = _unversioned(np.array(list(values.keys()), dtype=object))
        meds = np.array([float(v) for v in values.values()], dtype=np.float64)
        bad = ~np.isfinite(meds) | (meds <= 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise InputDataError(
                f"gene median for {ids[first]!r} is {meds[first]!r}; medians must be positive finite "
                f"numbers ({int(bad.sum())} invalid). Recompute the medians with `mixgf medians`."
            )
        order = np.argsort(ids.astype(str), kind="stable") if len(ids) else np.array([], dtype=np.int64)
        self._ids = ids[order].astype(str)
        self._medians = meds[order]
        self._index = pd.Index(self._ids)
        self.values: dict[str, float] = dict(zip(self._ids.tolist(), self._medians.tolist(), strict=True))
        #: what the run that computed this table read (``None`` when loaded from a file)
        self.stats: MedianRunStats | None = None
        #: the file this table was loaded from (``None`` when built in memory); named in errors
        self.path: Path | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, ensembl_id: object) -> bool:
        return ensembl_id in self.values

    def __repr__(self) -> str:
        return f"GeneMedians({len(self)} genes, hash={self.hash})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneMedians) and self.values == other.values

    @property
    def hash(self) -> str:
        """Content hash over the sorted (ID, median) pairs; exact float64 values (hex) are hashed."""
        return content_hash(
            "gene-medians-v1",
            "\n".join(f"{g}\t{float(m).hex()}" for g, m in zip(self._ids, self._medians, strict=True)),
        )

    def lookup(self, ensembl_ids: np.ndarray | Iterable[str]) -> np.ndarray:
        """Medians aligned with ``ensembl_ids`` (float64), NaN where a gene has no median."""
        ids = np.asarray(ensembl_ids, dtype=object)
        out = np.full(ids.shape[0], np.nan, dtype=np.float64)
        if len(self._ids) == 0 or ids.shape[0] == 0:
            return out
        pos = self._index.get_indexer(pd.Index(ids.astype(str)))
        hit = pos >= 0
        out[hit] = self._medians[pos[hit]]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write a two-column TSV (``ensembl_id``, ``median``) atomically; floats round-trip exactly.

        The header line records the number of genes and the content hash in a third field
        (``ensembl_id<TAB>median<TAB># 20000 genes, hash 0123456789abcdef``), so :meth:`load`
        recognizes a copy cut short at a line break. (pandas: ``read_csv(path, sep="\\t",
        usecols=[0, 1])``.)
        """
        path = Path(path)
        with atomic_file(path) as handle:
            handle.write(f"{MEDIANS_HEADER}\t# {len(self)} genes, hash {self.hash}\n")
            for g, m in zip(self._ids, self._medians, strict=True):
                handle.write(f"{g}\t{float(m)!r}\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneMedians:
        """Read a TSV written by :meth:`save` (clear errors for missing / truncated / wrong files).

        A table whose header records its gene count and hash must hold exactly those genes (else it
        was cut short or edited: :class:`ArtifactError`); one without them (written before they were
        recorded, or by hand) is read with a warning that truncation cannot be detected.
        """
        path, text = read_text(path, "gene median table", "a gene median TSV (written by `mixgf medians`)")
        with io.StringIO(text) as handle:
            recorded = _recorded_in_header(path, handle.readline().rstrip("\n"))
            if not text.endswith("\n"):
                raise ArtifactError(
                    f"gene median table {path} ends inside a line ({text[-40:]!r}): the file looks truncated (every line of a "
                    "median table ends with a line break). Copy or recompute it again; if it is complete, end its last line."
                )
            values: dict[str, float] = {}
            first_line: dict[str, int] = {}
            for lineno, line in enumerate(handle, start=2):
                line = line.rstrip("\n")
                if not line:
                    continue
                parts = line.split("\t")
                if len(parts) != 2:
                    raise ArtifactError(
                        f"gene median table {path}, line {lineno}: expected 2 tab-separated fields, "
                        f"got {len(parts)} ({line[:80]!r}); the file may be truncated or corrupt."
                    )
                if parts[0] in first_line:
                    raise ArtifactError(
                        f"gene median table {path} lists gene {parts[0]} twice (lines {first_line[parts[0]]} and {lineno}); "
                        "a gene has one median. Remove the repeated line, or recompute the table with `mixgf medians`."
                    )
                first_line[parts[0]] = lineno
                try:
                    values[parts[0]] = float(parts[1])
                except ValueError as exc:
                    raise ArtifactError(
                        f"gene median table {path}, line {lineno}: median {parts[1]!r} is not a number."
                    ) from exc
        if not values:
            raise ArtifactError(f"gene median table {path} holds no genes; recompute it with `mixgf medians`.")
        try:
            table = cls(values)
        except InputDataError as exc:  # a median <= 0 / NaN, or two versions of one gene: name the file
            raise InputDataError(f"gene median table {path}: {exc}") from exc
        _check_recorded(path, table, recorded)
        table.path = path
        return table

    def check_vocabulary(self, gene_ids: Iterable[str], min_coverage: float, vocabulary: str | os.PathLike | None = None) -> None:
        """:class:`VocabularyMismatchError` when this table was built for another vocabulary.

        ``gene_ids``: the vocabulary's genes. Of the genes they and the table share, the larger
        fraction (of the table's genes, or of the vocabulary's; one may hold the other) must reach
        ``min(min_coverage, 0.5)``; else tokenizing would keep only the few shared genes (a gene
        without a median is left out of every cell). ``vocabulary``: its file, for the message.
        """
        genes = set(gene_ids)
        shared = int(self._index.isin(genes).sum()) if genes else 0
        fraction = max(shared / len(self), shared / len(genes)) if genes and len(self) else 0.0
        if fraction < min(min_coverage, MAX_MIN_SHARED):
            where = f"gene median table {self.path}" if self.path else "the gene median table (given in memory)"
            vocab = f"the vocabulary {vocabulary}" if vocabulary else "the vocabulary (given in memory)"
            raise VocabularyMismatchError(
                f"{where} was built for another vocabulary than {vocab}: they share {shared:,} genes, "
                f"{shared / max(len(self), 1):.1%} of the table's {len(self):,} and {shared / max(len(genes), 1):.1%} of "
                f"the vocabulary's {len(genes):,} (under min_coverage {min(min_coverage, MAX_MIN_SHARED):.0%}). Pass the "
                "medians the vocabulary was built from (`mixgf vocab build --medians`), or compute medians on your corpus "
                "with `mixgf medians` and build the vocabulary with them."
            )

    def to_series(self) -> pd.Series:
        """The table as a pandas Series indexed by Ensembl ID."""
        return pd.Series(self._medians.copy(), index=pd.Index(self._ids.copy(), name="ensembl_id"), name="median")

