"""Input data the tokenizer and median stage must not silently get wrong (outside audit, part A).

Vocabulary genes absent from the shipped gene table, symbols of the wrong species, an input
listed twice, a median table listing a gene twice, duplicate columns named as the user has them,
and real-data tests that run in every clone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _tokenize_helpers import SPECIALS, make_adata, make_medians, make_vocab

from mixgeneformer import genes
from mixgeneformer.errors import ArtifactError, GeneIdError, InputDataError
from mixgeneformer.medians import GeneMedians, compute_medians
from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata, tokenize_files
from mixgeneformer.vocab import Vocabulary

RETIRED = "ENSG00000999999"  # an Ensembl ID of the human format that GENCODE v48 does not list
UNKNOWN = "ENSG00000888888"  # in neither the shipped table nor the vocabulary


def symbol_vocab(species: str, symbols: list[str]) -> tuple[Vocabulary, GeneMedians]:
    """A vocabulary and medians over the Ensembl IDs these symbols resolve to in ``species``."""
    ids = sorted({g for g in genes.map_gene_ids(symbols, species=species, min_coverage=0).ensembl_ids if g})
    vocab = Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)}, "separate")
    return vocab, make_medians(np.asarray(ids, dtype=object))


def adata_with(var_names: list[str], n_cells: int = 30, seed: int = 0) -> ad.AnnData:
    base = make_adata(n_cells, len(var_names), seed)
    base.var_names = pd.Index(var_names)
    return base


# ------------------------------------------------------------------------------------------------
# 1. A gene ID the vocabulary holds maps to itself, whatever the shipped table knows


def test_vocabulary_ids_missing_from_the_shipped_table_are_tokenized():
    table_ids = set(genes.gene_table("human")["ensembl_id"])
    assert RETIRED not in table_ids and UNKNOWN not in table_ids
    adata = make_adata(40, 50)
    ids = np.asarray(adata.var_names, dtype=object)
    ids[0], ids[1] = RETIRED, UNKNOWN
    adata.var_names = pd.Index(ids)
    vocab = make_vocab(np.array([g for g in ids if g != UNKNOWN], dtype=object), drop_every=10**6)
    medians = make_medians(ids)

    corpus = tokenize_anndata(adata, vocab, medians, TokenizeConfig())
    expressed = np.asarray(adata.X[:, 0].todense()).ravel() > 0
    assert expressed.sum() > 5
    rows = np.asarray(corpus["cell_index"])
    has = np.array([vocab.gene_to_id[RETIRED] in cell for cell in corpus["input_ids"]])
    np.testing.assert_array_equal(has, expressed[rows])

    mapping = genes.map_gene_ids(ids, species="human", vocabulary_ids=vocab.gene_to_id)
    assert mapping.ensembl_ids[0] == RETIRED and mapping.ensembl_ids[1] == ""
    assert mapping.n_vocabulary_only == 1
    report = mapping.coverage_report()
    assert "1 of them only through the vocabulary" in report
    assert "1 unmapped (in neither the shipped gene table nor the vocabulary, e.g. ENSG00000888888)" in report


def test_vocabulary_only_ids_never_cross_species():
    ids = np.asarray(make_adata(2, 30).var_names, dtype=object)
    mouse_only = "ENSMUSG00000999999"
    mapping = genes.map_gene_ids(list(ids) + [mouse_only], species="human", vocabulary_ids={mouse_only, RETIRED})
    assert mapping.ensembl_ids[-1] == "" and mapping.n_vocabulary_only == 0


def test_per_file_medians_keep_vocabulary_only_genes(tmp_path):
    adata = make_adata(40, 50)
    ids = np.asarray(adata.var_names, dtype=object)
    ids[0] = RETIRED
    adata.var_names = pd.Index(ids)
    adata.write_h5ad(tmp_path / "a.h5ad")
    vocab = make_vocab(ids, drop_every=10**6)
    out = tokenize_files([tmp_path / "a.h5ad"], tmp_path / "corpus", vocab, None, TokenizeConfig(medians="per_file"))
    import datasets

    tokens = np.concatenate(datasets.load_from_disk(str(out))["input_ids"])
    assert vocab.gene_to_id[RETIRED] in tokens


@pytest.mark.realdata
def test_every_geneformer_v1_gene_maps_to_itself(shared_data):
    from mixgeneformer.vocab import import_geneformer

    vocab, _ = import_geneformer(shared_data / "geneformer_v1/token_dictionary.pkl")
    ids = sorted(vocab.gene_to_id)
    before = genes.map_gene_ids(ids, species="human", min_coverage=0)
    after = genes.map_gene_ids(ids, species="human", vocabulary_ids=vocab.gene_to_id)
    assert before.n_input - before.n_mapped == after.n_vocabulary_only == 3395  # 13.4% of 25,424
    assert after.fraction_mapped == 1.0


# ------------------------------------------------------------------------------------------------
# 2. Symbols are never case-folded across species


def _protein_coding_symbols(species: str) -> pd.Series:
    table = genes.gene_table(species)
    return table.loc[(table["biotype"] == "protein_coding") & (table["symbol"] != ""), "symbol"].drop_duplicates()


def test_mouse_symbols_with_species_human_are_refused(tmp_path, capsys):
    from mixgeneformer.cli import main

    mouse = _protein_coding_symbols("mouse")
    folds = mouse.str.upper().isin(set(_protein_coding_symbols("human")))
    symbols = mouse[folds].iloc[:300].tolist()  # every one would case-fold onto a human gene (Gcg -> GCG)
    with pytest.raises(GeneIdError, match=r"spelled as mouse symbols.*--species mouse"):
        genes.map_gene_ids(symbols, species="human")
    assert genes.map_gene_ids(symbols, species="mouse").fraction_mapped == 1.0
    adata = adata_with(symbols)
    vocab, medians = symbol_vocab("human", [s.upper() for s in symbols])
    with pytest.raises(GeneIdError, match="--species mouse"):
        tokenize_anndata(adata, vocab, medians, TokenizeConfig(species="human"))
    adata.write_h5ad(tmp_path / "mouse.h5ad")
    vocab.save(tmp_path / "vocab.json")
    medians.save(tmp_path / "medians.tsv")
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", str(tmp_path / "mouse.h5ad"), "--species", "human", "--vocab", str(tmp_path / "vocab.json"),
              "--medians", str(tmp_path / "medians.tsv"), "--out", str(tmp_path / "corpus")])
    assert exit_info.value.code == 2 and "--species mouse" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()


def _human_plus_mouse_columns(n_human: int, n_mouse: int) -> tuple[list[str], list[str]]:
    human = _protein_coding_symbols("human")
    mouse = _protein_coding_symbols("mouse")
    human = human[~human.isin(set(mouse))]
    folding = mouse[mouse.str.upper().isin(set(human.iloc[n_human:]))]  # fold onto genes the file lacks
    return human.iloc[:n_human].tolist(), folding.iloc[:n_mouse].tolist()


def test_human_file_with_mouse_symbol_columns_is_refused_or_left_unmapped(caplog):
    human, mouse = _human_plus_mouse_columns(2000, 200)  # 9% mouse symbols, under the species-mixing threshold
    symbols = human + mouse
    for species in ("human", "auto"):
        with pytest.raises(GeneIdError, match=r"200 of 2,200 gene symbols .* mouse symbols .*--allow-mixed-species"):
            genes.map_gene_ids(symbols, species=species)
    mapping = genes.map_gene_ids(symbols, species="human", allow_mixed=True)
    assert (mapping.ensembl_ids[len(human):] == "").all()  # not merged into human genes
    assert (mapping.ensembl_ids[: len(human)] != "").all()

    # Tokens of every cell are those of the human columns alone.
    adata = adata_with(symbols, n_cells=20)
    vocab, medians = symbol_vocab("human", human + [s.upper() for s in mouse])
    config = TokenizeConfig(species="human", allow_mixed_species=True)
    mixed = tokenize_anndata(adata, vocab, medians, config)["input_ids"]
    alone = tokenize_anndata(adata[:, : len(human)].copy(), vocab, medians, config)["input_ids"]
    assert mixed == alone

    # A few foreign symbols: left unmapped with a warning that counts them.
    with caplog.at_level(logging.WARNING, logger="mixgeneformer.genes"):
        few = genes.map_gene_ids(human + mouse[:20], species="human")
    assert (few.ensembl_ids[len(human):] == "").all()
    assert "20 of 2020 columns are spelled as mouse symbols" in caplog.text


def test_a_mouse_spelling_is_not_folded_but_case_free_spellings_are():
    with pytest.raises(GeneIdError, match="spelled as mouse symbols"):
        genes.map_gene_ids(["INS", "gcg", "Sst", "KRT19"], species="human")  # Sst: the mouse spelling
    lower = genes.map_gene_ids(["INS", "gcg", "sst", "KRT19"], species="human")  # lower case carries no species
    assert (lower.ensembl_ids != "").all()


def test_real_symbols_are_not_flagged_as_foreign_even_upper_cased(baron_data, caplog):
    for name in ("human", "mouse"):
        adata = ad.read_h5ad(baron_data / f"baron_pancreas_{name}.h5ad", backed="r")
        symbols = np.asarray(adata.var_names, dtype=object)
        with caplog.at_level(logging.WARNING, logger="mixgeneformer.genes"):
            mapping = genes.map_gene_ids(symbols, species=name)
            upper = genes.map_gene_ids([s.upper() for s in symbols], species=name)  # some pipelines upper-case symbols
        assert mapping.fraction_mapped > 0.9
        np.testing.assert_array_equal(upper.ensembl_ids, mapping.ensembl_ids)
    assert "spelled as" not in caplog.text


# ------------------------------------------------------------------------------------------------
# 3. The same input twice


def test_the_same_input_twice_is_refused(tmp_path):
    adata = make_adata(20, 40)
    genes_ = np.asarray(adata.var_names, dtype=object)
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    (tmp_path / "sub").mkdir()
    os.symlink(path, tmp_path / "sub" / "link.h5ad")
    vocab, medians = make_vocab(genes_), make_medians(genes_)
    for second in (path, tmp_path / "sub" / ".." / "a.h5ad", tmp_path / "sub" / "link.h5ad"):
        with pytest.raises(InputDataError, match="inputs 1 and 2 are the same"):
            tokenize_files([path, second], tmp_path / "corpus", vocab, medians, TokenizeConfig())
        with pytest.raises(InputDataError, match="count twice"):
            compute_medians([path, second])
    assert not (tmp_path / "corpus").exists() and not (tmp_path / ".corpus.partial").exists()
    with pytest.raises(InputDataError, match="AnnData object given as input 1"):
        compute_medians([adata, adata])
    other = tmp_path / "b.h5ad"
    adata.write_h5ad(other)  # a copy is a different input (the user may mean it)
    assert len(compute_medians([path, other])) == len(compute_medians([path]))


def test_cli_tokenize_the_same_file_twice_exits_2(tmp_path, capsys):
    from mixgeneformer.cli import main

    adata = make_adata(20, 40)
    genes_ = np.asarray(adata.var_names, dtype=object)
    adata.write_h5ad(tmp_path / "a.h5ad")
    make_vocab(genes_).save(tmp_path / "vocab.json")
    make_medians(genes_).save(tmp_path / "medians.tsv")
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", str(tmp_path / "a.h5ad"), str(tmp_path / "a.h5ad"), "--vocab", str(tmp_path / "vocab.json"),
              "--medians", str(tmp_path / "medians.tsv"), "--out", str(tmp_path / "corpus")])
    assert exit_info.value.code == 2
    assert "inputs 1 and 2 are the same" in capsys.readouterr().err and not (tmp_path / "corpus").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["medians", str(tmp_path / "a.h5ad"), str(tmp_path / "a.h5ad"), "--out", str(tmp_path / "m.tsv")])
    assert exit_info.value.code == 2 and "are the same" in capsys.readouterr().err
    assert not (tmp_path / "m.tsv").exists()


# ------------------------------------------------------------------------------------------------
# 4. A median table listing a gene twice


def test_median_table_listing_a_gene_twice_is_refused(tmp_path):
    path = tmp_path / "medians.tsv"
    path.write_text("ensembl_id\tmedian\nENSG00000254647\t2.5\nENSG00000115263\t1.0\nENSG00000254647\t7.0\n")
    with pytest.raises(ArtifactError, match=r"lists gene ENSG00000254647 twice \(lines 2 and 4\)"):
        GeneMedians.load(path)


# ------------------------------------------------------------------------------------------------
# 17. duplicate_genes="error" names the user's columns; the CLI offers it


def test_duplicate_gene_error_names_the_columns_the_user_has(tmp_path, capsys):
    from mixgeneformer.cli import main

    symbols = _protein_coding_symbols("human").iloc[:60].tolist()
    symbols[5] = "INS"
    symbols[9] = "ins"  # resolves to INS as well
    adata = adata_with(symbols)
    vocab, medians = symbol_vocab("human", symbols)
    with pytest.raises(GeneIdError, match=r"columns 'INS', 'ins' all resolve to ENSG00000254647.*--duplicate-genes sum"):
        tokenize_anndata(adata, vocab, medians, TokenizeConfig(duplicate_genes="error"))
    summed = tokenize_anndata(adata, vocab, medians, TokenizeConfig())  # the default sums them
    assert len(summed) == adata.n_obs

    adata.write_h5ad(tmp_path / "a.h5ad")
    vocab.save(tmp_path / "vocab.json")
    medians.save(tmp_path / "medians.tsv")
    args = ["tokenize", str(tmp_path / "a.h5ad"), "--vocab", str(tmp_path / "vocab.json"),
            "--medians", str(tmp_path / "medians.tsv"), "--out", str(tmp_path / "corpus")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--duplicate-genes", "error"])
    assert exit_info.value.code == 2
    assert "'INS', 'ins'" in capsys.readouterr().err and not (tmp_path / "corpus").exists()
    main([*args, "--duplicate-genes", "sum"])
    assert (tmp_path / "corpus").is_dir()
    assert "2 columns resolve to a gene another column has too and are summed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# 20. Real-data tests run on the shipped Baron subset; skips are counted at the end


def test_real_data_tests_run_without_the_shared_folder_and_skips_are_reported(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MIXGF_SHARED_DATA": str(tmp_path / "absent"), "OMP_NUM_THREADS": "1"}
    tests = ["tests/test_genes.py::test_baron_symbols_map_with_high_coverage",
             "tests/test_vocab.py::test_geneformer_dictionaries_import_with_their_ids"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "skipped tests" in proc.stdout and "1 test(s) skipped:" in proc.stdout
    assert "1 x needs the full data folder ../shared/data" in proc.stdout
