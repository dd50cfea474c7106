"""Settings and report text an outside audit broke (part D).

A diverged pretraining stops with one error instead of finishing with loss 0; JSON is strict; option
values are taken as given or refused with the fix (bad YAML, NaN, mixed-type keys, ``1e-5`` in
free-form sections, ranges of the baselines); report text and commands survive any label.
"""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pandas as pd
import pytest
from test_pretrain import synthetic, tiny_config  # noqa: F401  (synthetic is a fixture)

from mixgeneformer.classify import BaselineConfig, ClassifyConfig, EmbeddingConfig
from mixgeneformer.config import apply_overrides, load_config
from mixgeneformer.demo.config import DemoConfig
from mixgeneformer.demo.markdown import frame_markdown, markdown_to_html, md_text
from mixgeneformer.errors import ConfigError, InputDataError, TrainingDivergedError
from mixgeneformer.fileio import write_json
from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining


def test_a_diverged_pretraining_stops_with_one_error_and_logs_the_nan(tmp_path, synthetic):  # noqa: F811
    out = tmp_path / "run"
    config = tiny_config(synthetic, out, train={"max_steps": 12, "learning_rate": 1e30, "max_grad_norm": 0.0})
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+: .*nan.*learning_rate"):
        run_pretraining(pretrain_config_from_dict(config))
    rows = pd.read_csv(out / "metrics.csv")
    assert rows["mlm_loss"].isna().iloc[-1] or not np.isfinite(rows["mlm_loss"].iloc[-1])
    assert not (out / "model").exists()  # no bundle of NaN weights


def test_json_is_strict_nan_becomes_null(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.array([np.nan, 2.0])})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "a": None, "b": [None, 1.5], "c": [None, 2.0]
    }


def test_override_values_that_are_not_yaml_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"override perturb_start: .*not valid YAML.*quote it"):
        apply_overrides({}, ["perturb_start=[1,"])
    assert apply_overrides({}, ["x='@a'"]) == {"x": "@a"}


def test_option_values_are_taken_as_given_and_overrides_win():
    config = load_config(ClassifyConfig, None, ["labels.seed=3"], {"labels.key": "cell type #1", "labels.seed": 1})
    assert config.labels.key == "cell type #1" and config.labels.seed == 3
    assert load_config(ClassifyConfig, None, None, {"labels.key": "1"}).labels.key == "1"


def test_config_files_mixed_keys_tab_json_and_nan(tmp_path):
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("foo: 1\n1: 2\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \[1, 'foo'\]"):
        load_config(ClassifyConfig, mixed)
    tabbed = tmp_path / "tabbed.json"
    tabbed.write_text(json.dumps({"labels": {"key": "celltype"}}, indent="\t"))
    assert load_config(ClassifyConfig, tabbed).labels.key == "celltype"
    for value in ("nan", ".inf", "-.inf"):
        with pytest.raises(ConfigError, match="finite number"):
            load_config(ClassifyConfig, None, [f"finetune.learning_rate={value}"])


def test_exponent_numbers_in_free_form_sections_are_numbers():
    config = pretrain_config_from_dict({
        "output_dir": "run", "data": {"corpus": ["c"], "vocab": "v.json"},
        "model": {"preset": "tiny", "overrides": {"layer_norm_eps": "1e-5"}}, "objective": {"temperature": "5e-2"},
    })
    assert config.model.overrides["layer_norm_eps"] == pytest.approx(1e-5)
    assert config.objective["temperature"] == pytest.approx(0.05)


@pytest.mark.parametrize("values", [{"knn_k": 0}, {"n_pcs": 0}, {"logreg_c": -1.0}, {"clip": -1.0}, {"target_sum": -5.0}])
def test_baseline_settings_out_of_range_are_refused(values):
    name = next(iter(values))
    with pytest.raises(ConfigError, match=f"baselines.{name}"):
        BaselineConfig(**values)


def test_embedding_knn_k_zero_is_refused():
    with pytest.raises(ConfigError, match="embedding.knn_k"):
        EmbeddingConfig(knn_k=0)


@pytest.mark.parametrize("values", [{"preset": "custom"}, {"learning_rate": math.nan}, {"cross_species_weight": math.inf}])
def test_demo_settings_pretraining_would_refuse_are_refused_first(values):
    with pytest.raises(ConfigError):
        DemoConfig(**values)


def test_demo_refuses_an_unknown_device_before_any_step(tmp_path):
    from mixgeneformer.demo import run_demo

    with pytest.raises(ConfigError):
        run_demo(tmp_path / "demo", DemoConfig.quick_config(device="tpu"), progress=False)
    assert not (tmp_path / "demo").exists()


def test_classify_label_option_keeps_the_config_key_and_is_literal(tmp_path, capsys):
    import anndata as ad
    import scipy.sparse as sp

    from mixgeneformer.cli import main

    data = tmp_path / "cells.h5ad"
    ad.AnnData(sp.csr_matrix(np.ones((4, 3), dtype=np.float32)), obs=pd.DataFrame(
        {"celltype": list("aabb")}, index=[f"c{i}" for i in range(4)])).write_h5ad(data)
    config = tmp_path / "c.yaml"
    config.write_text("labels:\n  key: nothere\n")
    with pytest.raises(SystemExit) as exit_info:  # the config's key, not --label's old default 'cell_type1'
        main(["classify", str(data), "--mode", "none", "--baselines", "--config", str(config), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "'nothere' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a '#' is part of the name, not a YAML comment
        main(["classify", str(data), "--mode", "none", "--baselines", "--label", "celltype #x", "--out", str(tmp_path / "o")])
    assert "'celltype #x' not found" in capsys.readouterr().err


def test_report_text_keeps_any_label_on_its_row():
    label = "alpha\n<b>**x**</b> | `y` [z]"
    cell = md_text(label)
    assert "\n" not in cell and "|" not in cell
    table = frame_markdown(pd.DataFrame({"gene": [label, "beta"], "score": [0.5, 0.25]}))
    assert len(table.splitlines()) == 4
    page = markdown_to_html(table, "t")
    assert "<td>alpha &lt;b&gt;**x**&lt;/b&gt; / `y` [z]</td>" in page and "<b>" not in page


def test_the_demo_command_reads_back_every_changed_option():
    from mixgeneformer.config import from_dict
    from mixgeneformer.demo.markdown import shell_word
    from mixgeneformer.demo.report import _non_default_options

    cfg = DemoConfig(classify_seeds=[0, 1, 2, 3], perturb_start="1", perturb_goal="a b")
    command = "".join(f" --set {shell_word(f'{k}={v}')}" for k, v in _non_default_options(cfg).items())
    words = shlex.split(command)
    overrides = [w for w in words if w != "--set"]
    assert from_dict(DemoConfig, apply_overrides({}, overrides)) == cfg


def test_figure_labels_with_dollars_are_drawn_as_text(tmp_path):
    from mixgeneformer.plots import confusion_matrix

    confusion_matrix(["$\\foo$", "b"], ["b", "b"], save=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_species_mixing_without_finite_embeddings_says_so():
    from mixgeneformer.integration import species_mixing

    with pytest.raises(InputDataError, match="finite embedding"):
        species_mixing(np.full((6, 3), np.nan), ["human", "mouse"] * 3, ["a"] * 6)


def test_a_few_ids_of_the_other_species_are_left_out_with_a_warning(caplog):
    import logging

    from mixgeneformer.genes import _id_set, map_gene_ids

    human = sorted(_id_set("human"))[:98]
    mouse = sorted(_id_set("mouse"))[:2]
    with caplog.at_level(logging.WARNING, logger="mixgeneformer.genes"):
        mapping = map_gene_ids(human + mouse, species="human")
    assert list(mapping.ensembl_ids[-2:]) == ["", ""] and all(mapping.ensembl_ids[:98])
    assert any("2 of 100 gene IDs are not human" in r.getMessage() and "--allow-mixed-species" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("medians", [True, False])
def test_tokenize_takes_exactly_one_source_of_medians(tmp_path, capsys, medians):
    from mixgeneformer.cli import main

    args = ["tokenize", str(tmp_path / "in.h5ad"), "--vocab", str(tmp_path / "v.json"), "--out", str(tmp_path / "c")]
    args += ["--medians", str(tmp_path / "m.tsv"), "--per-file-medians"] if medians else []
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "pass one of --medians" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_rank_value_encode_sums_a_gene_stored_twice():
    import scipy.sparse as sp

    from mixgeneformer.tokenize.encode import rank_value_encode

    split = sp.csr_matrix((np.array([2.0, 3.0, 3.0, 1.0]), np.array([0, 0, 2, 3]), np.array([0, 4])), shape=(1, 4))
    whole = sp.csr_matrix(np.array([[5.0, 0.0, 3.0, 1.0]]))
    args = (np.arange(4, dtype=np.int64) + 10, np.ones(4), np.array([9.0]), 8)
    tokens, lengths = rank_value_encode(split, *args)
    assert split.nnz == 4  # the caller's matrix is not changed
    np.testing.assert_array_equal(tokens, rank_value_encode(whole, *args)[0])
    assert list(lengths) == [3]


def test_a_corpus_folder_is_not_embedded_under_a_key_with_a_slash(tmp_path):
    from mixgeneformer.embed import embed_corpus_folder

    with pytest.raises(ConfigError, match="/"):
        embed_corpus_folder(tmp_path / "no-corpus", tmp_path / "no-model", key="emb/v1")


def test_typed_mappings_keep_their_value_type():
    config = load_config(ClassifyConfig, None, ["synonyms={beta: '2E3'}"])
    assert config.synonyms == {"beta": "2E3"}
    with pytest.raises(ConfigError, match="synonyms.pp: expected a string"):
        load_config(ClassifyConfig, None, ["synonyms={pp: 1.5}"])


def test_report_numbers_read_back_from_json_as_null_say_n_a(tmp_path):
    from mixgeneformer.demo.report import _mixing_lines
    from mixgeneformer.diagnostics import diagnostics_markdown
    from mixgeneformer.fileio import read_json

    write_json(tmp_path / "r.json", {
        "mixing": {"species_asw": float("nan"), "species_asw_shuffled": 0.5, "n_cells": 4, "shared_types": ["a"], "backend": "sklearn"},
        "final": {"step": 10, "mlm_loss": float("nan"), "rank_unigram_loss": 8.0},
    })
    back = read_json(tmp_path / "r.json")
    assert "species ASW n/a (shuffled: 0.500)" in _mixing_lines(back["mixing"])[0]
    assert "| model | nan |" in diagnostics_markdown(back["final"])


def test_the_h5ad_writer_round_trips_every_element(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from mixgeneformer.fileio import write_h5ad

    rng = np.random.default_rng(0)
    x = sp.random(6, 4, density=0.5, format="csr", random_state=0, dtype=np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame({"t": pd.Categorical(list("aabbcc"))}, index=[f"c{i}" for i in range(6)]),
                       var=pd.DataFrame({"g": list("wxyz")}, index=list("ABCD")))
    adata.layers["counts"] = x.copy()
    adata.obsm["X_e"] = rng.normal(size=(6, 3))
    adata.varm["V"] = rng.normal(size=(4, 2))
    adata.obsp["d"] = sp.identity(6, format="csr")
    adata.uns["p"] = {"a": 1, "b": np.array([np.nan, 1.0])}
    adata.raw = adata.copy()
    back = ad.read_h5ad(write_h5ad(adata, tmp_path / "a.h5ad"))
    assert (back.X != adata.X).nnz == 0 and (back.layers["counts"] != x).nnz == 0
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    pd.testing.assert_frame_equal(back.var, adata.var)
    np.testing.assert_array_equal(back.obsm["X_e"], adata.obsm["X_e"])
    np.testing.assert_array_equal(back.varm["V"], adata.varm["V"])
    assert (back.obsp["d"] != adata.obsp["d"]).nnz == 0
    assert back.uns["p"]["a"] == 1 and np.isnan(back.uns["p"]["b"][0])
    assert back.raw is not None and (back.raw.X != x).nnz == 0
