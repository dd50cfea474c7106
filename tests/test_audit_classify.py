"""Classification mistakes an audit found: silent results from a bad batch size, labels split by
whitespace, rare classes counted per spelling in transfer, options checked only after the work."""

from __future__ import annotations

import numpy as np
import pytest
from test_classify import labelled_counts, tiny_model, token_task

from mixgeneformer import classify as C
from mixgeneformer.cli import main
from mixgeneformer.errors import ConfigError


@pytest.mark.parametrize("batch_size", [-3, 0])
def test_prediction_refuses_a_batch_size_below_one(batch_size):
    # -3 gave every cell the same class (no batch ran, so every feature stayed zero); 0 a traceback.
    adata, vocab, tokens = token_task(n_per_class=5)
    classes = ["type0", "type1", "type2"]
    classifier = C.build_classifier(tiny_model(vocab), classes, vocab, C.FinetuneConfig(pooling="mean"))
    fitted = C.FittedClassifier(classifier, classes, vocab, None, C.ClassifyConfig(), [])
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        fitted.predict(tokens.dataset, batch_size=batch_size, device="cpu")


def test_cli_predict_refuses_bad_batch_size_and_device_before_loading(tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    labelled_counts({"a": 4, "b": 4}).write_h5ad(cells)
    missing = tmp_path / "no_classifier"  # never read: the options are refused first
    for option, value, expected in (("--batch-size", "-3", "batch_size"), ("--device", "foo", "not a torch device")):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(cells), "-c", str(missing), "-o", str(tmp_path / "p.h5ad"), option, value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    assert not (tmp_path / "p.h5ad").exists()


def test_labels_that_differ_only_by_surrounding_space_are_one_class():
    adata = labelled_counts({"beta": 6, "beta ": 5, " alpha": 6, "alpha": 5})
    selection = C.prepare_labels(adata, min_class_count=2)
    assert selection.classes == ["alpha", "beta"]
    assert sorted(set(selection.labels)) == ["alpha", "beta"] and len(selection.labels) == 22


def test_transfer_counts_spellings_of_one_class_together_before_dropping_rare_ones():
    # 3 "T cells" + 3 "t_cell" are six T cells: over min_class_count=5, so the class stays.
    source = labelled_counts({"alpha": 20, "beta": 20, "T cells": 3, "t_cell": 3}, seed=1)
    target = labelled_counts({"Alpha": 20, "beta": 20, "T_cell": 8}, seed=2)
    task = C.transfer_task(source, target, C.LabelConfig(min_class_count=5, min_class_fraction=0))
    assert task.classes == ["alpha", "beta", "t_cell"]
    assert (task.train_labels == "t_cell").sum() == 6 and (task.test_labels == "t_cell").sum() == 8


def test_cli_classify_refuses_a_bad_device_and_names_the_file_without_the_label(tmp_path, capsys):
    train, test = tmp_path / "train.h5ad", tmp_path / "test.h5ad"
    labelled_counts({"a": 20, "b": 20}).write_h5ad(train)
    other = labelled_counts({"a": 10, "b": 10})
    other.obs = other.obs.rename(columns={"cell_type1": "celltype"})
    other.write_h5ad(test)
    base = ["classify", str(train), "--mode", "none", "--baselines"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "o1"), "--device", "foo"])
    assert exit_info.value.code == 2 and "not a torch device" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "o2"), "--test", str(test)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "'cell_type1' not found" in err and str(test) in err and "celltype" in err
    assert not (tmp_path / "o2").exists()
    assert np.isin(["train.h5ad", "test.h5ad"], [p.name for p in tmp_path.iterdir()]).all()


def test_classifier_cls_pooling_refuses_a_species_token_at_position_zero():
    import torch

    _, vocab, tokens = token_task(n_per_class=2)
    classifier = C.build_classifier(tiny_model(vocab), ["type0", "type1", "type2"], vocab, C.FinetuneConfig(pooling="cls"))
    assert classifier.config.cls_token_id == vocab.cls_id
    cell = torch.as_tensor([tokens.dataset[0]["input_ids"]])
    assert classifier.cell_embeddings(cell).shape == (1, classifier.config.hidden_size)
    cell[0, 0] = vocab.id_of("<human>")
    with pytest.raises(ConfigError, match="<cls>"):
        classifier.cell_embeddings(cell)
