"""Reading Geneformer's pickled dictionaries without ever running code from them.

The only place the package touches :mod:`pickle`: an unpickler that admits plain containers and
numpy scalars, and refuses anything else (a pickle can name any callable to run on load).
"""

from __future__ import annotations

import os
import pickle
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
        if (module, name) in self._allowed:
            if module.startswith("numpy"):
                import importlib

                return getattr(importlib.import_module(module), name)
            return getattr(__import__("builtins"), name)
        raise ArtifactError(
            f"refusing to unpickle {module}.{name}: only dicts of str/int/float and numpy scalars are "
            "allowed in dictionary pickles. The file may be malicious or not a Geneformer dictionary."
        )


def load_restricted_pickle(path: str | os.PathLike, what: str = "pickle") -> object:
    """Load a dictionary pickle (e.g. Geneformer's token/median dictionaries) without running code.

    The value is whatever the pickle holds (containers of str/int/float and numpy scalars): the
    caller checks its shape."""
    path = check_readable_file(path, what)
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle).load()
        except ArtifactError:
            raise
        except Exception as exc:  # truncated or corrupt pickles raise many exception types
            raise ArtifactError(f"{what} {path} could not be read ({type(exc).__name__}: {exc}); it may be truncated.") from exc
