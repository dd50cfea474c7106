"""Audit of gene-ID mapping, vocabulary building and corpus medians: each test is a fault found
(silent results, tracebacks instead of one message) and stays as its regression test."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from _tokenize_helpers import cli_exit_code

from mixgeneformer.errors import ArtifactError, GeneIdError, InputDataError
from mixgeneformer.genes import gene_table
from mixgeneformer.medians import GeneMedians, MedianAccumulator
from mixgeneformer.vocab import Vocabulary, build_vocabulary, import_geneformer

RETIRED = "ENSG00000999999"  # an Ensembl ID the shipped GENCODE table lacks (like Geneformer's retired IDs)


# ------------------------------------------------------------- a corrupt vocabulary JSON
@pytest.mark.parametrize(
    "body",
    [
        {"hash": "x"},  # no tokens / gene_to_id / mode
        {"tokens": ["<pad>", "<mask>", "A"], "gene_to_id": {"A": "two"}, "mode": "separate", "hash": "x"},
        {"tokens": "<pad><mask>", "gene_to_id": [], "mode": "separate", "hash": "x"},
    ],
)
def test_corrupt_vocabulary_json_is_one_message_not_a_traceback(tmp_path, capsys, body):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"format": "mixgeneformer-vocabulary", **body}))
    with pytest.raises(ArtifactError, match="vocab.json"):
        Vocabulary.load(path)
    code, err = cli_exit_code(["vocab", "info", path]), capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "mixgf vocab build" in err, err


# ------------------------------------- median / extra genes the shipped gene table lacks
def test_build_vocabulary_keeps_every_median_gene_of_the_chosen_species():
    known = gene_table("human")["ensembl_id"].iloc[0]
    assert RETIRED not in set(gene_table("human")["ensembl_id"])
    medians = GeneMedians({known: 1.0, RETIRED: 2.0, "ENSMUSG00000999999": 3.0})
    vocab = build_vocabulary("separate", "medians", medians, species=("human",))
    assert set(vocab.gene_to_id) == {known, RETIRED}  # the mouse gene: species not chosen
    both = build_vocabulary("separate", "medians", medians)
    assert set(both.gene_to_id) == {known, RETIRED, "ENSMUSG00000999999"}


def test_build_vocabulary_geneformer_medians_lose_no_gene(shared_data):
    folder = shared_data / "geneformer_v1"
    _, medians = import_geneformer(folder / "token_dictionary.pkl", folder / "gene_median_dictionary.pkl")
    vocab = build_vocabulary("separate", "medians", medians, species=("human",))
    assert set(medians.values) <= set(vocab.gene_to_id)


def test_build_vocabulary_extra_genes_strip_versions_and_refuse_non_ids():
    vocab = build_vocabulary("separate", "medians", GeneMedians({RETIRED: 1.0}), species=("human",),
                             extra_genes=["ensg00000141510.16"])
    assert "ENSG00000141510" in vocab.gene_to_id
    with pytest.raises(GeneIdError, match="TP53"):
        build_vocabulary("separate", "protein_coding", species=("human",), extra_genes=["TP53"])


# ----------------------------------------------------- Geneformer dictionaries, corrupt
def test_import_geneformer_refuses_two_tokens_with_one_id(tmp_path):
    path = tmp_path / "token_dictionary.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2, "ENSG00000000005": 2}, handle)
    with pytest.raises(ArtifactError, match="ENSG00000000003"):
        import_geneformer(path)


# ------------------------------------------------------------------- median table IDs
def test_median_table_with_versioned_or_lower_case_ids_is_found(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("ensembl_id\tmedian\nENSG00000000003.15\t1.5\nensg00000000005\t2.0\n")
    medians = GeneMedians.load(path)
    np.testing.assert_array_equal(medians.lookup(np.array(["ENSG00000000003", "ENSG00000000005"], dtype=object)), [1.5, 2.0])
    path.write_text("ensembl_id\tmedian\nENSG00000000003.15\t1.5\nENSG00000000003.16\t2.0\n")
    with pytest.raises(InputDataError, match="ENSG00000000003"):
        GeneMedians.load(path)


def test_median_table_cut_inside_its_last_line_is_refused(tmp_path):
    path = tmp_path / "m.tsv"
    GeneMedians({"ENSG00000000003": 1.5, "ENSG00000000005": 12.25}).save(path)
    text = path.read_text()
    assert text.endswith("12.25\n")
    path.write_text(text[:-4])  # "...\t12": a truncated copy still parses, with a wrong median
    with pytest.raises(ArtifactError, match="truncated"):
        GeneMedians.load(path)


# -------------------------------------------------------- the accumulator's own checks
def test_accumulator_refuses_gene_ids_not_aligned_with_columns():
    counts = sp.csr_matrix(np.arange(1, 13).reshape(3, 4))
    with pytest.raises(InputDataError, match="4 columns"):
        MedianAccumulator().update(counts, np.array(["A", "B"], dtype=object), np.full(3, 100.0))


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_accumulator_refuses_negative_and_non_finite_counts(bad):
    counts = sp.csr_matrix(np.array([[1.0, 2.0], [bad, 3.0]]))
    with pytest.raises(InputDataError, match="NaN|negative"):
        MedianAccumulator().update(counts, np.array(["A", "B"], dtype=object), np.full(2, 100.0))


def test_grch37_par_ids_are_human_ensembl_ids():
    from mixgeneformer.genes import ensembl_species

    assert ensembl_species(np.array(["ENSGR0000002586", "ENSG00000002586", "ENSMUSG00000000001"], dtype=object)).tolist() == [
        "human", "human", "mouse"]


def test_medians_with_every_cell_filtered_out_say_so():
    from _tokenize_helpers import make_adata

    from mixgeneformer.medians import compute_file_medians, compute_medians

    adata = make_adata(20, 40, seed=1)
    adata.obs["filter_pass"] = 0
    for compute in (compute_medians, compute_file_medians):
        with pytest.raises(InputDataError, match="filter_pass"):
            compute(adata)


@pytest.mark.parametrize("broken", ["n_cells", "settings"])
def test_a_corrupt_median_accumulator_is_an_artifact_error(tmp_path, broken):
    """MedianAccumulator.load of an .npz with an empty array raised a bare IndexError."""
    acc = MedianAccumulator(genes=np.array(["ENSG00000000003", "ENSG00000000005"], dtype=object))
    acc.save(tmp_path / "acc.npz")
    with np.load(tmp_path / "acc.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[broken] = arrays[broken][:0]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ArtifactError, match="median accumulator .* could not be read"):
        MedianAccumulator.load(tmp_path / "bad.npz")
    assert MedianAccumulator.load(tmp_path / "acc.npz").n_cells == 0
