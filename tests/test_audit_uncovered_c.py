"""Branches no in-process test ran (coverage at 98a9eb9) of the classification, embedding, tokenizer,
perturbation, plotting, demo and helper modules: what a user who reaches each one gets (RELIABILITY 11,
18, 19, 23)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys

import numpy as np
import pandas as pd
import pytest
from _tokenize_helpers import SPECIALS, cli_exit_code, human_ids, make_adata

from mixgeneformer.errors import ArtifactError, ConfigError, GeneIdError, InputDataError


def _labelled(n_cells: int = 60):
    return make_adata(n_cells, 60)


# -- classification: names checked before any method runs --------------------------------------------


def test_unknown_baseline_name_is_refused_before_any_method_runs(monkeypatch):
    """A misspelt baseline (``knn_pcaa``) was refused only when its turn came: after the other
    methods (a fine-tuning of minutes) had run, their results lost. Now before any cell is read."""
    from mixgeneformer.classify import ClassifyConfig, LabelConfig, run_classification

    baselines_module = sys.modules["mixgeneformer.classify.baselines"]
    ran: list[str] = []
    real = baselines_module.baseline_predict
    monkeypatch.setattr(baselines_module, "baseline_predict", lambda *a, **k: ran.append(a[3]) or real(*a, **k))
    config = ClassifyConfig(labels=LabelConfig(key="cell_type"))
    with pytest.raises(ConfigError, match=r"baseline_methods \['knn_pcaa'\] not known: choose among \['knn_pca', 'logreg_counts', 'logreg_tokens'\]"):
        run_classification(_labelled(), methods=(), baseline_methods=("logreg_counts", "knn_pcaa"), config=config)
    assert ran == []
    with pytest.raises(ConfigError, match=r"methods \['svm'\] not known: choose among \['finetune', 'knn', 'logreg'\]"):
        run_classification(_labelled(), methods=("svm",), config=config)


def test_baselines_refuse_an_unknown_name_before_reading_counts(monkeypatch):
    from mixgeneformer.classify import LabelConfig, baselines, within_task

    baselines_module = sys.modules["mixgeneformer.classify.baselines"]
    monkeypatch.setattr(baselines_module, "read_counts", lambda *a, **k: pytest.fail("counts read before the names were checked"))
    task = within_task(_labelled(), LabelConfig(key="cell_type"))
    with pytest.raises(ConfigError, match=r"baseline methods \['svm'\] are not among \['logreg_counts', 'knn_pca'\]"):
        baselines(task, ["logreg_counts", "svm"])


def test_classification_too_few_cells_to_split_every_class_on_both_sides():
    from mixgeneformer.classify import ClassifyConfig, LabelConfig, run_classification

    config = ClassifyConfig(labels=LabelConfig(key="cell_type", min_class_fraction=0.0))
    with pytest.raises(InputDataError, match=r"6 cells cannot be split 80%/20% with every one of 3 classes on both sides"):
        run_classification(_labelled(6), methods=(), baseline_methods="logreg_counts", config=config)


def test_cross_species_count_baselines_without_shared_genes():
    """Two inputs whose genes have no one-to-one ortholog in common: said, not an empty matrix's error."""
    from mixgeneformer.classify import align_genes

    a, b = np.ones((2, 2)), np.ones((3, 2))
    with pytest.raises(InputDataError, match="share no genes after ortholog mapping"):
        align_genes(a, np.array(["ENSG1", "ENSG2"]), b, np.array(["ENSG3", "ENSG4"]))


@pytest.mark.parametrize(("section", "values", "message"), [
    ("labels", {"min_class_fraction": 1.0}, r"labels.min_class_fraction=1.0 must be in \[0, 1\)"),
    ("labels", {"min_class_count": 0}, "labels.min_class_count=0 must be at least 1"),
    ("finetune", {"batch_size": 0}, "finetune.batch_size=0 must be >= 1"),
])
def test_classify_config_values(tmp_path, section, values, message):
    from mixgeneformer.classify import ClassifyConfig
    from mixgeneformer.config import load_config

    path = tmp_path / "classify.yaml"
    path.write_text(json.dumps({section: values}))
    with pytest.raises(ConfigError, match=message):
        load_config(ClassifyConfig, path)


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "bogus"], r"--mode 'bogus' is not one of \['all', 'finetune', 'knn', 'logreg', 'none', 'zero-shot'\]"),
    (["--mode", "none"], "--mode none runs nothing without --baselines"),
    ([], r"--mode all needs --model BUNDLE \(or use --mode none --baselines\)"),
])
def test_cli_classify_mode_mistakes(tmp_path, capsys, args, message):
    path = tmp_path / "cells.h5ad"
    _labelled().write_h5ad(path)
    assert cli_exit_code(["classify", path, "--out", tmp_path / "out", *args]) == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_zero_shot_predict_unknown_method():
    from mixgeneformer.classify import LabelConfig, within_task
    from mixgeneformer.classify.zeroshot import zero_shot_predict

    task = within_task(_labelled(), LabelConfig(key="cell_type"))
    x = np.zeros((task.train_rows.size, 2)), np.zeros((task.test_rows.size, 2))
    with pytest.raises(ConfigError, match=r"zero-shot method 'svm' is not one of \['knn', 'logreg'\]"):
        zero_shot_predict(task, *x, "svm")
    with pytest.raises(InputDataError, match="do not match the task's train/test cells"):
        zero_shot_predict(task, x[1], x[0], "knn")


# -- configs of the tokenizer, demo and planted data ------------------------------------------------------


@pytest.mark.parametrize(("values", "message"), [
    ({"min_coverage": 1.5}, "tokenize.min_coverage=1.5 is a fraction of gene IDs"),
    ({"max_len": 0}, "tokenize.max_len=0 leaves no room for genes after 0 special tokens"),
    ({"max_len": 3, "style": "v2", "add_species_token": True}, "tokenize.max_len=3 leaves no room for genes after 3 special tokens"),
    ({"chunk_size": 0}, r"tokenize.chunk_size \(0\) and task_cells \(50000\) must be ≥ 1"),
    ({"task_cells": 0}, r"tokenize.chunk_size \(4096\) and task_cells \(0\) must be ≥ 1"),
])
def test_tokenize_config_values(values, message):
    from mixgeneformer.tokenize import TokenizeConfig, load_tokenize_config

    with pytest.raises(ConfigError, match=message):
        load_tokenize_config(values)
    with pytest.raises(ConfigError, match="tokenize.style='v3' is not one of"):
        TokenizeConfig(style="v3")  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "message"), [
    ({"cells_per_type": 1}, r"demo.cells_per_type must be >= 2 \(or None for all cells\), got 1"),
    ({"min_class_count": 1}, r"demo.min_class_count=1 must be at least 2"),
])
def test_demo_config_values(values, message):
    from mixgeneformer.demo import DemoConfig

    with pytest.raises(ConfigError, match=message):
        DemoConfig.quick_config(**values)


@pytest.mark.parametrize(("values", "message"), [
    ({"n_types": 0}, "planted.n_types must be >= 1, got 0"),
    ({"specific_program_size": 9, "n_specific_genes": 5}, "planted.specific_program_size cannot exceed planted.n_specific_genes"),
    ({"program_overlap": 1.5}, r"planted.program_overlap must be in \[0, 1\], got 1.5"),
    ({"program_fold": 0}, "planted folds and library_size must be > 0, dispersion >= 0"),
    ({"dispersion": -1.0}, "planted folds and library_size must be > 0, dispersion >= 0"),
])
def test_planted_config_values(values, message):
    from mixgeneformer.simulate import PlantedConfig

    with pytest.raises(ConfigError, match=message):
        PlantedConfig(**values)


# -- demo folders -------------------------------------------------------------------------------------


def test_demo_report_of_an_unfinished_demo_names_the_missing_step(tmp_path):
    from mixgeneformer.config import to_dict
    from mixgeneformer.demo import DemoConfig, write_report
    from mixgeneformer.demo.config import DEMO_MARKER

    config = DemoConfig.quick_config(data_dir=str(tmp_path / "data"))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / DEMO_MARKER).write_text(json.dumps({"fingerprint": config.fingerprint(), "config": to_dict(config)}))
    with pytest.raises(ArtifactError, match=r"demo step 'data' has not finished in .*demo \(.*STEP_DONE.json missing\); run the demo first"):
        write_report(tmp_path / "demo")
    assert not (tmp_path / "demo" / "report").exists()


def test_demo_overwrite_replaces_its_own_folder_and_refuses_anything_else(tmp_path):
    from mixgeneformer.config import to_dict
    from mixgeneformer.demo import DemoConfig, run_demo
    from mixgeneformer.demo.config import DEMO_MARKER

    config = DemoConfig.quick_config(data_dir=str(tmp_path / "no_data"))
    old = tmp_path / "demo"
    old.mkdir()
    (old / DEMO_MARKER).write_text(json.dumps({"fingerprint": "other", "config": to_dict(config)}))
    (old / "old_step.txt").write_text("from the earlier run")
    with pytest.raises(ArtifactError, match=r"demo input .*no_data/baron_pancreas_human.h5ad not found; set data_dir"):
        run_demo(old, config, overwrite=True, progress=False)
    assert not (old / "old_step.txt").exists()  # the earlier run was replaced
    assert json.loads((old / DEMO_MARKER).read_text())["fingerprint"] == config.fingerprint()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="--overwrite only replaces outputs of mixgeneformer"):
        run_demo(mine, config, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "keep"


def test_demo_label_key_missing_from_the_data(tmp_path, baron_data):
    from mixgeneformer.demo import DemoConfig, run_demo

    config = DemoConfig.quick_config(data_dir=str(baron_data), label_key="no_such_column")
    with pytest.raises(ConfigError, match=r"baron_pancreas_human.h5ad has no obs column 'no_such_column' \(label_key\); columns: \["):
        run_demo(tmp_path / "demo", config, progress=False)


# -- pickles, genes, helpers -----------------------------------------------------------------------------


def test_truncated_geneformer_dictionary_is_named(tmp_path):
    from mixgeneformer.vocab import import_geneformer

    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2}, protocol=4)[:-9])
    with pytest.raises(ArtifactError, match=rf"Geneformer token dictionary {path} could not be read \(.*\); it may be truncated"):
        import_geneformer(path)


def test_geneformer_dictionary_of_an_old_protocol_with_a_set_loads(tmp_path):
    """Protocol 2 pickles name builtins (``__builtin__.set``) by module: admitted, since plain containers are."""
    from mixgeneformer.pickles import load_restricted_pickle

    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"a": {1, 2}}, protocol=2))
    assert load_restricted_pickle(path) == {"a": {1, 2}}


def test_gene_ids_without_columns_or_of_an_unknown_species():
    from mixgeneformer.genes import gene_table, map_gene_ids

    with pytest.raises(GeneIdError, match=r"no gene identifiers given: the matrix has no columns \(var is empty\)"):
        map_gene_ids([])
    with pytest.raises(GeneIdError, match=r"species must be one of \['human', 'mouse'\], got 'dog'"):
        map_gene_ids(["ENSG00000000003"], species="dog")  # type: ignore[arg-type]
    with pytest.raises(GeneIdError, match=r"species must be one of \['human', 'mouse'\], got 'dog'"):
        gene_table("dog")  # type: ignore[arg-type]


def test_upper_cased_mouse_symbols_are_detected_as_mouse():
    """Symbols whose case was changed match no species exactly; ignoring case they are mouse ones."""
    from mixgeneformer.genes import gene_table, map_gene_ids

    human = set(gene_table("human")["symbol"].str.upper())
    mouse = gene_table("mouse")
    only_mouse = [s.upper() for s in mouse["symbol"] if s and s.upper() not in human and s.upper() != s][:50]
    mapping = map_gene_ids(only_mouse, species="auto", min_coverage=0.0)
    assert mapping.species == "mouse"


def test_python2_builtins_are_still_only_the_plain_containers(tmp_path):
    from mixgeneformer.pickles import load_restricted_pickle

    path = tmp_path / "evil.pkl"
    path.write_bytes(b"c__builtin__\neval\n(S'1+1'\ntR.")  # protocol 0: __builtin__.eval('1+1')
    with pytest.raises(ArtifactError, match=r"refusing to unpickle builtins.eval"):
        load_restricted_pickle(path)


# -- tokenizer ------------------------------------------------------------------------------------------


def _tokenize_inputs(tmp_path, n_cells: int = 30):
    from _tokenize_helpers import make_medians, make_vocab

    adata = make_adata(n_cells, 60)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    genes = adata.var_names.to_numpy(dtype=object)
    return adata, path, make_vocab(genes), make_medians(genes)


def test_tokenize_files_refuses_settings_the_vocabulary_or_call_cannot_serve(tmp_path):
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files
    from mixgeneformer.vocab import Vocabulary

    adata, path, vocab, medians = _tokenize_inputs(tmp_path)
    genes = list(adata.var_names)
    v1 = Vocabulary(["<pad>", "<mask>", *genes], {g: i + 2 for i, g in enumerate(genes)}, "geneformer")
    out = tmp_path / "corpus"
    with pytest.raises(ConfigError, match=r"style='v2' needs <cls> and <eos> tokens, which this vocabulary lacks"):
        tokenize_files(path, out, v1, medians, TokenizeConfig(style="v2"))
    with pytest.raises(ConfigError, match=r"add_species_token=True but the vocabulary has no species tokens"):
        tokenize_files(path, out, v1, medians, TokenizeConfig(add_species_token=True))
    with pytest.raises(ConfigError, match=r"medians='corpus' needs a median table; pass medians= \(CLI: --medians"):
        tokenize_files(path, out, vocab, None)
    with pytest.raises(InputDataError, match="no input files given"):
        tokenize_files([], out, vocab, medians)
    with pytest.raises(ConfigError, match="workers must be >= 1, got 0"):
        tokenize_files(path, out, vocab, medians, workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]  # nothing written


def test_tokenize_files_copies_shards_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    import os

    import datasets

    from mixgeneformer.tokenize import tokenize_files

    _, path, vocab, medians = _tokenize_inputs(tmp_path)
    linked = datasets.load_from_disk(str(tokenize_files(path, tmp_path / "linked", vocab, medians)))

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    copied = datasets.load_from_disk(str(tokenize_files(path, tmp_path / "copied", vocab, medians)))
    assert len(copied) == len(linked) > 0
    assert copied["input_ids"] == linked["input_ids"] and copied["cell_index"] == linked["cell_index"]
    assert not list(tmp_path.glob(".*partial"))


def test_tokenize_files_filter_pass_off_and_kept_totals_ignore_those_obs_columns(tmp_path):
    """filter_pass=False keeps cells marked 0; totals='kept' normalizes by the vocabulary genes' counts,
    whatever an obs n_counts column says."""
    import datasets

    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    adata, path, vocab, medians = _tokenize_inputs(tmp_path)
    plain = datasets.load_from_disk(str(tokenize_files(path, tmp_path / "plain", vocab, medians, TokenizeConfig(totals="kept"))))
    adata.obs["filter_pass"] = 0
    adata.obs["n_counts"] = np.random.default_rng(3).uniform(1, 1e6, adata.n_obs)
    marked = tmp_path / "marked.h5ad"
    adata.write_h5ad(marked)
    kept = datasets.load_from_disk(str(tokenize_files(marked, tmp_path / "kept", vocab, medians,
                                                      TokenizeConfig(totals="kept", filter_pass=False))))
    assert kept["input_ids"] == plain["input_ids"] and kept["cell_index"] == plain["cell_index"]
    with pytest.raises(InputDataError, match="no cell could be tokenized"):
        tokenize_files(marked, tmp_path / "none", vocab, medians, TokenizeConfig(totals="kept"))


def test_tokenize_duplicate_genes_error_on_a_file_without_duplicates_tokenizes_as_sum(tmp_path):
    import datasets

    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    _, path, vocab, medians = _tokenize_inputs(tmp_path)
    summed = datasets.load_from_disk(str(tokenize_files(path, tmp_path / "sum", vocab, medians)))
    strict = datasets.load_from_disk(str(tokenize_files(path, tmp_path / "err", vocab, medians, TokenizeConfig(duplicate_genes="error"))))
    assert strict["input_ids"] == summed["input_ids"] and len(strict) > 0


def test_tokenize_input_whose_genes_are_all_outside_the_vocabulary_is_named(tmp_path):
    from _tokenize_helpers import make_medians, make_vocab

    from mixgeneformer.tokenize import tokenize_files

    _, path, _, _ = _tokenize_inputs(tmp_path)
    other = human_ids(200)[100:]  # none of the input's 60 genes
    with pytest.raises(GeneIdError, match=r"cells.h5ad: none of its 60 genes is in the vocabulary with a median .*Wrong species"):
        tokenize_files(path, tmp_path / "corpus", make_vocab(other), make_medians(other))
    assert not (tmp_path / "corpus").exists() and not list(tmp_path.glob(".*partial"))


# -- perturbation tables, shards and statistics --------------------------------------------------------


def _cells_table(n_cells: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"cell": np.repeat(np.arange(n_cells // 2), 2), "perturbed": ["ENSG00000000003", "ENSG00000000005"] * (n_cells // 2),
                         "gene_token": [10, 11] * (n_cells // 2), "gene_rank": [0, 1] * (n_cells // 2),
                         "shift": rng.uniform(0, 1, n_cells)})


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"mode": "paired"}, ConfigError, r"mode='paired'; use 'vs_all', 'vs_null' or 'aggregate'"),
    ({"mode": "vs_null"}, ConfigError, r"mode='vs_null' needs the null run's table \(null=..., CLI: --null DIR\)"),
    ({"score": "goal_shift"}, ConfigError, r"score column 'goal_shift' is not in the table \(columns: \['cell'"),
    ({"mode": "vs_null", "null": _cells_table().drop(columns="shift")}, ConfigError, "the null table has no 'shift' column"),
])
def test_perturbation_statistics_option_mistakes(kwargs, error, message):
    from mixgeneformer.perturb import perturbation_statistics

    with pytest.raises(error, match=message):
        perturbation_statistics(_cells_table(), **kwargs)


def test_perturbation_statistics_of_a_run_that_perturbed_no_cell():
    from mixgeneformer.perturb import perturbation_statistics

    with pytest.raises(InputDataError, match="the perturbation table is empty: no cell expressed the perturbed genes"):
        perturbation_statistics(_cells_table().iloc[:0])


def _write_shards(out, configs, shifts=(False, False)):
    from mixgeneformer.config import save_config

    shards = out / "shards"
    shards.mkdir(parents=True)
    world = len(configs)
    for index, config in enumerate(configs):
        name = f"{index:05d}-of-{world:05d}"
        save_config(config, shards, f"config-{name}.yaml")
        _cells_table().assign(cell=lambda t, i=index: t["cell"] + 10 * i).to_parquet(shards / f"cells-{name}.parquet")
        if shifts[index]:
            pd.DataFrame({"gene_token": [10], "shift": [0.5]}).to_parquet(shards / f"gene_shifts-{name}.parquet")


def test_merge_of_shards_that_ran_with_different_options_or_measured_shifts_on_some(tmp_path):
    from _tokenize_helpers import make_vocab

    from mixgeneformer.perturb import PerturbConfig, merge_run

    vocab = make_vocab(human_ids(20))
    _write_shards(tmp_path / "a", [PerturbConfig(seed=0), PerturbConfig(seed=1)])
    with pytest.raises(ArtifactError, match=r"the shards in .*a/shards ran with different options \(2 versions of config-\*.yaml\); rerun every shard"):
        merge_run(tmp_path / "a", vocab)
    _write_shards(tmp_path / "b", [PerturbConfig(gene_shifts=True, genes=["ENSG00000000003"])] * 2, shifts=(True, False))
    with pytest.raises(ArtifactError, match=r"only 1 of the 2 shards in .*b/shards measured gene shifts; rerun every shard"):
        merge_run(tmp_path / "b", vocab)
    assert not (tmp_path / "a" / "merged").exists() and not (tmp_path / "b" / "merged").exists()


def test_shard_folder_that_is_a_file_or_someone_elses(tmp_path):
    from mixgeneformer.perturb import check_shard_folder, merge_shards

    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"--out .*file is a file; a sharded run writes a folder \(OUT/shards/\)"):
        check_shard_folder(tmp_path / "file", [])
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match=r"--out .*theirs holds files of something else \(no shards/ folder"):
        check_shard_folder(tmp_path / "theirs", [])
    check_shard_folder(tmp_path / "new", [])  # a new folder is fine
    with pytest.raises(InputDataError, match="no shard tables to merge"):
        merge_shards([])


# -- fine-tuning: two classes ------------------------------------------------------------------------------


def test_probe_start_of_a_two_class_head_gives_the_probe_probabilities():
    """With two classes sklearn fits one row (class 1); the head gets both rows, so its softmax at the start
    of fine-tuning equals the probe's probabilities."""
    import torch
    from test_classify import tiny_model, token_task

    from mixgeneformer import classify as C
    from mixgeneformer.classify.recipe import init_head_from_probe, pooled_features

    _, vocab, tokens = token_task(n_per_class=12, n_classes=2)
    labels = np.asarray([int(ids[1] >= 6 + 8) for ids in tokens.dataset["input_ids"]])  # the marker block says the class
    classifier = C.build_classifier(tiny_model(vocab), ["type0", "type1"], vocab, seed=0)
    fit_set = tokens.dataset.add_column("labels", labels.tolist())
    init_head_from_probe(classifier, fit_set, vocab.pad_id, balanced=False, seed=0)
    features = pooled_features(classifier, fit_set, vocab.pad_id)
    probe = C.fit_logreg(features, labels, seed=0)
    with torch.no_grad():
        head = torch.softmax(classifier.classifier(torch.as_tensor(features)).double(), dim=1).numpy()
    np.testing.assert_allclose(head, probe.predict_proba(features), atol=1e-4)
    assert head.shape == (24, 2) and set(np.argmax(head, axis=1)) == {0, 1}


# -- figures -----------------------------------------------------------------------------------------


def test_figure_functions_refuse_wrong_arguments_with_the_fix(tmp_path):
    from mixgeneformer.plots import confusion_matrix, perturbation_ranking, training_curves, umap

    with pytest.raises(InputDataError, match=r"matrix must be square with one row per label; got \(2, 3\) for 2 labels"):
        confusion_matrix(matrix=np.ones((2, 3)))
    with pytest.raises(ConfigError, match="pass y_true and y_pred, or matrix="):
        confusion_matrix(y_true=["a"])
    with pytest.raises(ConfigError, match=r"color='cell_type' names an obs column, but the input is an array; pass the labels themselves"):
        umap(np.zeros((5, 2)), color="cell_type")
    with pytest.raises(ConfigError, match=r"species has shape \(3,\), expected one label per cell \(5,\)"):
        umap(np.zeros((5, 2)), species=["a", "b", "c"])
    with pytest.raises(InputDataError, match=r"embeddings must be 2-D \(cells x dims\), got shape \(5,\)"):
        umap(np.zeros(5))
    results = pd.DataFrame({"symbol": ["A", "B"], "shift": [0.2, -0.1]})
    with pytest.raises(ConfigError, match="results must be a pandas DataFrame, got dict"):
        perturbation_ranking(results.to_dict())
    with pytest.raises(InputDataError, match="the perturbation results are empty; nothing to rank"):
        perturbation_ranking(results.iloc[:0])
    for top in (0, True, 2.5):
        with pytest.raises(ConfigError, match=rf"top must be a whole number >= 1, got {top!r}"):
            perturbation_ranking(results, top=top)
    with pytest.raises(ConfigError, match=r"score column 'goal' not in the results; columns: \['symbol', 'shift'\]"):
        perturbation_ranking(results, score="goal")
    damaged = tmp_path / "metrics.csv"
    damaged.write_bytes(b"step,loss\n1,\xff\xfe\x00garbage\n")
    with pytest.raises(InputDataError, match=rf"metrics CSV {damaged} cannot be parsed .*; is it truncated\?"):
        training_curves(damaged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


# -- pretraining helpers: sampler without length grouping, baselines of a large corpus ------------------------


def test_sampler_without_length_grouping_shuffles_every_cell_once_per_epoch():
    """data.group_by_length=false: each epoch is a permutation of all cells, fixed by (seed, epoch)."""
    from mixgeneformer.sampling import PretrainSampler

    sampler = PretrainSampler(50, batch_size=8, seed=3, group_by_length=False)
    first = sampler.epoch_order(0)
    assert sorted(first.tolist()) == list(range(50)) and first.tolist() != list(range(50))
    assert np.array_equal(first, PretrainSampler(50, batch_size=8, seed=3, group_by_length=False).epoch_order(0))
    assert not np.array_equal(first, sampler.epoch_order(1))
    sampler.set_epoch(1)
    assert list(sampler) == sampler.epoch_order(1).tolist()
    with pytest.raises(ConfigError, match="group_by_length needs the corpus column 'length'"):
        PretrainSampler(50, batch_size=8, seed=3, lengths=np.ones(49))
    with pytest.raises(ConfigError, match="species_balanced sampling needs the corpus column 'species'"):
        PretrainSampler(50, batch_size=8, seed=3, group_by_length=False, species_balanced=True)


def test_frequency_baselines_count_a_seeded_subset_of_a_large_corpus():
    from mixgeneformer.diagnostics import frequency_baselines

    special = np.array([0, 1])
    cells = [np.full(i + 1, 2 + i % 5, dtype=np.int64) for i in range(50)]  # cell i: i + 1 tokens

    def counted(seed):
        return frequency_baselines(cells, 8, special, max_len=64, bucket_size=8, prior_strength=1.0, max_cells=20, seed=seed)

    a, b, c = counted(0), counted(0), counted(1)
    assert a.n_cells == 20 and 20 * 21 // 2 <= a.n_tokens <= sum(range(31, 51))
    assert a.n_tokens == b.n_tokens and np.array_equal(a.rank_log_prob, b.rank_log_prob)
    assert c.n_tokens != a.n_tokens
    whole = frequency_baselines(cells, 8, special, max_len=64, bucket_size=8, prior_strength=1.0, max_cells=None)
    assert whole.n_cells == 50 and whole.n_tokens == 50 * 51 // 2
    with pytest.raises(InputDataError, match="bucket_size must be >= 1, got 0"):
        frequency_baselines(cells, 8, special, max_len=64, bucket_size=0)
    with pytest.raises(InputDataError, match="no training cells to count frequency baselines from"):
        frequency_baselines([], 8, special, max_len=64)
    with pytest.raises(InputDataError, match=r"token ids outside 0..7; the corpus was tokenized with another vocabulary"):
        frequency_baselines([np.array([2, 9])], 8, special, max_len=64, prior_strength=1.0)


def test_eval_metrics_of_no_masked_gene_are_nan_and_a_tuple_of_predictions_is_read():
    from transformers import EvalPrediction

    from mixgeneformer.diagnostics import METRIC_NAMES, STAT_NAMES, compute_eval_metrics, summarize

    assert all(np.isnan(v) for v in summarize(np.zeros((3, len(STAT_NAMES)))).values())
    stats = np.zeros((2, len(STAT_NAMES)))
    stats[:, 0] = 2.0
    stats[:, 1:] = 1.0
    metrics = compute_eval_metrics(EvalPrediction(predictions=(stats, None), label_ids=None))
    assert metrics == {name: 0.5 for name in METRIC_NAMES}


def test_integration_scores_refuse_cells_without_species():
    from mixgeneformer.integration import species_mixing

    with pytest.raises(InputDataError, match="2 cells have no species label; give every cell its species"):
        species_mixing(np.zeros((4, 2)), ["human", None, "nan", "mouse"], ["a", "a", "b", "b"])


def test_model_helpers_refuse_a_wrong_ortholog_map_or_pooling():
    import torch
    from test_classify import tiny_model, token_task

    from mixgeneformer.errors import VocabularyMismatchError
    from mixgeneformer.model import describe, pool_cells

    _, vocab, _ = token_task(n_per_class=4)
    model = tiny_model(vocab)
    with pytest.raises(VocabularyMismatchError, match=rf"ortholog map has \(3,\) entries but the model vocabulary has {len(vocab.tokens)} tokens"):
        model.set_ortholog_map(torch.arange(3))
    ids = torch.tensor([[2, 7, 8]])
    with pytest.raises(ConfigError, match="pooling must be 'mean' or 'cls', got 'max'"):
        pool_cells(torch.zeros(1, 3, 4), ids, torch.ones_like(ids), [0, 1, 2], pooling="max")  # type: ignore[arg-type]
    summary = json.loads(describe(model))
    assert summary["vocab"] == len(vocab.tokens) and summary["params"] == sum(p.numel() for p in model.parameters())


def test_read_metrics_of_a_run_without_metrics_csv_is_empty(tmp_path):
    from mixgeneformer.metrics_csv import read_metrics

    assert read_metrics(tmp_path) == []


# -- perturbation with its progress bar (what the CLI shows) -------------------------------------------------


def _perturb_setup():
    import torch
    from transformers import BertConfig, BertModel

    from mixgeneformer.vocab import Vocabulary

    ids = list(human_ids(60))
    vocab = Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)})
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2, 4], rng.choice(np.arange(6, 66), rng.integers(6, 25), replace=False), [3]]).astype(np.int64)
             for _ in range(10)]
    return vocab, bert, cells


@pytest.mark.parametrize("mode", ["exact", "screen"])
def test_perturbation_with_a_progress_bar_gives_the_same_table(capsys, mode):
    """progress=True (the CLI's default) ran in no test: the bar counts every cell, skipped ones too, and
    the table is the one a run without a bar makes."""
    from mixgeneformer.perturb import PerturbConfig, perturb_cells

    vocab, bert, cells = _perturb_setup()
    present = [vocab.tokens[t] for t in cells[0][2:4]]  # genes of the first cell; most others lack them
    config = PerturbConfig(genes=present) if mode == "exact" else PerturbConfig(mode="screen", screen_top_k=2)
    quiet = perturb_cells(bert, cells, vocab, config, progress=False)
    capsys.readouterr()
    shown = perturb_cells(bert, cells, vocab, config, progress=True)
    pd.testing.assert_frame_equal(shown.cells, quiet.cells)
    assert "10/10" in capsys.readouterr().err
    if mode == "exact":
        assert quiet.summary["cells_skipped_gene_absent"] > 0


def test_cli_perturb_notes_statistics_it_could_not_run_and_accepts_a_null_of_the_same_mode(tmp_path, capsys):
    """Two genes listed and only one expressed: vs_all cannot test one perturbation, so the run says why its
    statistics are 'aggregate' (the 'note:' line); a null run of the same mode is then compared with."""
    import anndata as ad
    import scipy.sparse as sp
    from test_perturb import bundle_and_cells

    from mixgeneformer.vocab import Vocabulary

    ids = list(human_ids(60))
    vocab = Vocabulary(SPECIALS + ids, {g: i + len(SPECIALS) for i, g in enumerate(ids)})
    genes = bundle_and_cells(tmp_path, vocab)
    adata = ad.read_h5ad(tmp_path / "in.h5ad")
    counts = adata.X.toarray()
    counts[:, 1] = 0  # no cell expresses genes[1]
    ad.AnnData(sp.csr_matrix(counts), obs=adata.obs, var=adata.var).write_h5ad(tmp_path / "in.h5ad")
    base = ["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--genes", f"{genes[0]},{genes[1]}",
            "--device", "cpu", "--no-progress"]
    assert cli_exit_code([*base, "--out", tmp_path / "run"]) == 0
    out = capsys.readouterr().out
    assert f"note: mode='vs_all' needs two perturbations and this run scored one ({genes[0]})" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["statistics"]["requested"] == "vs_all" and summary["statistics"]["mode"] == "aggregate"
    assert cli_exit_code([*base, "--out", tmp_path / "vs_null", "--stats", "vs_null", "--null", tmp_path / "run"]) == 0
    table = pd.read_csv(tmp_path / "vs_null" / "genes.csv")
    assert table["perturbed"].tolist() == [genes[0]] and "null_mean_shift" in table.columns
    assert table["null_mean_shift"].iloc[0] == pytest.approx(table["mean_shift"].iloc[0])  # the same cells, the same model


def test_finetune_without_given_tokens_tokenizes_the_task_itself(tmp_path):
    """finetune(task, model, vocab, medians) with no tokens (the public call) tokenizes the task's cells
    with the model's length: the result is the one of a call given those tokens."""
    import anndata as ad
    from _tokenize_helpers import make_counts, random_gene_bundle

    from mixgeneformer import classify as C

    made = random_gene_bundle(tmp_path / "model", 60, 0)
    obs = pd.DataFrame({"cell_type1": ["a", "b"] * 20}, index=[f"c{i}" for i in range(40)])
    adata = ad.AnnData(make_counts(40, 60, seed=2), obs=obs, var=pd.DataFrame(index=made.ids[:60]))
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = C.ClassifyConfig(labels=C.LabelConfig(min_class_fraction=0), finetune=C.FinetuneConfig(
        epochs=1, batch_size=8, device="cpu", head_init="random"))
    own, _ = C.finetune(task, made.model, made.vocab, made.medians, config)
    tokens = C.tokenize_task(task, made.vocab, made.medians, None, 128)[1:]
    given, _ = C.finetune(task, made.model, made.vocab, made.medians, config, tokens=tokens)
    assert own.metrics == given.metrics and np.array_equal(own.y_pred, given.y_pred) and own.rows.size == 8


def test_embed_and_predict_api_name_a_missing_input(tmp_path):
    from mixgeneformer.classify.predict import predict_file
    from mixgeneformer.embed import embed_to_outputs

    missing = tmp_path / "cells.h5ad"
    with pytest.raises(ArtifactError, match=rf"input {missing} does not exist; give .*or a tokenized corpus folder"):
        embed_to_outputs(missing, tmp_path / "model", tmp_path / "out.h5ad")
    with pytest.raises(ArtifactError, match=rf"input {missing} does not exist; give .*or a tokenized corpus folder"):
        predict_file(missing, tmp_path / "classifier", tmp_path / "out.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_demo_report_names_the_objective_the_demo_pretrained_with():
    """contrastive_weight=0 pretrains without SimCSE, yet the report's objective read 'MLM + SimCSE' (and
    a negative weight, which maximises the contrastive loss, was taken and failed nowhere)."""
    from mixgeneformer.demo import DemoConfig
    from mixgeneformer.demo.report import _objective

    mlm = "MLM (output bias started at the log gene frequencies)"
    assert _objective(DemoConfig.quick_config(cross_species_weight=0.0)) == f"{mlm} + SimCSE"
    assert _objective(DemoConfig.quick_config(cross_species_weight=0.0, contrastive_weight=0.0)) == mlm
    assert _objective(DemoConfig.quick_config(contrastive_weight=0.5, cross_species_queue=0, cross_species_k=20, mlm_bias_init="zero")) == (
        "MLM + SimCSE × 0.5 + cross-species term × 0.05, 20-reciprocal nearest cells of the batch as positives")
    with pytest.raises(ConfigError, match=r"demo.contrastive_weight.* must be finite and >= 0, got \[2.0, 5, -1.0, 0.05"):
        DemoConfig.quick_config(contrastive_weight=-1.0)


def test_overexpressing_more_genes_than_the_model_has_positions_is_refused():
    import torch
    from transformers import BertConfig, BertModel

    from mixgeneformer.perturb import PerturbConfig, perturb_cells

    vocab, _, cells = _perturb_setup()
    cells = [cell[:12].tolist() + [3] for cell in cells]  # <cls> <human> 10 genes <eos>
    torch.manual_seed(0)
    short = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=16), add_pooling_layer=False).eval()
    genes = [vocab.tokens[t] for t in range(6, 20)]
    config = PerturbConfig(perturb="overexpress", genes=genes, combine=True, overexpress_absent="insert")
    with pytest.raises(InputDataError, match=r"overexpressing 14 gene\(s\) needs 17 positions but the model accepts 16; overexpress fewer genes"):
        perturb_cells(short, cells, vocab, config, progress=False)
    fits = perturb_cells(short, cells, vocab, dataclasses.replace(config, genes=genes[:5]), progress=False)
    assert len(fits.cells) == len(cells)


def test_an_anchored_shard_without_cells_has_the_columns_of_a_full_one():
    from mixgeneformer.perturb import (
        PerturbConfig,
        merge_shards,
        perturb_cells,
        perturbation_statistics,
    )

    vocab, bert, cells = _perturb_setup()
    anchor, genes = vocab.tokens[cells[0][2]], [vocab.tokens[t] for t in cells[0][3:6]]
    full = perturb_cells(bert, cells[:4], vocab, PerturbConfig(genes=genes, anchor=anchor), progress=False).cells
    empty = perturb_cells(bert, cells[:4], vocab, PerturbConfig(genes=genes, anchor=anchor, shard_index=5, num_shards=6),
                          progress=False).cells
    assert empty.empty and empty.dtypes.to_dict() == full.dtypes.to_dict() and "anchor_token" in empty.columns
    merged = merge_shards([full, empty])
    pd.testing.assert_frame_equal(perturbation_statistics(merged), perturbation_statistics(full))


def test_species_mixing_without_a_working_scib_metrics_falls_back_to_sklearn(monkeypatch):
    """scib-metrics absent or failing to import (jax): the silhouette is still given, and the backend says so."""
    from mixgeneformer.integration import scib_available, species_mixing

    rng = np.random.default_rng(0)
    x, species, types = rng.normal(size=(40, 5)), np.array(["human", "mouse"] * 20), np.array(["a"] * 20 + ["b"] * 20)
    with_scib = species_mixing(x, species, types)
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # import raises ImportError
    assert not scib_available()
    fallback = species_mixing(x, species, types, kbet=True)
    assert fallback["backend"] == "sklearn" and "ilisi" not in fallback and "kbet" not in fallback
    assert fallback["species_asw"] == pytest.approx(with_scib["species_asw"])
    assert fallback["species_asw_shuffled"] == pytest.approx(with_scib["species_asw_shuffled"])


def test_interrupt_while_the_command_line_loads_exits_130(monkeypatch, capsys):
    import mixgeneformer.cli._main as cli_main

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "main", interrupted)
    assert cli_exit_code(["--help"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_classification_metrics_need_equally_long_label_arrays():
    from mixgeneformer.classify import classification_metrics

    with pytest.raises(InputDataError, match=r"need equally long, non-empty label arrays; got \(2,\) and \(1,\)"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(InputDataError, match="non-empty label arrays"):
        classification_metrics([], [])


@pytest.mark.parametrize(("values", "message"), [
    ({"n_shared_genes": 10**6}, r"only \d+ protein-coding one-to-one pairs are shipped; n_shared_genes=1000000"),
    ({"n_specific_genes": 10**6, "specific_program_size": 1}, r"only \d+ human protein-coding genes without an ortholog; n_specific_genes=1000000"),
])
def test_planted_data_larger_than_the_shipped_gene_tables(values, message):
    from mixgeneformer.simulate import PlantedConfig, simulate_planted

    with pytest.raises(ConfigError, match=message):
        simulate_planted(PlantedConfig(**values))


def test_benjamini_hochberg_of_untested_p_values_only():
    from mixgeneformer.perturb import benjamini_hochberg

    assert np.isnan(benjamini_hochberg(np.array([np.nan, np.nan]))).all()
    np.testing.assert_allclose(benjamini_hochberg(np.array([0.01, np.nan, 0.04])), [0.02, np.nan, 0.04])
