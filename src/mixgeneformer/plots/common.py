"""What every figure shares: literal text, the atomic writer, category colours, class names, column picking."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import ConfigError
from ..fileio import atomic_file
from ..filekinds import figure_metadata

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def plain_text(value: object) -> str:
    """``value`` as literal figure text: matplotlib reads ``$...$`` as math (and fails on bad TeX)."""
    return str(value).replace("$", r"\$")


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (png, pdf, svg...)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"cannot save a figure as {path.name!r}: unknown format {fmt!r}; use one of "
                          f"{sorted(fig.canvas.get_supported_filetypes())}")
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=dpi, bbox_inches="tight", metadata=figure_metadata(fmt))
    return path


def _finish(fig: Figure, save: str | os.PathLike | None) -> Figure:
    if save is not None:
        save_figure(fig, save)
    return fig


def category_colours(n: int) -> list[tuple[float, ...]]:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, tab20 + tab20b + tab20c up to 60, else
    ``n`` evenly spaced hues of turbo (tab20 alone repeated from the 21st category: two types, one colour)."""
    if n <= 20:
        return [matplotlib.colormaps["tab10" if n <= 10 else "tab20"](i) for i in range(n)]
    if n <= 60:
        return [matplotlib.colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)][:n]
    return [tuple(c) for c in matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, n))]


def _class_names(values: ArrayLike) -> tuple[pd.Series, bool]:
    """Labels as strings (missing: <NA>) and whether they are all numbers. Numbers are compared as
    numbers: 1 and 1.0 (an int column, a float column holding NaN) are one class "1"; text stays text."""
    series = pd.Series(np.asarray(values).astype(object))
    missing = series.isna().to_numpy()
    if missing.all() or pd.api.types.infer_dtype(series, skipna=True) not in ("integer", "floating", "mixed-integer-float"):
        return series.astype("string"), False
    number = pd.to_numeric(series).to_numpy(np.float64, na_value=np.nan)
    whole = np.isfinite(number) & (np.abs(number) < 2**53) & (number == np.round(number))
    text = np.where(whole, np.where(whole, number, 0).astype(np.int64).astype(str), number.astype(str))
    return pd.Series(text, dtype="string").mask(missing), True


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ConfigError(f"{what} column {wanted!r} not in the results; columns: {list(columns)}")
        return wanted
    found = next((name for name in candidates if name in columns), None)
    if found is None and required:
        raise ConfigError(f"no {what} column found (looked for {list(candidates)}); pass {what}= one of {list(columns)}")
    return found
