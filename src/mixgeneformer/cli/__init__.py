"""``mixgf``: a thin command line over the :mod:`mixgeneformer` Python API.

Each pipeline stage registers its commands in its own module; :mod:`._main` assembles them and
turns errors into exit codes. Errors a user can fix
(:class:`~mixgeneformer.errors.MixGeneformerError`) print one clear message and exit with code 2;
``mixgf --debug ...`` shows the traceback instead.

Command modules import the library inside their command functions, on purpose: importing the user
APIs (torch, transformers, datasets, anndata) took 54 s of import time against 1.9 s for the CLI
itself on the shared 2-core CI machine (``python -X importtime``), so ``mixgf --help`` and each
command pay only for what they use. The library modules import at their tops.

This module imports nothing else at its top: the console script (``mixgf =
"mixgeneformer.cli:main"``) and ``python -m mixgeneformer`` import it outside any guard, so
:func:`main` imports the command line itself (numpy, pandas, typer, the command modules), where a
Ctrl-C ends as an interrupted command does ("interrupted", exit 130) instead of with a traceback.
``app`` and ``state`` are still attributes of this module (imported on first use).
"""

from __future__ import annotations

import sys

__all__ = ["app", "main"]


def _interrupted() -> None:
    print("interrupted", file=sys.stderr)  # the line _main.main prints for an interrupted command
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mixgf`` console script: imports the command line and runs it on ``argv``
    (default ``sys.argv[1:]``). A KeyboardInterrupt while importing it, or one that escapes the
    command line's own handling, exits 130 with one line."""
    try:
        from ._main import main as run

        run(argv)
    except KeyboardInterrupt:
        _interrupted()


def __getattr__(name: str) -> object:
    """``app`` and ``state`` of the command line, imported when first asked for."""
    if name in ("app", "state"):
        from . import _main

        return getattr(_main, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
