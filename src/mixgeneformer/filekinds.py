"""The kinds of single file this package writes, and how each carries a stamp saying so.

``--overwrite`` may replace a file only if this package wrote it. A folder says so with its
marker file; a file says so inside itself: an HDF5 root attribute (``.h5ad``), Parquet schema
metadata, a figure's ``Creator`` metadata, the word ``mixgeneformer`` in a JSON document, the
header line of a median table. A file of the right type without the stamp (the user's own data,
or a file of a version before stamps) is never replaced.
"""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    import pyarrow as pa

WRITTEN_BY = "mixgeneformer"
_KEY = "written_by"

#: Figure formats whose metadata matplotlib writes as text we can find again: the only ones a
#: command writes as a file of its own (``--umap``), and each one's stamp as it appears in the file.
_FIGURE_STAMPS = {
    "png": re.compile(rb"tEXtCreator\x00mixgeneformer"),
    "pdf": re.compile(rb"/Creator \(mixgeneformer\)"),
    "svg": re.compile(rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>mixgeneformer</dc:title>"),
    "eps": re.compile(rb"\n%%Creator: mixgeneformer\n"),
    "ps": re.compile(rb"\n%%Creator: mixgeneformer\n"),
}
STAMPED_FIGURES = frozenset(_FIGURE_STAMPS)
_MAX_FIGURE_BYTES = 256 << 20

#: How the first line of a median table starts (medians/table.py writes it; it is that file's stamp).
MEDIANS_HEADER = "ensembl_id\tmedian"


class _FirstErrorKept(io.RawIOBase):
    """A binary file for h5py that remembers the first failed write and drops the ones after it.

    HDF5 keeps writing (metadata, then flushes when its handles are closed or garbage collected);
    on a full disk each of those fails again, and h5py can crash the interpreter. Here the first
    failure is kept, HDF5 closes cleanly, and :func:`write_h5ad` raises that failure.
    """

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle, self.error = handle, None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def readinto(self, buffer: Any) -> int:
        return self.handle.readinto(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while self.error is None and len(view):  # an unbuffered write may take only part (h5py ignores the count)
            try:
                written = self.handle.write(view)
            except OSError as exc:
                self.error = exc
                break
            if not written:
                self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written or len(view):]
        return size

    def truncate(self, size: int | None = None) -> int:
        return self.handle.truncate(size)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.handle.flush()
            except OSError as exc:
                self.error = exc


def write_h5ad(adata: anndata.AnnData, path: str | Path) -> None:
    """Write ``adata`` to ``path`` as gzip-compressed h5ad carrying the stamp (a root attribute
    anndata ignores). A failed write (a full disk) raises its ``OSError`` after HDF5 has closed."""
    import h5py

    adata.strings_to_categoricals()  # as AnnData.write_h5ad does
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    with open(path, "w+b", buffering=0) as handle:  # unbuffered: a seek never writes
        guarded = _FirstErrorKept(handle)
        try:
            with h5py.File(guarded, "w") as store:
                _write_anndata(store, adata)
                store.attrs[_KEY] = WRITTEN_BY
        except Exception as exc:  # after a dropped write HDF5 reads a short file and fails its own way
            if guarded.error is not None:
                raise guarded.error from exc
            raise
        if guarded.error is not None:
            raise guarded.error
        os.fsync(handle.fileno())


def _write_anndata(store: Any, adata: anndata.AnnData) -> None:
    """The elements of ``adata`` into the root of ``store`` as ``anndata.AnnData.write_h5ad`` writes them:
    ``X`` and ``raw`` only when present (``write_elem`` of a whole AnnData stores a missing ``raw`` as a
    null element, which anndata then cannot read back in backed mode)."""
    from anndata.io import write_elem

    options = {"dataset_kwargs": {"compression": "gzip"}}
    store.attrs["encoding-type"] = "anndata"
    store.attrs["encoding-version"] = "0.1.0"
    if adata.X is not None:
        write_elem(store, "X", adata.X, **options)
    if adata.raw is not None:
        write_elem(store, "raw", adata.raw, **options)
    for name in ("obs", "var"):
        write_elem(store, name, getattr(adata, name), **options)
    for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        write_elem(store, name, dict(getattr(adata, name)), **options)


def parquet_table(frame: pd.DataFrame) -> pa.Table:
    """``frame`` as an Arrow table whose schema metadata carries the stamp (index kept as pandas does)."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), _KEY.encode(): WRITTEN_BY.encode()})


def figure_metadata(fmt: str) -> dict[str, Any] | None:
    """The ``savefig(metadata=...)`` that stamps a figure of format ``fmt`` (None where none can)."""
    return {"Creator": WRITTEN_BY} if fmt.lower() in STAMPED_FIGURES else None


def is_package_file(path: Path, kind: str) -> bool:
    """Whether the file ``path``, read as a file of suffix ``kind``, carries this package's stamp."""
    kind = kind.lower()
    try:
        if kind == ".h5ad":
            import h5py

            with h5py.File(path, "r") as handle:
                return str(handle.attrs.get(_KEY, "")) == WRITTEN_BY
        if kind == ".parquet":
            import pyarrow.parquet as pq

            return (pq.read_schema(path).metadata or {}).get(_KEY.encode()) == WRITTEN_BY.encode()
        figure = _FIGURE_STAMPS.get(kind.lstrip("."))
        with open(path, "rb") as handle:  # a figure whole: PDF's Info dictionary sits anywhere before its xref table
            head = handle.read(_MAX_FIGURE_BYTES if figure is not None else 4096)
    except Exception:  # unreadable, truncated, or not of that type at all
        return False
    if kind == ".tsv":
        return head.startswith(MEDIANS_HEADER.encode())
    if kind == ".json":
        return head.lstrip().startswith(b"{") and WRITTEN_BY.encode() in head
    return figure is not None and figure.search(head) is not None
