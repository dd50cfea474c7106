"""The unified vocabulary: modes, special tokens, hashing, JSON I/O, Geneformer import."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from mixgeneformer.errors import ArtifactError, ConfigError
from mixgeneformer.vocab import SHARED, Vocabulary, build_vocabulary, import_geneformer


@pytest.fixture(scope="module")
def separate():
    return build_vocabulary("separate")


def test_special_tokens_come_first(separate):
    assert separate.tokens[:6] == ["<pad>", "<mask>", "<cls>", "<eos>", "<human>", "<mouse>"]
    assert (separate.pad_id, separate.mask_id, separate.cls_id, separate.eos_id) == (0, 1, 2, 3)
    assert separate.species_token_id("mouse") == 5
    assert list(separate.special_ids) == [0, 1, 2, 3, 4, 5]


def test_separate_mode_has_both_species_as_distinct_tokens(separate):
    ids = separate.encode_genes(["ENSG00000254647", "ENSMUSG00000035804", "ENSG_NOT_REAL"])
    assert ids[0] >= 6 and ids[1] >= 6 and ids[0] != ids[1] and ids[2] == -1
    assert separate.encode_genes(["ENSG00000254647"]).dtype == np.int32


def test_ortholog_mode_ties_one_to_one_pairs(separate):
    tied = build_vocabulary("ortholog")
    human, mouse = tied.encode_genes(["ENSG00000000003", "ENSMUSG00000067377"])  # TSPAN6 / Tspan6
    assert human == mouse and tied.token_species[human] == SHARED
    assert len(tied) < len(separate)
    # In separate mode the same pair is linked through the ortholog map instead.
    h, m = separate.encode_genes(["ENSG00000000003", "ENSMUSG00000067377"])
    assert separate.ortholog_map[h] == m and separate.ortholog_map[m] == h
    assert (separate.ortholog_map[separate.special_ids] == separate.special_ids).all()


def test_json_round_trip_keeps_hash(tmp_path, separate):
    path = separate.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(path)
    assert loaded.hash == separate.hash and loaded.tokens == separate.tokens
    data = json.loads(path.read_text())
    data["tokens"][10] = "ENSG99999999999"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="hash"):
        Vocabulary.load(path)


def test_hash_depends_on_content(separate):
    assert build_vocabulary("separate", species=("human",)).hash != separate.hash


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text('{"format": "mixgeneformer-vocabulary", "tokens": [')
    with pytest.raises(ArtifactError, match="truncated"):
        Vocabulary.load(bad)
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ArtifactError, match="Git-LFS"):
        Vocabulary.load(bad)
    with pytest.raises(ArtifactError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")


def test_bad_options_rejected():
    with pytest.raises(ConfigError):
        build_vocabulary("bogus")
    with pytest.raises(ConfigError, match="needs medians"):
        build_vocabulary(gene_set="medians")


@pytest.mark.realdata
def test_geneformer_dictionaries_import_with_their_ids(shared_data):
    vocab, medians = import_geneformer(
        shared_data / "geneformer_v1/token_dictionary.pkl", shared_data / "geneformer_v1/gene_median_dictionary.pkl"
    )
    assert len(vocab) == 25_426 and vocab.pad_id == 0 and vocab.mask_id == 1 and vocab.cls_id is None
    assert vocab.tokens[2].startswith("ENSG")
    assert len(medians) == 25_424


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "evil": Exploit()}))
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        import_geneformer(path)
    assert not marker.exists()
