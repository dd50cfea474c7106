"""Audit: runs refuse what they would get wrong before any work. Pretraining with a median table the
corpus was not tokenized with, a run folder inside its input corpus, and a perturbation whose every
selected cell is dropped are exit-2 errors, and nothing is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from test_perturb import bert, bundle_and_cells, cells, vocab  # noqa: F401  (fixtures)
from test_pretrain import synthetic, tiny_config  # noqa: F401  (fixture)

from mixgeneformer.corpus import check_corpora
from mixgeneformer.errors import ArtifactError, ConfigError, InputDataError
from mixgeneformer.medians import GeneMedians
from mixgeneformer.perturb import PerturbConfig, perturb_cells
from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining
from mixgeneformer.vocab import Vocabulary


def _medians(path, value: float) -> GeneMedians:
    table = GeneMedians({f"ENSG{i:011d}": value + i for i in range(1, 61)})
    table.save(path)
    return table


def _record(corpus, **fields) -> None:
    meta_path = corpus / "mixgf_corpus.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **fields}))


def test_pretraining_refuses_a_median_table_the_corpus_was_not_tokenized_with(tmp_path, synthetic):  # noqa: F811
    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic / "corpus", corpus)
    used, other = _medians(tmp_path / "used.tsv", 1.0), _medians(tmp_path / "other.tsv", 2.0)
    _record(corpus, medians_hash=used.hash)
    config = tiny_config(synthetic, tmp_path / "run", data={"corpus": [str(corpus)], "medians": str(tmp_path / "other.tsv")})
    with pytest.raises(ConfigError, match=rf"tokenized with gene medians {used.hash}.*other.tsv.*{other.hash}"):
        run_pretraining(pretrain_config_from_dict(config))
    assert not (tmp_path / "run").exists()
    run_vocab = Vocabulary.load(synthetic / "vocab.json")
    check_corpora([corpus], run_vocab, tmp_path / "used.tsv")  # the table it was tokenized with
    shutil.copyfile(tmp_path / "other.tsv", tmp_path / "same_content.tsv")
    _record(corpus, medians_hash=other.hash)
    check_corpora([corpus], run_vocab, tmp_path / "same_content.tsv")  # the hash is of the content, not the path
    check_corpora([corpus], run_vocab, None)  # no table shipped: nothing to compare


def test_corpora_that_record_no_single_table_are_not_refused(tmp_path, synthetic):  # noqa: F811
    run_vocab = Vocabulary.load(synthetic / "vocab.json")
    _medians(tmp_path / "m.tsv", 1.0)
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(synthetic / "corpus", unrecorded)  # records the vocabulary only (other tools, older versions)
    per_file = tmp_path / "per_file"
    shutil.copytree(synthetic / "corpus", per_file)
    _record(per_file, medians_hash="0123456789abcdef")  # tokenize records the hash of the per-file hashes
    (per_file / "config.yaml").write_text(yaml.safe_dump({"medians": "per_file", "max_len": 2048}))
    check_corpora([unrecorded, per_file], run_vocab, tmp_path / "m.tsv")
    (per_file / "config.yaml").write_text(yaml.safe_dump({"medians": "corpus"}))
    with pytest.raises(ConfigError, match="0123456789abcdef"):
        check_corpora([unrecorded, per_file], run_vocab, tmp_path / "m.tsv")


def test_a_new_run_folder_inside_the_input_corpus_is_refused(tmp_path, synthetic, capsys):  # noqa: F811
    from mixgeneformer.cli import main

    corpus = tmp_path / "corpus"
    shutil.copytree(synthetic / "corpus", corpus)
    before = sorted(p.name for p in corpus.iterdir())
    config = tiny_config(synthetic, corpus / "run", data={"corpus": [str(corpus)]}, train={"max_steps": 2})
    with pytest.raises(ArtifactError, match="inside the input folder"):
        run_pretraining(pretrain_config_from_dict(config))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in corpus.iterdir()) == before  # nothing written into the corpus


def test_perturbing_when_every_selected_cell_is_dropped_is_an_error(tmp_path, vocab, bert, cells, capsys):  # noqa: F811
    states = ["a"] * 5 + ["b"] * 5
    config = PerturbConfig(state_column="s", start="a", min_genes=1000)
    with pytest.raises(InputDataError, match=r"all 5 selected cells of state 'a' .*min_genes=1000"):
        perturb_cells(bert, cells, vocab, config, states=states, progress=False)
    with pytest.raises(InputDataError, match=r"all 10 selected cells have fewer than min_genes=1000"):
        perturb_cells(bert, cells, vocab, PerturbConfig(min_genes=1000), progress=False)
    some = int(np.median([len(c) for c in cells])) - 3  # dropping some cells still runs
    result = perturb_cells(bert, cells, vocab, PerturbConfig(min_genes=some), progress=False)
    assert 0 < result.summary["cells_selected"] < len(cells) and result.summary["cells_dropped_few_genes"] > 0

    from mixgeneformer.cli import main

    bundle_and_cells(tmp_path, vocab)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["perturb", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "bundle"), "--out", str(out),
              "--set", "min_genes=1000", "--state-column", "kind", "--start", "x", "--cells-per-state", "3",
              "--device", "cpu", "--no-progress"])
    assert exit_info.value.code == 2
    assert "all 3 selected cells of state 'x'" in capsys.readouterr().err
    assert not out.exists()
