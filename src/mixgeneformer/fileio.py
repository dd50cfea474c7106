"""Small I/O helpers shared by every stage: atomic writes, safe loading, file checks.

Nothing here knows about genes or models. Writers never leave half-written output: they write to
a temporary sibling and rename it into place (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import uuid
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from .errors import ArtifactError, ConfigError
from .filekinds import is_package_file
from .filekinds import write_h5ad as write_stamped_h5ad
from .locks import (  # noqa: F401  (fileio.* stays their import path)
    _HELD_LOCKS,
    OUTPUT_MARKER,
    claim_outputs,
    lock_path,
    moved_aside,
    output_lock,
    remove_stale_temporaries,
    restore_moved_aside,
    scratch_folder,
    temporary_sibling,
)

if TYPE_CHECKING:  # anndata is imported lazily at run time (start-up cost)
    import anndata

#: A JSON document: what :func:`read_json` returns and :func:`write_json` writes (also the plain
#: config dicts of :func:`mixgeneformer.config.to_dict`).
JSONValue: TypeAlias = dict[str, "JSONValue"] | list["JSONValue"] | str | int | float | bool | None

_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def check_readable_file(path: str | os.PathLike, what: str = "file", *, file_only: bool = False) -> Path:
    """Return ``path`` as a Path after checking it exists, is non-empty and is no Git-LFS pointer.

    ``file_only``: a directory is an error (for options that expect one file).
    """
    path = Path(path)
    if not path.exists():
        top = next(q for q in (path.absolute(), *path.absolute().parents) if q.parent.exists())  # the missing folder
        if aside := moved_aside(top):  # an interrupted overwrite (atomic_directory); the next write restores it
            raise ArtifactError(f"{what} not found: {path}; an interrupted overwrite left {top} at {aside[-1]}. Rename "
                                f"that back to {top}, or rerun the command that writes {top}: it restores it first.")
        raise ArtifactError(f"{what} not found: {path}. Check the path (relative paths are taken from {Path.cwd()}).")
    if file_only and path.is_dir():
        raise ArtifactError(f"{what} {path} is a directory; a file was expected.")
    if not os.access(path, os.R_OK):  # else an open below or later fails as if it were an unwritable output
        raise ArtifactError(f"{what} {path} is not readable (permission denied); fix its permissions or copy it somewhere readable.")
    if path.is_file():
        size = path.stat().st_size
        if size == 0:
            raise ArtifactError(f"{what} {path} is empty (0 bytes); it was probably truncated. Recreate or re-download it.")
        if size < 1024:
            with open(path, "rb") as handle:
                if handle.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX:
                    raise ArtifactError(
                        f"{what} {path} is a Git-LFS pointer, not the real file. Run `git lfs pull` in its repository."
                    )
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success rename it to ``target``.

    On any exception the temporary folder is removed and ``target`` is untouched. The folder carries
    :data:`OUTPUT_MARKER`; an existing ``target`` is replaced only with ``overwrite`` and only when it
    carries that marker too (:func:`check_output`, again under the lock: another writer may have just
    finished). A second process writing the same ``target`` meanwhile is refused (:func:`output_lock`).

    Replacing renames the old ``target`` to ``.NAME.old-XXXXXXXX``, renames the new folder in, then
    deletes the old one. A process killed between the two renames leaves the old output only under
    that hidden name: the next call for ``target`` (here or :func:`claim_outputs`) renames it back
    first, with a warning, so the user's previous output is never lost; without ``overwrite`` that
    call then stops with "already exists", as it would have before the interrupted one. Reading a
    missing ``target`` meanwhile (:func:`check_readable_file`) names where the output is.
    """
    target = Path(target)
    check_output(target, overwrite=overwrite)
    with output_lock(target), writing(target):
        restore_moved_aside(target)
        check_output(target, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        tmp.mkdir()
        try:
            write_output_marker(tmp)
            yield tmp
            if target.exists():
                trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, trash)
                os.replace(tmp, target)
                if trash.is_symlink():
                    trash.unlink()  # a link: not what it points to
                else:
                    (trash / OUTPUT_MARKER).unlink(missing_ok=True)  # first: a half-deleted folder is never restored
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


_TOGETHER: list[list[tuple[Path, Path]]] = []  # the renames held back by each open written_together()


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Several output files of one command replace their targets all or none: inside the block,
    :func:`atomic_file` and :func:`write_h5ad` leave each file at its temporary path, and every
    rename happens when the block has succeeded (a full disk on the last file keeps the first). The
    renames themselves (within one folder, metadata only) are not atomic as a group."""
    pending: list[tuple[Path, Path]] = []
    _TOGETHER.append(pending)
    try:
        yield
        for tmp, target in pending:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _TOGETHER.pop()


def _rename_into_place(tmp: Path, target: Path) -> None:
    if _TOGETHER:
        _TOGETHER[-1].append((tmp, target))
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``target`` for writing; rename it into place on success."""
    target = Path(target)
    with writing(target):
        if target.is_dir():
            raise ArtifactError(f"cannot write {target}: it is a folder. Give a file path.")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        try:
            with open(tmp, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            _rename_into_place(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------------------------------------
# The user's files: outputs never replace inputs or files this package did not write

_WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full (No space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "it is not writable (permission denied)",
    errno.EPERM: "it is not writable (operation not permitted)",
    errno.EROFS: "it is on a read-only file system",
    errno.EFBIG: "the file is larger than this system or your file-size limit allows (File too large)",
}
_WRITE_TEXTS = (
    (("no space left", "storagefull", "disk quota"), _WRITE_ERRNOS[errno.ENOSPC]),
    (("read-only file system",), _WRITE_ERRNOS[errno.EROFS]),
    (("permission denied",), _WRITE_ERRNOS[errno.EACCES]),
)
_PICKLE_OR_HDF5 = {b"\x80": "a Python pickle", b"\x89HDF": "an HDF5 file (e.g. .h5ad)", b"PAR1": "a Parquet file"}


def write_output_marker(folder: str | os.PathLike) -> None:
    """Mark ``folder`` as written by this package (so ``--overwrite`` may replace it later)."""
    from . import __version__

    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"written_by": "mixgeneformer", "version": __version__}) + "\n")


def written_by_package(path: str | os.PathLike, markers: Iterable[str] = (), writes: str | None = None) -> bool:
    """True for an empty folder, a folder with :data:`OUTPUT_MARKER` (or one of ``markers``) and a
    file of the kind ``writes`` (a suffix such as ``".json"``; default: the file's own suffix) that
    carries this package's stamp (:func:`filekinds.is_package_file`)."""
    path = Path(path)
    if path.is_dir():
        return not any(path.iterdir()) or any((path / name).is_file() for name in (OUTPUT_MARKER, *markers))
    return path.is_file() and is_package_file(path, writes or path.suffix)


def check_not_input(target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str = "output") -> None:
    """An output ``target`` is not one of its command's ``inputs``, no folder holding one, and not
    inside an input folder (a 10x folder, a corpus, a model: writing there changes the input)."""
    resolved = Path(target).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if source == resolved or resolved in source.parents:
            holds = "is" if source == resolved else "holds"
            raise ArtifactError(
                f"{option} {target} {holds} the input {item}; an output never replaces an input. Choose another {option} path."
            )
        if source in resolved.parents and source.is_dir():
            raise ArtifactError(
                f"{option} {target} is inside the input folder {item}; writing there would change that input. "
                f"Choose an {option} path outside it."
            )


def _nearest_existing(target: str | os.PathLike) -> Path:
    """The nearest ancestor of ``target`` that exists (where its writes land; the root always exists)."""
    return next(parent for parent in Path(target).absolute().parents if parent.exists())


def check_writable(target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), option: str = "output") -> Path:
    """The first rules of :func:`check_output`, for commands that decide themselves what an existing
    output means (resume, replace): ``target`` can be written (its nearest existing ancestor is a
    writable folder) and is none of the ``inputs`` nor holds or sits in one. Returns it as a Path."""
    target = Path(target)
    folder = _nearest_existing(target)
    if not folder.is_dir():
        raise ArtifactError(f"{option} {target}: {folder} is a file, not a folder, so nothing can be written under it. Choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"cannot write {option} {target}: {folder} is not writable (permission denied or a read-only file system). "
            "Choose a writable path."
        )
    check_not_input(target, inputs, option)
    return target


def check_output(
    target: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    overwrite: bool = False,
    option: str = "output",
    markers: Iterable[str] = (),
    writes: str | None = None,
) -> Path:
    """The rules every command applies to an output path before doing any work.

    The output can be written (its nearest existing ancestor is a writable folder); it never
    replaces one of its command's ``inputs`` (the same path, or a folder holding one); an existing
    output is refused without ``overwrite``; with it, only something this package wrote is
    replaced (:func:`written_by_package`; ``writes``: the suffix of the one file the command
    writes, e.g. ``".json"``, so a folder there is refused). Returns ``target`` as a Path.
    """
    target = check_writable(target, inputs, option)
    if not (target.exists() or target.is_symlink()):
        return target
    if writes is not None and target.is_dir():
        raise ArtifactError(f"{option} {target} is a folder; this command writes one {writes} file there. Give a file path.")
    if not overwrite:
        raise ArtifactError(f"{option} {target} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if not written_by_package(target, markers, writes):
        kind = f"a folder without the {OUTPUT_MARKER} marker" if target.is_dir() else "not a file mixgeneformer wrote (it carries no mixgeneformer stamp; outputs of earlier versions of mixgeneformer carry none)"
        raise ArtifactError(
            f"{option} {target} exists and is {kind}: --overwrite only replaces outputs of mixgeneformer. "
            "Delete or move it yourself, or choose another path."
        )
    return target


def _disk_is_full(target: str | os.PathLike) -> bool:
    """Whether the file system ``target`` is written to has (almost) no space left."""
    try:
        return shutil.disk_usage(_nearest_existing(target)).free < 1 << 20
    except OSError:
        return False


def _read_denied(filename: str | bytes | os.PathLike | None) -> ArtifactError | None:
    """The error for a permission denied on ``filename`` when it was no write: the path exists and
    cannot be read (a write would have been allowed), or a folder above it cannot be entered."""
    if not filename:
        return None
    path = Path(os.fsdecode(filename))
    if os.path.lexists(path):
        if os.access(path, os.R_OK):
            return None  # readable: what failed was a write
        writable = os.access(path, os.W_OK)
        kind = "folder" if path.is_dir() else "file"
        return ArtifactError(f"cannot read {path}: the {kind} is not readable{'' if writable else ' or writable'} "
                             f"(permission denied). Fix its permissions (e.g. chmod u+r{'x' if kind == 'folder' else ''}) "
                             "or copy it somewhere readable.")
    folder = _nearest_existing(path)
    if folder.is_dir() and not os.access(folder, os.X_OK):
        return ArtifactError(f"cannot read or write {path}: the folder {folder} cannot be entered (permission denied). "
                             "Fix its permissions (chmod u+x) or choose another path.")
    return None


def output_error(target: str | os.PathLike, exc: BaseException, guess: bool = True) -> ArtifactError | None:
    """A clear error for a write that failed because the disk is full or the path is not writable
    (None for any other exception); a permission error on reading an existing file says "cannot
    read" that file instead (it is raised inside the :func:`writing` block of a command). Also recognizes libraries that wrap the OS error in their own
    exception type (safetensors, h5py, Arrow) by its text; with ``guess``, any write error while the
    disk of ``target`` has almost no space left (torch's zip writer says "unexpected pos")."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code in (errno.EACCES, errno.EPERM) and (denied := _read_denied(getattr(exc, "filename", None))) is not None:
        return denied  # a command's inputs are read inside its writing() block too
    cause = _WRITE_ERRNOS.get(code) if code is not None else None
    if cause is None:
        text = str(exc).lower()
        cause = next((c for keys, c in _WRITE_TEXTS if any(k in text for k in keys)), None)
    if cause is None and guess and isinstance(exc, (OSError, RuntimeError)) and _disk_is_full(target):
        cause = _WRITE_ERRNOS[errno.ENOSPC]  # e.g. torch's zip writer: "unexpected pos", no errno
    if cause is None:
        return None
    filename = getattr(exc, "filename", None)
    where = f" ({filename})" if filename and str(filename) != str(target) else ""
    return ArtifactError(f"cannot write {target}{where}: {cause}. Nothing was left half-written; free space or choose a writable path.")


@contextlib.contextmanager
def writing(target: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full / not-writable ``OSError`` raised inside into an :class:`ArtifactError` naming ``target``."""
    try:
        yield
    except ArtifactError:
        raise
    except OSError as exc:
        error = output_error(target, exc)
        if error is None and isinstance(exc, (NotADirectoryError, FileExistsError)) and not (folder := _nearest_existing(target)).is_dir():
            error = ArtifactError(f"cannot write {target}: {folder} is a file, not a folder. Choose another path.")
        if error is None:
            raise
        raise error from exc


def read_text(path: str | os.PathLike, what: str, expected: str, hint: str = "") -> tuple[Path, str]:
    """Read a text artifact (vocabulary JSON, median TSV, config), naming ``what`` and the ``expected``
    kind of file (and ``hint``, a sentence) when it is a directory, a pickle, an HDF5 file or
    otherwise not UTF-8 text."""
    path = check_readable_file(path, what, file_only=True)
    with open(path, "rb") as handle:
        head = handle.read(8)
    hint = f" {hint}" if hint else ""
    for magic, kind in _PICKLE_OR_HDF5.items():
        if head.startswith(magic):
            raise ArtifactError(f"{what} {path} is {kind}, not {expected}.{hint}")
    try:
        return path, path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not content
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{what} {path} is a binary file, not {expected}.{hint}") from exc


def check_outputs_of(
    outputs: dict[str, tuple[str | os.PathLike | None, set[str]]], inputs: Iterable[str | os.PathLike | None], overwrite: bool
) -> None:
    """:func:`check_output` for each output of one command (``{option: (path or None, allowed
    suffixes)}``): each path given ends in an allowed suffix, they are distinct files, none replaces
    an input."""
    inputs = list(inputs)
    given = {option: Path(path) for option, (path, _) in outputs.items() if path is not None}
    for option, path in given.items():
        allowed, suffix = outputs[option][1], path.suffix.lower()
        if suffix not in allowed and not path.is_dir():  # a folder there gets check_output's message
            check_writable(path, inputs, option)  # "is the input" says more than the suffix
            raise ConfigError(f"{option} {path} must end in one of {sorted(allowed)}")
        check_output(path, inputs, overwrite=overwrite, option=option, writes=suffix if suffix in allowed else min(allowed))
    resolved = [p.resolve() for p in given.values()]
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"{', '.join(given)} must be different files")


def h5ad_read_errors() -> tuple[type[Exception], ...]:
    """anndata's errors for an h5ad it cannot read; IORegistryError: an encoding it cannot decode (a newer anndata's)."""
    try:
        from anndata._io.specs.registry import IORegistryError
    except ImportError:  # another anndata layout: its other errors are still caught
        return (OSError, KeyError, ValueError, TypeError)
    return (OSError, KeyError, ValueError, TypeError, IORegistryError)


def read_h5ad(path: str | os.PathLike, what: str = "input h5ad", **kwargs: Any) -> anndata.AnnData:
    """``anndata.read_h5ad`` with a clear error for missing, truncated or non-h5ad files."""
    import anndata as ad

    path = check_readable_file(path, what, file_only=True)
    try:
        return remember_source(ad.read_h5ad(path, **kwargs), path)
    except h5ad_read_errors() as exc:
        raise ArtifactError(f"cannot read {what} {path} as h5ad ({exc}); is it truncated or another format?") from exc


#: id of an AnnData read from a file -> (a weak reference to it, the file), for :func:`source_name`.
_SOURCES: dict[int, tuple[weakref.ref, str]] = {}


def remember_source(adata: anndata.AnnData, path: str | os.PathLike) -> anndata.AnnData:
    """``adata``, recorded as read from ``path``: messages about its counts and genes name the file (with
    ``mixgf classify --test``, which of the two) instead of 'AnnData'. Forgotten when ``adata`` is."""
    key = id(adata)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _SOURCES.get(key, (None,))[0] is ref:
            del _SOURCES[key]

    _SOURCES[key] = (weakref.ref(adata, forget), str(path))
    return adata


def source_name(adata: anndata.AnnData, default: str = "AnnData") -> str:
    """The file ``adata`` was read from (:func:`remember_source`), else ``default``."""
    entry = _SOURCES.get(id(adata))
    return entry[1] if entry is not None and entry[0]() is adata else default


def write_json(path: str | os.PathLike, obj: JSONValue) -> None:
    """Write ``obj`` as indented, strict JSON, atomically (numpy scalars and arrays and Paths inside
    it are converted; NaN and infinities become ``null``)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    with atomic_file(path) as handle:
        handle.write(text + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (Python or numpy, in lists, tuples, dicts, arrays) as None."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return _finite(obj.tolist())
    return obj


def read_json(path: str | os.PathLike, what: str = "JSON file", hint: str = "") -> JSONValue:
    """Read JSON with a clear error for missing, truncated or corrupt files (``hint``: see :func:`read_text`)."""
    path, text = read_text(path, what, "a JSON file", hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{what} {path} is not valid JSON ({exc}); it may be truncated. Recreate it.") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()  # numpy scalars (int, float, bool) and arrays as Python values
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def content_hash(*parts: bytes | str) -> str:
    """A short, stable SHA-256 hex digest over the given parts (used for vocabularies, medians)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def files_signature(paths: Iterable[str | os.PathLike]) -> list[list[str | int]]:
    """(path, size, mtime) of every file at or under ``paths`` (a folder: each file in it, hidden ones
    aside, since a file rewritten in place leaves its folder's own size and mtime as they were)."""
    files = [sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")) if p.is_dir() else [p]
             for p in (Path(path).resolve() for path in paths)]
    return [[str(file), (stat := file.stat()).st_size, stat.st_mtime_ns] for group in files for file in group]


def write_h5ad(adata: anndata.AnnData, out: str | os.PathLike) -> Path:
    """Write an AnnData to ``out`` atomically (gzip; a temporary sibling, then rename); a full or
    read-only disk, or a folder at ``out``, raises :class:`ArtifactError` (:func:`writing`)."""
    out = Path(out)
    with writing(out):
        if out.is_dir():  # else the rename fails with a bare IsADirectoryError after the whole write
            raise ArtifactError(f"cannot write {out}: it is a folder, and an h5ad is one file. Give a file path "
                                f"(e.g. {out / 'cells.h5ad'}), or move the folder away.")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(out, ".h5ad")
        try:
            write_stamped_h5ad(adata, tmp)
            _rename_into_place(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out
