"""``mixgf``: a thin command line over the :mod:`mixgeneformer` Python API.

Each pipeline stage registers its commands in its own module. Errors a user can fix
(:class:`~mixgeneformer.errors.MixGeneformerError`) print one clear message and exit with code 2;
``mixgf --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import sys

from ..errors import MixGeneformerError

# Command modules: importing them registers their commands on ``app``.
from . import classify as _classify  # noqa: F401
from . import demo as _demo  # noqa: F401
from . import embed as _embed  # noqa: F401
from . import perturb as _perturb  # noqa: F401
from . import predict as _predict  # noqa: F401
from . import pretrain as _pretrain  # noqa: F401
from . import tokenize as _tokenize  # noqa: F401
from . import vocab as _vocab  # noqa: F401
from ._app import app, state

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mixgf`` console script."""
    args = sys.argv[1:] if argv is None else argv
    state["debug"] = "--debug" in args
    try:
        app(args=args, standalone_mode=False)
    except MixGeneformerError as exc:
        if state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise
