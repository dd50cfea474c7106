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


def test_shuffling_within_types_keeps_each_types_species_counts():
    species = np.array(["h", "h", "m", "m", "m", "h"])
    types = np.array(["a", "a", "a", "b", "b", "b"])
    out = integration.shuffled_within_types(species, types, seed=3)
    for t in ("a", "b"):
        assert sorted(out[types == t]) == sorted(species[types == t])


def test_sklearn_species_asw_orders_mixed_above_separated():
    mixed = integration.species_asw_sklearn(*_embeddings(False))
    separated = integration.species_asw_sklearn(*_embeddings(True))
    assert mixed > 0.9 and separated < 0.8


def test_species_mixing_reports_its_backend_and_skips_nan_rows(monkeypatch):
    x, species, types = _embeddings(True)
    x[0] = np.nan
    monkeypatch.setattr(integration, "scib_available", lambda: False)
    out = integration.species_mixing(x, species, types)
    assert out["backend"] == "sklearn" and set(out) == {"species_asw", "species_asw_shuffled", "backend"}
    assert out["species_asw_shuffled"] > 0.9 > out["species_asw"]  # separated species; shuffling mixes them
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
    assert b["ilisi_shuffled"] > 0.7 and b["species_asw_shuffled"] > b["species_asw"]
    assert "kbet" not in a  # opt-in (slow)


def test_cross_species_scores_per_type_agree_with_the_macro_f1(monkeypatch):
    """Per-type transfer F1 (model and count baseline) average to the macro-F1 the table reports."""
    from mixgeneformer.classify import canonical_labels
    from mixgeneformer.simulate import PlantedConfig, simulate_planted

    monkeypatch.setattr(integration, "scib_available", lambda: False)  # the mixing scores are tested above
    data = simulate_planted(PlantedConfig(n_types=4, cells_per_type=30, n_shared_genes=120, n_specific_genes=20,
                                          program_size=20, specific_program_size=5))
    label = "cell_type"
    rng = np.random.default_rng(0)
    types = sorted(set(data.human.obs[label].astype(str)))
    emb, rows = {}, {}
    for s in ("human", "mouse"):
        code = data[s].obs[label].astype(str).map({t: i for i, t in enumerate(types)}).to_numpy()
        code = np.where(code == 3, 2, code) if s == "mouse" else code  # mouse type 3 looks like type 2: a miss
        emb[s] = np.eye(len(types))[code] + 0.01 * rng.normal(size=(code.size, len(types)))
        rows[s] = np.arange(data[s].n_obs)
    out = integration.cross_species_scores(dict(human=data.human, mouse=data.mouse), emb, rows, label, per_type=True)
    for src, tgt in (("mouse", "human"), ("human", "mouse")):
        for prefix, macro in (("type_f1", "transfer_f1"), ("pca_type_f1", "pca_f1")):
            per_type = [out[f"{prefix}_{src}->{tgt}:{t}"] for t in canonical_labels(np.asarray(types))]
            assert np.mean(per_type) == pytest.approx(out[f"{macro}_{src}->{tgt}"])
        assert out[f"type_f1_{src}->{tgt}:type_d"] < 0.5  # the planted miss shows in its own type
    assert out["type_f1_human->mouse:type_a"] == pytest.approx(1.0)  # and not in the types told apart
    plain = integration.cross_species_scores(dict(human=data.human, mouse=data.mouse), emb, rows, label)
    assert not any("type_f1" in k for k in plain) and plain["transfer_f1_mouse->human"] == out["transfer_f1_mouse->human"]
