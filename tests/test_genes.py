"""Gene identifier resolution (RELIABILITY 6-8)."""

from __future__ import annotations

import numpy as np
import pytest

from mixgeneformer import genes
from mixgeneformer.errors import GeneIdError


def test_versions_stripped_and_case_folded():
    mapping = genes.map_gene_ids(["ENSG00000000003.14", "ensg00000000005", "ENSG00000000419.2"], min_coverage=0)
    assert list(mapping.ensembl_ids) == ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]
    assert mapping.species == "human" and mapping.id_type == "ensembl"


def test_symbols_resolve_per_species_in_any_case():
    human = genes.map_gene_ids(["INS", "gcg", "sst", "NOTAGENE"], species="human", min_coverage=0)
    mouse = genes.map_gene_ids(["Ins2", "GCG", "sst", "NOTAGENE"], species="mouse", min_coverage=0)
    assert all(x.startswith("ENSG") for x in human.ensembl_ids[:3]) and human.ensembl_ids[3] == ""
    assert all(x.startswith("ENSMUSG") for x in mouse.ensembl_ids[:3]) and mouse.ensembl_ids[3] == ""
    assert "NOTAGENE" in human.unmapped


def test_species_detected_from_symbols_and_ids():
    assert genes.detect_species(["Ins1", "Ins2", "Gcg", "Sst", "Ppy", "Pdx1"]) == "mouse"
    assert genes.detect_species(["INS", "GCG", "SST", "PPY", "PDX1", "KRT19"]) == "human"
    assert genes.detect_species(["ENSMUSG00000035804", "ENSMUSG00000000028"]) == "mouse"


def test_wrong_species_is_an_error_with_the_fix():
    with pytest.raises(GeneIdError, match="species='mouse'"):
        genes.map_gene_ids(["ENSMUSG00000067377", "ENSMUSG00000031250"], species="human")


def test_mixed_species_ids_error_unless_allowed():
    ids = ["ENSMUSG00000067377", "ENSMUSG00000031250", "ENSG00000000003", "ENSG00000000005"]
    with pytest.raises(GeneIdError, match="mix species"):
        genes.map_gene_ids(ids)
    mapping = genes.map_gene_ids(ids, allow_mixed=True)
    assert mapping.n_mapped == 4


def test_unknown_prefix_and_mixed_id_types():
    with pytest.raises(GeneIdError, match="other than human"):
        genes.map_gene_ids(["ENSDARG00000000001", "ENSDARG00000000002"])
    with pytest.raises(GeneIdError, match="gene_column"):
        genes.map_gene_ids(["ENSG00000000003"] * 5 + ["INS"] * 5)


def test_low_coverage_asks_about_symbols_or_species():
    with pytest.raises(GeneIdError, match="other species"):
        genes.map_gene_ids(["INS", "FOO1", "FOO2", "FOO3", "FOO4", "FOO5"], species="human", min_coverage=0.5)


def test_coverage_report_counts():
    mapping = genes.map_gene_ids(["INS", "GCG", "NOTAGENE"], species="human", min_coverage=0)
    report = mapping.coverage_report(np.array([90.0, 5.0, 5.0]))
    assert "2/3 genes" in report and "95.0% of counts" in report


@pytest.mark.realdata
def test_baron_symbols_map_with_high_coverage(baron_data):
    import anndata as ad

    for name, species in [("human", "human"), ("mouse", "mouse")]:
        adata = ad.read_h5ad(baron_data / f"baron_pancreas_{name}.h5ad", backed="r")
        mapping = genes.map_gene_ids(adata.var_names)
        assert mapping.species == species
        assert mapping.fraction_mapped > 0.9


def test_orthologs_table():
    pairs = genes.one_to_one_orthologs()
    assert len(pairs) > 15_000
    assert pairs["human_id"].is_unique and pairs["mouse_id"].is_unique
    assert genes.symbols_of(["ENSG00000254647"])[0] == "INS"


def test_r_make_names_symbols_are_read_with_dashes():
    # R's make.names writes HLA-A as HLA.A (Baron human: 0.5% of counts on such names, mouse H2.K1 ...).
    human = genes.map_gene_ids(["HLA.A", "INS", "HLA.NOPE"], species="human")
    table = genes.gene_table("human").set_index("symbol")["ensembl_id"]
    assert human.ensembl_ids[0] == table["HLA-A"] and human.ensembl_ids[2] == ""
    assert human.n_dots_repaired == 1 and "'.' for '-'" in human.coverage_report()
    mouse = genes.map_gene_ids(["H2.K1", "Ins1", "Gcg"], species="mouse")
    assert mouse.ensembl_ids[0] == genes.gene_table("mouse").set_index("symbol")["ensembl_id"]["H2-K1"]
    # Where the file also has the dashed spelling, the dotted column is a different thing: left unmapped.
    both = genes.map_gene_ids(["HLA-A", "HLA.A", "INS"], species="human")
    assert both.ensembl_ids[1] == "" and both.n_dots_repaired == 0
