"""Atomic, verifiable training checkpoints.

A checkpoint is written into ``<run>/.staging/checkpoint-<step>``; when every file is on disk, a
``COMPLETE`` manifest (file names and sizes) is written **last**, and the folder is renamed to
``<run>/checkpoint-<step>``. A crash, a kill or a full disk at any point leaves either the old
checkpoints untouched plus a stale staging folder (removed at the next start), or a new, complete
checkpoint. Resume takes the newest checkpoint whose manifest matches the files on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import ArtifactError, ConfigError
from .fileio import check_not_input, check_output, content_hash

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STAGING = ".staging"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def staging_dir(run_dir: str | os.PathLike) -> Path:
    """The folder in which checkpoints are assembled before they are renamed into place."""
    return Path(run_dir) / STAGING


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_complete_marker(checkpoint: str | os.PathLike, step: int) -> Path:
    """Write the ``COMPLETE`` manifest (relative path -> size in bytes of every file) last."""
    checkpoint = Path(checkpoint)
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and path.name != COMPLETE:
            _fsync_file(path)  # on disk before the marker that vouches for it (a power cut keeps neither or both)
            files[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    marker = checkpoint / COMPLETE
    tmp = checkpoint / f".{COMPLETE}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as handle:
        json.dump({"step": int(step), "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, marker)
    _fsync_dir(checkpoint)
    return marker


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, or None when it is complete and intact."""
    checkpoint = Path(checkpoint)
    marker = checkpoint / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker (the save was interrupted)"
    try:
        manifest = json.loads(marker.read_text())
        files, step = manifest["files"], manifest["step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE} marker ({f'no {exc} entry' if isinstance(exc, KeyError) else exc})"
    if not isinstance(files, dict) or not all(type(v) is int for v in files.values()) or type(step) is not int:
        return f"unreadable {COMPLETE} marker (not this package's manifest: files {{name: bytes}} and an integer step)"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"file {name} listed in {COMPLETE} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"file {name} is {actual} bytes, {COMPLETE} says {size} (truncated or modified)"
    return None


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The optimizer step a complete checkpoint was saved at (from its ``COMPLETE`` manifest)."""
    return int(json.loads((Path(checkpoint) / COMPLETE).read_text())["step"])


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """All ``checkpoint-<step>`` folders of a run, oldest step first (complete or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint of ``run_dir``; damaged ones are logged and skipped.

    Raises
    ------
    ArtifactError
        When checkpoints exist but none of them is intact.
    """
    checkpoints = list_checkpoints(run_dir)
    problems = []
    for _step, path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
        problems.append(f"{path.name}: {problem}")
    if checkpoints:
        raise ArtifactError(
            f"no intact checkpoint to resume from in {run_dir} ({'; '.join(problems)}). "
            "Delete the damaged folders, or start again with --overwrite."
        )
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Check an explicitly named checkpoint folder; an incomplete one is an error."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"checkpoint folder not found: {path}.")
    if not (path / COMPLETE).exists():
        _refuse_no_checkpoint(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ArtifactError(f"checkpoint {path} cannot be resumed from: {problem}. Use an older checkpoint.")
    return path


def _refuse_no_checkpoint(path: Path) -> None:
    """A run folder or a model bundle named where a checkpoint is expected: say which checkpoint to pass."""
    run = path if list_checkpoints(path) else path.parent if list_checkpoints(path.parent) else None
    newest = f" (the newest: {list_checkpoints(run)[-1][1]})" if run is not None else ""
    if run == path:
        raise ArtifactError(f"--resume-from {path} is a pretraining run folder, not one of its checkpoints; pass a "
                            f"checkpoint folder{newest}, or continue the run with --resume and output_dir={path}.")
    if (path / "mixgf.json").exists() or (path / "config.json").exists():
        raise ArtifactError(f"--resume-from {path} is a model bundle, not a training checkpoint (it holds no optimizer "
                            f"or data-order state); pass a checkpoint-<step> folder of its run{newest}.")


def publish_checkpoint(staged: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Rename a complete staged checkpoint into ``run_dir`` (replacing one of the same step)."""
    staged = Path(staged)
    target = Path(run_dir) / staged.name
    if checkpoint_problem(staged) is not None:
        raise ArtifactError(f"refusing to publish incomplete checkpoint {staged}: {checkpoint_problem(staged)}.")
    if target.exists():
        trash = Path(run_dir) / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(staged, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, target)
    _fsync_dir(Path(run_dir))
    return target


def rotate_checkpoints(run_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (None or 0: keep all)."""
    if not keep:
        return []
    complete = [path for _step, path in list_checkpoints(run_dir) if checkpoint_problem(path) is None]
    removed = []
    for path in complete[: max(0, len(complete) - keep)]:
        # Rename first so that a crash mid-delete never leaves a half-deleted "complete" checkpoint.
        trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


def clean_stale(run_dir: str | os.PathLike) -> None:
    """Remove leftovers of interrupted saves (staging folder, renamed-away old checkpoints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    staging = staging_dir(run_dir)
    if staging.is_symlink() or staging.is_file():  # not ours to assemble in: the run folder is this package's
        staging.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    for child in sorted(run_dir.iterdir()):
        if child.name.startswith(".checkpoint-") and ".old-" in child.name:
            original = run_dir / child.name[1:].split(".old-")[0]
            # A crash between publish_checkpoint's two renames left a step with only its moved-aside copy:
            # restored, not deleted (a rotation's copy comes back too, and the next rotation removes it).
            if not original.exists() and checkpoint_problem(child) is None:
                os.replace(child, original)
            else:
                shutil.rmtree(child, ignore_errors=True)


def plan_run_dir(
    run_dir: Path, resume: bool, overwrite: bool, resume_from: Path | None, inputs: list[Path | None] | tuple = ()
) -> tuple[str, Path | None]:
    """Decide fresh / overwrite / resume without writing anything (every rank computes the same).

    No mode writes into a folder that is or holds one of the run's ``inputs``; ``--overwrite``
    replaces only a mixgeneformer output (:func:`fileio.check_output`), ``--resume`` without a
    checkpoint only a pretraining run folder stopped before its first checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"output_dir {run_dir} is a file; a run needs a folder. Choose another output_dir.")
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it; pass one of them.")
    check_previous_run_dir(run_dir)
    # every mode, a new run folder too (inside a corpus it would write checkpoints into that input); even
    # to resume: the run writes its config.yaml there
    check_not_input(run_dir, inputs, "output_dir")
    occupied = run_dir.exists() and any(p.name != STAGING for p in run_dir.iterdir())
    if resume_from is not None:
        return _plan_resume_from(run_dir, overwrite, resolve_checkpoint(resume_from), occupied, inputs)
    if resume:
        checkpoint = latest_complete_checkpoint(run_dir)
        if checkpoint is not None:
            return "resume", checkpoint
        if not occupied:
            logger.warning("--resume: no run in %s yet; starting a fresh run there", run_dir)
            return "fresh", None
        # a run stopped before its first checkpoint (its environment.json written) starts over; anything else,
        # even another mixgeneformer output, is refused: --resume never replaces what --overwrite would
        if not (run_dir / "environment.json").is_file():
            raise ArtifactError(
                f"--resume: {run_dir} holds no checkpoint to resume from, and a new run cannot start there: it is not a "
                "pretraining run folder (no environment.json). Choose another output_dir."
            )
        try:
            check_output(run_dir, inputs, overwrite=True, option="output_dir")
        except ArtifactError as exc:
            raise ArtifactError(f"--resume: {run_dir} holds no checkpoint to resume from, and a new run cannot start there: {exc}") from exc
        logger.warning("--resume: %s holds no complete checkpoint; starting over from step 0", run_dir)
        return "overwrite", None
    if occupied:
        if overwrite:
            check_output(run_dir, inputs, overwrite=True, option="output_dir")
            return "overwrite", None
        raise ArtifactError(
            f"run folder {run_dir} already exists. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another output_dir."
        )
    return "fresh", None


def _fingerprint(checkpoint: Path) -> str:
    """What tells two checkpoints of one name apart: their manifest (files, sizes, step) and training
    state (the logged losses of the run that saved it)."""
    parts = [checkpoint / COMPLETE, checkpoint / "trainer_state.json"]
    return content_hash(*(path.read_bytes() if path.is_file() else b"" for path in parts))


def check_ranks_agree(run_dir: Path, mode: str, checkpoint: Path | None) -> None:
    """Every process of a multi-process run must have planned the same start (:func:`plan_run_dir`): the
    same checkpoint (its name and contents), or none. A node that sees another ``output_dir`` (a local disk
    on a multi-node run: rank 0's checkpoints are not there, or an earlier run's of the same name are) would
    start over, or from other weights, optimizer state and data position, while rank 0 resumes, training on
    out of step until a collective hangs. Called once the process group exists and before rank 0 writes
    anything; one :class:`ArtifactError` on every rank otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    plans: list = [None] * dist.get_world_size()
    own = (checkpoint.name, _fingerprint(checkpoint)) if checkpoint is not None else (None, None)
    dist.all_gather_object(plans, (mode, *own))
    other = next((rank for rank, plan in enumerate(plans) if plan[1:] != plans[0][1:]), None)  # fresh = overwrite: step 0
    if other is not None:
        def said(plan):
            return f"to resume from {plan[1]}" if plan[1] else "to start at step 0"
        same_name = plans[other][1] is not None and plans[other][1] == plans[0][1]
        contents = " with other contents (another run's)" if same_name else ""
        raise ArtifactError(
            f"the processes of this run see different run folders at {run_dir}: rank 0 plans {said(plans[0])}, "
            f"rank {other} {said(plans[other])}{contents}. "
            "Every node must see the same output_dir: put it on a filesystem that all nodes share (checkpoints are "
            "written by rank 0 only)."
        )


def _plan_resume_from(
    run_dir: Path, overwrite: bool, checkpoint: Path, occupied: bool, inputs: list[Path | None] | tuple
) -> tuple[str, Path]:
    """``--resume-from``: continue the run in ``run_dir`` from one of its own checkpoints (none newer may
    be left: a later ``--resume`` would take them, and rotation would keep them over the new ones), or
    start ``run_dir`` from another run's checkpoint (an occupied ``run_dir`` only with ``--overwrite``)."""
    if checkpoint.resolve().parent == run_dir.resolve():
        if overwrite:
            raise ConfigError(f"--overwrite would set aside {run_dir}, which holds the checkpoint --resume-from names "
                              f"({checkpoint.name}); pass one of them.")
        step = checkpoint_step(checkpoint)
        newer = [path.name for later, path in list_checkpoints(run_dir) if later > step and checkpoint_problem(path) is None]
        if newer:
            raise ArtifactError(
                f"--resume-from {checkpoint.name}: {run_dir} holds newer checkpoints ({', '.join(newer)}) of the run "
                "continued after it; a later --resume would take them, and checkpoint.keep would delete the new run's "
                f"checkpoints before them. Delete them to continue from {checkpoint.name} here, or resume into another "
                "output_dir."
            )
        return "resume", checkpoint
    check_not_input(run_dir, [checkpoint], "output_dir")  # no run folder inside the checkpoint it reads
    if not occupied:
        return "resume", checkpoint
    if not overwrite:
        raise ArtifactError(
            f"output_dir {run_dir} already exists and --resume-from names a checkpoint of another run ({checkpoint}). "
            "Pass --overwrite to replace it, or choose another output_dir."
        )
    check_output(run_dir, inputs, overwrite=True, option="output_dir")
    return "overwrite", checkpoint


def previous_run_dir(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces until the new one has finished."""
    return run_dir.parent / f".{run_dir.name}.replaced"


_REPLACES = ".replaces"  # in a run folder: this run set the previous one aside (drop it when finished)


def check_previous_run_dir(run_dir: Path) -> None:
    """Refuse a file where ``--overwrite`` keeps the replaced run (every rank checks; nothing written)."""
    kept = previous_run_dir(run_dir)
    if kept.exists() and not kept.is_dir():
        raise ArtifactError(f"{kept} is a file, where --overwrite keeps the run it replaces until the new one has "
                            "finished; move or delete it, then rerun.")


def set_aside_previous_run(run_dir: Path) -> None:
    """``--overwrite``: move the previous run beside (not delete it), so a crash or kill of the new
    run loses neither; :func:`drop_previous_run` removes it once the new run has finished."""
    kept = previous_run_dir(run_dir)
    if kept.exists():  # an earlier --overwrite never finished: run_dir holds its partial run, kept the one before
        shutil.rmtree(run_dir)
    else:
        run_dir.rename(kept)
    run_dir.mkdir(parents=True)
    (run_dir / _REPLACES).write_text(str(kept))
    logger.warning("the run being replaced is kept in %s until this one has finished", kept)


def drop_previous_run(run_dir: Path) -> None:
    """Remove the run ``--overwrite`` replaced, now that the run that replaces it has finished (only
    that run: a fresh run in the folder leaves a kept run alone)."""
    marker = run_dir / _REPLACES
    if not marker.is_file():
        return
    kept = previous_run_dir(run_dir)
    if kept.is_dir():
        shutil.rmtree(kept)
        logger.info("removed the replaced run %s", kept)
    marker.unlink()
