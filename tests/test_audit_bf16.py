"""Audit of the bf16 paths (the default precision of pretraining, embedding and prediction on a GPU with
native bf16), run here on the CPU under explicit bf16 settings: PyTorch's CPU autocast computes in bf16 too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixgeneformer.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_classify import C, tiny_model, token_task  # noqa: E402
from test_devices import StandInGPUs  # noqa: E402


# ------------------------------------------------------------------------------------------ fine-tuning
def _finetune(bf16: bool, device: str | None = "cpu", max_steps: int = 2):
    adata, vocab, tokens = token_task(n_per_class=12)
    task = C.within_task(adata, C.LabelConfig(min_class_fraction=0))
    config = C.ClassifyConfig(finetune=C.FinetuneConfig(
        learning_rate=1e-4, batch_size=12, max_steps=max_steps, device=device, logging_steps=1, bf16=bf16))
    result, fitted = C.finetune(task, tiny_model(vocab), vocab, None, config, tokens=(tokens, tokens))
    return task, tokens, result, fitted


def test_finetune_bf16_without_a_device_trains_on_the_cpu_and_predicts_what_classify_reported(tmp_path):
    """finetune.bf16=true without finetune.device on a machine without CUDA raised the Trainer's ValueError
    ("Your setup doesn't support bf16/gpu"), after the cells were tokenized; fp32 trains there on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("the CPU fallback of device=None is what this machine lacks")
    task, tokens, result, fitted = _finetune(bf16=True, device=None)
    assert fitted.summary["steps_run"] == 2
    assert {p.dtype for p in fitted.model.parameters()} == {torch.float32}  # master weights stay float32
    loaded = C.load_classifier(fitted.save(tmp_path / "clf"))
    again = loaded.predict(tokens.select(task.test_rows), device="cpu")
    assert np.array_equal(again.labels, result.y_pred)


def test_the_probe_initialised_head_scores_alike_under_bf16():
    """The head ran in bf16 under the Trainer's bf16 autocast. Its probe initialisation folds the feature
    standardisation into the bias, so the logits are differences of large terms: the probe's validation loss
    was 5x the float32 one (0.156 against 0.031) and the probe-vs-trained choice compared rounding noise."""
    losses = {}
    for bf16 in (False, True):
        _, _, _, fitted = _finetune(bf16=bf16, max_steps=1)
        losses[bf16] = fitted.summary["probe_validation_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=0.05), losses


def test_the_classification_head_computes_in_float32_under_autocast():
    _, vocab, tokens = token_task(n_per_class=2)
    model = C.build_classifier(tiny_model(vocab), ["a", "b"], vocab, C.FinetuneConfig(pooling="mean"), seed=0).eval()
    ids = torch.as_tensor([tokens.dataset[i]["input_ids"][:8] for i in range(4)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert logits.dtype == torch.float32


def test_finetune_bf16_on_a_gpu_without_bf16_is_one_config_error(monkeypatch):
    """Refused before any cell is tokenized, naming the option (the Trainer's ValueError came after the probe)."""
    from mixgeneformer.classify.finetune import check_finetune_options

    StandInGPUs(monkeypatch, ["none"], ["Tesla P100"])
    with pytest.raises(ConfigError, match=r"finetune\.bf16=true, but Tesla P100.*set finetune\.bf16=false"):
        check_finetune_options(C.FinetuneConfig(bf16=True, device="cuda"))
    check_finetune_options(C.FinetuneConfig(bf16=False, device="cuda"))


# ------------------------------------------------------------------------------------------ pretraining
def test_precision_auto_of_pretraining_is_fp32_where_the_gpu_only_emulates_bf16(monkeypatch):
    """train.precision=auto chose bf16 on a T4 / V100 (torch.cuda.is_bf16_supported() counts emulation),
    where embedding's "auto" (inference.autocast_dtype) rightly keeps fp32: pretraining's default ran
    emulated bf16 there."""
    from mixgeneformer.trainer import resolve_precision

    gpu = StandInGPUs(monkeypatch, ["emulated"])
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16"  # asked for explicitly: the GPU can run it (emulated)
    gpu.bf16 = ["native"]  # Ampere and later
    assert resolve_precision("auto") == "bf16"


@pytest.fixture(scope="module")
def orthologs(tmp_path_factory):
    from test_audit_pretrain_paths import ortholog_corpus, ortholog_vocab
    from test_pretrain import training_data

    return training_data(tmp_path_factory.mktemp("bf16_orthologs"), ortholog_vocab(), ortholog_corpus)


BF16_RUN = {"objective": {"cross_species_weight": 0.5, "cross_species_queue": 24, "pooling": "mean",
                          "contrastive": "simcse", "contrastive_weight": 0.5},
            "train": {"max_steps": 8, "per_device_batch_size": 8, "precision": "bf16", "mlm_bias_init": "unigram"},
            "data": {"eval_fraction": 0.15}, "checkpoint": {"save_steps": 4, "keep": 0}}


def test_bf16_pretraining_resumes_exactly_and_writes_float32_weights(tmp_path, orthologs, monkeypatch):
    """Every loss term, the cross-species queue, the unigram bias and held-out evaluation under bf16 autocast:
    losses finite and near an fp32 run's first step, the queue float32, checkpoint and bundle float32 and
    readable by plain transformers, and a resumed run equal to a straight one."""
    from safetensors.torch import load_file
    from test_pretrain import params_of, tiny_config
    from transformers import BertForMaskedLM

    from mixgeneformer.pretrain import pretrain_config_from_dict, read_metrics, run_pretraining

    fp32 = {**BF16_RUN, "train": {**BF16_RUN["train"], "precision": "fp32", "max_steps": 1}}
    run_pretraining(pretrain_config_from_dict(tiny_config(orthologs, tmp_path / "fp32", **fp32)))
    straight = run_pretraining(pretrain_config_from_dict(tiny_config(orthologs, tmp_path / "a", **BF16_RUN)))
    rows = read_metrics(tmp_path / "a")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 8 and all(np.isfinite([r["loss"], r["mlm_loss"], r["contrastive_loss"], r["cross_species_loss"]]).all() for r in train)
    first32 = read_metrics(tmp_path / "fp32")[0]
    for name in ("loss", "mlm_loss", "contrastive_loss", "cross_species_loss"):
        assert train[0][name] == pytest.approx(first32[name], rel=2e-2), name
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and np.isfinite([evals[-1]["eval_mlm_loss"], evals[-1]["eval_unigram_loss"]]).all()
    bank = load_file(str(tmp_path / "a" / "checkpoint-4" / "cell_bank_0.safetensors"))
    assert bank and all(v.dtype in (torch.float32, torch.int64, torch.bool) for v in bank.values())
    assert {v.dtype for v in load_file(str(tmp_path / "a" / "checkpoint-4" / "model.safetensors")).values()} == {torch.float32}
    assert {v.dtype for v in params_of(straight.bundle_dir).values()} == {torch.float32}
    assert next(BertForMaskedLM.from_pretrained(straight.bundle_dir).parameters()).dtype == torch.float32

    config = pretrain_config_from_dict(tiny_config(orthologs, tmp_path / "b", **BF16_RUN))
    monkeypatch.setenv("MIXGF_TEST_FAIL_AT_STEP", "0:6")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pretraining(config)
    monkeypatch.delenv("MIXGF_TEST_FAIL_AT_STEP")
    resumed = run_pretraining(config, resume=True)
    assert resumed.resumed_from.name == "checkpoint-4"
    drop = ("time_s", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "b")]
    a, b = params_of(straight.bundle_dir), params_of(resumed.bundle_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ a trained tiny model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from test_pretrain import make_vocab, tiny_config, training_data

    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.pretrain import pretrain_config_from_dict, run_pretraining

    root = training_data(tmp_path_factory.mktemp("bf16_trained"), make_vocab(), n_cells=96)
    config = tiny_config(root, root / "run", train={"max_steps": 40, "warmup_steps": 4, "learning_rate": 3e-3},
                         checkpoint={"save_steps": 40})
    result = run_pretraining(pretrain_config_from_dict(config))
    model, vocab, _ = load_bundle(result.bundle_dir)
    import datasets

    return model, vocab, datasets.load_from_disk(str(root / "corpus")).select(range(32))


def test_bf16_cell_and_gene_embeddings_are_float32_and_agree_with_fp32(trained):
    from mixgeneformer.inference import embed_corpus

    model, vocab, cells = trained
    out = {p: embed_corpus(model, cells, vocab, batch_size=8, device="cpu", progress=False, precision=p,
                           gene_embeddings=True) for p in ("fp32", "bf16")}
    a, b = out["fp32"], out["bf16"]
    assert b.cells.dtype == np.float32 and (b.genes.dtypes == np.float32).all()
    cosine = (a.cells * b.cells).sum(1) / np.linalg.norm(a.cells, axis=1) / np.linalg.norm(b.cells, axis=1)
    assert cosine.min() > 0.99
    ga, gb = a.genes.to_numpy(), b.genes.to_numpy()
    assert ((ga * gb).sum(1) / np.linalg.norm(ga, axis=1) / np.linalg.norm(gb, axis=1)).min() > 0.99


def test_bf16_deletion_scan_runs_and_ranks_genes_like_fp32(trained):
    """Every single-gene deletion of a cell shares its first block (perturb.deletion.DeletionScan). Under
    precision='bf16' its float32 / float64 attention sums met bf16 key weights in an in-place baddbmm_:
    'Input dtypes must be the same'. Every bf16 all-genes deletion run crashed."""
    from scipy.stats import spearmanr

    from mixgeneformer.perturb import PerturbConfig, perturb_cells

    model, vocab, cells = trained
    tables = {p: perturb_cells(model, cells.select(range(6)), vocab, PerturbConfig(device="cpu", precision=p, batch_size=16),
                               progress=False).cells for p in ("fp32", "bf16")}
    a, b = tables["fp32"], tables["bf16"]
    assert (a[["cell", "perturbed"]].to_numpy() == b[["cell", "perturbed"]].to_numpy()).all()
    for (_, x), (_, y) in zip(a.groupby("cell"), b.groupby("cell"), strict=True):
        assert spearmanr(x["shift"], y["shift"]).statistic > 0.95


def test_the_deletion_scan_keeps_float32_under_autocast(trained):
    from mixgeneformer.perturb.deletion import DeletionScan

    model, _, cells = trained
    tokens = torch.as_tensor(cells[0]["input_ids"], dtype=torch.int64)
    with torch.inference_mode():
        plain = DeletionScan(model.bert, tokens).first_block(range(len(tokens)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scan = DeletionScan(model.bert, tokens)
            assert scan.sums["X"].dtype == torch.float64
            mixed = scan.first_block(range(len(tokens)))
    assert torch.allclose(mixed.float(), plain, atol=0.1)


def test_embed_anndata_records_the_precision_it_computed_in(tmp_path):
    """uns[key + '_params'] records how an embedding was made, but not its precision: precision='auto' is
    bf16 on an Ampere GPU and fp32 elsewhere, so two files of one command could differ without a trace."""
    import warnings

    import anndata as ad
    from _tokenize_helpers import partly_outside_files

    from mixgeneformer.embed import embed_anndata

    made, path = partly_outside_files(tmp_path)
    adata = ad.read_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {p: embed_anndata(adata, made.folder, copy=True, device="cpu", progress=False, precision=p, batch_size=4)
               for p in ("bf16", "auto")}
    assert out["bf16"].obsm["X_mixgeneformer"].dtype == np.float32
    assert out["bf16"].uns["X_mixgeneformer_params"]["precision"] == "bf16"
    assert out["auto"].uns["X_mixgeneformer_params"]["precision"] == "fp32"  # auto on the CPU
