"""Reference audit of in silico perturbation (SPEC §5) on real Baron pancreas cells.

Every expected value here is computed the slow, obvious way, independently of the package's
engine: the cell's token list is edited by hand as SPEC says (delete: remove the token;
overexpress: move it after the leading ``<cls>`` / species token, or insert it there and cut the
cell to the model's length keeping ``<eos>``; activate / inhibit: move it to a gene rank), the edited
cell goes alone through a plain ``transformers`` forward pass (``output_hidden_states``), the chosen
layer is pooled (mean over gene tokens, or the ``<cls>`` state), and the scores are
``shift = 1 − cos(original, perturbed)`` and ``goal_shift = cos(perturbed, goal) − cos(original,
goal)`` with the goal the mean embedding of the goal cells. The screen's first-order estimates are
checked against finite differences along the path the estimate linearises, in float64.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import mixgeneformer.perturb as pt
from mixgeneformer.inference import encoder_of, layers_to_run
from mixgeneformer.perturb import PerturbConfig, perturb_cells

pytestmark = pytest.mark.realdata

MAXP = 48  # the model's positions: the longest cell below fills them
CLS, EOS, HUMAN = 2, 3, 4
BASE = dict(state_column="state", start="beta", goal="alpha", alternatives=["ductal"], device="cpu")


@pytest.fixture(scope="module")
def setup(baron_data):
    """(model, vocab, medians, adata, cells, labels): a tiny model over real cells' genes; 6 beta
    cells cut to varied lengths (the first at the model's length), 6 alpha and 3 ductal cells,
    V2-style (<cls> <human> genes… <eos>)."""
    import anndata as ad

    from mixgeneformer.medians import compute_medians
    from mixgeneformer.model import MixGeneformerForPretraining, make_config
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_for_model
    from mixgeneformer.vocab import build_vocabulary

    adata = ad.read_h5ad(baron_data / "baron_pancreas_human.h5ad")
    adata = adata[np.flatnonzero(adata.obs["cell_type1"].isin(["alpha", "beta", "ductal"]).to_numpy())[::6]].copy()
    medians = compute_medians([adata])
    vocab = build_vocabulary("separate", "protein_coding", medians, species=("human",))
    torch.manual_seed(0)
    model = MixGeneformerForPretraining(make_config("tiny", vocab, max_position_embeddings=MAXP)).eval()
    corpus, _, _ = tokenize_for_model(adata, vocab, medians, TokenizeConfig(max_len=MAXP, style="v2", add_species_token=True),
                                      MAXP, obs_columns=["cell_type1"])
    ids = [np.asarray(x, dtype=np.int64) for x in corpus["input_ids"]]
    states = np.asarray(corpus["cell_type1"], dtype=object)
    cells, labels = [], []
    for i, row in enumerate(np.flatnonzero(states == "beta")[:6]):
        n = [MAXP - 3, 10, 25, 7, 40, 18][i]
        cells.append(np.concatenate([ids[row][: 2 + n], [EOS]]))
        labels.append("beta")
    for state, k in (("alpha", 6), ("ductal", 3)):
        for row in np.flatnonzero(states == state)[:k]:
            cells.append(ids[row])
            labels.append(state)
    assert len(cells[0]) == MAXP and all(c[0] == CLS and c[1] == HUMAN and c[-1] == EOS for c in cells)
    return model, vocab, medians, adata, cells, labels


def _states(model, tokens, layer=-2) -> np.ndarray:
    """Token states of ``layer`` of one unpadded forward pass, float64."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        return encoder_of(model)(ids, output_hidden_states=True).hidden_states[layer][0].double().numpy()


def _embed(model, vocab, tokens, layer=-2, pooling="mean") -> np.ndarray:
    states = _states(model, tokens, layer)
    return states[0] if pooling == "cls" else states[~np.isin(tokens, vocab.special_ids)].mean(0)


def _cos(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run(setup, config, cells=None, labels=None):
    model, vocab, _, _, all_cells, all_labels = setup
    cells = all_cells if cells is None else cells
    dataset = [list(map(int, c)) for c in cells]
    return perturb_cells(model, dataset, vocab, config, states=all_labels if labels is None else labels, progress=False)


def _check_against_edits(setup, config, edit, cells=None, layer=-2, pooling="mean") -> pd.DataFrame:
    """Run ``config`` and compare every row's shift / goal_shift / alt_shift with the edited cell's."""
    model, vocab, _, _, all_cells, labels = setup
    cells = all_cells if cells is None else cells
    result = _run(setup, config, cells)
    states = {s: np.mean([_embed(model, vocab, c, layer, pooling) for c, lab in zip(cells, labels, strict=True) if lab == s], 0)
              for s in ("alpha", "ductal")}
    assert len(result.cells)
    for _, row in result.cells.iterrows():
        tokens = cells[row["cell"]]
        before = _embed(model, vocab, tokens, layer, pooling)
        after = _embed(model, vocab, edit(tokens, row["gene_token"]), layer, pooling)
        expected = [1 - _cos(before, after)] + [_cos(after, states[s]) - _cos(before, states[s]) for s in states]
        got = row[["shift", "goal_shift", "alt_shift:ductal"]].to_numpy(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-8, err_msg=f"cell {row['cell']} {row['perturbed']}")
    return result.cells


def _delete(tokens, gene):
    return tokens[tokens != gene]


def _move_to_front(tokens, gene, lead=2, max_len=MAXP):
    """Geneformer's overexpression: the gene after the leading special tokens (inserted if absent);
    the cell cut to ``max_len`` with its trailing <eos> kept."""
    tokens = list(tokens)
    tail = [EOS] if tokens[-1] == EOS else []
    body = [t for t in tokens[lead : len(tokens) - len(tail)] if t != gene]
    return np.asarray((tokens[:lead] + [gene] + body)[: max_len - len(tail)] + tail)


def _genes(setup) -> list[str]:
    """Four genes: two that the two longest beta cells share (below their top gene), the top gene of
    a short beta cell, and an alpha cell's gene no beta cell has (inserted into the full cell)."""
    _, vocab, _, _, cells, _ = setup
    shared = [int(t) for t in cells[4][3:-1] if t in cells[0][3:-1] and t != cells[1][2]]
    beta = np.concatenate(cells[:6])
    absent = next(int(t) for t in cells[6][2:-1] if t not in beta)
    return [vocab.tokens[t] for t in (shared[0], shared[1], int(cells[1][2]), absent)]


@pytest.mark.parametrize(("layer", "pooling"), [(-2, "mean"), (-1, "mean"), (0, "mean"), (1, "cls")])
def test_every_single_deletion_scores_like_the_edited_cell(setup, layer, pooling):
    _, vocab, *_ , cells, _ = setup
    config = PerturbConfig(**BASE, layer=layer, pooling=pooling, batch_size=7)
    table = _check_against_edits(setup, config, _delete, layer=layer, pooling=pooling)
    # each row names the gene it deleted: token, ID, rank (position after <cls> <human>) and gene count
    n_genes = [len(c) - 3 for c in cells]
    assert len(table) == sum(n_genes[:6]) and set(table["cell"]) == set(range(6))
    np.testing.assert_array_equal(table["n_genes"], np.asarray(n_genes)[table["cell"]])
    at_rank = np.asarray([cells[c][2 + r] for c, r in zip(table["cell"], table["gene_rank"], strict=True)])
    np.testing.assert_array_equal(at_rank, table["gene_token"])
    assert (np.asarray(vocab.tokens, dtype=object)[table["gene_token"]] == table["perturbed"]).all()


def test_listed_genes_absent_ones_and_a_gene_set_delete_like_the_edited_cells(setup):
    _, vocab, *_, cells, _ = setup
    genes = _genes(setup)
    table = _check_against_edits(setup, PerturbConfig(**BASE, genes=genes), _delete)
    # a listed gene a cell lacks gives that cell no row for it
    expected = {(c, vocab.gene_to_id[g]) for c in range(6) for g in genes if vocab.gene_to_id[g] in cells[c]}
    assert set(zip(table["cell"], table["gene_token"], strict=True)) == expected
    assert len(expected) < 6 * len(genes)
    tokens = [vocab.gene_to_id[g] for g in genes[:2]]
    result = _run(setup, PerturbConfig(**BASE, genes=genes[:2], combine=True))
    holders = [c for c in range(6) if all(t in cells[c] for t in tokens)]
    assert list(result.cells["cell"]) == holders and result.summary["cells_skipped_gene_absent"] == 6 - len(holders)
    model = setup[0]
    for row in result.cells.itertuples():
        before = _embed(model, vocab, cells[row.cell])
        after = _embed(model, vocab, cells[row.cell][~np.isin(cells[row.cell], tokens)])
        assert row.perturbed == "+".join(genes[:2]) and row.gene_token == -1
        np.testing.assert_allclose(row.shift, 1 - _cos(before, after), rtol=1e-4, atol=2e-8)


@pytest.mark.parametrize("absent", ["skip", "insert"])
def test_overexpression_scores_like_the_edited_cell(setup, absent):
    _, vocab, *_, cells, _ = setup
    genes = _genes(setup)
    config = PerturbConfig(**BASE, perturb="overexpress", genes=genes, overexpress_absent=absent)
    table = _check_against_edits(setup, config, _move_to_front)
    present = [vocab.gene_to_id[g] in cells[c] for c, g in zip(table["cell"], table["perturbed"], strict=True)]
    assert all(present) if absent == "skip" else (not all(present) and len(table) == 6 * 4)
    np.testing.assert_array_equal(table["gene_rank"] == -1, ~np.asarray(present))
    top = table["gene_rank"] == 0  # moving the top gene to the front changes nothing
    assert top.any() and (table.loc[top, ["shift", "goal_shift"]] == 0).all().all()
    # the cell at the model's length loses its last gene for an inserted one, keeps <eos>
    assert (absent == "insert") == ((table["cell"] == 0) & (table["gene_rank"] == -1)).any()


def test_an_inserted_gene_set_scores_like_the_edited_cell(setup):
    model, vocab, *_, cells, _ = setup
    genes = _genes(setup)
    tokens = [vocab.gene_to_id[g] for g in genes]
    config = PerturbConfig(**BASE, perturb="overexpress", genes=genes, combine=True, overexpress_absent="insert")
    table = _run(setup, config).cells
    assert list(table["cell"]) == list(range(6)) and (table["perturbed"] == "+".join(genes)).all()
    for row in table.itertuples():
        body = [t for t in cells[row.cell][2:-1] if t not in tokens]
        edited = np.asarray(([CLS, HUMAN] + tokens + body)[: MAXP - 1] + [EOS])
        before, after = _embed(model, vocab, cells[row.cell]), _embed(model, vocab, edited)
        np.testing.assert_allclose(row.shift, 1 - _cos(before, after), rtol=1e-4, atol=2e-8)


@pytest.mark.parametrize(("kind", "rank"), [("activate", 2), ("inhibit", -1), ("inhibit", 5)])
def test_activation_and_inhibition_score_like_the_edited_cell(setup, kind, rank):
    def move(tokens, gene):
        genes = [t for t in tokens[2:-1] if t != gene]
        current, target = list(tokens[2:-1]).index(gene), rank if rank >= 0 else len(genes) + 1 + rank
        if (kind == "activate" and current <= target) or (kind == "inhibit" and current >= target):
            return tokens  # never lowered by activation nor raised by inhibition
        return np.asarray([CLS, HUMAN] + genes[:target] + [gene] + genes[target:] + [EOS])

    _check_against_edits(setup, PerturbConfig(**BASE, perturb=kind, target_rank=rank, genes=_genes(setup)), move)


@pytest.mark.parametrize("form", ["v1", "species"])
def test_cells_without_cls_or_eos_delete_and_insert_like_the_edited_cell(setup, form):
    """V1 cells (genes only) and species-token cells; the first fills the model's positions."""
    model, vocab, *_, cells, labels = setup
    lead = 0 if form == "v1" else 1
    pool = list(dict.fromkeys(np.concatenate([c[2:-1] for c in cells[:3]]).tolist()))
    edited = [np.asarray([HUMAN] * lead + pool[: MAXP - lead])] + [np.asarray([HUMAN] * lead + list(c[2:-1])) for c in cells[1:]]
    _check_against_edits(setup, PerturbConfig(**BASE), _delete, cells=edited)
    config = PerturbConfig(**BASE, perturb="overexpress", genes=_genes(setup), overexpress_absent="insert")
    _check_against_edits(setup, config, lambda t, g: _move_to_front(t, g, lead=lead), cells=edited)


def test_scores_do_not_depend_on_batch_size_or_the_other_cells(setup):
    *_, cells, labels = setup
    config = dict(BASE, genes=[], score="cell_emb")
    full = _run(setup, PerturbConfig(**config, batch_size=64)).cells
    for batch_size in (1, 3, 16):
        other = _run(setup, PerturbConfig(**config, batch_size=batch_size)).cells
        pd.testing.assert_frame_equal(other[["cell", "perturbed", "gene_rank"]], full[["cell", "perturbed", "gene_rank"]])
        cols = ["shift", "goal_shift", "alt_shift:ductal", "cell_emb"]
        np.testing.assert_allclose(other[cols], full[cols], rtol=1e-4, atol=1e-7)
    # a short cell alone (no other cells of other lengths to be padded with) scores the same
    alone = _run(setup, PerturbConfig(**config, batch_size=64), [cells[3]] + cells[6:], ["beta"] + labels[6:]).cells
    same = full[full["cell"] == 3].reset_index(drop=True)
    np.testing.assert_allclose(alone[["shift", "goal_shift", "cell_emb"]], same[["shift", "goal_shift", "cell_emb"]], rtol=1e-4, atol=1e-7)


def _cell_emb(model, vocab, tokens, edited, gene) -> float:
    """Geneformer's cell_emb: mean cos of each remaining gene's state before and after."""
    before, after = _states(model, tokens), _states(model, edited)
    where = {int(t): i for i, t in enumerate(tokens)}
    keep = [j for j, t in enumerate(edited) if t not in vocab.special_ids and t != gene]
    return float(np.mean([_cos(before[where[int(edited[j])]], after[j]) for j in keep]))


@pytest.mark.parametrize("perturb", ["delete", "overexpress"])
def test_cell_emb_is_the_mean_cosine_of_the_remaining_genes(setup, perturb):
    model, vocab, *_, cells, _ = setup
    extra = {"perturb": "overexpress", "genes": _genes(setup), "overexpress_absent": "insert"} if perturb == "overexpress" else {}
    table = _run(setup, PerturbConfig(**BASE, score="cell_emb", batch_size=9, **extra)).cells
    edit = _move_to_front if perturb == "overexpress" else _delete
    for row in table.itertuples():
        expected = _cell_emb(model, vocab, cells[row.cell], edit(cells[row.cell], row.gene_token), row.gene_token)
        np.testing.assert_allclose([row.cell_emb, row.cell_emb_shift], [expected, 1 - expected], rtol=1e-5, atol=1e-7)


def test_anchor_pairs_score_against_the_original_and_the_anchor_alone(setup):
    model, vocab, *_, cells, _ = setup
    anchor = int(cells[0][4])
    table = _run(setup, PerturbConfig(**BASE, anchor=vocab.tokens[anchor])).cells
    assert set(table["cell"]) == {c for c in range(6) if anchor in cells[c]}
    for row in table.itertuples():
        tokens = cells[row.cell]
        alone = _delete(tokens, anchor)
        pair = _delete(alone, row.gene_token) if row.anchor_token >= 0 else alone
        e0, ea, ep = (_embed(model, vocab, t) for t in (tokens, alone, pair))
        np.testing.assert_allclose([row.shift, row.anchor_shift], [1 - _cos(e0, ep), 1 - _cos(ea, ep)], rtol=1e-4, atol=2e-8)


def test_goal_shift_is_positive_toward_the_goal_and_ranks_that_gene_first(setup):
    """The goal state is the start cell without one gene: deleting it reaches the goal exactly."""
    model, vocab, *_, cells, _ = setup
    start, gene = cells[2], int(cells[2][6])
    config = PerturbConfig(state_column="state", start="beta", goal="alpha", device="cpu")
    result = _run(setup, config, [start, _delete(start, gene)], ["beta", "alpha"])
    row = result.cells.set_index("gene_token").loc[gene]
    goal = _embed(model, vocab, _delete(start, gene))
    np.testing.assert_allclose(row["goal_shift"], 1 - _cos(_embed(model, vocab, start), goal), rtol=1e-4)
    assert row["goal_shift"] > 0 and result.cells["goal_shift"].idxmax() == result.cells.index[result.cells["gene_token"] == gene][0]
    stats = pt.perturbation_statistics(result.cells, vocab, mode="aggregate")
    assert stats["gene_token"].iloc[0] == gene and stats["ensembl_id"].iloc[0] == vocab.tokens[gene]


# -- screen: first-order estimates and exact re-scores ----------------------------------------
def _embedding_along(bert, vocab, tokens, original, position, eps, method, pooling):
    """Cell embedding (float64) along the path the screen linearises at ``eps`` (1 = the deletion):
    ``mask``: presence weight of ``position`` 1 − eps, position embeddings of later tokens moved
    eps of the way up one place; ``shift`` (on the cell without its last gene): tokens of
    [position, last) moved eps of the way to their successor's word embedding."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    words, places = bert.embeddings.word_embeddings.weight, bert.embeddings.position_embeddings.weight
    x, weight = words[ids].clone(), torch.ones(len(ids), dtype=torch.float64)
    if method == "mask":
        x[position + 1 :] += eps * (places[position : len(ids) - 1] - places[position + 1 : len(ids)])
        weight[position] = 1 - eps
    else:
        full = torch.as_tensor(np.asarray(original, dtype=np.int64))
        last = len(ids) - 1  # the deleted last gene's position in the original (before <eos>)
        x[position:last] += eps * (words[full[position + 1 : last + 1]] - words[full[position:last]])
    with torch.no_grad():
        hidden = bert.embeddings(inputs_embeds=x[None])
        for block in bert.encoder.layer[: layers_to_run(len(bert.encoder.layer), -2)]:
            out = block(hidden, torch.log(weight)[None, None, None, :])
            hidden = out[0] if isinstance(out, tuple) else out
    hidden = hidden[0].numpy()
    if pooling == "cls":
        return hidden[0]
    pooled = (~np.isin(tokens, vocab.special_ids)) * weight.numpy()
    return (hidden * pooled[:, None]).sum(0) / pooled.sum()


@pytest.mark.parametrize("method", ["mask", "shift"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_screen_estimates_are_the_first_order_expansion_of_each_deletion(setup, method, pooling):
    model, vocab, *_, cells, _ = setup
    bert = copy.deepcopy(encoder_of(model)).double().eval()
    tokens, hidden = cells[3], bert.config.hidden_size
    goal = np.random.default_rng(1).standard_normal(hidden)
    # every direction orthogonal to the embedding probed: the shift estimate is exact for the linear change
    config = PerturbConfig(mode="screen", screen_method=method, screen_probes=hidden - 1, pooling=pooling,
                           state_column="s", goal="g", device="cpu", precision="auto")
    path = lambda cell, p, eps: _embedding_along(bert, vocab, cell, tokens, p, eps, method, pooling)  # noqa: E731
    original = path(tokens, 0, 0.0) if method == "mask" else _embed(bert, vocab, tokens, pooling=pooling)
    got = pt.screen_deletions(bert, tokens, original, {"g": goal}, vocab, config, torch.device("cpu"))
    genes = np.flatnonzero(~np.isin(tokens, vocab.special_ids))
    start = tokens if method == "mask" else np.delete(tokens, genes[-1])
    eps = 1e-6
    for rank, p in enumerate(genes):
        at, up, down = (path(start, p, e) for e in (0.0, eps, -eps))
        linear = at + (up - down) / (2 * eps)
        slope = (_cos(up, goal) - _cos(down, goal)) / (2 * eps)
        if method == "shift" and p == genes[-1]:  # the base itself: exact
            linear, slope = at, 0.0
        expected = [1 - _cos(original, linear), _cos(at, goal) + slope - _cos(original, goal)]
        np.testing.assert_allclose([got["shift"][rank], got["goal_shift"][rank]], expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(got["gene_token"], tokens[genes])


def test_screen_rescores_its_top_estimates_exactly(setup):
    exact = _run(setup, PerturbConfig(**BASE)).cells
    screen = _run(setup, PerturbConfig(**BASE, mode="screen", screen_top_k=4)).cells
    pd.testing.assert_frame_equal(screen[["cell", "gene_token", "gene_rank"]], exact[["cell", "gene_token", "gene_rank"]])
    rescored = screen["exact"].to_numpy()
    np.testing.assert_allclose(screen.loc[rescored, "goal_shift"], exact.loc[rescored, "goal_shift"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(screen.loc[rescored, "shift"], exact.loc[rescored, "shift"], rtol=1e-4, atol=1e-8)
    assert screen.loc[~rescored, ["shift", "goal_shift"]].isna().all().all()
    for _, cell in screen.groupby("cell"):
        top = cell.sort_values("goal_shift_estimate", ascending=False, kind="stable").head(4)
        assert set(top["gene_rank"]) == set(cell.loc[cell["exact"], "gene_rank"])
    # first order: the estimates order each cell's deletions much like the exact scores
    rho = [scipy.stats.spearmanr(screen.loc[screen["cell"] == c, "goal_shift_estimate"], exact.loc[exact["cell"] == c, "goal_shift"]).statistic
           for c in range(6)]
    assert np.mean(rho) > 0.5, rho


# -- the user API on an AnnData: rows, names and statistics line up ---------------------------
def test_perturb_anndata_rows_names_and_tests_line_up(setup):
    from mixgeneformer.genes import symbols_of
    from mixgeneformer.tokenize import TokenizeConfig, tokenize_for_model

    model, vocab, medians, adata, *_ = setup
    import scipy.sparse as sp

    adata = adata[:60].copy()
    kept = np.ones(adata.n_obs)
    kept[4] = 0  # a cell the tokenizer drops (no counts): corpus rows and obs rows differ after it
    adata.X = sp.csr_matrix(sp.diags(kept) @ adata.X)
    adata.X.eliminate_zeros()
    config = PerturbConfig(state_column="cell_type1", start="beta", goal="alpha", cells_per_state=3, device="cpu", seed=5)
    tk = TokenizeConfig(max_len=MAXP)
    with pytest.warns(UserWarning, match="1 of 60 cells were dropped by the tokenizer"):
        result, stats = pt.perturb_anndata(adata, model, config, vocab=vocab, medians=medians, tokenize_config=tk, progress=False)
    cells = result.cells
    assert result.summary["cells_dropped_by_tokenizer"] == 1 and 4 not in set(cells["cell"])
    assert (np.asarray(adata.obs_names)[cells["cell"]] == cells["obs_name"]).all()
    assert (adata.obs["cell_type1"].to_numpy()[cells["cell"]] == cells["state"]).all() and (cells["state"] == "beta").all()
    # the goal: the 3 alpha cells drawn with the per-state seed, each tokenized as the run does
    corpus, obs_rows, _ = tokenize_for_model(adata, vocab, medians, tk, MAXP, obs_columns=["cell_type1"])
    alpha = np.flatnonzero(np.asarray(corpus["cell_type1"]) == "alpha")
    alpha = np.sort(np.random.default_rng([5, zlib.crc32(b"alpha")]).choice(alpha, 3, replace=False))
    goal = np.mean([_embed(model, vocab, np.asarray(corpus["input_ids"][r])) for r in alpha], 0)
    for row in cells.iloc[::37].itertuples():
        tokens = np.asarray(corpus["input_ids"][int(np.flatnonzero(obs_rows == row.cell)[0])])
        assert tokens[row.gene_rank] == row.gene_token and vocab.tokens[row.gene_token] == row.perturbed
        before, after = _embed(model, vocab, tokens), _embed(model, vocab, _delete(tokens, row.gene_token))
        np.testing.assert_allclose(row.goal_shift, _cos(after, goal) - _cos(before, goal), rtol=1e-4, atol=2e-8)
    # the statistics: one row per gene, named by its own token, tested against all scores
    assert (stats["ensembl_id"] == stats["perturbed"]).all()
    assert list(stats["symbol"]) == list(symbols_of(list(stats["ensembl_id"])))
    values = cells["goal_shift"].to_numpy()
    for row in stats.iloc[::25].itertuples():
        own = cells.loc[cells["gene_token"] == row.gene_token, "goal_shift"].to_numpy()
        assert row.n_cells == len(own) and vocab.tokens[row.gene_token] == row.perturbed
        p = scipy.stats.mannwhitneyu(own, values, alternative="two-sided", method="asymptotic").pvalue
        np.testing.assert_allclose([row.mean_goal_shift, row.p_value], [own.mean(), p], rtol=1e-9, atol=1e-12)


def test_cli_perturb_writes_what_the_api_computes_with_its_options(setup, tmp_path):
    """``mixgf perturb`` on an .h5ad: its options reach the run (layer, alternatives, insertion)
    and cells.parquet / genes.csv equal the API's result on the same cells."""
    from mixgeneformer.bundle import save_bundle
    from mixgeneformer.cli import main
    from mixgeneformer.tokenize import TokenizeConfig

    model, vocab, medians, adata, *_ = setup
    adata = adata[:40].copy()
    adata.write_h5ad(tmp_path / "in.h5ad")
    save_bundle(model, tmp_path / "bundle", vocab, medians)
    genes = _genes(setup)[2:]
    main(["perturb", str(tmp_path / "in.h5ad"), "--model", str(tmp_path / "bundle"), "--out", str(tmp_path / "out"),
          "--perturb", "overexpress", "--genes", ",".join(genes), "--state-column", "cell_type1", "--start", "beta",
          "--goal", "alpha", "--alternatives", "ductal", "--layer", "-1", "--device", "cpu", "--no-progress",
          "--set", "overexpress_absent=insert"])
    config = PerturbConfig(perturb="overexpress", genes=genes, state_column="cell_type1", start="beta", goal="alpha",
                           alternatives=["ductal"], layer=-1, overexpress_absent="insert", device="cpu")
    result, stats = pt.perturb_anndata(adata, model, config, vocab=vocab, medians=medians,
                                       tokenize_config=TokenizeConfig(max_len=MAXP), progress=False)
    written = pd.read_parquet(tmp_path / "out" / "cells.parquet")
    assert (result.cells["gene_rank"] == -1).any() and "alt_shift:ductal" in written.columns
    pd.testing.assert_frame_equal(written, result.cells, check_dtype=False, rtol=1e-6)
    table = pd.read_csv(tmp_path / "out" / "genes.csv")
    assert list(table["perturbed"]) == list(stats["perturbed"]) and list(table["symbol"]) == list(stats["symbol"])
    np.testing.assert_allclose(table["p_value"], stats["p_value"], rtol=1e-6)


def test_a_cell_holding_only_the_deleted_genes_is_skipped_and_counted_not_fatal(setup):
    """Deleting a gene set from a cell that holds nothing else leaves no gene: that one cell stopped the
    whole run (InputDataError); it is now skipped, counted apart from cells lacking the genes, and the
    other cells are scored as before."""
    _, vocab, *_, cells, _ = setup
    pair = cells[3][2:4]  # two genes of a 7-gene beta cell
    only_pair = np.concatenate([cells[3][:2], pair, [EOS]])
    config = PerturbConfig(**BASE, genes=[vocab.tokens[t] for t in pair], combine=True, min_genes=2)
    result = _run(setup, config, cells=[cells[3], only_pair, *cells[6:]], labels=["beta", "beta", *setup[5][6:]])
    assert list(result.cells["cell"]) == [0]
    assert result.summary["cells_skipped_no_gene_left"] == 1
    assert result.summary["cells_skipped_gene_absent"] == 0
    alone = _run(setup, config, cells=[cells[3], *cells[6:]], labels=["beta", *setup[5][6:]])
    np.testing.assert_allclose(result.cells["shift"].to_numpy(), alone.cells["shift"].to_numpy(), rtol=1e-6)
