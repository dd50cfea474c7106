"""Loading models and classifiers, and what embed / predict write (audit of model loading).

Each test names the fault it guards: a corpus of another vocabulary predicted silently, a
classifier whose files disagree loaded silently, ``--tokenize-config`` replacing the bundle's
tokenize.yaml, a checkpoint taken for a model, null ``raw`` elements in written h5ad files, ``/``
in output keys, predictions overwriting the input's entries, config.json not matching the weights,
tracebacks instead of one error, and the Hub-ID hint for a Path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from _tokenize_helpers import cli_exit_code, random_gene_bundle
from safetensors.torch import load_file, save_file

from mixgeneformer import bundle as bundle_module
from mixgeneformer import checkpoints
from mixgeneformer.bundle import (
    TOKENIZE_CONFIG_NAME,
    TokenizeOverrides,
    load_bundle,
    load_for_inference,
)
from mixgeneformer.classify.config import ClassifyConfig, FinetuneConfig
from mixgeneformer.classify.finetune import FittedClassifier, build_classifier, load_classifier
from mixgeneformer.classify.predict import predict_cells, predict_file
from mixgeneformer.config import load_config, save_config
from mixgeneformer.errors import ArtifactError, ConfigError, OfflineError, VocabularyMismatchError
from mixgeneformer.fileio import write_h5ad
from mixgeneformer.filekinds import WRITTEN_BY, is_package_file
from mixgeneformer.sharding import output_frame, read_rows
from mixgeneformer.tokenize import TokenizeConfig, tokenize_files
from mixgeneformer.vocab import Vocabulary

N_GENES, N_CELLS = 40, 24
# how the bundle's training corpus was tokenized (its tokenize.yaml): V2 cells with a species token
TRAINED = TokenizeConfig(max_len=64, style="v2", add_species_token=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny random bundle with a V2 tokenize.yaml, a classifier fine-tuned from it (untrained head),
    package-written cells, and a corpus tokenized with a vocabulary of the same size but another order."""
    root = tmp_path_factory.mktemp("loading")
    gene_bundle = random_gene_bundle(root / "model", N_GENES, 5)
    save_config(TRAINED, gene_bundle.folder, TOKENIZE_CONFIG_NAME)
    vocab, medians, rng = gene_bundle.vocab, gene_bundle.medians, gene_bundle.rng
    counts = rng.poisson(1.5, size=(N_CELLS, len(gene_bundle.ids))).astype(np.float32)
    obs = pd.DataFrame({"cell_type": rng.choice(["alpha", "beta"], N_CELLS)}, index=[f"c{i}" for i in range(N_CELLS)])
    cells = root / "cells.h5ad"
    write_h5ad(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=gene_bundle.ids)), cells)

    classes = ["alpha", "beta"]
    head = build_classifier(gene_bundle.model, classes, vocab, FinetuneConfig(pooling="mean"), seed=0)
    classifier = FittedClassifier(head, classes, vocab, medians, ClassifyConfig(), [], tokenize_config=TRAINED).save(
        root / "classifier"
    )
    genes = [t for t in vocab.tokens if t.startswith("ENSG")]
    shuffled = Vocabulary(vocab.tokens[: len(vocab.tokens) - len(genes)] + genes[::-1], {})
    shuffled = Vocabulary(shuffled.tokens, {t: i for i, t in enumerate(shuffled.tokens) if t.startswith("ENSG")})
    assert len(shuffled) == len(vocab) and shuffled.hash != vocab.hash
    other_corpus = tokenize_files([cells], root / "other_corpus", shuffled, medians, TokenizeConfig(max_len=32))
    return {"root": root, "bundle": gene_bundle.folder, "cells": cells, "classifier": classifier, "vocab": vocab,
            "shuffled": shuffled, "other_corpus": other_corpus, "medians": medians}


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ 1
def test_predict_refuses_a_corpus_of_another_vocabulary(made, tmp_path, capsys):
    with pytest.raises(VocabularyMismatchError, match="tokenized with vocabulary"):
        predict_file(made["other_corpus"], made["classifier"], tmp_path / "out.h5ad", device="cpu")
    out = tmp_path / "cli.h5ad"
    assert cli_exit_code(["predict", str(made["other_corpus"]), "-c", str(made["classifier"]), "-o", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "re-tokenize" in err and "Traceback" not in err and not out.exists()


# ------------------------------------------------------------------------------------------ 2
def test_classifier_vocabulary_is_checked_against_marker_and_model(made, tmp_path):
    edited = _copy(made["classifier"], tmp_path / "edited")
    made["shuffled"].save(edited / "vocab.json")  # same size, another vocabulary: the marker's hash differs
    with pytest.raises(VocabularyMismatchError, match="records vocabulary hash"):
        load_classifier(edited)
    (edited / "mixgf.json").unlink()  # no marker: the model's config still records its vocabulary
    with pytest.raises(VocabularyMismatchError):
        load_classifier(edited)
    small = Vocabulary(made["vocab"].tokens[:-3], {t: i for i, t in enumerate(made["vocab"].tokens[:-3]) if t.startswith("ENSG")})
    small.save(edited / "vocab.json")
    with pytest.raises(VocabularyMismatchError, match="vocab_size"):
        load_classifier(edited)
    assert load_classifier(made["classifier"]).classes == ["alpha", "beta"]


def test_classifier_weights_that_do_not_load_are_an_artifact_error(made, tmp_path):
    truncated = _copy(made["classifier"], tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ArtifactError, match="model.safetensors"):
        load_classifier(truncated)

    labels = _copy(made["classifier"], tmp_path / "labels")
    _edit_json(labels / "config.json", id2label={"0": "alpha", "1": "beta", "2": "gamma"},
               label2id={"alpha": 0, "beta": 1, "gamma": 2})
    with pytest.raises(ArtifactError, match="config.json"):
        load_classifier(labels)

    layers = _copy(made["classifier"], tmp_path / "layers")
    _edit_json(layers / "config.json", num_hidden_layers=2)  # the weights hold 3 layers
    with pytest.raises(ArtifactError, match="do not fit"):
        load_classifier(layers)


# ------------------------------------------------------------------------------------------ 3
def test_tokenize_config_file_overlays_the_bundles(made, tmp_path):
    yaml_file = tmp_path / "tok.yaml"
    yaml_file.write_text("min_coverage: 0.2\n")
    overrides = load_config(TokenizeOverrides, yaml_file)
    _, _, _, used, _ = load_for_inference(made["bundle"], None, None, overrides)
    assert (used.max_len, used.style, used.add_species_token, used.min_coverage) == (64, "v2", True, 0.2)
    assert type(used) is TokenizeConfig
    # an explicit TokenizeConfig passed to the API replaces the bundle's as a whole (as documented)
    _, _, _, replaced, _ = load_for_inference(made["bundle"], None, None, TokenizeConfig(min_coverage=0.2))
    assert (replaced.max_len, replaced.style) == (2048, "v1")


def test_predict_and_embed_tokenize_config_files_keep_the_models_settings(made, tmp_path):
    yaml_file = tmp_path / "tok.yaml"
    yaml_file.write_text("min_coverage: 0.2\n")
    fitted = load_classifier(made["classifier"])
    adata = ad.read_h5ad(made["cells"])
    own, _ = predict_cells(fitted, adata)
    overlaid, _ = predict_cells(fitted, adata, tokenize_config=load_config(TokenizeOverrides, yaml_file))
    v1, _ = predict_cells(fitted, adata, tokenize_config=TokenizeConfig(min_coverage=0.2))
    np.testing.assert_allclose(overlaid, own, rtol=0, atol=1e-6)
    assert not np.allclose(v1, own, atol=1e-6)  # the settings matter: replacing them changes the numbers

    plain, overlay = tmp_path / "plain.h5ad", tmp_path / "overlay.h5ad"
    base = ["embed", str(made["cells"]), "-m", str(made["bundle"]), "--device", "cpu", "--no-progress"]
    assert cli_exit_code([*base, "-o", str(plain)]) == 0
    assert cli_exit_code([*base, "-o", str(overlay), "--tokenize-config", str(yaml_file)]) == 0
    np.testing.assert_allclose(ad.read_h5ad(overlay).obsm["X_mixgeneformer"],
                               ad.read_h5ad(plain).obsm["X_mixgeneformer"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ 4
def test_checkpoint_and_run_folders_are_refused_naming_the_model_folder(made, tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-40"
    checkpoint.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "vocab.json", "medians.tsv"):
        shutil.copyfile(made["bundle"] / name, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert load_bundle(checkpoint)[0] is not None  # another Trainer's checkpoint: any Hugging Face BERT folder
    (checkpoint / checkpoints.COMPLETE).write_text('{"step": 40, "files": {}}')
    with pytest.raises(ArtifactError, match=r"checkpoint.*run/model"):
        load_bundle(checkpoint)
    with pytest.raises(ArtifactError, match=r"run folder.*run/model"):
        load_bundle(run)
    _copy(made["bundle"], run / "model")
    with pytest.raises(ArtifactError, match=r"run folder.*run/model"):
        load_bundle(run)
    assert load_bundle(run / "model")[0] is not None
    assert checkpoints.COMPLETE == bundle_module.CHECKPOINT_MARKER  # the two modules name the same marker


# ------------------------------------------------------------------------------------------ 5
def test_written_h5ad_is_backed_sliceable_and_stamped(made, tmp_path):
    assert is_package_file(made["cells"], ".h5ad")
    backed = ad.read_h5ad(made["cells"], backed="r")
    try:
        part = backed[0:10].to_memory()
    finally:
        backed.file.close()
    assert part.n_obs == 10
    with h5py.File(made["cells"], "r") as handle:
        assert "raw" not in handle and handle.attrs["written_by"] == WRITTEN_BY
    out = tmp_path / "sharded.h5ad"
    assert cli_exit_code(["embed", str(made["cells"]), "-m", str(made["bundle"]), "-o", str(out), "--device", "cpu",
                 "--no-progress", "--shard-index", "0", "--num-shards", "2"]) == 0


def test_read_rows_reads_an_old_file_with_a_null_raw(made, tmp_path):
    old = tmp_path / "old.h5ad"
    adata = ad.read_h5ad(made["cells"])
    with h5py.File(old, "w") as store:  # as earlier versions wrote: a null raw element
        ad.io.write_elem(store, "/", adata)
    with h5py.File(old, "r") as handle:
        assert handle["raw"].attrs["encoding-type"] == "null"
    part = read_rows(old, 3, 9)
    assert list(part.obs_names) == list(adata.obs_names[3:9])
    np.testing.assert_array_equal(np.asarray(part.X), np.asarray(adata.X[3:9]))


# ------------------------------------------------------------------------------------------ 6
@pytest.mark.parametrize("key", ["emb/v1", ""])
def test_keys_an_h5ad_cannot_store_are_refused(made, tmp_path, key):
    from mixgeneformer.embed import embed_anndata

    with pytest.raises(ConfigError, match="key"):
        embed_anndata(ad.read_h5ad(made["cells"]), made["bundle"], key=key, device="cpu")
    with pytest.raises(ConfigError, match="key"):
        predict_file(made["cells"], made["classifier"], tmp_path / "out.h5ad", key=key, device="cpu")
    assert not (tmp_path / "out.h5ad").exists()


# ------------------------------------------------------------------------------------------ 7
def test_predict_refuses_to_replace_the_inputs_entries_without_overwrite(made, tmp_path, capsys):
    adata = ad.read_h5ad(made["cells"])
    adata.obs["predicted_pred"] = "mine"
    marked = tmp_path / "marked.h5ad"
    write_h5ad(adata, marked)
    out = tmp_path / "out.h5ad"
    base = ["predict", str(marked), "-c", str(made["classifier"]), "-o", str(out), "--device", "cpu"]
    assert cli_exit_code(base) == 2
    err = capsys.readouterr().err
    assert "predicted_pred" in err and "--overwrite" in err and "Traceback" not in err and not out.exists()
    assert cli_exit_code([*base, "--key", "other"]) == 0
    assert cli_exit_code([*base, "--overwrite"]) == 0
    assert set(ad.read_h5ad(out).obs["predicted_pred"].dropna()) <= {"alpha", "beta"}


# ------------------------------------------------------------------------------------------ 8
def test_config_with_fewer_layers_than_the_weights_is_refused(made, tmp_path):
    folder = _copy(made["bundle"], tmp_path / "fewer")
    _edit_json(folder / "config.json", num_hidden_layers=1)
    with pytest.raises(ArtifactError, match="num_hidden_layers=1"):
        load_bundle(folder)


def test_harmless_extra_tensors_still_load(made, tmp_path):
    folder = _copy(made["bundle"], tmp_path / "extras")
    state = load_file(folder / "model.safetensors")
    reference = load_bundle(made["bundle"])[0].state_dict()
    hidden = reference["bert.embeddings.word_embeddings.weight"].shape[1]
    state["cls.seq_relationship.weight"] = torch.zeros(2, hidden)  # BERT's next-sentence head
    state["bert.embeddings.position_ids"] = torch.arange(8)[None]
    save_file(state, folder / "model.safetensors")
    loaded = load_bundle(folder)[0].state_dict()
    torch.testing.assert_close(loaded["bert.encoder.layer.2.output.dense.weight"],
                               reference["bert.encoder.layer.2.output.dense.weight"])


# ------------------------------------------------------------------------------------------ 9
@pytest.mark.parametrize(("file", "content", "match"), [
    ("config.json", {"hidden_size": "abc"}, "config.json"),
    ("config.json", {"hidden_act": "nope"}, "config.json"),
    ("mixgf.json", ["a", "list"], "mixgf.json"),
])
def test_bad_bundle_files_are_one_error_naming_the_file(made, tmp_path, capsys, file, content, match):
    folder = _copy(made["bundle"], tmp_path / "bad")
    if isinstance(content, dict):
        _edit_json(folder / file, **content)
    else:
        (folder / file).write_text(json.dumps(content))
    with pytest.raises(ArtifactError, match=match):
        load_bundle(folder)
    out = tmp_path / "out.h5ad"
    assert cli_exit_code(["embed", str(made["cells"]), "-m", str(folder), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ 10
def test_predict_on_a_truncated_h5ad_is_one_error(made, tmp_path, capsys):
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(made["cells"].read_bytes()[:1500])
    with pytest.raises(ArtifactError, match="broken.h5ad"):
        output_frame(broken)
    out = tmp_path / "out.h5ad"
    assert cli_exit_code(["predict", str(broken), "-c", str(made["classifier"]), "-o", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "broken.h5ad" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ 11
def test_a_missing_path_that_looks_like_a_hub_id_gets_the_hint_as_a_path_too(made, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineError, match="Hub ID"):
        load_bundle(Path("foo/bar"))
    assert cli_exit_code(["embed", str(made["cells"]), "-m", "foo/bar", "-o", "out.h5ad", "--device", "cpu"]) == 2
    assert "Hub ID" in capsys.readouterr().err


def test_a_bundle_whose_median_table_was_swapped_is_refused(tmp_path):
    """mixgf.json records the hash of the medians a model was saved with; a bundle whose medians.tsv
    was replaced (another corpus's table) loaded silently and tokenized new cells differently."""
    from mixgeneformer.medians import GeneMedians

    made = random_gene_bundle(tmp_path / "model", 40, 0)
    assert load_bundle(made.folder)[2].hash == made.medians.hash  # untouched: loads
    other = GeneMedians({g: 2.0 * made.medians.lookup([g])[0] for g in made.ids})
    other.save(made.folder / "medians.tsv")
    with pytest.raises(ArtifactError, match=r"medians\.tsv .* not the median table the model was saved with"):
        load_bundle(made.folder)
    assert load_bundle(made.folder, medians=made.medians)[2].hash == made.medians.hash  # a table passed in is used as given
