"""Audit of the perturbation statistics and screening tables (perturb/stats.py, screen.py,
results.py and what engine.py / cli/perturb.py feed them).

Each test computes its expectation independently (scipy.stats.mannwhitneyu, scipy's
Benjamini-Hochberg) and fails on a fault the audit found.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from mixgeneformer.perturb import perturbation_statistics


def _table(groups: dict[str, list[float]], column: str = "shift") -> pd.DataFrame:
    rows = [{"cell": c, "perturbed": gene, "gene_token": 10 + int(gene[1:]), "gene_rank": 0, column: v}
            for gene, values in groups.items() for c, v in enumerate(values)]
    return pd.DataFrame(rows)


# -- a test whose values are all tied is p = 1 (scipy), and counts in the FDR ---------------------
def test_all_tied_scores_are_p_one_and_count_in_the_fdr():
    # G0 changes nothing in either run (every score exactly 0): a test made, with no evidence.
    test = _table({"G0": [0.0, 0.0, 0.0], "G1": [0.30, 0.32, 0.35, 0.31], "G2": [0.05, 0.20, 0.11]})
    null = _table({"G0": [0.0, 0.0], "G1": [0.01, 0.02, 0.00, 0.03], "G2": [0.04, 0.21, 0.10]})
    stats = perturbation_statistics(test, mode="vs_null", null=null).set_index("perturbed")
    expected = {}
    for gene in ("G0", "G1", "G2"):
        x = test.loc[test["perturbed"] == gene, "shift"]
        y = null.loc[null["perturbed"] == gene, "shift"]
        expected[gene] = scipy.stats.mannwhitneyu(x, y, method="asymptotic").pvalue
    assert expected["G0"] == 1.0
    for gene, p in expected.items():
        assert stats.at[gene, "p_value"] == pytest.approx(p, rel=1e-9)
    genes = list(expected)
    fdr = scipy.stats.false_discovery_control([expected[g] for g in genes])
    assert stats.loc[genes, "fdr"].to_numpy() == pytest.approx(fdr, rel=1e-9)
