"""Reading Geneformer's pickled dictionaries without ever running code from them.

The only place the package touches :mod:`pickle`: an unpickler that admits plain containers and
numpy scalars, and refuses anything else (a pickle can name any callable to run on load).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .fileio import check_readable_file


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
        if module == "__builtin__":  # Python 2's name of builtins (what pickle's fix_imports maps), in protocol 0-2 pickles
            module = "builtins"
        if (module, name) in self._allowed:
            if module.startswith("numpy"):
                import importlib

                return getattr(importlib.import_module(module), name)
            return getattr(__import__("builtins"), name)
        raise ArtifactError(
            f"refusing to unpickle {module}.{name}: only dicts of str/int/float and numpy scalars are "
            "allowed in dictionary pickles. The file may be malicious or not a Geneformer dictionary."
        )


#: How files of other kinds start; none of these bytes opens a pickle ('{' is no pickle opcode).
_NOT_PICKLES = {b"\x89HDF": "an HDF5 file (e.g. .h5ad)", b"PAR1": "a Parquet file", b"{": "a JSON file",
                b"PK\x03\x04": "a zip archive (e.g. a torch checkpoint)"}


def load_restricted_pickle(path: str | os.PathLike, what: str = "pickle") -> object:
    """Load a dictionary pickle (e.g. Geneformer's token/median dictionaries) without running code.

    The value is whatever the pickle holds (containers of str/int/float and numpy scalars): the
    caller checks its shape."""
    if Path(path).is_dir():
        raise ArtifactError(f"{what} {path} is a directory, not a Python pickle file (Geneformer's dictionaries are .pkl files).")
    path = check_readable_file(path, what)
    with open(path, "rb") as handle:
        head = handle.read(8)
        kind = next((k for magic, k in _NOT_PICKLES.items() if head.lstrip().startswith(magic)), None)
        if kind is not None:  # else "invalid load key ...; it may be truncated", of a whole file of another kind
            raise ArtifactError(f"{what} {path} is {kind}, not a Python pickle (Geneformer's dictionaries are .pkl files).")
        handle.seek(0)
        try:
            return _RestrictedUnpickler(handle).load()
        except ArtifactError:
            raise
        except Exception as exc:  # truncated or corrupt pickles raise many exception types
            raise ArtifactError(f"{what} {path} could not be read ({type(exc).__name__}: {exc}); it may be truncated.") from exc
