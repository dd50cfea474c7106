"""Species-mixing scores: mixed embeddings score high, species-separated ones low (both backends)."""

from __future__ import annotations

import numpy as np
import pytest

from mixgeneformer import integration
from mixgeneformer.errors import InputDataError


def _embeddings(separate: bool, n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n)
    species = np.where(rng.integers(0, 2, n) == 1, "mouse", "human")
    x = rng.normal(size=(n, 8))
    x[:, 0] += 6.0 * types
    if separate:
        x[:, 1] += 6.0 * (species == "mouse")
    return x, species, types


def test_sklearn_species_asw_orders_mixed_above_separated():
    mixed = integration.species_asw_sklearn(*_embeddings(False))
    separated = integration.species_asw_sklearn(*_embeddings(True))
    assert mixed > 0.9 and separated < 0.8


def test_species_mixing_reports_its_backend_and_skips_nan_rows(monkeypatch):
    x, species, types = _embeddings(True)
    x[0] = np.nan
    monkeypatch.setattr(integration, "scib_available", lambda: False)
    out = integration.species_mixing(x, species, types)
    assert out["backend"] == "sklearn" and set(out) == {"species_asw", "backend"}
    assert out["species_asw"] == pytest.approx(integration.species_asw_sklearn(x[1:], species[1:], types[1:].astype(str)))
    with pytest.raises(InputDataError, match="same cells"):
        integration.species_mixing(x, species[:-1], types)


@pytest.mark.slow
@pytest.mark.skipif(not integration.scib_available(), reason="scib-metrics not installed (extra 'metrics')")
def test_scib_scores_agree_with_the_sklearn_silhouette():
    mixed, separated = _embeddings(False), _embeddings(True)
    a, b = integration.species_mixing(*mixed), integration.species_mixing(*separated)
    assert a["backend"] == "scib-metrics"
    assert a["species_asw"] == pytest.approx(integration.species_asw_sklearn(*mixed), abs=1e-4)
    assert a["ilisi"] > 0.7 > 0.2 > b["ilisi"]
    assert "kbet" not in a  # opt-in (slow)
