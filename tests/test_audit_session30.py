"""Audit (session 30) of the modules of the last two sessions: FSDP2 sharding, the readers of the model
commands, the resume checks. Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mixgeneformer.errors import ArtifactError, ConfigError

# --------------------------------------------------------------------------------------------
# FSDP2: the root group keeps the loss in float32 under Accelerate's bf16 policy
# --------------------------------------------------------------------------------------------
SHARD_SCRIPT = r'''
import json, sys, types
import torch, torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.fsdp import MixedPrecisionPolicy
from mixgeneformer.fsdp import shard_model
from mixgeneformer.model import MixGeneformerForPretraining
from mixgeneformer.model_config import make_config

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
# Accelerate's policy for TrainingArguments(bf16=True) under FSDP2 (FullyShardedDataParallelPlugin.set_mixed_precision)
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, output_dtype=torch.bfloat16)
plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                        transformer_cls_names_to_wrap=["BertLayer"], mixed_precision_policy=policy)
accelerator = types.SimpleNamespace(is_fsdp2=True, state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None)
torch.manual_seed(0)
model = MixGeneformerForPretraining(make_config("tiny", vocab_size=40, num_hidden_layers=1, max_position_embeddings=16,
                                                pad_token_id=0))
assert shard_model(accelerator, model)
ids = torch.randint(6, 40, (4, 10))
labels = torch.where(torch.rand(4, 10) < 0.3, ids, torch.full_like(ids, -100))
labels[:, 0] = ids[:, 0]
out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
print(json.dumps({"loss": str(out.loss.dtype), "mlm_loss": str(out.mlm_loss.dtype)}))
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_bf16_policy_leaves_the_loss_in_float32(tmp_path):
    """Accelerate's bf16 policy (output_dtype bf16) on the root group cast the model's outputs, the loss and its
    parts, to bf16: an FSDP run's metrics.csv and held-out loss were rounded to bf16 (3.8125 for 3.8140), a DDP
    run's (autocast, outputs converted to float32) were not. Only the root's output dtype is left as computed."""
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(_free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dtypes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert dtypes == {"loss": "torch.float32", "mlm_loss": "torch.float32"}


# --------------------------------------------------------------------------------------------
# TileDB-SOMA: an AnnData with a named obs / var index reads as its h5ad does
# --------------------------------------------------------------------------------------------
def test_a_soma_experiment_of_an_h5ad_with_named_indexes_keeps_its_cell_names_and_genes(tmp_path):
    """tiledbsoma.io.from_h5ad writes a NAMED obs index (e.g. 'barcode') as a column of that name, not obs_id, and
    a named var index not as var_id (it records the name in the dataframe's metadata). The reader took the cell
    names for absent: the cells were named '0', '1', ... with an extra 'barcode' obs column (the h5ad of the same
    cells: the barcodes as obs_names), and the gene IDs were refused ("gene_column None not found")."""
    tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
    from mixgeneformer.readers import read_anndata

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type1": list("abcabcab"), "n": np.arange(8)},
                       index=pd.Index([f"AAAC-{i}" for i in range(8)], name="barcode"))
    var = pd.DataFrame(index=pd.Index([f"ENSG{i:011d}" for i in range(6)], name="gene_id"))
    cells = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (8, 6)).astype(np.float32)), obs=obs, var=var)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    tiledbsoma_io.from_h5ad(str(tmp_path / "soma"), str(tmp_path / "cells.h5ad"), measurement_name="RNA")

    got = read_anndata(tmp_path / "soma")
    assert list(got.obs_names) == list(cells.obs_names)
    assert list(got.obs.columns) == ["cell_type1", "n"]
    assert got.obs["cell_type1"].astype(str).tolist() == cells.obs["cell_type1"].astype(str).tolist()
    assert list(got.var_names) == list(cells.var_names)
    assert (got.X != cells.X).nnz == 0
    shard = read_anndata(tmp_path / "soma", (3, 7), chunk_size=2)  # a shard's rows across chunk boundaries
    assert list(shard.obs_names) == list(cells.obs_names[3:7])


# --------------------------------------------------------------------------------------------
# Resume checks: a damaged record of the checkpoint is one ArtifactError, not a bare exception
# --------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    return folder


def test_a_binary_checkpoint_config_is_one_artifact_error(tmp_path, checkpoint):
    """A config.yaml that is not UTF-8 text (damaged) raised a bare UnicodeDecodeError (a traceback in the CLI)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pretrain import make_vocab, tiny_config

    from mixgeneformer.pretrain import pretrain_config_from_dict
    from mixgeneformer.resume import check_resume_config

    (checkpoint / "config.yaml").write_bytes(b"\xff\xfe\x00\x81 not yaml")
    config = pretrain_config_from_dict(tiny_config(tmp_path / "corpus", tmp_path / "run"))
    with pytest.raises(ArtifactError, match=r"config.yaml cannot be read as a pretraining config.*binary file"):
        check_resume_config(config, checkpoint, make_vocab())


@pytest.mark.parametrize("record", ['[1, 2]', '{"world_size": 1, "corpus": [3]}'])
def test_a_checkpoint_environment_that_is_no_run_record_is_one_artifact_error(checkpoint, record):
    """environment.json holding a list (or a corpus that is no mapping) raised AttributeError / TypeError."""
    from mixgeneformer.resume import check_resume_corpus

    (checkpoint / "environment.json").write_text(record)
    with pytest.raises(ArtifactError, match="is not this package's run record"):
        check_resume_corpus(checkpoint, {"cells": 3, "tokens": 30, "hash": "abc"}, 1)


def test_a_corpus_record_without_a_count_still_gives_the_corpus_message(checkpoint):
    """A recorded corpus lacking 'tokens' raised KeyError while the refusal's message was formatted."""
    from mixgeneformer.resume import check_resume_corpus

    (checkpoint / "environment.json").write_text(json.dumps({"world_size": 1, "corpus": {"cells": 3}}))
    with pytest.raises(ConfigError, match=r"not the one checkpoint-3 was trained on \(3 training cells, an unrecorded"):
        check_resume_corpus(checkpoint, {"cells": 3, "tokens": 30, "hash": "abc"}, 1)


# --------------------------------------------------------------------------------------------
# classify_file: the arguments are checked before the (possibly large) files are read
# --------------------------------------------------------------------------------------------
def test_classify_file_checks_config_model_folder_and_device_before_reading_a_cell(tmp_path, monkeypatch):
    """classify_file read the input (and test) file first: a config given as a dict then failed with a bare
    AttributeError ('dict' object has no attribute 'labels'), and a missing model folder or a bad device were
    refused only after the whole input had been read."""
    import mixgeneformer.classify.files as files
    from mixgeneformer.classify import LabelConfig, classify_file

    def no_read(*args, **kwargs):
        raise AssertionError("a file was read before the arguments were checked")

    monkeypatch.setattr(files, "read_h5ad", no_read)
    monkeypatch.setattr(files, "read_cells", no_read)
    path = tmp_path / "cells.h5ad"
    ad.AnnData(X=sp.csr_matrix(np.ones((4, 3), np.float32)), obs=pd.DataFrame({"cell_type1": list("abab")},
               index=[f"c{i}" for i in range(4)])).write_h5ad(path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    with pytest.raises(ConfigError, match="config must be a ClassifyConfig.*got dict"):
        classify_file(path, bundle, config={"labels": {"key": "cell_type1"}})
    with pytest.raises(ArtifactError, match="model folder not found"):
        classify_file(path, tmp_path / "no-such-bundle", config=files.ClassifyConfig(labels=LabelConfig(key="cell_type1")))
    with pytest.raises(ConfigError, match="device='gpu' is not a torch device"):
        classify_file(path, bundle, device="gpu")


def test_resume_takes_the_same_files_spelled_as_absolute_paths_but_refuses_other_files(tmp_path, checkpoint, monkeypatch):
    """A run started with relative paths (data.corpus: corpus, data.vocab: corpus/vocab.json) and resumed with the same
    files as absolute paths (a job script run from elsewhere) was refused as 'changed settings'; the files' contents
    are checked apart (vocabulary hash, training cells' hash)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pretrain import make_vocab, tiny_config

    from mixgeneformer.config import save_config
    from mixgeneformer.pretrain import pretrain_config_from_dict
    from mixgeneformer.resume import check_resume_config

    monkeypatch.chdir(tmp_path)
    save_config(pretrain_config_from_dict(tiny_config(Path("corpus"), Path("run"))), checkpoint)
    same = pretrain_config_from_dict(tiny_config(tmp_path / "corpus", tmp_path / "run"))
    assert check_resume_config(same, checkpoint, make_vocab()) == []  # nothing changed: no line either
    other = pretrain_config_from_dict(tiny_config(tmp_path / "other", tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"changed settings \(data.corpus: .*; data.vocab: "):
        check_resume_config(other, checkpoint, make_vocab())
