"""Small I/O helpers shared by every stage: atomic writes, safe loading, file checks.

Nothing here knows about genes or models. Writers never leave half-written output: they write to
a temporary sibling and rename it into place (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError

_LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def check_readable_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path after checking it exists, is non-empty and is no Git-LFS pointer."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} not found: {path}. Check the path (relative paths are taken from {Path.cwd()}).")
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

    On any exception the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ArtifactError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``target`` for writing; rename it into place on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON with a clear error for missing, truncated or corrupt files."""
    path = check_readable_file(path, what)
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{what} {path} is not valid JSON ({exc}); it may be truncated. Recreate it.") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
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


class _RestrictedUnpickler(pickle.Unpickler):
    """Admit only plain containers and numpy scalars; anything else (code!) is refused."""

    _allowed = {
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            if module.startswith("numpy"):
                import importlib

                return getattr(importlib.import_module(module), name)
            return getattr(__import__("builtins"), name)
        raise ArtifactError(
            f"refusing to unpickle {module}.{name}: only dicts of str/int/float and numpy scalars are "
            "allowed in dictionary pickles. The file may be malicious or not a Geneformer dictionary."
        )


def load_restricted_pickle(path: str | os.PathLike, what: str = "pickle") -> Any:
    """Load a dictionary pickle (e.g. Geneformer's token/median dictionaries) without running code."""
    path = check_readable_file(path, what)
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle).load()
        except ArtifactError:
            raise
        except Exception as exc:  # truncated or corrupt pickles raise many exception types
            raise ArtifactError(f"{what} {path} could not be read ({type(exc).__name__}: {exc}); it may be truncated.") from exc


def write_h5ad(adata: Any, out: str | os.PathLike) -> Path:
    """Write an AnnData to ``out`` atomically (gzip; a temporary sibling, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}.h5ad"
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
