"""Planted-truth fixture: shapes, real Ensembl IDs that map, markers and programs expressed as planted."""

from __future__ import annotations

import numpy as np
import pytest

from mixgeneformer.errors import ConfigError
from mixgeneformer.genes import map_gene_ids, one_to_one_orthologs
from mixgeneformer.simulate import PlantedConfig, simulate_planted

SMALL = dict(n_types=3, cells_per_type=40, n_shared_genes=120, n_specific_genes=30, program_size=12,
             specific_program_size=4, n_markers=3)


@pytest.fixture(scope="module")
def planted():
    return simulate_planted(PlantedConfig(**SMALL, seed=1))


def test_shapes_ids_and_orthologs(planted):
    truth = planted.truth
    for species, prefix in (("human", "ENSG"), ("mouse", "ENSMUSG")):
        adata = planted[species]
        assert adata.shape == (3 * 40, 120 + 30)
        assert adata.X.dtype == np.int32 and adata.X.min() >= 0
        assert adata.obs["cell_type"].value_counts().to_dict() == {t: 40 for t in truth.types}
        assert (adata.obs["species"] == species).all()
        ids = np.asarray(adata.var_names)
        assert all(i.startswith(prefix) for i in ids) and len(set(ids)) == ids.size
        mapping = map_gene_ids(ids)
        assert mapping.species == species and mapping.n_mapped == ids.size  # every ID is a shipped gene
    pairs = set(map(tuple, one_to_one_orthologs()[["human_id", "mouse_id"]].to_numpy()))
    simulated = list(map(tuple, truth.shared_pairs.to_numpy()))
    assert len(simulated) == 120 and set(simulated) <= pairs
    # The first 120 columns of both species are the same pairs in the same order.
    assert list(planted.human.var_names[:120]) == [h for h, _ in simulated]
    assert list(planted.mouse.var_names[:120]) == [m for _, m in simulated]
    shared_mouse = {m for _, m in simulated}
    assert not set(truth.specific_genes["mouse"]) & shared_mouse


def test_markers_and_programs_are_expressed_as_planted(planted):
    truth = planted.truth
    for species in ("human", "mouse"):
        adata = planted[species]
        x = np.asarray(adata.X.todense(), dtype=np.float64)
        x = x / x.sum(axis=1, keepdims=True)
        labels = adata.obs["cell_type"].to_numpy()
        column = {g: i for i, g in enumerate(adata.var_names)}
        for cell_type in truth.types:
            inside, outside = labels == cell_type, labels != cell_type
            markers = [column[g] for g in truth.markers[cell_type][species]]
            fold = x[inside][:, markers].mean(0) / x[outside][:, markers].mean(0)
            assert (fold > 4).all(), (species, cell_type, fold)  # planted 10x, noisy
            program = [column[g] for g in truth.programs[cell_type][species]]
            unrelated = outside & (labels != truth.siblings.get(cell_type))  # siblings share program genes
            program_fold = x[inside][:, program].mean(0) / x[unrelated][:, program].mean(0)
            assert np.median(program_fold) > 1.8
            assert not set(truth.markers[cell_type][species]) & set(truth.programs[cell_type][species])
    # Siblings (A, B), (C, ...): B repeats part of A's program, so A without its markers resembles B.
    assert truth.siblings == {"type_A": "type_B", "type_B": "type_A"}  # the third type has no sibling
    a, b = (set(truth.programs[t]["human"]) for t in ("type_A", "type_B"))
    c = set(truth.programs["type_C"]["human"])
    assert len(a & b) >= 6 > len(a & c)
    # Marker pairs are the same orthologs in both species and distinct across types.
    all_markers = [p for t in truth.types for p in truth.marker_pairs(t)]
    assert len(set(all_markers)) == len(all_markers) == 3 * 3
    assert set(all_markers) <= set(map(tuple, truth.shared_pairs.to_numpy()))


def test_seeded_and_validated():
    a = simulate_planted(PlantedConfig(**SMALL, seed=5))
    b = simulate_planted(PlantedConfig(**SMALL, seed=5))
    assert (a.human.X != b.human.X).nnz == 0 and a.truth.markers == b.truth.markers
    with pytest.raises(ConfigError, match="n_shared_genes"):
        PlantedConfig(n_types=10, n_markers=20, n_shared_genes=100)
    with pytest.raises(ConfigError, match="n_types"):
        PlantedConfig(n_types=1)
