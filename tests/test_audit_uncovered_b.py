"""Audit of branches the suite never ran (coverage at 98a9eb9): readers, checkpoints, sharding, medians
histograms, perturbation / embedding input checks, locks, signals, JSON records. Each test drives a
user's action (a damaged or unusual file, an option value, an environment) and checks what they get."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from transformers import BertConfig, BertModel

from mixgeneformer import checkpoints as ckpt
from mixgeneformer.errors import ArtifactError, ConfigError, InputDataError, VocabularyMismatchError
from mixgeneformer.fileio import atomic_directory, write_json
from mixgeneformer.genes import gene_table
from mixgeneformer.inference import embed_corpus
from mixgeneformer.locks import OUTPUT_MARKER
from mixgeneformer.medians import MedianAccumulator
from mixgeneformer.perturb import PerturbConfig, perturb_cells
from mixgeneformer.readers import open_source, read_anndata
from mixgeneformer.sharding import cell_lengths, shard_role
from mixgeneformer.vocab import Vocabulary

GENES = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"]
COUNTS = np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0]], dtype=np.int32)
SPECIALS = ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]


def _cells() -> ad.AnnData:
    return ad.AnnData(sp.csr_matrix(COUNTS), obs=pd.DataFrame({"ct": ["a", "b", "c"]}, index=["c1", "c2", "c3"]),
                      var=pd.DataFrame(index=GENES))


def _chunks(source, size=2, obs_columns=()):
    with source:
        return list(source.iter_chunks(size, obs_columns=list(obs_columns)))


# -- readers: 10x .h5 with other feature types, damaged h5ad / loom, odd encodings ------------------
def test_10x_h5_with_antibody_features_reads_only_the_gene_expression_columns(tmp_path):
    """CellRanger multi-feature output (gene expression + antibody capture): the antibody rows are not genes."""
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    csc = sp.csc_matrix(COUNTS.T)  # genes x cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = csc.data, csc.indices, csc.indptr, np.array(csc.shape)
        g["barcodes"] = np.array(["c1", "c2", "c3"], dtype="S")
        g["features/id"] = np.array(GENES, dtype="S")
        g["features/name"] = np.array(["A", "CD3_TotalSeqB", "C"], dtype="S")
        g["features/feature_type"] = np.array(["Gene Expression", "Antibody Capture", "Gene Expression"], dtype="S")
    chunks = _chunks(open_source(path))
    assert list(chunks[0].gene_ids) == [GENES[0], GENES[2]]
    np.testing.assert_array_equal(sp.vstack([c.counts for c in chunks]).toarray(), COUNTS[:, [0, 2]])
    adata = read_anndata(path)
    assert list(adata.var_names) == [GENES[0], GENES[2]] and list(adata.obs_names) == ["c1", "c2", "c3"]
    np.testing.assert_array_equal(adata.X.toarray(), COUNTS[:, [0, 2]])


def test_damaged_h5ad_files_name_the_file_and_what_is_wrong(tmp_path):
    _cells().write_h5ad(tmp_path / "ok.h5ad")
    cases = {}
    (tmp_path / "notes.h5ad").write_bytes(b"not an HDF5 file at all\n" * 8)
    cases["notes.h5ad"] = "could not be opened as HDF5"
    for name, damage, message in [
        ("nox.h5ad", lambda f: f.__delitem__("X"), r"holds no count matrix \(no X, no layers, no \.raw\)"),
        ("narrow.h5ad", lambda f: f["X"].attrs.__setitem__("shape", np.array([3, 2])), "3 var entries but the matrix has 2 columns"),
        ("coo.h5ad", lambda f: f["X"].attrs.__setitem__("encoding-type", "coo_matrix"), "unsupported matrix encoding 'coo_matrix'"),
    ]:
        shutil.copy(tmp_path / "ok.h5ad", tmp_path / name)
        with h5py.File(tmp_path / name, "a") as f:
            damage(f)
        cases[name] = message
    for name, message in cases.items():
        before = (tmp_path / name).read_bytes()
        with pytest.raises(InputDataError, match=message) as info:
            open_source(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
        assert (tmp_path / name).read_bytes() == before  # the input is untouched


def test_an_anndata_without_any_count_matrix_says_so_instead_of_asking_for_a_layer(tmp_path):
    """No X, no layers, no .raw (e.g. obs / var only): 'pass layer=... Available layers: []' offered nothing to pass."""
    empty = ad.AnnData(obs=pd.DataFrame(index=["c1", "c2"]), var=pd.DataFrame(index=GENES[:2]))
    empty.write_h5ad(tmp_path / "meta.h5ad")
    for given, name in ((empty, "AnnData"), (tmp_path / "meta.h5ad", str(tmp_path / "meta.h5ad"))):
        with pytest.raises(InputDataError, match=r"holds no count matrix \(.*no layers, no \.raw\).*counts .*X") as info:
            open_source(given)
        assert str(info.value).startswith(name) and "layer=" not in str(info.value)
    with_layer = ad.AnnData(obs=empty.obs, var=empty.var, layers={"counts": sp.csr_matrix(np.eye(2, dtype=np.int32))})
    with pytest.raises(InputDataError, match=r"X is empty; pass layer=\.\.\. Available layers: \['counts'\]"):
        open_source(with_layer)


def test_a_non_hdf5_10x_h5_is_an_input_error_naming_it(tmp_path):
    (tmp_path / "counts.h5").write_bytes(b"truncated download" * 4)
    for read in (open_source, read_anndata):
        with pytest.raises(InputDataError, match=r"counts\.h5 could not be opened as HDF5"):
            read(tmp_path / "counts.h5")


def test_loom_gene_attribute_of_the_wrong_length_is_a_damaged_file(tmp_path):
    with h5py.File(tmp_path / "cells.loom", "w") as f:
        f["matrix"] = COUNTS.T
        f.create_group("layers")
        f["row_attrs/Accession"] = np.array(GENES[:2], dtype="S")
        f["col_attrs/CellID"] = np.array(["c1", "c2", "c3"], dtype="S")
    with pytest.raises(InputDataError, match=r"cells\.loom: row attribute 'Accession' has \(2,\) entries for 3 matrix rows"):
        open_source(tmp_path / "cells.loom")


def test_cell_names_shorter_than_the_matrix_are_an_error_not_cells_named_0(tmp_path):
    """A loom CellID / an h5ad obs index with fewer entries than the matrix has cells: the last chunk's cells were
    named 0, 1, … after its obs column's positions (with obs columns asked for), silently."""
    with h5py.File(tmp_path / "cells.loom", "w") as f:
        f["matrix"] = COUNTS.T
        f.create_group("layers")
        f["row_attrs/Accession"] = np.array(GENES, dtype="S")
        f["col_attrs/CellID"] = np.array(["c1", "c2"], dtype="S")
        f["col_attrs/ct"] = np.array(["a", "b", "c"], dtype="S")
    with pytest.raises(InputDataError, match=r"cells\.loom: column attribute 'CellID' has \(2,\) entries for 3 matrix columns"):
        _chunks(open_source(tmp_path / "cells.loom"), 2, ["ct"])
    cells = _cells()
    cells.obs["ct"] = cells.obs["ct"].astype(str)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    with h5py.File(tmp_path / "cells.h5ad", "a") as f:
        attrs = dict(f["obs/_index"].attrs)
        del f["obs/_index"]
        index = f["obs"].create_dataset("_index", data=np.array(["c1", "c2"], dtype=object), dtype=h5py.string_dtype())
        index.attrs.update(attrs)
    with pytest.raises(InputDataError, match=r"obs column 'ct' has 1 values for the 0 cell names of cells 2–2; obs is inconsistent"):
        _chunks(open_source(tmp_path / "cells.h5ad"), 2, ["ct"])


def test_h5ad_nullable_obs_column_and_csc_cells_without_counts(tmp_path):
    """A nullable-integer obs column (read whole, then sliced) and CSC chunks whose cells store nothing."""
    counts = np.array([[0, 0, 0], [1, 0, 2], [0, 0, 0], [0, 0, 0], [3, 0, 0]], dtype=np.int32)
    adata = ad.AnnData(sp.csc_matrix(counts), var=pd.DataFrame(index=GENES))
    adata.obs_names = [f"c{i}" for i in range(5)]
    adata.obs["n"] = pd.array([1, None, 3, 4, None], dtype="Int64")
    adata.write_h5ad(tmp_path / "csc.h5ad")
    chunks = _chunks(open_source(tmp_path / "csc.h5ad"), 2, ["n"])
    assert [c.counts.toarray().tolist() for c in chunks] == [counts[0:2].tolist(), counts[2:4].tolist(), counts[4:].tolist()]
    assert [v if pd.notna(v) else None for c in chunks for v in c.obs["n"]] == [1, None, 3, 4, None]


def test_log_normalized_h5ad_with_dense_raw_counts_points_to_layer_raw(tmp_path):
    """scanpy's `adata.raw = adata` before normalizing, written with a dense raw/X: the error says where the counts are."""
    adata = ad.AnnData(np.log1p(COUNTS.astype(np.float32)), var=pd.DataFrame(index=GENES))
    adata.obs_names = ["c1", "c2", "c3"]
    adata.raw = ad.AnnData(COUNTS.astype(np.float32), var=pd.DataFrame(index=GENES))
    adata.write_h5ad(tmp_path / "normalized.h5ad")
    with pytest.raises(InputDataError, match=r"normalized\.h5ad: expects raw integer counts.*its \.raw \(adata\.raw\.X, 3 genes\) "
                                             r"holds integer counts.*layer='raw'"):
        _chunks(open_source(tmp_path / "normalized.h5ad"))
    chunks = _chunks(open_source(tmp_path / "normalized.h5ad", layer="raw"))
    np.testing.assert_array_equal(sp.vstack([c.counts for c in chunks]).toarray(), COUNTS)


def test_soma_obs_indexed_by_cell_name_reads_in_joinid_order_and_filters(tmp_path):
    """An experiment whose obs is indexed by obs_id (not soma_joinid) is read by joinid ranges."""
    pa = pytest.importorskip("pyarrow")
    tiledbsoma = pytest.importorskip("tiledbsoma")
    joinids = np.array([3, 5, 9, 10, 20], dtype=np.int64)
    counts = sp.csr_matrix(np.random.default_rng(0).integers(1, 4, (5, 4)))
    uri = str(tmp_path / "exp")
    with tiledbsoma.Experiment.create(uri) as exp:
        fields = [pa.field("obs_id", pa.large_string()), pa.field("tissue", pa.large_string())]
        obs = exp.add_new_dataframe("obs", schema=pa.schema(fields), index_column_names=["obs_id"])
        obs.write(pa.table({"soma_joinid": joinids[::-1], "obs_id": [f"cell_{j}" for j in joinids[::-1]],
                            "tissue": [f"t{j}" for j in joinids[::-1]]}))
        rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
        var = rna.add_new_dataframe("var", schema=pa.schema([pa.field("var_id", pa.large_string())]), domain=[(0, 3)])
        var.write(pa.table({"soma_joinid": np.arange(4, dtype=np.int64), "var_id": [f"g{i}" for i in range(4)]}))
        x = rna.add_new_collection("X").add_new_sparse_ndarray("data", type=pa.float32(), shape=(21, 4))
        coo = counts.tocoo()
        x.write(pa.table({"soma_dim_0": joinids[coo.row], "soma_dim_1": coo.col.astype(np.int64),
                          "soma_data": coo.data.astype(np.float32)}))
    chunks = _chunks(open_source(uri), 2, ["tissue"])
    assert [n for c in chunks for n in c.obs.index] == [f"cell_{j}" for j in joinids]
    assert [t for c in chunks for t in c.obs["tissue"]] == [f"t{j}" for j in joinids]
    np.testing.assert_array_equal(sp.vstack([c.counts for c in chunks]).toarray(), counts.toarray())
    chunks = _chunks(open_source(uri, obs_filter="tissue == 't9' or tissue == 't20'"), 10, ["tissue"])
    assert list(chunks[0].obs.index) == ["cell_9", "cell_20"]
    np.testing.assert_array_equal(chunks[0].counts.toarray(), counts.toarray()[[2, 4]])


def test_a_damaged_soma_experiment_is_an_input_error_naming_it(tmp_path, capsys):
    """A fragment of X missing (a copy cut short): tiledbsoma's SOMAError was a traceback."""
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    from mixgeneformer.cli import main

    _bundle(tmp_path)
    soma = tmp_path / "soma"
    tiledbsoma_io.from_h5ad(str(soma), str(tmp_path / "in.h5ad"), measurement_name="RNA")
    for fragment in (soma / "ms" / "RNA" / "X" / "data" / "__fragments").iterdir():
        shutil.rmtree(fragment)
    with pytest.raises(InputDataError, match=rf"{soma}: opening it as a TileDB-SOMA experiment failed \(SOMAError: "):
        open_source(soma)
    with pytest.raises(SystemExit) as info:
        main(["tokenize", str(soma), "--vocab", str(tmp_path / "bundle" / "vocab.json"), "--medians",
              str(tmp_path / "bundle" / "medians.tsv"), "--out", str(tmp_path / "corpus")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "SOMAError" in err and "Traceback" not in err and not (tmp_path / "corpus").exists()


# -- checkpoints ----------------------------------------------------------------------------------
def _checkpoint(run_dir: Path, step: int, payload: str = "weights") -> Path:
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(payload)
    ckpt.write_complete_marker(folder, step)
    return folder


def test_damaged_checkpoints_are_skipped_and_named_when_none_is_intact(tmp_path):
    run = tmp_path / "run"
    older, newer = _checkpoint(run, 10), _checkpoint(run, 20)
    (newer / ckpt.COMPLETE).write_text("{truncated")
    assert ckpt.latest_complete_checkpoint(run) == older  # the newest intact one
    (older / "model.safetensors").unlink()
    with pytest.raises(ArtifactError) as info:
        ckpt.latest_complete_checkpoint(run)
    message = str(info.value)
    assert "checkpoint-20: unreadable COMPLETE marker" in message
    assert "checkpoint-10: file model.safetensors listed in COMPLETE is missing" in message and "--overwrite" in message
    with pytest.raises(ArtifactError, match="checkpoint-10 cannot be resumed from: file model.safetensors listed"):
        ckpt.plan_run_dir(run, False, False, older)
    with pytest.raises(ArtifactError, match=r"checkpoint folder not found: .*checkpoint-99"):
        ckpt.plan_run_dir(run, False, False, run / "checkpoint-99")


@pytest.mark.parametrize("marker", ['{"files": ["model.safetensors"], "step": 20}', '{"files": null, "step": 20}',
                                    '{"files": {"model.safetensors": 7}}', '{"files": {"model.safetensors": 7}, "step": "20"}'])
def test_a_complete_marker_of_another_shape_is_skipped_not_a_crash(tmp_path, marker):
    """Valid JSON that is not this package's manifest (files not a name -> bytes mapping, no integer step):
    --resume took it for intact (or raised AttributeError), then crashed reading its step."""
    run = tmp_path / "run"
    older, newer = _checkpoint(run, 10), _checkpoint(run, 20)
    (newer / ckpt.COMPLETE).write_text(marker)
    assert ckpt.checkpoint_problem(newer).startswith("unreadable COMPLETE marker (")
    assert ckpt.plan_run_dir(run, True, False, None) == ("resume", older)


def test_publishing_a_checkpoint_of_an_existing_step_replaces_it_whole(tmp_path):
    """Resuming from an older checkpoint saves again at a step that already has one."""
    run = tmp_path / "run"
    _checkpoint(run, 5, "old weights")
    staged = _checkpoint(ckpt.staging_dir(run), 5, "new weights")
    assert ckpt.publish_checkpoint(staged, run) == run / "checkpoint-5"
    assert (run / "checkpoint-5" / "model.safetensors").read_text() == "new weights"
    assert ckpt.checkpoint_problem(run / "checkpoint-5") is None
    assert sorted(p.name for p in run.iterdir()) == [ckpt.STAGING, "checkpoint-5"]  # no renamed-away copy left
    assert not any(ckpt.staging_dir(run).iterdir())


# -- sharding, precision --------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "world", "message"), [
    ("x", "2", r"RANK / WORLD_SIZE must be integers"), ("2", "2", r"environment RANK=2 is not within WORLD_SIZE=2"),
])
def test_a_launcher_environment_that_cannot_be_sharded_is_a_config_error(monkeypatch, rank, world, message):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ConfigError, match=message):
        shard_role()


def test_shard_lengths_of_a_corpus_without_a_length_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[2, 7, 8, 3], [2, 3], [2, 9, 3]]}).save_to_disk(str(tmp_path / "corpus"))
    assert cell_lengths(tmp_path / "corpus").tolist() == [4, 2, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a CUDA GPU")
def test_fp16_precision_on_a_machine_without_cuda_is_refused():
    from mixgeneformer.trainer import resolve_precision

    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA GPU; use auto, bf16 or fp32"):
        resolve_precision("fp16")


# -- medians accumulators -------------------------------------------------------------------------
def test_median_accumulator_settings_merges_and_damaged_files(tmp_path):
    with pytest.raises(InputDataError, match="bins_per_decade=0.*need bins_per_decade ≥ 1"):
        MedianAccumulator(bins_per_decade=0)
    with pytest.raises(InputDataError, match="0 < min_value < max_value"):
        MedianAccumulator(min_value=10.0, max_value=1.0)
    with pytest.raises(InputDataError, match="genes must be unique"):
        MedianAccumulator(genes=[GENES[0], GENES[0]])
    with pytest.raises(InputDataError, match=r"different bins \(10/0.001/10000.0 vs 200/0.001/10000.0\)"):
        MedianAccumulator(genes=GENES).merge(MedianAccumulator(genes=GENES, bins_per_decade=10))
    MedianAccumulator(genes=GENES).save(tmp_path / "acc.npz")
    arrays = dict(np.load(tmp_path / "acc.npz"))
    arrays["histograms"] = arrays["histograms"][:, :10]
    np.savez(tmp_path / "cut.npz", **arrays)
    with pytest.raises(ArtifactError, match=r"cut\.npz: histogram shape \(3, 10\) does not match its settings"):
        MedianAccumulator.load(tmp_path / "cut.npz")
    whole = (tmp_path / "acc.npz").read_bytes()  # a copy cut short, or with damaged bytes: not a zipfile traceback
    (tmp_path / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "damaged.npz").write_bytes(whole[:200] + b"x" * 60 + whole[260:])
    for name in ("truncated.npz", "damaged.npz"):
        with pytest.raises(ArtifactError, match=rf"median accumulator .*{name} could not be read .*; it may be truncated"):
            MedianAccumulator.load(tmp_path / name)


# -- perturbation and embedding input checks ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    ids = gene_table("human").query("biotype == 'protein_coding'")["ensembl_id"].tolist()[:60]
    vocab = Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    bert = BertModel(config, add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2, 4], rng.choice(np.arange(6, 66), 8, replace=False), [3]]) for _ in range(6)]
    return vocab, bert, cells, [ids[int(cells[0][2]) - 6]]


def test_perturb_cells_refuses_cells_the_model_cannot_read(tiny):
    vocab, bert, cells, genes = tiny
    smaller = Vocabulary(vocab.tokens[:50], {g: i for g, i in vocab.gene_to_id.items() if i < 50})
    for given, vocabulary, error, message in [
        ([], vocab, InputDataError, "there are no cells to perturb"),
        ([*cells, np.zeros(0, np.int64)], vocab, InputDataError, r"1 cells have no tokens \(first at row 6\)"),
        ([*cells, np.arange(6, 26)], vocab, InputDataError, "cell 6 has 20 tokens but the model accepts at most 16; tokenize with max_len<=16"),
        (cells, smaller, VocabularyMismatchError, "the vocabulary has 50 tokens but the model's vocab_size is 66"),
        ([*cells, np.array([2, 4, 70, 3])], vocab, InputDataError, r"token ids range over \[2, 70\] but the vocabulary has 66"),
    ]:
        with pytest.raises(error, match=message):
            perturb_cells(bert, given, vocabulary, PerturbConfig(genes=genes), progress=False)


def test_perturb_cells_state_labels_must_fit_the_cells(tiny):
    import datasets

    vocab, bert, cells, genes = tiny
    corpus = datasets.Dataset.from_dict({"input_ids": [c.tolist() for c in cells], "st": ["a"] * 3 + ["b"] * 3})
    for dataset, config, states, message in [
        (corpus, dict(state_column="zz"), None, r"state_column 'zz' is not a column of the corpus \(columns: \['input_ids', 'st'\]\)"),
        (cells, dict(state_column="st"), ["a"] * 3, "3 state labels for 6 cells; give one label per cell"),
        (corpus, dict(state_column="st", start="q"), None, r"start state 'q' has no cells in 'st'; states: \['a', 'b'\]"),
        (corpus, dict(state_column="st", start="a", goal="b", alternatives=["q"]), None, "alternative state 'q' has no cells"),
    ]:
        with pytest.raises(InputDataError, match=message):
            perturb_cells(bert, dataset, vocab, PerturbConfig(genes=genes, **config), states=states, progress=False)


def test_a_device_that_is_not_one_under_a_launcher_is_a_config_error(tiny, monkeypatch):
    """Under torchrun (LOCAL_RANK set) a device string torch cannot parse is passed on and refused by name."""
    vocab, bert, cells, genes = tiny
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"device='gpu' is not a torch device \(use 'cpu', 'cuda', 'cuda:1'\)"):
        perturb_cells(bert, cells, vocab, PerturbConfig(genes=genes, device="gpu"), progress=False)


def test_embed_corpus_refuses_bad_options_models_and_vocabularies(tiny):
    vocab, bert, cells, _ = tiny
    smaller = Vocabulary(vocab.tokens[:50], {g: i for g, i in vocab.gene_to_id.items() if i < 50})
    with pytest.raises(ConfigError, match="gene_embeddings must be False, True, 'mean' or 'per_cell', got 'yes'"):
        embed_corpus(bert, cells, vocab, gene_embeddings="yes")
    with pytest.raises(ConfigError, match="model of type Linear has no BERT encoder"):
        embed_corpus(torch.nn.Linear(2, 2), cells, vocab)
    with pytest.raises(VocabularyMismatchError, match="use the vocabulary saved in the model bundle"):
        embed_corpus(bert, cells, smaller)
    with pytest.raises(InputDataError, match="not token ids of a vocabulary"):
        embed_corpus(bert, [[2, 2**40, 3]], vocab, progress=False)


def test_cli_perturb_of_a_tokenized_corpus_and_of_a_missing_state_column(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_perturb import bundle_and_cells

    from mixgeneformer.cli import main

    ids = gene_table("human").query("biotype == 'protein_coding'")["ensembl_id"].tolist()[:60]
    genes = bundle_and_cells(tmp_path, Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)}))
    bundle = tmp_path / "bundle"
    main(["tokenize", str(tmp_path / "in.h5ad"), "--vocab", str(bundle / "vocab.json"), "--medians", str(bundle / "medians.tsv"),
          "--out", str(tmp_path / "corpus"), "--max-len", "64", "--obs-columns", "kind"])
    common = ["--model", str(bundle), "--genes", f"{genes[0]},{genes[1]}", "--device", "cpu", "--no-progress"]
    main(["perturb", str(tmp_path / "corpus"), "--out", str(tmp_path / "p"), "--state-column", "kind", "--start", "x", *common])
    cells = pd.read_parquet(tmp_path / "p" / "cells.parquet")
    assert len(cells) and set(cells["state"]) == {"x"} and set(cells["cell"]) <= set(range(0, 12, 2))
    assert set(cells["perturbed"]) <= set(genes[:2])
    with pytest.raises(SystemExit) as info:
        main(["perturb", str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "p2"), "--state-column", "nope", *common])
    assert info.value.code == 2 and not (tmp_path / "p2").exists()
    assert "state_column 'nope' is not an obs column; obs columns: ['kind']" in capsys.readouterr().err


def test_cli_embed_of_a_soma_experiment_with_an_obs_filter_in_the_tokenize_options(tmp_path):
    """The filter selects the experiment's cells; the cells read are then tokenized without it."""
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_perturb import bundle_and_cells

    from mixgeneformer.cli import main

    ids = gene_table("human").query("biotype == 'protein_coding'")["ensembl_id"].tolist()[:60]
    bundle_and_cells(tmp_path, Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)}))
    tiledbsoma_io.from_h5ad(str(tmp_path / "soma"), str(tmp_path / "in.h5ad"), measurement_name="RNA")
    (tmp_path / "tokenize.yaml").write_text("obs_filter: \"kind == 'x'\"\n")
    main(["embed", str(tmp_path / "soma"), "--model", str(tmp_path / "bundle"), "--out", str(tmp_path / "e.h5ad"),
          "--tokenize-config", str(tmp_path / "tokenize.yaml"), "--device", "cpu", "--no-progress"])
    embedded = ad.read_h5ad(tmp_path / "e.h5ad")
    assert list(embedded.obs_names) == [f"c{i}" for i in range(0, 12, 2)] and set(embedded.obs["kind"]) == {"x"}
    assert embedded.obsm["X_mixgeneformer"].shape == (6, 64) and np.isfinite(embedded.obsm["X_mixgeneformer"]).all()


def test_pretraining_with_a_given_peak_logs_a_plausible_mfu(tmp_path):
    """logging.peak_tflops on a device of unknown peak (a CPU): every training row gets an mfu."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pretrain import make_vocab, tiny_config, training_data

    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.flops import count_flop_parameters
    from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining

    root = training_data(tmp_path, make_vocab())
    config = tiny_config(root, tmp_path / "run", train={"max_steps": 3}, logging={"peak_tflops": 0.5})
    result = run_pretraining(pretrain_config_from_dict(config))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 3 and all(r["mfu"] > 0 for r in rows)
    n_params = count_flop_parameters(load_bundle(result.bundle_dir)[0])
    for row in rows:  # mfu x peak / tokens per second: the FLOPs of one token, ~6 N plus attention and the MLM head
        assert 6 * n_params < row["mfu"] * 0.5e12 / row["tokens_per_s"] < 5 * 6 * n_params


def _bundle(folder: Path) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_perturb import bundle_and_cells

    ids = gene_table("human").query("biotype == 'protein_coding'")["ensembl_id"].tolist()[:60]
    return bundle_and_cells(folder, Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)}))


def test_sharded_embed_of_an_h5ad_without_x_equals_one_process(tmp_path):
    """Counts in a layer and no X (adata.X = None): each shard read its rows from the backed file, which
    anndata cannot slice without X ("rewrite it with anndata", which keeps it X-less); one process read it."""
    from mixgeneformer.cli import main

    _bundle(tmp_path)
    cells = ad.read_h5ad(tmp_path / "in.h5ad")
    no_x = ad.AnnData(obs=cells.obs.copy(), var=cells.var.copy(), layers={"counts": cells.X.copy()})
    no_x.write_h5ad(tmp_path / "nox.h5ad")
    (tmp_path / "tokenize.yaml").write_text("layer: counts\n")
    common = ["--model", str(tmp_path / "bundle"), "--tokenize-config", str(tmp_path / "tokenize.yaml"), "--device", "cpu",
              "--no-progress"]
    main(["embed", str(tmp_path / "nox.h5ad"), "--out", str(tmp_path / "one.h5ad"), *common])
    for shard in ("0", "1"):
        main(["embed", str(tmp_path / "nox.h5ad"), "--out", str(tmp_path / "sharded.h5ad"), *common,
              "--num-shards", "2", "--shard-index", shard])
    main(["embed-merge", str(tmp_path / "sharded.h5ad")])
    one, sharded = ad.read_h5ad(tmp_path / "one.h5ad"), ad.read_h5ad(tmp_path / "sharded.h5ad")
    assert list(sharded.obs_names) == list(one.obs_names) == list(cells.obs_names)
    np.testing.assert_allclose(sharded.obsm["X_mixgeneformer"], one.obsm["X_mixgeneformer"], atol=1e-5)


def test_an_h5ad_anndata_cannot_decode_is_an_error_naming_it(tmp_path, capsys):
    """An element encoding this anndata has no reader for (a newer anndata's, a damaged attribute): exit 2,
    not anndata's IORegistryError traceback; a shard's read of a damaged h5ad: ArtifactError, not ValueError."""
    from mixgeneformer.cli import main

    _bundle(tmp_path)
    shutil.copy(tmp_path / "in.h5ad", tmp_path / "newer.h5ad")
    with h5py.File(tmp_path / "newer.h5ad", "a") as f:
        f["X"].attrs["encoding-type"] = "coo_matrix"
    with pytest.raises(SystemExit) as info:
        main(["embed", str(tmp_path / "newer.h5ad"), "--model", str(tmp_path / "bundle"), "--out", str(tmp_path / "e.h5ad"),
              "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"cannot read input h5ad {tmp_path / 'newer.h5ad'} as h5ad" in err
    assert "encoding_type='coo_matrix'" in err and not (tmp_path / "e.h5ad").exists()
    shutil.copy(tmp_path / "in.h5ad", tmp_path / "narrow.h5ad")
    with h5py.File(tmp_path / "narrow.h5ad", "a") as f:
        f["X"].attrs["shape"] = np.array([12, 59])
    with pytest.raises(ArtifactError, match=r"cannot read cells 0-6 of .*narrow\.h5ad .*ValueError: .*`var` must have as many rows"):
        read_anndata(tmp_path / "narrow.h5ad", rows=(0, 6))


def test_an_obs_column_anndata_cannot_decode_is_an_input_error(tmp_path, capsys):
    """tokenize --obs-columns of a column stored in an encoding this anndata has no reader for: exit 2 naming
    the file and the cells, not anndata's IORegistryError traceback."""
    from mixgeneformer.cli import main

    _bundle(tmp_path)
    cells = ad.read_h5ad(tmp_path / "in.h5ad")
    cells.obs["batch"] = pd.array([1, None] * 6, dtype="Int64")
    cells.write_h5ad(tmp_path / "newer.h5ad")
    with h5py.File(tmp_path / "newer.h5ad", "a") as f:
        f["obs/batch"].attrs["encoding-type"] = "nullable-integer-v2"
    with pytest.raises(SystemExit) as info:
        main(["tokenize", str(tmp_path / "newer.h5ad"), "--vocab", str(tmp_path / "bundle" / "vocab.json"), "--medians",
              str(tmp_path / "bundle" / "medians.tsv"), "--out", str(tmp_path / "corpus"), "--obs-columns", "batch"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"{tmp_path / 'newer.h5ad'}: reading obs column 'batch' of cells 0–" in err, err
    assert "failed (IORegistryError" in err
    assert "encoding_type='nullable-integer-v2'" in err and not (tmp_path / "corpus").exists()


# -- output folders, signals, JSON records --------------------------------------------------------
def test_two_interrupted_overwrites_and_no_output_is_an_error_that_keeps_both(tmp_path):
    for tag in ("0123abcd", "89abcdef"):
        old = tmp_path / f".out.old-{tag}"
        old.mkdir()
        (old / OUTPUT_MARKER).write_text("")
        (old / "data").write_text(tag)
    with pytest.raises(ArtifactError, match=r"out is missing and interrupted overwrites left earlier outputs at .*\.out\.old-0123abcd, "):
        with atomic_directory(tmp_path / "out", overwrite=True) as folder:
            (folder / "new").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-0123abcd", ".out.old-89abcdef"]
    assert (tmp_path / ".out.old-89abcdef" / "data").read_text() == "89abcdef"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_ends_on_sigterm_as_if_no_handler_were_installed():
    from mixgeneformer.stopping import SignalFlag

    flag = SignalFlag()
    flag.install()
    try:
        flag.training = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a multi-threaded process
            pid = os.fork()
        if pid == 0:  # the worker: its SIGTERM must end it, not set a flag of the parent's copy
            time.sleep(10)
            os._exit(0)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    finally:
        flag.uninstall()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert flag.received is None


SIGNAL_WORKER = r'''
import json, os, sys
from mixgeneformer.pretrain import TrainingInterrupted, load_pretrain_config, run_pretraining
try:
    run_pretraining(load_pretrain_config(sys.argv[1]))
    report = {"finished": True}
except TrainingInterrupted as exc:
    report = {"signum": exc.signum, "message": str(exc)}
with open(os.path.join(os.environ["REPORT_DIR"], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(report, handle)
sys.exit(0 if report.get("finished") else 3)
'''


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """Two gloo ranks under torchrun; SIGTERM reaches rank 1 only (a scheduler preempting one task): the
    ranks agree on the stop at the next multiple of SIGNAL_SYNC_STEPS, rank 0 saves, both exit non-zero."""
    import subprocess

    import psutil
    import yaml

    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import _free_port
    from test_pretrain import make_vocab, tiny_config, training_data

    from mixgeneformer.pretrain import read_metrics
    from mixgeneformer.stopping import SIGNAL_SYNC_STEPS

    root, out, reports = training_data(tmp_path, make_vocab(), n_cells=128), tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    config = tiny_config(root, out, train={"max_steps": 100_000, "per_device_batch_size": 4},
                         checkpoint={"save_steps": 100_000}, distributed={"timeout_s": 60})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "worker.py").write_text(SIGNAL_WORKER)
    env = {**os.environ, "REPORT_DIR": str(reports), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                             "127.0.0.1", "--master_port", str(_free_port()), str(tmp_path / "worker.py"),
                             str(tmp_path / "run.yaml")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(r["step"] >= 3 for r in read_metrics(out)) and proc.poll() is None:
            time.sleep(0.2)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        logged = max(int(r["step"]) for r in read_metrics(out))
        rank1[0].send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output[-3000:]
    told = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert told[0] == told[1] and told[0]["signum"] == signal.SIGTERM, told
    step = int(told[0]["message"].split(" at step ")[1].split(";")[0])
    assert step % SIGNAL_SYNC_STEPS == 0 and step >= logged
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == [f"checkpoint-{step}"]
    assert ckpt.checkpoint_problem(out / f"checkpoint-{step}") is None
    assert {p.name for p in (out / f"checkpoint-{step}").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert int(read_metrics(out)[-1]["step"]) == step and "Continue with --resume" in told[0]["message"]


def test_json_records_convert_numpy_scalars_arrays_and_paths(tmp_path):
    record = {"n": np.int64(3), "x": np.float32(0.5), "ok": np.bool_(True), "ids": np.arange(2), "path": Path("a/b")}
    write_json(tmp_path / "r.json", record)
    assert json.loads((tmp_path / "r.json").read_text()) == {"n": 3, "x": 0.5, "ok": True, "ids": [0, 1], "path": "a/b"}


def test_simcse_dimension_loss_of_a_one_cell_batch_is_zero_with_a_gradient():
    from mixgeneformer.losses import simcse_pp_dimension_loss

    z = torch.randn(1, 4, requires_grad=True)
    loss = simcse_pp_dimension_loss(z, z * 2)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and torch.equal(z.grad, torch.zeros_like(z))
    with pytest.raises(ValueError, match=r"two \(B, D\) tensors of equal shape, got \(3, 4\) and \(3, 5\)"):
        simcse_pp_dimension_loss(torch.zeros(3, 4), torch.zeros(3, 5))
