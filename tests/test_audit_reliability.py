"""Audit of RELIABILITY.md cases on commands their first tests did not cover: wrong file types for
Geneformer's dictionaries (25), one writer for every output of ``mixgf embed`` (26), and the
classifier folder of ``mixgf predict`` (20, 25)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from _tokenize_helpers import partly_outside_files
from test_audit_files import lock_holder, run_cli

from mixgeneformer.errors import ArtifactError, OfflineError


# ------------------------------------------------------------- 25: Geneformer dictionaries
@pytest.fixture()
def median_pickle(tmp_path) -> Path:
    path = tmp_path / "gene_median_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000003": 1.5, "ENSG00000000005": 2.0}))
    return path


def _wrong_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A folder, an HDF5 (h5ad) file and a JSON file where a pickled dictionary is expected."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    h5 = tmp_path / "cells.h5ad"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(2048))
    js = tmp_path / "vocab.json"
    js.write_text('{"format": "mixgeneformer-vocabulary", "tokens": ["<pad>"]}\n' + " " * 1024)
    return {"folder": (folder, "is a directory"), "h5ad": (h5, "is an HDF5 file"), "json": (js, "is a JSON file")}


@pytest.mark.parametrize("kind", ["folder", "h5ad", "json"])
@pytest.mark.parametrize("option", ["--token-dictionary", "--gene-median-dictionary"])
def test_import_geneformer_names_a_wrong_file_type_for_either_dictionary(tmp_path, capsys, median_pickle, kind, option):
    wrong, said = _wrong_files(tmp_path)[kind]
    tokens = tmp_path / "token_dictionary.pkl"
    tokens.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2, "ENSG00000000005": 3}))
    files = {"--token-dictionary": tokens, "--gene-median-dictionary": median_pickle, option: wrong}
    out = tmp_path / "out"
    code, err = run_cli(capsys, "vocab", "import-geneformer", *[w for pair in files.items() for w in pair],
                        "--out", out / "v.json", "--medians-out", out / "m.tsv")
    assert code == 2 and "Traceback" not in err, err
    assert said in err and str(wrong) in err and "pickle" in err, err
    assert "truncated" not in err  # the file is whole; it is of another kind
    assert not out.exists()
    assert wrong.exists()


# ------------------------------------------------------- 26: every output of mixgf embed locked
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    made, path = partly_outside_files(tmp_path_factory.mktemp("audit_reliability"))
    return {"folder": made.folder, "h5ad": path}


@pytest.mark.parametrize("option, name", [("--umap", "u.png"), ("--gene-embeddings", "genes.parquet")])
def test_embed_refuses_a_second_writer_of_its_figure_or_gene_table(bundle, tmp_path, capsys, option, name):
    """Another process writing the --umap / --gene-embeddings file: refused before any work (it
    would replace that process's file, though neither passed --overwrite)."""
    out, extra = tmp_path / "e.h5ad", tmp_path / name
    with lock_holder(extra) as pid:
        code, err = run_cli(capsys, "embed", bundle["h5ad"], "--model", bundle["folder"], "--out", out, option, extra,
                            "--device", "cpu", "--no-progress")
    assert code == 2 and f"pid {pid}" in err and "Traceback" not in err, err
    assert not out.exists() and not extra.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.lock"]  # the other process's, killed


@pytest.mark.parametrize("command", ["embed", "predict"])
def test_embed_and_predict_outputs_under_a_file_are_exit_2_and_create_nothing(bundle, tmp_path, capsys, command):
    """Every other command says "is a file, not a folder" here; these two raised FileExistsError
    while taking the lock, and an output in a missing folder left that folder behind on failure."""
    model = ["--model", bundle["folder"]] if command == "embed" else ["--classifier", tmp_path / "no-classifier"]
    code, err = run_cli(capsys, command, bundle["h5ad"], *model, "--out", bundle["h5ad"] / "x.h5ad", "--device", "cpu")
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err, err
    if command == "embed":
        code, err = run_cli(capsys, "embed", bundle["h5ad"], *model, "--out", tmp_path / "e.h5ad", "--umap",
                            bundle["h5ad"] / "u.png", "--device", "cpu")
        assert code == 2 and "--umap" in err and "is a file, not a folder" in err, err
    code, err = run_cli(capsys, command, bundle["h5ad"], *model[:1], tmp_path / "missing-model", "--out",
                        tmp_path / "new" / "x.h5ad", "--device", "cpu")
    assert code == 2 and "not found" in err, err
    assert list(tmp_path.iterdir()) == []  # no folder "new" left by the failed run


# ----------------------------------------------------- 20, 25: the classifier folder of predict
def test_load_classifier_refuses_a_hub_id_without_touching_the_network(tmp_path, monkeypatch):
    from mixgeneformer.classify import load_classifier

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineError, match="Hugging Face Hub ID"):
        load_classifier("someone/cell-type-classifier")


def test_load_classifier_names_a_file_or_the_classify_output_folder(tmp_path, bundle):
    from mixgeneformer.classify import load_classifier

    with pytest.raises(ArtifactError, match=r"is a file.*--classifier"):
        load_classifier(bundle["h5ad"])
    out = tmp_path / "cls"  # what `mixgf classify --out cls` writes: the classifier is in cls/finetuned
    (out / "finetuned").mkdir(parents=True)
    (out / "finetuned" / "model.safetensors").write_bytes(b"x" * 2048)
    (out / "metrics.csv").write_text("method\n")
    with pytest.raises(ArtifactError, match=f"pass {out / 'finetuned'}"):
        load_classifier(out)


def test_predict_with_a_hub_id_classifier_is_exit_2_and_writes_nothing(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "predict", bundle["h5ad"], "--classifier", "someone/classifier", "--out", "p.h5ad",
                        "--device", "cpu")
    assert code == 2 and "Hugging Face Hub ID" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
