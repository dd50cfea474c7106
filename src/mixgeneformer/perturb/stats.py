"""Statistics of in silico perturbation results: which genes move cells, with what confidence.

Per perturbed gene (or gene set), :func:`perturbation_statistics` summarises the per-cell scores
of :func:`mixgeneformer.perturb.perturb_cells` and tests them: the Wilcoxon rank-sum
(Mann–Whitney U, normal approximation with tie and continuity correction, as
``scipy.stats.mannwhitneyu``, vectorised over all genes at once) of a gene's scores against all
perturbations' scores (``vs_all``) or against the same gene's scores in a second, null run
(``vs_null``), with Benjamini–Hochberg FDR over the perturbations tested; or just means and counts
(``aggregate``). A NaN score (e.g. ``cell_emb`` of a variant that leaves no unperturbed gene to
compare) is left out of the tests and means, as Geneformer's ``nan_policy="omit"``. A screen's
table (``mode="screen"``) holds exact scores for each cell's top genes and first-order estimates
for all: its statistics test the estimates and name every column ``*_estimate`` or ``*_exact``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy.stats import norm

from ..errors import ConfigError, InputDataError
from ..genes import symbols_of

if TYPE_CHECKING:
    from ..vocab import Vocabulary

StatsMode = Literal["vs_all", "vs_null", "aggregate"]

#: FDR below which a perturbation counts as significant (the ``significant`` column; the order of the table).
FDR_ALPHA = 0.05

_logger = logging.getLogger(__name__)

__all__ = ["StatsMode", "benjamini_hochberg", "gene_names", "perturbation_statistics", "run_statistics"]


def gene_names(token_ids: np.ndarray, vocab: Vocabulary) -> pd.DataFrame:
    """Ensembl ID(s) and symbol(s) of gene tokens (``"a|b"`` for a shared ortholog token).

    Returns a DataFrame with columns ``ensembl_id`` and ``symbol`` aligned with ``token_ids``.
    """

    token_ids = np.asarray(token_ids, dtype=np.int64)
    unique, inverse = np.unique(token_ids, return_inverse=True)
    ids = ["|".join(vocab.token_genes[t]) if 0 <= t < len(vocab) else "" for t in unique.tolist()]
    flat = [g for t in unique.tolist() if 0 <= t < len(vocab) for g in vocab.token_genes[t]]
    symbol_of = dict(zip(flat, symbols_of(flat).tolist(), strict=True)) if flat else {}
    symbols = [
        "|".join(s for s in (symbol_of.get(g, "") for g in vocab.token_genes[t]) if s) if 0 <= t < len(vocab) else ""
        for t in unique.tolist()
    ]
    return pd.DataFrame(
        {"ensembl_id": np.asarray(ids, dtype=object)[inverse], "symbol": np.asarray(symbols, dtype=object)[inverse]}
    )


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (FDR); NaNs stay NaN and are not counted; a value
    outside [0, 1] (or infinite) is an :class:`InputDataError`."""
    p = np.asarray(p_values, dtype=np.float64)
    bad = np.flatnonzero(~np.isnan(p) & ~((p >= 0.0) & (p <= 1.0)))
    if len(bad):  # scipy.stats.false_discovery_control refuses these too; a q-value from them means nothing
        raise InputDataError(f"benjamini_hochberg: {len(bad)} p-value(s) outside [0, 1] (first: {p[bad[0]]!r} at "
                             f"position {bad[0]}); pass p-values (NaN marks an untested one)")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def _mwu_p(u1: np.ndarray, n1: np.ndarray, n2: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Two-sided asymptotic Mann–Whitney p-value with tie and continuity correction (scipy's)."""

    n1 = n1.astype(np.float64)
    n2 = n2.astype(np.float64)
    n = n1 + n2
    mu = n1 * n2 / 2.0
    big = np.maximum(u1, n1 * n2 - u1)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))
        z = (big - mu - 0.5) / np.sqrt(var)
        p = np.clip(2.0 * norm.sf(z), 0.0, 1.0)
    # Every value tied (zero variance): no evidence of a difference, p = 1 as scipy gives; it is a
    # test made, so it counts in the FDR (NaN would leave it out and lower the other genes' FDR).
    p[~(var > 0)] = 1.0
    p[(n1 == 0) | (n2 == 0)] = np.nan  # nothing to test
    return p


def _tie_term(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return counts**3 - counts


def _mwu_vs_all(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """p-value of each group's values against all values (the group included), vectorized."""
    pool = np.sort(values)
    n2 = len(pool)
    left = np.searchsorted(pool, values, "left")
    right = np.searchsorted(pool, values, "right")
    u1 = np.bincount(codes, weights=left + 0.5 * (right - left), minlength=n_groups)
    n1 = np.bincount(codes, minlength=n_groups)
    _, pool_counts = np.unique(pool, return_counts=True)
    base_ties = _tie_term(pool_counts).sum()
    # Ties of the combined sample: values of the group add to the pool's tie blocks.
    key = pd.DataFrame({"g": codes, "v": values, "a": right - left})
    per = key.groupby(["g", "v"], sort=False).agg(b=("a", "size"), a=("a", "first"))
    a = per["a"].to_numpy(np.float64)
    b = per["b"].to_numpy(np.float64)
    extra = np.bincount(
        per.index.get_level_values("g").to_numpy(), weights=_tie_term(a + b) - _tie_term(a), minlength=n_groups
    )
    return _mwu_p(u1, n1, np.full(n_groups, n2), base_ties + extra)


def _mwu_paired_groups(x: np.ndarray, x_codes: np.ndarray, y: np.ndarray, y_codes: np.ndarray, n_groups: int) -> np.ndarray:
    """p-value per group of that group's x values against the same group's y values."""
    frame = pd.DataFrame(
        {"g": np.concatenate([x_codes, y_codes]), "v": np.concatenate([x, y]),
         "is_x": np.concatenate([np.ones(len(x), bool), np.zeros(len(y), bool)])}
    )
    frame["rank"] = frame.groupby("g")["v"].rank(method="average")
    n1 = np.bincount(x_codes, minlength=n_groups)
    n2 = np.bincount(y_codes, minlength=n_groups)
    r1 = np.bincount(frame["g"].to_numpy()[frame["is_x"].to_numpy()], weights=frame["rank"].to_numpy()[frame["is_x"].to_numpy()], minlength=n_groups)
    u1 = r1 - n1 * (n1 + 1) / 2.0
    sizes = frame.groupby(["g", "v"], sort=False).size()
    ties = np.bincount(sizes.index.get_level_values("g").to_numpy(), weights=_tie_term(sizes.to_numpy()), minlength=n_groups)
    return _mwu_p(u1, n1, n2, ties)


def _is_score_column(column: str) -> bool:
    """Whether a cell-table column holds a perturbation score (its per-gene mean is reported)."""
    base = column.removesuffix("_estimate").removesuffix("_exact")
    return base in ("shift", "cell_emb") or base.endswith("_shift") or base.startswith("alt_shift:")


def _check_keys(cells: pd.DataFrame, what: str, keys: tuple[str, ...] = ("cell", "perturbed", "gene_token")) -> None:
    missing = [c for c in keys if c not in cells.columns]
    if missing:
        raise InputDataError(f"{what} has no {missing} column(s) (columns: {list(cells.columns)}); pass the cell "
                             "table of a perturbation run (PerturbationResult.cells, or a run folder's cells.parquet)")


def _check_score_values(cells: pd.DataFrame, score: str, what: str) -> None:
    """A numeric score column without infinite values (NaN is allowed: not scored)."""
    column = cells[score]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise ConfigError(f"score column {score!r} of {what} holds {column.dtype} values; test a numeric score column")
    infinite = np.flatnonzero(np.isinf(column.to_numpy(np.float64)))
    if len(infinite):
        first = cells.iloc[infinite[0]]
        raise InputDataError(f"score column {score!r} of {what} has {len(infinite)} infinite value(s) (first: "
                             f"{first['perturbed']}, cell {first.get('cell', '?')}); a perturbation score is finite, so the table is "
                             "damaged or not a perturbation run's: rerun the perturbation")


def _screen_view(cells: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """A screen's table (an ``exact`` flag and ``<score>_estimate`` columns) with each exactly
    re-scored column renamed ``<score>_exact`` and NaN where a row holds only the estimate (tables
    written before kept the estimate there), so no statistic mixes the two; (table, is a screen)."""
    bases = [c.removesuffix("_estimate") for c in cells.columns
             if c.endswith("_estimate") and c.removesuffix("_estimate") in cells.columns]
    if "exact" not in cells.columns or not bases:
        return cells, False
    exact = cells["exact"].astype("boolean").fillna(False).to_numpy(bool)
    view = cells.assign(exact=exact, **{base: cells[base].where(exact) for base in bases})
    return view.rename(columns={base: f"{base}_exact" for base in bases}), True


def _score_column(cells: pd.DataFrame, score: str | None, screen: bool) -> str:
    """The column tested: by default ``goal_shift`` when a goal was given, else ``shift`` — in a
    screen, their first-order ``*_estimate`` (every gene of every cell measured the same way);
    a screen's exact score (``score="goal_shift"``) tests its exactly re-scored rows only."""
    if score is None:
        score = "goal_shift" if {"goal_shift", "goal_shift_exact"} & set(cells.columns) else "shift"
        return f"{score}_estimate" if screen else score
    return f"{score}_exact" if screen and f"{score}_exact" in cells.columns else score


def _null_view(null: pd.DataFrame, screen: bool, score: str) -> pd.DataFrame:
    """The null run's table, as :func:`_screen_view`; refused if it cannot be compared with the run."""
    _check_keys(null, "the null table", ("perturbed", "gene_token"))
    null, null_screen = _screen_view(null)
    if null_screen != screen:
        kinds = {True: "a screen (mode='screen': first-order estimates)", False: "exact (mode='exact')"}
        raise ConfigError(f"the null run is {kinds[null_screen]} and this run is {kinds[screen]}: the test would compare "
                          "estimates with exact scores. Run the null with the same mode (CLI: --mode)")
    if score not in null.columns:
        raise ConfigError(f"the null table has no {score!r} column; run the null with the same options and states")
    _check_score_values(null, score, "the null table")
    return null


# long: a 24-line docstring; one vectorized table per statistics mode.
def perturbation_statistics(
    cells: pd.DataFrame,
    vocab: Vocabulary | None = None,
    mode: StatsMode = "vs_all",
    null: pd.DataFrame | None = None,
    score: str | None = None,
) -> pd.DataFrame:
    """Per-perturbation summary and test of a :func:`perturb_cells` table.

    Parameters
    ----------
    cells
        The per-(cell, perturbation) table (``PerturbationResult.cells``).
    vocab
        Adds ``ensembl_id`` and ``symbol`` columns when given.
    mode
        ``"vs_all"``: Wilcoxon rank-sum of each gene's scores against all perturbations' scores;
        ``"vs_null"``: against the same gene's scores in ``null`` (a second run, e.g. on cells of
        another state or with a random model); ``"aggregate"``: means and counts only.
    null
        The null run's cell table (``vs_null`` only).
    score
        Column tested: default ``goal_shift`` when present, else ``shift``. In a screen's table
        (``mode="screen"``: an ``exact`` flag and ``*_estimate`` columns) the default is their
        first-order estimate (``goal_shift_estimate`` / ``shift_estimate``: every gene of every cell
        measured the same way); ``score="goal_shift"`` there tests only the exactly re-scored rows
        (each cell's top genes by the estimate), as ``goal_shift_exact``. No test mixes the two.

    Returns
    -------
    pandas.DataFrame
        One row per perturbed gene (or gene set): ``perturbed``, ``gene_token``, ``ensembl_id``,
        ``symbol``, ``n_cells``, ``n_scored`` (finite scores tested and averaged: a NaN score is
        left out), ``mean_shift``, ``mean_goal_shift`` (and other means; a screen's table has
        ``n_exact`` and ``mean_<score>_exact`` over the exactly re-scored rows only, and
        ``mean_<score>_estimate`` over every row), and for
        the tests ``p_value``, ``fdr`` (Benjamini–Hochberg) and ``significant`` (``fdr <
        FDR_ALPHA``); ``vs_null`` adds ``null_mean_<score>`` and ``mean_<score>_vs_null`` (the
        difference). Sorted as Geneformer's goal-state statistics: significant rows first, each
        group by the mean score descending (toward the goal first; ``vs_null``: by the difference
        from the null), then by FDR; without a test, by the mean score.
    """
    if mode not in ("vs_all", "vs_null", "aggregate"):
        raise ConfigError(f"mode={mode!r}; use 'vs_all', 'vs_null' or 'aggregate'")
    if mode == "vs_null" and null is None:
        raise ConfigError("mode='vs_null' needs the null run's table (null=..., CLI: --null DIR)")
    _check_keys(cells, "the perturbation table")
    cells, screen = _screen_view(cells)
    score = _score_column(cells, score, screen)
    if score not in cells.columns:
        raise ConfigError(f"score column {score!r} is not in the table (columns: {list(cells.columns)})")
    if cells.empty:
        raise InputDataError("the perturbation table is empty: no cell expressed the perturbed genes")
    value_cols = [c for c in cells.columns if _is_score_column(c)]
    if score not in value_cols:  # any numeric column may be tested; its mean ranks the table
        value_cols.append(score)
    _check_score_values(cells, score, "the perturbation table")
    keys = pd.MultiIndex.from_frame(cells[["perturbed", "gene_token"]])
    codes, uniques = pd.factorize(keys, sort=True)
    groups = cells.groupby(codes, sort=True)
    table = pd.DataFrame(
        {
            "perturbed": [u[0] for u in uniques],
            "gene_token": np.asarray([u[1] for u in uniques], dtype=np.int64),
            "n_cells": groups["cell"].nunique().to_numpy(),
        }
    )
    for col in value_cols:
        table["mean_" + col] = groups[col].mean().to_numpy()
    table["n_scored"] = groups[score].count().to_numpy()  # finite scores: those tested and averaged
    if screen:  # rows re-scored exactly (their *_exact values); every row has its *_estimate
        table["n_exact"] = groups["exact"].sum().to_numpy().astype(np.int64)
    values = cells[score].to_numpy(np.float64)
    if mode == "vs_all" and len(uniques) < 2:
        raise ConfigError(
            f"mode='vs_all' tests each perturbation against all of them, and this table has one ({uniques[0][0]}); "
            "use mode='aggregate', or 'vs_null' with a null run (CLI: --stats)"
        )
    scored = np.isfinite(values)  # a NaN score (no gene left to compare) is left out of the tests, not ranked
    if mode == "vs_all":
        table["p_value"] = _mwu_vs_all(values[scored], codes[scored], len(uniques))
    elif mode == "vs_null":
        null = _null_view(null, screen, score)
        null_index = pd.MultiIndex.from_frame(null[["perturbed", "gene_token"]])
        null_codes = pd.Index(uniques).get_indexer(null_index)
        null_values = null[score].to_numpy(np.float64)
        keep = (null_codes >= 0) & np.isfinite(null_values)
        table["p_value"] = _mwu_paired_groups(
            values[scored], codes[scored], null_values[keep], null_codes[keep], len(uniques)
        )
        table["n_null"] = np.bincount(null_codes[keep], minlength=len(uniques))
        null_mean = pd.Series(null[score].to_numpy()[keep]).groupby(null_codes[keep]).mean()
        table["null_mean_" + score] = null_mean.reindex(range(len(uniques))).to_numpy()
        # what the test measures: the shift beyond the null's (a gene moving cells as much in the null
        # run is not ranked first); Geneformer's vs-null ranking uses the same difference
        table[f"mean_{score}_vs_null"] = table["mean_" + score] - table["null_mean_" + score]
    if mode != "aggregate":
        table["fdr"] = benjamini_hochberg(table["p_value"].to_numpy())
    if vocab is not None:
        names = gene_names(np.where(table["gene_token"] >= 0, table["gene_token"], 0), vocab)
        set_rows = table["gene_token"].to_numpy() < 0
        names.loc[set_rows, ["ensembl_id", "symbol"]] = ""
        if "anchor_token" in cells.columns:  # a pair row is named "anchor+partner", like its label
            anchors = groups["anchor_token"].first().to_numpy()
            paired = anchors >= 0
            anchor_names = gene_names(np.where(paired, anchors, 0), vocab)
            for column in ("ensembl_id", "symbol"):
                names.loc[paired, column] = anchor_names.loc[paired, column] + "+" + names.loc[paired, column]
        table.insert(2, "ensembl_id", names["ensembl_id"].to_numpy())
        table.insert(3, "symbol", names["symbol"].to_numpy())
    if "fdr" in table.columns:
        # Geneformer's order: the significant perturbations first, each group by its mean score
        # (the shift toward the goal: genes that move cells away from it come last), then by FDR.
        table.insert(table.columns.get_loc("fdr") + 1, "significant", table["fdr"].to_numpy() < FDR_ALPHA)
        ranked_by = f"mean_{score}_vs_null" if mode == "vs_null" else "mean_" + score
        sort_cols, ascending = ["significant", ranked_by, "fdr"], [False, False, True]
    else:
        sort_cols, ascending = ["mean_" + score], [False]
    table = table.sort_values(sort_cols, ascending=ascending, kind="stable", na_position="last")
    table.attrs["score"] = score
    table.attrs["screen"] = screen
    table.attrs["mode"] = mode
    return table.reset_index(drop=True)


def run_statistics(
    cells: pd.DataFrame,
    vocab: Vocabulary | None = None,
    mode: StatsMode = "vs_all",
    null: pd.DataFrame | None = None,
    score: str | None = None,
) -> pd.DataFrame:
    """:func:`perturbation_statistics` of a finished run. ``vs_all`` on a table that holds a single
    perturbation (e.g. only one of the listed genes is expressed by any cell) cannot test it: the
    run is not lost, its table is the ``aggregate`` one, with a warning and ``attrs["requested"]``
    / ``attrs["note"]`` saying why (:func:`write_results` records them in ``summary.json``)."""
    if mode == "vs_all" and "perturbed" in cells.columns and cells["perturbed"].nunique() == 1:
        note = (f"mode='vs_all' needs two perturbations and this run scored one ({cells['perturbed'].iloc[0]}); "
                "its statistics are 'aggregate' (means and counts, no test)")
        _logger.warning(note)
        table = perturbation_statistics(cells, vocab, mode="aggregate", score=score)
        table.attrs.update(requested=mode, note=note)
        return table
    return perturbation_statistics(cells, vocab, mode=mode, null=null, score=score)
