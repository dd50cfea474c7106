"""Step bookkeeping of a demo folder: markers, resume, the output-folder guard."""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import changed_settings, from_dict, to_dict
from ..errors import ArtifactError, ConfigError
from ..fileio import check_output, read_json, write_json
from .config import _STEP_TITLES, DEMO_MARKER, DEMO_STEPS, DONE_MARKER, DemoConfig


@dataclass
class _Context:
    out_dir: Path
    config: DemoConfig
    progress: bool
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    record: list[dict[str, Any]] = field(default_factory=list)

    def step_dir(self, step: str) -> Path:
        return self.out_dir / step


def _banner(text: str) -> None:
    line = "=" * 78
    print(f"\n{line}\n{text}\n{line}", flush=True)


def _run_step(ctx: _Context, index: int, step: str, func: Callable[[_Context, Path], dict[str, Any]]) -> None:
    """Run one step unless its marker says it finished; record its results and timing."""
    folder = ctx.step_dir(step)
    marker = folder / DONE_MARKER
    title = f"[{index}/{len(DEMO_STEPS)}] {step}"
    if marker.exists():
        done = read_json(marker, f"{step} step marker")
        ctx.results[step] = done["result"]
        ctx.record.append({"step": step, "status": "resumed", "seconds": done["seconds"], "finished_at": done["finished_at"]})
        _banner(f"{title}: already finished in {done['seconds']:.1f}s (resumed from {marker})")
        return
    _banner(f"{title}: {_STEP_TITLES[step]}")
    if folder.exists() and step != "pretrain":  # a half-finished step starts over (pretrain resumes)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = func(ctx, folder)
    seconds = round(time.perf_counter() - started, 2)
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(marker, {"step": step, "seconds": seconds, "finished_at": finished, "result": result})
    ctx.results[step] = result
    ctx.record.append({"step": step, "status": "ran", "seconds": seconds, "finished_at": finished})
    print(f"{step}: done in {seconds:.1f}s", flush=True)


def _load_context(out_dir: Path) -> _Context:
    """Config and step results of a demo folder, from its markers."""
    demo = read_json(out_dir / DEMO_MARKER, "demo marker")
    ctx = _Context(out_dir=out_dir, config=from_dict(DemoConfig, demo["config"], "demo"), progress=False)
    for step in DEMO_STEPS:
        marker = out_dir / step / DONE_MARKER
        if not marker.exists():
            raise ArtifactError(f"demo step {step!r} has not finished in {out_dir} ({marker} missing); run the demo first.")
        done = read_json(marker, f"{step} step marker")
        ctx.results[step] = done["result"]
        ctx.record.append({"step": step, "status": "resumed", "seconds": done["seconds"], "finished_at": done["finished_at"]})
    return ctx


def _prepare_out_dir(out_dir: Path, config: DemoConfig, overwrite: bool) -> None:
    marker = out_dir / DEMO_MARKER
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--out {out_dir} is a file; the demo writes a folder. Choose another --out.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if overwrite:
            check_output(out_dir, overwrite=True, markers=(DEMO_MARKER,))
            shutil.rmtree(out_dir)
        elif not marker.exists():
            raise ArtifactError(
                f"{out_dir} exists and is not a demo output folder (no {DEMO_MARKER}); choose another --out: the demo "
                "replaces only its own output folders, even with --overwrite."
            )
        else:
            recorded = read_json(marker, "demo marker")
            if recorded.get("fingerprint") != config.fingerprint():
                changed = changed_settings(recorded.get("config") or {}, to_dict(config))
                shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:8]) or "its fingerprint"
                raise ConfigError(
                    f"{out_dir} holds a demo run with other options ({shown}); pass --overwrite "
                    "to start it over with the current options, or choose another --out."
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json(marker, {"fingerprint": config.fingerprint(), "config": to_dict(config)})
