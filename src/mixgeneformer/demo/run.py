"""Running the whole demo."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..devices import resolve_device
from ..errors import check_config
from ..fileio import check_writable, output_lock
from .config import DEMO_STEPS, DemoConfig
from .context import _banner, _Context, _prepare_out_dir, _run_step
from .report import write_report
from .steps import _STEP_FUNCS


def run_demo(
    out_dir: str | os.PathLike = "demo_output",
    config: DemoConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the whole demo and write its report; return the path of ``report/report.md``.

    Parameters
    ----------
    out_dir
        Output folder. An existing demo folder made with the same options is resumed: finished
        steps are skipped.
    config
        Sizes and options (default :class:`DemoConfig`; :meth:`DemoConfig.quick_config` for CI).
    overwrite
        Delete ``out_dir`` first and run every step again.
    progress
        Show the stages' progress bars.

    Raises
    ------
    ConfigError
        ``out_dir`` holds a demo made with other options (pass ``overwrite=True``).
    ArtifactError
        ``out_dir`` exists and is not a demo folder, or an input is missing.
    """
    check_config(config, DemoConfig)
    config = config or DemoConfig()
    resolve_device(config.device)  # an unknown or absent device is refused before any step runs
    out_dir = Path(out_dir).resolve()
    # writable and no input (--overwrite would delete the demo's data), before the lock creates anything beside it
    check_writable(out_dir, [config.data_dir], "--out")
    with output_lock(out_dir):  # a second demo on this folder meanwhile is refused
        _prepare_out_dir(out_dir, config, overwrite)
        ctx = _Context(out_dir=out_dir, config=config, progress=progress)
        started = time.perf_counter()
        mode = "quick" if config.quick else "full"
        _banner(f"Mix-Geneformer demo ({mode}) → {out_dir}")
        for index, step in enumerate(DEMO_STEPS, start=1):
            _run_step(ctx, index, step, _STEP_FUNCS[step])
        wall = round(time.perf_counter() - started, 2)
        _banner("report")
        report = write_report(out_dir, ctx.record, wall)
    print(f"\nreport: {report}\nwall time of this run: {wall:.1f}s", flush=True)
    return report
