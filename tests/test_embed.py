"""Cell and gene embeddings: layer selection, pooling, batching invariance, AnnData write-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tokenize_helpers import SPECIALS, random_gene_bundle
from transformers import BertConfig, BertModel

from mixgeneformer.devices import inference_context
from mixgeneformer.embed import CorpusEmbeddings, embed_anndata, embed_corpus, embed_corpus_folder
from mixgeneformer.errors import ConfigError, InputDataError
from mixgeneformer.inference import hidden_at_layer, layers_to_run
from mixgeneformer.model import pool_cells
from mixgeneformer.vocab import Vocabulary

N_GENES = 300


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    tokens = SPECIALS + [f"ENSG{i:011d}" for i in range(N_GENES)]
    return Vocabulary(tokens, {t: i for i, t in enumerate(tokens) if t.startswith("ENSG")})


def _bert(vocab: Vocabulary, layers: int = 4, attn: str = "sdpa", seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=vocab.pad_id,
        attn_implementation=attn,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def bert(vocab) -> BertModel:
    return _bert(vocab)


def _cells(n: int, seed: int = 0, special: bool = False, min_len: int = 3, max_len: int = 120) -> list[list[int]]:
    """Random cells: distinct gene tokens of random lengths; optionally <cls> <human> ... <eos>."""
    rng = np.random.default_rng(seed)
    gene_ids = np.arange(len(SPECIALS), len(SPECIALS) + N_GENES)
    cells = []
    for length in rng.integers(min_len, max_len, size=n):
        genes = rng.choice(gene_ids, size=length, replace=False).tolist()
        cells.append([2, 4, *genes, 3] if special else genes)
    return cells


def _pad(cells: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, cells))
    ids = torch.zeros((len(cells), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, cell in enumerate(cells):
        ids[i, : len(cell)] = torch.tensor(cell)
        mask[i, : len(cell)] = 1
    return ids, mask


# ---------------------------------------------------------------------------- layer selection
@pytest.mark.parametrize("layer", [-1, -2, -3, 0, 1, 4, -5])
def test_hidden_at_layer_equals_full_forward_hidden_state(bert, layer):
    ids, mask = _pad(_cells(6, seed=1))
    with torch.inference_mode():
        full = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        mine = hidden_at_layer(bert, ids, mask, layer)
    real = mask.bool()
    assert mine.shape == full.shape
    torch.testing.assert_close(mine[real], full[real], rtol=0, atol=1e-6)


def test_hidden_at_layer_runs_only_the_blocks_it_needs(bert):
    calls = []
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, block in enumerate(bert.encoder.layer)]
    try:
        ids, mask = _pad(_cells(3, seed=2))
        with torch.inference_mode():
            hidden_at_layer(bert, ids, mask, layer=-2)
        assert calls == [0, 1, 2]  # 4 blocks; the second-to-last hidden state needs the first 3
        calls.clear()
        with torch.inference_mode():
            hidden_at_layer(bert, ids, mask, layer=0)
        assert calls == []
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("layer", [5, -6, 1.5, True])
def test_layer_out_of_range_is_a_clear_error(bert, layer):
    with pytest.raises(ConfigError, match="layer"):
        layers_to_run(len(bert.encoder.layer), layer)


def test_embed_corpus_layer_matches_hidden_states_pooled_the_same_way(bert, vocab):
    cells = _cells(10, seed=3, special=True)
    ids, mask = _pad(cells)
    with torch.inference_mode():
        states = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in (-1, -2, 1):
        expected = pool_cells(states[layer], ids, mask, vocab.special_ids, "mean").numpy()
        got = embed_corpus(bert, cells, vocab, layer=layer, batch_size=4, progress=False)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_eager_and_sdpa_attention_give_the_same_embeddings(vocab):
    cells = _cells(8, seed=4)
    sdpa = embed_corpus(_bert(vocab, attn="sdpa"), cells, vocab, batch_size=3, progress=False)
    eager = embed_corpus(_bert(vocab, attn="eager"), cells, vocab, batch_size=3, progress=False)
    np.testing.assert_allclose(sdpa, eager, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- pooling
def test_mean_pooling_averages_gene_positions_only(bert, vocab):
    cells = _cells(5, seed=5, special=True)
    ids, mask = _pad(cells)
    with torch.inference_mode():
        hidden = hidden_at_layer(bert, ids, mask, -2)
        pooled = pool_cells(hidden, ids, mask, vocab.special_ids, "mean")
    for i, cell in enumerate(cells):
        genes = [p for p, t in enumerate(cell) if t >= len(SPECIALS)]
        assert len(genes) == len(cell) - 3  # <cls>, <human>, <eos> removed
        np.testing.assert_allclose(pooled[i].numpy(), hidden[i, genes].mean(0).numpy(), rtol=0, atol=1e-6)


def test_cls_pooling_takes_position_zero(bert, vocab):
    cells = _cells(5, seed=6, special=True)
    ids, mask = _pad(cells)
    with torch.inference_mode():
        hidden = hidden_at_layer(bert, ids, mask, -1)
    pooled = pool_cells(hidden, ids, mask, vocab.special_ids, "cls")
    torch.testing.assert_close(pooled, hidden[:, 0])
    got = embed_corpus(bert, cells, vocab, layer=-1, pooling="cls", batch_size=2, progress=False)
    np.testing.assert_allclose(got, hidden[:, 0].numpy(), rtol=0, atol=1e-5)


def test_cls_pooling_without_cls_token_is_an_error(bert, vocab):
    with pytest.raises(ConfigError, match="<cls>"):
        embed_corpus(bert, _cells(3, seed=7), vocab, pooling="cls", progress=False)
    # Style v1 with a species token: cells start <human> gene ...; its state is not <cls>'s.
    species_first = [cell[1:-1] for cell in _cells(3, seed=7, special=True)]
    assert all(cell[0] == vocab.id_of("<human>") for cell in species_first)
    with pytest.raises(ConfigError, match="<cls>"):
        embed_corpus(bert, species_first, vocab, pooling="cls", progress=False)


# ---------------------------------------------------------------------------- batching
@pytest.mark.parametrize("pooling,special", [("mean", False), ("mean", True), ("cls", True)])
def test_cell_alone_equals_cell_in_padded_batch(bert, vocab, pooling, special):
    cells = _cells(12, seed=8, special=special, min_len=2, max_len=200)
    batched = embed_corpus(bert, cells, vocab, pooling=pooling, batch_size=12, progress=False)
    alone = np.stack([embed_corpus(bert, [cell], vocab, pooling=pooling, progress=False)[0] for cell in cells])
    assert batched.dtype == np.float32 and batched.shape == (12, 32)
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)


def test_corpus_order_is_kept_whatever_the_batch_size(bert, vocab, monkeypatch):
    import mixgeneformer.inference as embed_module

    cells = _cells(17, seed=9)
    reference = embed_corpus(bert, cells, vocab, batch_size=1, progress=False)
    for batch_size in (2, 5, 64):
        np.testing.assert_allclose(embed_corpus(bert, cells, vocab, batch_size=batch_size, progress=False), reference, atol=1e-5)
    monkeypatch.setattr(embed_module, "_SORT_CHUNK", 4)  # corpus read and sorted in chunks of 4 cells
    np.testing.assert_allclose(embed_corpus(bert, cells, vocab, batch_size=3, progress=False), reference, atol=1e-5)
    order = np.random.default_rng(0).permutation(len(cells))
    permuted = embed_corpus(bert, [cells[i] for i in order], vocab, batch_size=4, progress=False)
    np.testing.assert_allclose(permuted, reference[order], atol=1e-5)


def test_embed_corpus_reads_a_datasets_corpus_and_its_selections(bert, vocab):
    import datasets

    cells = _cells(9, seed=10)
    corpus = datasets.Dataset.from_dict(
        {"input_ids": cells, "length": [len(c) for c in cells]},
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32")}),
    )
    reference = embed_corpus(bert, cells, vocab, progress=False)
    np.testing.assert_allclose(embed_corpus(bert, corpus, vocab, progress=False), reference, atol=1e-5)
    picked = [7, 2, 5]
    np.testing.assert_allclose(embed_corpus(bert, corpus.select(picked), vocab, progress=False), reference[picked], atol=1e-5)
    np.testing.assert_allclose(embed_corpus(bert, corpus.select(range(3, 6)), vocab, progress=False), reference[3:6], atol=1e-5)


def test_model_training_mode_is_restored_and_wrappers_are_accepted(vocab):
    from transformers import BertForMaskedLM

    bert = _bert(vocab)
    wrapper = BertForMaskedLM(bert.config)
    wrapper.bert.load_state_dict(bert.state_dict(), strict=False)
    wrapper.train()
    cells = _cells(4, seed=11)
    got = embed_corpus(wrapper, cells, vocab, progress=False)
    assert wrapper.training
    np.testing.assert_allclose(got, embed_corpus(bert, cells, vocab, progress=False), atol=1e-5)


# ---------------------------------------------------------------------------- bad input
def test_bad_corpora_are_clear_errors(bert, vocab):
    with pytest.raises(InputDataError, match="no tokens"):
        embed_corpus(bert, [[10, 11], []], vocab, progress=False)
    with pytest.raises(InputDataError, match="max_position_embeddings"):
        embed_corpus(bert, [list(range(6, 6 + 257))], vocab, progress=False)
    with pytest.raises(InputDataError, match="another vocabulary"):
        embed_corpus(bert, [[10, len(vocab) + 3]], vocab, progress=False)
    with pytest.raises(InputDataError, match="no cells"):
        embed_corpus(bert, [], vocab, progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        embed_corpus(bert, [[10]], vocab, batch_size=0, progress=False)
    with pytest.raises(ConfigError, match="pooling"):
        embed_corpus(bert, [[10]], vocab, pooling="max", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            embed_corpus(bert, [[10]], vocab, device="cuda", progress=False)


# ---------------------------------------------------------------------------- gene embeddings
def test_gene_embeddings_average_each_gene_over_the_cells_expressing_it(bert, vocab):
    cells = _cells(15, seed=12, special=True, max_len=60)
    result = embed_corpus(bert, cells, vocab, gene_embeddings="per_cell", batch_size=4, progress=False)
    assert isinstance(result, CorpusEmbeddings)
    np.testing.assert_allclose(result.cells, embed_corpus(bert, cells, vocab, progress=False), atol=1e-5)
    # per-cell states are aligned with the cell's gene tokens, special tokens removed
    ids, mask = _pad(cells)
    with torch.inference_mode():
        hidden = hidden_at_layer(bert, ids, mask, -2)
    sums: dict[int, list[np.ndarray]] = {}
    for i, cell in enumerate(cells):
        genes = [(p, t) for p, t in enumerate(cell) if t >= len(SPECIALS)]
        expected = hidden[i, [p for p, _ in genes]].numpy()
        np.testing.assert_allclose(result.per_cell[i], expected, atol=1e-5)
        for row, (_, token) in zip(expected, genes, strict=True):
            sums.setdefault(token, []).append(row)
    assert set(result.genes.index) == {vocab.tokens[t] for t in sums}
    assert not any(name.startswith("<") for name in result.genes.index)
    for token, rows in sums.items():
        name = vocab.tokens[token]
        assert result.gene_counts[name] == len(rows)
        np.testing.assert_allclose(result.genes.loc[name].to_numpy(), np.mean(rows, axis=0), atol=1e-5)
    mean_only = embed_corpus(bert, cells, vocab, gene_embeddings=True, progress=False)
    assert mean_only.per_cell is None
    np.testing.assert_allclose(mean_only.genes.to_numpy(), result.genes.to_numpy(), atol=1e-5)


# ---------------------------------------------------------------------------- AnnData front end
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random model bundle over 300 real human genes, with medians; and matching cells."""
    import anndata as ad
    import pandas as pd


    made = random_gene_bundle(tmp_path_factory.mktemp("bundle") / "model", N_GENES, 50)
    in_vocab, outside, folder, rng = made.ids[:N_GENES], made.ids[N_GENES:], made.folder, made.rng

    n_cells = 40
    counts = rng.poisson(0.4, size=(n_cells, N_GENES + 50)).astype(np.float32)
    counts[5] = 0  # no counts at all
    counts[11, :N_GENES] = 0  # counts only outside the vocabulary
    counts[11, N_GENES:] = 3
    var_names = in_vocab + outside
    order = rng.permutation(len(var_names))  # gene column order must not matter
    obs = pd.DataFrame({"cell_type1": rng.choice(["alpha", "beta"], n_cells)}, index=[f"cell{i}" for i in range(n_cells)])
    adata = ad.AnnData(X=counts[:, order], obs=obs, var=pd.DataFrame(index=np.asarray(var_names)[order]))
    return folder, adata


def test_embed_anndata_writes_obsm_in_obs_order_with_nan_for_dropped_cells(bundle):
    folder, adata = bundle
    adata = adata.copy()
    with pytest.warns(UserWarning, match="2 of 40 cells were dropped"):
        result = embed_anndata(adata, folder, progress=False)
    assert result is None
    emb = adata.obsm["X_mixgeneformer"]
    assert emb.shape == (40, 64) and emb.dtype == np.float32
    dropped = ~np.isfinite(emb).all(axis=1)
    assert np.flatnonzero(dropped).tolist() == [5, 11]
    params = adata.uns["X_mixgeneformer_params"]
    assert params["layer"] == -2 and params["pooling"] == "mean" and params["n_dropped"] == 2
    assert params["tokenize"]["max_len"] == 128  # capped at the model's max_position_embeddings

    # obs order is kept: embedding a shuffled object gives the same rows, shuffled
    order = np.random.default_rng(1).permutation(adata.n_obs)
    with pytest.warns(UserWarning):
        shuffled = embed_anndata(adata[order].copy(), folder, key="X_other", copy=True, progress=False)
    np.testing.assert_allclose(shuffled.obsm["X_other"], emb[order], atol=1e-5, equal_nan=True)
    assert list(shuffled.obs_names) == list(adata.obs_names[order])


def test_embed_anndata_equals_embed_corpus_of_the_tokenized_cells(bundle):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata

    folder, adata = bundle
    model, vocab, medians = load_bundle(folder)
    corpus = tokenize_anndata(adata, vocab, medians, TokenizeConfig(max_len=128))
    expected = embed_corpus(model, corpus, vocab, layer=1, progress=False)
    with pytest.warns(UserWarning):
        out = embed_anndata(adata, model, layer=1, vocab=vocab, medians=medians, copy=True, progress=False)
    np.testing.assert_allclose(out.obsm["X_mixgeneformer"][np.asarray(corpus["cell_index"])], expected, atol=1e-6)
    assert "X_mixgeneformer" not in adata.obsm  # copy=True leaves the input alone


def test_embed_anndata_never_overwrites_silently(bundle):
    folder, adata = bundle
    adata = adata.copy()
    adata.obsm["X_mixgeneformer"] = np.zeros((adata.n_obs, 3), dtype=np.float32)
    with pytest.raises(ConfigError, match="overwrite=True"):
        embed_anndata(adata, folder, progress=False)
    assert adata.obsm["X_mixgeneformer"].shape == (adata.n_obs, 3)
    with pytest.warns(UserWarning):
        embed_anndata(adata, folder, overwrite=True, progress=False)
    assert adata.obsm["X_mixgeneformer"].shape == (adata.n_obs, 64)


def test_embed_anndata_needs_vocabulary_and_medians_for_in_memory_models(bundle):
    from mixgeneformer.bundle import load_bundle

    folder, adata = bundle
    model, vocab, _ = load_bundle(folder)
    with pytest.raises(ConfigError, match="medians"):
        embed_anndata(adata, model, vocab=vocab, copy=True, progress=False)
    with pytest.raises(ConfigError, match="AnnData"):
        embed_anndata(np.zeros((3, 3)), folder)


def test_embed_corpus_folder_builds_anndata_with_obs_and_gene_table(bundle, tmp_path):
    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_anndata

    folder, adata = bundle
    model, vocab, medians = load_bundle(folder)
    corpus = tokenize_anndata(adata, vocab, medians, TokenizeConfig(max_len=128), obs_columns=["cell_type1"])
    corpus.save_to_disk(str(tmp_path / "corpus"))
    out, result = embed_corpus_folder(tmp_path / "corpus", folder, gene_embeddings=True, progress=False)
    assert out.n_obs == 38 and list(out.obs["cell_type1"]) == list(adata.obs["cell_type1"].iloc[corpus["cell_index"]])
    np.testing.assert_allclose(out.obsm["X_mixgeneformer"], embed_corpus(model, corpus, vocab, progress=False), atol=1e-6)
    assert set(result.genes.index) <= set(vocab.tokens[len(SPECIALS):])


def test_cli_embed_writes_h5ad_gene_table_and_umap(bundle, tmp_path, capsys):
    import anndata as ad
    import pandas as pd

    from mixgeneformer.cli import main

    folder, adata = bundle
    source = tmp_path / "cells.h5ad"
    adata.write_h5ad(source)
    out, genes, fig = tmp_path / "out.h5ad", tmp_path / "genes.parquet", tmp_path / "umap.png"
    args = ["embed", str(source), "--model", str(folder), "--out", str(out), "--no-progress", "--device", "cpu"]
    with pytest.warns(UserWarning, match="dropped"):
        main([*args, "--gene-embeddings", str(genes), "--umap", str(fig), "--color", "cell_type1", "--batch-size", "7"])
        expected = embed_anndata(adata, folder, copy=True, progress=False).obsm["X_mixgeneformer"]
    written = ad.read_h5ad(out)
    emb = written.obsm["X_mixgeneformer"]
    assert emb.shape == (40, 64) and list(written.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(emb, expected, atol=1e-5, equal_nan=True)
    assert written.uns["X_mixgeneformer_params"]["model"] == str(folder)
    table = pd.read_parquet(genes)
    assert table.columns[0] == "n_cells" and table.shape[1] == 65 and (table["n_cells"] > 0).all()
    assert fig.stat().st_size > 1000

    # an existing output is never replaced without --overwrite (exit code 2, clear message)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", str(source), "--model", str(folder), "--out", str(tmp_path / "b.h5ad"), "--color", "x"])
    assert not (tmp_path / "b.h5ad").exists()


@pytest.mark.realdata
def test_embed_anndata_on_real_baron_cells_with_symbol_gene_names(baron_data):
    """Real human pancreas cells (HGNC symbols as var_names) through tokenizer + tiny model."""
    import anndata as ad

    from mixgeneformer.medians import compute_medians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.vocab import build_vocabulary

    adata = ad.read_h5ad(baron_data / "baron_pancreas_human.h5ad")[::32].copy()  # 55 cells
    medians = compute_medians([adata])
    vocab = build_vocabulary("separate", "protein_coding", medians, species=("human",))
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=512))
    out = embed_anndata(adata, model, vocab=vocab, medians=medians, copy=True, progress=False, batch_size=8)
    emb = out.obsm["X_mixgeneformer"]
    assert emb.shape == (adata.n_obs, 64) and np.isfinite(emb).all()
    assert list(out.obs_names) == list(adata.obs_names)
    assert out.uns["X_mixgeneformer_params"]["tokenize"]["max_len"] == 512
    # a cell alone gives the same vector as inside the batch
    alone = embed_anndata(adata[[7]].copy(), model, vocab=vocab, medians=medians, copy=True, progress=False)
    np.testing.assert_allclose(alone.obsm["X_mixgeneformer"][0], emb[7], rtol=0, atol=1e-5)


def test_cli_embed_reads_a_tokenized_corpus_folder_and_checks_its_vocabulary(bundle, tmp_path):
    import anndata as ad

    from mixgeneformer.bundle import load_bundle
    from mixgeneformer.cli import main
    from mixgeneformer.errors import VocabularyMismatchError
    from mixgeneformer.fileio import read_json, write_json
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_files

    folder, adata = bundle
    model, vocab, medians = load_bundle(folder)
    source = tmp_path / "cells.h5ad"
    adata.write_h5ad(source)
    corpus = tokenize_files([source], tmp_path / "corpus", vocab, medians, TokenizeConfig(max_len=128), obs_columns=["cell_type1"])
    out = tmp_path / "out.h5ad"
    main(["embed", str(corpus), "--model", str(folder), "--out", str(out), "--no-progress", "--layer", "-1"])
    written = ad.read_h5ad(out)
    assert written.n_obs == 38 and "cell_type1" in written.obs
    assert written.uns["X_mixgeneformer_params"]["layer"] == -1
    with pytest.warns(UserWarning):
        direct = embed_anndata(adata, folder, layer=-1, copy=True, progress=False).obsm["X_mixgeneformer"]
    finite = np.isfinite(direct).all(axis=1)
    np.testing.assert_allclose(written.obsm["X_mixgeneformer"], direct[finite], atol=1e-5)

    meta = read_json(corpus / "mixgf_corpus.json")
    write_json(corpus / "mixgf_corpus.json", {**meta, "vocab_hash": "0" * 16})
    with pytest.raises(VocabularyMismatchError, match="re-tokenize"):
        embed_corpus_folder(corpus, folder, progress=False)


def test_embed_anndata_tokenizes_like_the_bundle_records(tmp_path):
    """A bundle's tokenize.yaml (written by pretraining) is the default for new cells."""
    import shutil

    import anndata as ad

    from mixgeneformer.bundle import save_bundle
    from mixgeneformer.config import save_config
    from mixgeneformer.medians import compute_medians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.tokenize import TokenizeConfig
    from mixgeneformer.vocab import build_vocabulary

    rng = np.random.default_rng(0)
    genes = ["INS", "GCG", "SST", "PPY", "KRT19", "PRSS1", "CPA1", "REG1A", "TTR", "CHGA"]
    adata = ad.AnnData(rng.poisson(3, (6, len(genes))).astype(np.float32))
    adata.var_names = genes
    medians = compute_medians([adata], species="human")
    vocab = build_vocabulary("separate", medians=medians, species=("human",))
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=16)).eval()
    bundle = save_bundle(model, tmp_path / "bundle", vocab, medians)
    save_config(TokenizeConfig(max_len=8, style="v2", add_species_token=True), tmp_path, "tokenize.yaml")
    shutil.copyfile(tmp_path / "tokenize.yaml", bundle / "tokenize.yaml")
    embed_anndata(adata, bundle, pooling="cls", species="human")
    assert adata.uns["X_mixgeneformer_params"]["tokenize"]["style"] == "v2"
    assert np.isfinite(adata.obsm["X_mixgeneformer"]).all()


@pytest.mark.parametrize(("precision", "bf16"), [("auto", False), ("fp32", False), ("bf16", True)])
def test_inference_context_precision_on_cpu(precision, bf16):
    with inference_context(torch.device("cpu"), precision):
        assert torch.is_autocast_enabled("cpu") is bf16
        out = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert not torch.is_autocast_enabled("cpu")


def test_inference_context_rejects_unknown_precision():
    with pytest.raises(ConfigError, match="precision"):
        inference_context(torch.device("cpu"), "fp16")
