"""Branches no in-process test ran (coverage at 98a9eb9) of the config, corpus, bundle, vocabulary,
median-table, file-stamp and CLI modules: what a user who reaches each one gets (RELIABILITY 13, 18, 24, 25)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import threading

import anndata as ad
import numpy as np
import pytest
import torch
import yaml
from _tokenize_helpers import SPECIALS, cli_exit_code, human_ids, make_adata, random_gene_bundle
from safetensors.torch import load_file, save_file

from mixgeneformer.bundle import load_bundle, load_for_inference, load_model, save_bundle
from mixgeneformer.config import load_config
from mixgeneformer.corpus import (
    check_cells_input,
    check_corpora,
    check_corpus_vocabulary,
    check_two_species,
    corpus_species_codes,
    load_corpus,
    open_corpus,
)
from mixgeneformer.errors import ArtifactError, ConfigError, GeneIdError, InputDataError
from mixgeneformer.filekinds import is_package_file, write_h5ad
from mixgeneformer.medians import GeneMedians
from mixgeneformer.model import MixGeneformerForPretraining
from mixgeneformer.model_config import make_config
from mixgeneformer.perturb import PerturbConfig
from mixgeneformer.pretrain_config import (
    TrainOptions,
    load_pretrain_config,
    pretrain_config_from_dict,
)
from mixgeneformer.vocab import Vocabulary, build_vocabulary, import_geneformer

BASE = {"output_dir": "run", "data": {"corpus": ["corpus"], "vocab": "vocab.json"}}


def _yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return random_gene_bundle(tmp_path_factory.mktemp("bundle") / "model", 12, 0)


# ------------------------------------------------------------------ model options (pretrain objective)
@pytest.mark.parametrize(("objective", "message"), [
    ({"temperature": "hot"}, "objective.temperature='hot' must be a finite number"),
    ({"num_hidden_layers": 0}, "objective.num_hidden_layers=0 must be a positive integer"),
    ({"hidden_act": "swishy"}, "objective.hidden_act='swishy' is no activation"),
    ({"gather_negatives": "yes please"}, "objective.gather_negatives='yes please' must be true or false"),
    ({"hidden_dropout_prob": 1.0}, r"objective.hidden_dropout_prob=1.0 must be a dropout probability in \[0, 1\)"),
])
def test_a_bad_model_option_value_is_refused_with_the_config(tmp_path, capsys, objective, message):
    """Before: only the names were checked up front; 'hot' failed in a bare comparison once the corpus was
    opened ("'>' not supported between 'str' and 'int'"), 0 layers trained a model without an encoder."""
    path = _yaml(tmp_path / "run.yaml", {**BASE, "output_dir": str(tmp_path / "run"), "objective": objective})
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(path)  # corpus and vocab do not exist: nothing is read first
    assert cli_exit_code(["pretrain", "--config", path]) == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "").split("=")[0] in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=message.replace("objective.", "model.")):
        make_config("tiny", None, vocab_size=10, **objective)  # the Python API: no bare TypeError either


def test_a_model_override_value_is_named_where_it_is_set():
    with pytest.raises(ConfigError, match="model.overrides.num_attention_heads=0 must be a positive integer"):
        pretrain_config_from_dict({**BASE, "model": {"overrides": {"num_attention_heads": 0}}})


@pytest.mark.parametrize(("change", "message"), [
    ({"output_dir": None}, "output_dir is required"),
    ({"data": {"corpus": ["c"]}}, "data.vocab is required"),
    ({"data": {**BASE["data"], "eval_fraction": 1.0}}, r"data.eval_fraction must be in \[0, 1\), got 1.0"),
    ({"data": {**BASE["data"], "mlm_probability": 0.0}}, r"data.mlm_probability must be in \(0, 1\), got 0.0"),
    ({"data": {**BASE["data"], "max_cells": 0}}, "data.max_cells must be positive, got 0"),
    ({"checkpoint": {"save_steps": 0}}, "checkpoint.save_steps must be >= 1, got 0"),
    ({"checkpoint": {"keep": -1}}, "checkpoint.keep must be >= 0, got -1"),
    ({"train": {"learning_rate": 0.0}}, "train.learning_rate must be > 0, got 0.0"),
    ({"train": {"epochs": 0.0}}, "set train.epochs > 0 or train.max_steps > 0"),
    ({"train": {"max_grad_norm": -1.0}}, "train.max_grad_norm must be >= 0, got -1.0"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay must be >= 0, got -0.1"),
    ({"logging": {"peak_tflops": 0.0}}, "logging.peak_tflops must be > 0, got 0.0"),
])
def test_pretrain_config_values_name_the_option(change, message):
    with pytest.raises(ConfigError, match=message):
        pretrain_config_from_dict({**BASE, **change})


@pytest.mark.parametrize(("text", "message"), [
    ("train: 5\n", r"train: expected a mapping, got 5"),
    ("data:\n  corpus: my_corpus\n", r"data.corpus: expected a list, got 'my_corpus'"),
    ("objective: 0.5\n", r"objective: expected a mapping, got 0.5"),
    ("train:\n  torch_compile: 1\n", r"train.torch_compile: expected true/false, got 1"),
    ("output_dir: 2024\n", r"output_dir: expected a path, got 2024. YAML reads 2024 unquoted as a int; quote it"),
])
def test_a_config_file_value_of_the_wrong_shape_is_named(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(path)


def test_a_section_given_as_a_dataclass_is_taken_as_is():
    config = pretrain_config_from_dict({**BASE, "train": TrainOptions(seed=3, max_steps=5)})
    assert config.train.seed == 3 and config.train.max_steps == 5


# ------------------------------------------------------------------ perturbation options
@pytest.mark.parametrize(("options", "message"), [
    ({"perturb": "activate"}, "needs target_rank"),
    ({"genes": ["INS"], "combine": True}, "list at least two genes"),
    ({"genes": ["INS", "GCG"], "combine": True, "anchor": "SST"}, "use either combine"),
    ({"goal": "beta"}, "need state_column"),
    ({"min_genes": 0}, "min_genes must be positive, got 0"),
    ({"state_column": "type", "cells_per_state": 0}, "cells_per_state must be positive, got 0"),
    ({"mode": "screen", "perturb": "overexpress"}, "estimates single-gene deletions only"),
    ({"gene_shifts": True}, "list the genes to perturb"),
    ({"shard_index": 0}, "give both shard_index and num_shards"),
    ({"shard_index": 2, "num_shards": 2}, r"shard_index=2 must be in \[0, num_shards=2\)"),
    ({"goal": 1, "state_column": "cluster"}, "goal: expected a string, got 1. YAML reads 1 unquoted as a int; quote it"),
])
def test_perturb_config_file_values_are_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PerturbConfig, _yaml(tmp_path / "perturb.yaml", options))


def test_perturb_cli_checks_the_options_before_the_inputs(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_exit_code(["perturb", tmp_path / "missing.h5ad", "-m", tmp_path / "no_model", "-o", out,
                          "--set", "min_genes=0"])
    err = capsys.readouterr().err
    assert code == 2 and "min_genes must be positive" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"perturb": "knockout"}, "perturb='knockout'; use 'delete'"),
    ({"mode": "fast"}, "mode='fast'; use 'exact' or 'screen'"),
])
def test_perturb_config_built_in_python_is_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        PerturbConfig(**options)


# ------------------------------------------------------------------ corpus folders
def test_a_damaged_corpus_metadata_file_is_named(tmp_path, bundle):
    """Before: check_corpus_vocabulary (embed / perturb of a corpus) crashed with AttributeError on a
    mixgf_corpus.json that is not an object; check_corpora said 'tokenized with vocabulary None'."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "mixgf_corpus.json").write_text("[1, 2]")
    for check in (lambda: check_corpus_vocabulary(corpus, bundle.vocab.hash), lambda: check_corpora([corpus], bundle.vocab)):
        with pytest.raises(ArtifactError, match=r"mixgf_corpus.json holds a JSON list, not the corpus's metadata"):
            check()
    assert (corpus / "mixgf_corpus.json").read_text() == "[1, 2]"


def test_corpus_folders_that_are_not_one_corpus(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ArtifactError, match=r"holds several splits \['train'\]; point at one split's folder"):
        load_corpus(tmp_path / "dd")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="could not be opened .*Re-tokenize it"):
        load_corpus(tmp_path / "plain")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ArtifactError, match="is a file; a corpus is the folder"):
        load_corpus(tmp_path / "f.txt")
    with pytest.raises(ArtifactError, match="does not exist; tokenize first"):
        load_corpus(tmp_path / "none")
    with pytest.raises(ArtifactError, match=r"corpus folder is a file, not a corpus folder: .*f.txt \(data.corpus\)"):
        check_corpora([tmp_path / "f.txt"], Vocabulary(SPECIALS, {}))
    with pytest.raises(ArtifactError, match=r"mixgf_corpus.json missing\). Create it with `mixgf tokenize`"):
        check_corpora([tmp_path / "plain"], Vocabulary(SPECIALS, {}))


def test_corpus_columns_and_max_cells(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"tokens": [[1, 2]]}).save_to_disk(str(tmp_path / "no_ids"))
    with pytest.raises(ArtifactError, match=r"has no 'input_ids' column \(columns: \['tokens'\]\)"):
        open_corpus([tmp_path / "no_ids"])
    datasets.Dataset.from_dict({"input_ids": [[4, 5], [6], [7, 8, 9]]}).save_to_disk(str(tmp_path / "c"))
    cut = open_corpus([tmp_path / "c"], max_cells=2)
    assert cut["input_ids"] == [[4, 5], [6]]
    with pytest.raises(ArtifactError, match="no 'species' column, needed for species-balanced sampling"):
        corpus_species_codes(cut)
    with pytest.raises(ConfigError, match="the corpus has no 'species' column.*cross_species_weight: 0"):
        check_two_species(cut, 0.5)


def test_a_bare_matrix_market_file_is_refused_by_name(tmp_path, capsys):
    mtx = tmp_path / "matrix.mtx"
    mtx.write_text("%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 3\n")
    with pytest.raises(InputDataError, match="is a Matrix Market file .*pass the 10x folder"):
        check_cells_input(mtx)
    out = tmp_path / "out"
    assert cli_exit_code(["perturb", mtx, "-m", tmp_path, "-o", out]) == 2
    assert "Matrix Market" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ model bundles
def test_a_sharded_safetensors_bundle_loads_and_a_damaged_index_is_named(tmp_path, bundle):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "medians.tsv"):
        (folder / name).write_bytes((bundle.folder / name).read_bytes())
    state = load_file(str(bundle.folder / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, str(folder / "a.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(folder / "b.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}}))
    model = load_model(folder)
    for key, tensor in bundle.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    for damaged in ("[1, 2]", json.dumps({"weight_map": ["a.safetensors"]})):
        index.write_text(damaged)  # before: AttributeError ('list' object has no attribute 'get' / 'values')
        with pytest.raises(ArtifactError, match=r"index.json is damaged: it must be a JSON object whose 'weight_map'"):
            load_bundle(folder)


def test_bundle_weights_in_other_layouts(tmp_path, bundle):
    model = load_model(bundle.folder, dtype=torch.float64, device="cpu")
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float64
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "vocab.json"):
        (folder / name).write_bytes((bundle.folder / name).read_bytes())
    bare = {k[len("bert."):]: v for k, v in bundle.model.state_dict().items() if k.startswith("bert.")}
    save_file(bare, str(folder / "model.safetensors"))  # a BertModel checkpoint: no "bert." prefix, no MLM head
    with pytest.raises(ArtifactError, match=r"lack 5 tensors \(e.g. \['cls.predictions.bias'.*not a BERT masked-LM model"):
        load_model(folder)
    save_file({f"bert.{k}": v for k, v in bare.items() if "layer.1." not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"lack \d+ tensors \(e.g. \['bert.encoder.layer.1"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    torch.save([torch.zeros(1)], folder / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="pytorch_model.bin hold a list, not a state dict"):
        load_model(folder)


def test_bundle_config_json_that_fits_no_model_is_named(tmp_path, bundle):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(bundle.folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    with pytest.raises(ArtifactError, match="do not fit config.json"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "pooling": "bogus"}))
    with pytest.raises(ArtifactError, match=r"config.json describes no model that can be built \(ConfigError: model.pooling"):
        load_model(folder)
    with pytest.raises(ArtifactError, match="is a file; pass the folder that holds config.json"):
        load_model(folder / "config.json")


def test_save_bundle_records_special_ids_and_in_memory_models_need_a_vocabulary(tmp_path, bundle):
    config = make_config("tiny", None, vocab_size=len(bundle.vocab), num_hidden_layers=1)
    assert config.special_token_ids is None
    saved = save_bundle(MixGeneformerForPretraining(config), tmp_path / "b", bundle.vocab)
    recorded = json.loads((saved / "config.json").read_text())["special_token_ids"]
    assert recorded == [int(i) for i in bundle.vocab.special_ids]
    medians_path = bundle.medians.save(tmp_path / "m.tsv")
    model, vocab, medians, _, name = load_for_inference(bundle.model, bundle.folder / "vocab.json", medians_path, None)
    assert vocab.hash == bundle.vocab.hash and medians == bundle.medians and name == "MixGeneformerForPretraining"
    with pytest.raises(ConfigError, match="an in-memory model needs its vocabulary"):
        load_for_inference(torch.nn.Linear(2, 2), None, None)
    with pytest.raises(ConfigError, match="must be a model bundle folder or a torch model, got int"):
        load_for_inference(3, None, None)


# ------------------------------------------------------------------ vocabularies
@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["tokens"].__setitem__(-1, d["tokens"][-2]), "duplicate token names"),
    (lambda d: d["tokens"].__setitem__(0, "<nothing>"), "lacks the required special token <pad>"),
    (lambda d: d["gene_to_id"].__setitem__(next(iter(d["gene_to_id"])), 999), "beyond its token list"),
    (lambda d: d.__setitem__("mode", "mixed"), "'mode' must be one of"),
])
def test_a_corrupt_vocabulary_file_is_named(tmp_path, capsys, bundle, edit, message):
    data = bundle.vocab.to_dict()
    edit(data)
    assert bundle.vocab.tokens == Vocabulary.load(bundle.folder / "vocab.json").tokens  # the dict was a copy
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=f"vocabulary {path}.*{message}"):  # before: no file named (first three)
        Vocabulary.load(path)
    assert cli_exit_code(["vocab", "info", path]) == 2
    assert str(path) in capsys.readouterr().err


def test_a_json_that_is_no_vocabulary(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"tokens": ["<pad>"]}))
    with pytest.raises(ArtifactError, match="is not a mixgeneformer vocabulary .*mixgf vocab build"):
        Vocabulary.load(path)


def test_build_vocabulary_choices():
    with pytest.raises(ConfigError, match="gene_set must be 'protein_coding', 'all' or 'medians', got 'coding'"):
        build_vocabulary(gene_set="coding")
    with pytest.raises(ConfigError, match="unknown species 'rat'"):
        build_vocabulary(species=["rat"])
    mouse_only = GeneMedians({"ENSMUSG00000000001": 1.0})
    with pytest.raises(GeneIdError, match="would contain no genes"):
        build_vocabulary(gene_set="medians", medians=mouse_only, species=["human"])
    coding = build_vocabulary(species=["human"])
    every = build_vocabulary(gene_set="all", species=["human"])
    assert set(coding.gene_to_id) < set(every.gene_to_id)


def test_a_geneformer_dictionary_that_is_not_usable_is_named(tmp_path):
    genes = list(human_ids(3))
    path = tmp_path / "token_dictionary.pkl"
    for raw, message in (({}, "not a Geneformer token dictionary"),
                         ({"<pad>": 0, "<mask>": 1, genes[0]: 3}, "not contiguous 0..2"),
                         ({"<mask>": 0, genes[0]: 1}, "not a usable Geneformer token dictionary: .*special token <pad>")):
        path.write_bytes(pickle.dumps(raw))
        with pytest.raises(ArtifactError, match=f"{path}.*{message}|{message}"):
            import_geneformer(path)
    path.write_bytes(pickle.dumps({"<mask>": 0, genes[0]: 1}))
    with pytest.raises(ArtifactError, match=str(path)):  # before: "vocabulary lacks ... <pad>." naming no file
        import_geneformer(path)


# ------------------------------------------------------------------ median tables
@pytest.mark.parametrize(("line", "error", "message"), [
    ("{g}\t-1.5", InputDataError, r"gene median for '{g}' is .*-1.5.*positive finite"),
    ("{g}\tnan", InputDataError, r"gene median for '{g}' is .*nan"),
    ("{g}.1\t1.0\n{g}.2\t2.0", InputDataError, "given twice for gene {g}"),
    ("{g}\t1.0\textra", ArtifactError, r"line 2: expected 2 tab-separated fields, got 3"),
    ("{g}\tone", ArtifactError, "line 2: median 'one' is not a number"),
])
def test_a_bad_median_table_line_names_the_file(tmp_path, line, error, message):
    gene = human_ids(1)[0]
    path = tmp_path / "medians.tsv"
    path.write_text(f"ensembl_id\tmedian\n{line.format(g=gene)}\n")
    with pytest.raises(error, match=f"gene median table {path}.*{message.format(g=gene)}"):
        GeneMedians.load(path)  # before (first three): the message named no file


def test_median_table_without_genes_blank_lines_and_accessors(tmp_path):
    genes = human_ids(2)
    path = tmp_path / "m.tsv"
    path.write_text("ensembl_id\tmedian\n\n")
    with pytest.raises(ArtifactError, match="holds no genes"):
        GeneMedians.load(path)
    path.write_text(f"ensembl_id\tmedian\n{genes[0]}\t2.0\n\n{genes[1]}\t0.5\n")
    with pytest.warns(UserWarning):
        table = GeneMedians.load(path)
    assert len(table) == 2 and genes[0] in table and "GeneMedians(2 genes" in repr(table)
    assert table.to_series().to_dict() == {genes[0]: 2.0, genes[1]: 0.5}
    assert table.lookup([]).shape == (0,)


# ------------------------------------------------------------------ file stamps, disk full
def test_an_h5ad_write_on_a_full_disk_raises_its_os_error(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as caught:
        write_h5ad(make_adata(10, 20), "/dev/full")
    assert caught.value.errno == errno.ENOSPC


def test_a_damaged_output_is_not_taken_for_a_package_file(tmp_path):
    written = tmp_path / "ours.h5ad"
    write_h5ad(make_adata(10, 20), written)
    assert is_package_file(written, ".h5ad")
    damaged = tmp_path / "damaged.h5ad"
    damaged.write_bytes(written.read_bytes()[:200])
    assert not is_package_file(damaged, ".h5ad")
    ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(tmp_path / "theirs.h5ad")
    assert not is_package_file(tmp_path / "theirs.h5ad", ".h5ad")


# ------------------------------------------------------------------ CLI
def test_medians_per_file_with_a_vocabulary(tmp_path, capsys):
    adata = make_adata(30, 40)
    (tmp_path / "a").mkdir()
    adata.write_h5ad(tmp_path / "a" / "one.h5ad")
    adata[:15].copy().write_h5ad(tmp_path / "a" / "two.h5ad")
    genes = list(adata.var_names[:25])
    Vocabulary(SPECIALS + genes, {g: i + len(SPECIALS) for i, g in enumerate(genes)}).save(tmp_path / "vocab.json")
    out = tmp_path / "per_file"
    args = ["medians", tmp_path / "a" / "one.h5ad", tmp_path / "a" / "two.h5ad", "-o", out, "--per-file",
            "--vocab", tmp_path / "vocab.json"]
    assert cli_exit_code(args) == 0
    assert "wrote 2 median tables" in capsys.readouterr().out
    tables = {p.name: GeneMedians.load(p) for p in sorted(out.glob("*.tsv"))}
    assert sorted(tables) == ["one.medians.tsv", "two.medians.tsv"]
    assert all(set(t.values) <= set(genes) and len(t) > 0 for t in tables.values())
    assert tables["one.medians.tsv"] != tables["two.medians.tsv"]
    assert cli_exit_code(args) == 2  # an existing folder without --overwrite
    assert "overwrite" in capsys.readouterr().err


def test_the_cli_run_from_a_thread_still_ends_with_exit_2(tmp_path, capsys):
    codes = []
    thread = threading.Thread(target=lambda: codes.append(cli_exit_code(["vocab", "info", tmp_path / "missing.json"])))
    thread.start()
    thread.join()
    assert codes == [2] and "not found" in capsys.readouterr().err
