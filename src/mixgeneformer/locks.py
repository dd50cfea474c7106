"""Locks on outputs: one writer per output path, held for a whole command, and the repair of an
output folder whose replacement an interrupt cut short.

A lock is a hidden sibling file (``.NAME.lock``) holding the writer's pid, locked with ``flock``:
the kernel releases it when the process ends, however it ends. Re-exported by :mod:`fileio`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from .errors import ArtifactError

OUTPUT_MARKER = ".mixgf-output"
"""Written into every output folder; ``--overwrite`` replaces only folders that carry it."""

_HELD_LOCKS: dict[str, int] = {}


def moved_aside(target: str | os.PathLike) -> list[Path]:
    """The ``.NAME.old-XXXXXXXX`` siblings of ``target``: earlier outputs there that
    :func:`fileio.atomic_directory` moved aside to replace them (normally deleted at once)."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.old-[0-9a-f]{{8}}")
    try:
        return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:  # no parent folder (yet), or it cannot be listed
        return []


def temporary_sibling(target: str | os.PathLike, suffix: str = "") -> Path:
    """A new temporary path beside ``target`` for writing it: ``.NAME.tmp-<pid>-XXXXXXXX<suffix>``
    (the pid names the writer, so a later writer can tell a dead one's leftovers)."""
    target = Path(target)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the :func:`temporary_sibling` files and folders of ``target`` whose writer has ended
    without removing them (``kill -9``, a crash, a lost machine); returns them. Called under the
    output's lock, so no live writer of ``target`` can be using one (the pid check also spares an
    unlocked writer of this machine still running)."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[0-9a-f]{{8}}(\.h5ad)?")
    try:
        found = [(p, int(m.group(1))) for p in target.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except OSError:  # no parent folder (yet), or it cannot be listed
        return []
    removed = []
    for path, pid in found:
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def scratch_folder(kind: str | os.PathLike) -> Iterator[Path]:
    """A private scratch folder of this process beside ``kind`` (a path naming the kind of scratch, e.g.
    ``/tmp/mixgf-finetune-HOST``): a :func:`temporary_sibling` of it, mode 0700, removed on exit. The
    scratch folders of ``kind`` whose process has ended without removing them (``kill -9``) are removed
    first (:func:`remove_stale_temporaries`: only names of that exact pattern; a live process's never)."""
    remove_stale_temporaries(kind)
    scratch = temporary_sibling(kind)
    scratch.mkdir(mode=0o700)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def restore_moved_aside(target: str | os.PathLike) -> Path | None:
    """Repair what an interrupted overwrite of the folder ``target`` left (call under its lock).

    ``atomic_directory`` replaces a folder in three steps: rename the old one to ``.NAME.old-*``,
    rename the new one in, delete the old one (its :data:`OUTPUT_MARKER` first). An interrupt
    between the renames left no ``target``, only the old output under the hidden name: it is
    renamed back to ``target`` (with a warning) and returned. One that lost its marker was being
    deleted and is removed. A marked one beside an existing ``target`` (the new output was in
    place) is kept, with a warning naming it. Several marked ones and no ``target``: an error.
    """
    target = Path(target)
    marked = []
    for old in moved_aside(target):
        if old.is_symlink() or (old / OUTPUT_MARKER).is_file():
            marked.append(old)
        else:  # its deletion had begun (the marker goes first)
            shutil.rmtree(old, ignore_errors=True)
    if not marked:
        return None
    if target.exists() or target.is_symlink() or len(marked) > 1:
        names = ", ".join(str(p) for p in marked)
        if not (target.exists() or target.is_symlink()):
            raise ArtifactError(f"{target} is missing and interrupted overwrites left earlier outputs at {names}; "
                                f"rename the one you want back to {target} and delete the others.")
        warnings.warn(f"{target}: an interrupted overwrite left the output it replaced at {names}; delete it if you "
                      "do not need it.", UserWarning, stacklevel=3)
        return None
    os.replace(marked[0], target)
    warnings.warn(f"{target}: an earlier overwrite was interrupted after moving this output aside; it was restored "
                  f"from {marked[0].name}.", UserWarning, stacklevel=3)
    return target


@contextlib.contextmanager
def claim_outputs(check: Callable[[], object], *targets: str | os.PathLike | None) -> Iterator[None]:
    """Hold the lock of every output of a command for its whole run. ``check`` (the command's output
    rules) runs before the locks, so a refused output creates nothing, and again under them: another
    process may have written an output meanwhile. A second writer is refused (:func:`output_lock`).
    An output folder an interrupted overwrite left aside is restored first (:func:`restore_moved_aside`).
    Folders the locks created are removed again if the command fails and leaves them empty."""
    check()
    made = [p for t in targets if t is not None for p in Path(t).absolute().parents if not p.exists()]
    try:
        with contextlib.ExitStack() as stack:
            for target in targets:
                if target is not None:
                    stack.enter_context(output_lock(target))
                    restore_moved_aside(target)
            check()
            yield
    except BaseException:
        for folder in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file guarding writes to ``target`` (a hidden sibling)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` for as long as it is being written.

    A second process asking for the same lock gets an :class:`ArtifactError` naming the first
    one's pid. The lock is released when this process exits, however it ends (even ``kill -9``);
    re-entrant within a process. Without ``fcntl`` (Windows) no lock is taken. Once it holds the
    lock, what an ended writer of ``target`` left is removed (:func:`remove_stale_temporaries`).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = lock_path(target)
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, target, fcntl)
    _HELD_LOCKS[key] = fd
    try:
        # The pid only names the holder to a second writer: a full disk must not fail (or leak) the lock
        # itself; the command's own writes then report the disk.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_stale_temporaries(target)
        yield
    finally:
        del _HELD_LOCKS[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, target: str | os.PathLike, fcntl: ModuleType) -> int:
    """An open descriptor of the lock file ``path`` holding its ``flock``; ArtifactError when another
    process holds it. No descriptor is left open when this raises."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except BlockingIOError:
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise ArtifactError(
                f"{Path(target)} is being written by another process (pid {owner}); wait for it to finish or "
                f"choose another output path (lock: {path})."
            ) from None
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: retry
