"""The ``mixgf`` command line proper: the Typer app with every command registered, and how its
errors end (see :mod:`mixgeneformer.cli`, whose ``main`` imports this module inside a guard).

Errors a user can fix (:class:`~mixgeneformer.errors.MixGeneformerError`) print one clear message
and exit with code 2; ``mixgf --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import signal
import sys
import threading

from ..errors import MixGeneformerError
from ..fileio import output_error

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

__all__ = ["app", "main", "state"]


def _click_exception_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage-error classes, abort classes) of every click the installed typer may raise.

    Older typer raises click's own exceptions; typer 0.29 raises those of a copy of click vendored
    as ``typer._click`` (and ``typer.exceptions.Abort``). All are caught, whichever is installed.
    """
    import importlib

    errors, aborts = [], []
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        errors.extend(c for c in (getattr(module, "ClickException", None),) if c is not None)
        aborts.extend(c for c in (getattr(module, "Abort", None),) if c is not None)
    return tuple(errors), tuple(aborts)


def _terminated(signum: int, frame: object) -> None:
    print("terminated", file=sys.stderr)
    raise SystemExit(128 + signum)


def _exit_on_sigterm() -> object:
    """SIGTERM (a scheduler's kill, ``timeout``) exits through Python, so every writer's cleanup runs
    and no temporary file is left; its default action ended the process on the spot. Pretraining
    installs its own handler (a checkpoint first). Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)


def main(argv: list[str] | None = None) -> None:
    """Run the ``mixgf`` command line on ``argv`` (default ``sys.argv[1:]``); :func:`mixgeneformer.cli.main`
    calls this once the command line is imported."""
    args = sys.argv[1:] if argv is None else argv
    state["debug"] = "--debug" in args
    previous = _exit_on_sigterm()
    try:
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:  # typer.Exit(n) comes back as n here
            if code == 130:  # typer turns a KeyboardInterrupt into Exit(130)
                print("interrupted", file=sys.stderr)
            sys.exit(code)
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
        usage_errors, aborts = _click_exception_classes()
        if isinstance(exc, usage_errors):
            exc.show()
            sys.exit(2)
        if isinstance(exc, aborts):  # an older click's KeyboardInterrupt (or EOF at a prompt)
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        # A write that failed because the disk is full or the folder is not writable (or a read of an unreadable file).
        filename = getattr(exc, "filename", None)  # without one, the disk to ask about is unknown: no guess
        error = output_error(filename or "the output", exc, guess=filename is not None) if isinstance(exc, OSError) else None
        if error is not None and not filename and isinstance(exc, PermissionError):  # read or write: unknown
            error = f"permission denied ({exc}) on a file this command reads or writes; check the permissions of its inputs and output."
        if error is None or state["debug"]:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
