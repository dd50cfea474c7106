"""Mutation-testing audit of tokenize/encode.py, medians/histogram.py and losses.py: each test pins behaviour
that a mutant of the source (named in the test) changed while the module's earlier tests still passed.
Expectations are computed independently (by hand, or by numpy in the encoder's own operation order)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mixgeneformer.medians import MedianAccumulator
from mixgeneformer.tokenize.encode import (
    _Columns,
    add_special_tokens,
    cell_species,
    rank_value_encode,
)


def test_rank_value_order_within_one_float32_value_follows_the_exact_value():
    # Values 1, 1 + 2e-12, 1 + 1e-12 (count 1 of a total 1e4, medians 1, 1/(1+2e-12), 1/(1+1e-12)) are
    # one float32 (the radix key) but three float64 values: the exact value orders them, not the token.
    # Kills: the insertion sort's "values[e] > values[..]" flipped to >=, its `or` / `and` swapped (the hypothesis
    # test of test_tokenize reaches this path only through exactly equal values; this pins the float32 collisions).
    medians = 1.0 / np.array([1.0, 1.0 + 2e-12, 1.0 + 1e-12, 1.0 + 2e-12])
    assert len(set(np.float32(1.0 / medians).tolist())) == 1 and len(set((1.0 / medians).tolist())) == 3
    counts = sp.csr_matrix(np.ones((1, 4)))
    flat, lengths = rank_value_encode(counts, np.array([10, 11, 12, 13]), medians, np.array([1e4]), 10)
    # 11 and 13 tie exactly (the smaller token first), then 12, then 10.
    assert flat.tolist() == [11, 13, 12, 10] and lengths.tolist() == [4]
    flat, _ = rank_value_encode(counts, np.array([13, 12, 11, 10]), medians, np.array([1e4]), 10)
    assert flat.tolist() == [10, 12, 11, 13]


def test_rank_value_encode_skips_stored_zeros_and_keeps_token_id_zero():
    # A CSR matrix may store explicit zeros (h5ad written after arithmetic): they are not expressed genes.
    # Token id 0 is a vocabulary entry like any other (only -1 means "not in the vocabulary").
    # Kills: "x > 0" -> "x >= 0", "token >= 0" -> "token > 0" and "token >= 0 and x > 0" -> "or" in _rank_rows;
    # "token_ids >= 0" -> "> 0" in rank_value_encode's usable mask and in its median lookup (np.where(..., medians, 1.0)).
    # A column out of the vocabulary (token -1) is skipped whatever its count.
    # Token 0's column is divided by its own median (4): 3/4 < 1/1, so token 7 comes first.
    counts = sp.csr_matrix((np.array([0.0, 3.0, 1.0, 9.0]), np.array([0, 1, 2, 3]), np.array([0, 4])), shape=(1, 4))
    assert counts.nnz == 4
    flat, lengths = rank_value_encode(counts, np.array([5, 0, 7, -1]), np.array([1.0, 4.0, 1.0, 1.0]), np.array([13.0]), 10)
    assert flat.tolist() == [7, 0] and lengths.tolist() == [2]


def test_rank_value_encode_cell_with_zero_total_is_empty_even_with_counts():
    # _encode_chunk drops cells by giving them total 0 (filter_pass): such a cell gets no token even
    # though it has counts. Kills: "total > 0" -> "total >= 0" in _rank_rows (a division by zero) without going
    # through a whole tokenization (test_tokenize's filter_pass test catches it end to end).
    counts = sp.csr_matrix(np.array([[2.0, 1.0], [2.0, 1.0]]))
    flat, lengths = rank_value_encode(counts, np.array([4, 5]), np.ones(2), np.array([0.0, 3.0]), 10)
    assert lengths.tolist() == [0, 2] and flat.tolist() == [4, 5]


def test_rank_value_order_of_values_that_differ_only_in_low_float32_bits():
    # The radix sort reads the float32 key 8 bits at a time; values a few float32 steps apart (every bit of
    # the low 16 used) at several scales must come out in the order of a plain sort (value desc, then token).
    # Kills: a radix pass's shift moved (8 -> 9 leaves bit 8 unsorted), a digit pass skipped.
    rng = np.random.default_rng(7)
    n = 400
    steps = rng.integers(0, 2**16, n) * 2.0**-23
    values = rng.choice([0.37, 1.0, 5.5, 1234.0], n) * (1.0 + steps)
    values[::9] = values[1::9][: len(values[::9])]  # a few exact ties, ordered by token
    tokens = rng.permutation(n) + 10
    counts = sp.csr_matrix(np.ones((1, n)))
    medians = 1.0 / values
    flat, _ = rank_value_encode(counts, tokens, medians, np.array([1e4]), n)
    exact = 1.0 / 1e4 * 1e4 / medians  # the encoder's own operation order, in numpy
    expected = tokens[np.lexsort((tokens, -exact))]
    assert flat.tolist() == expected.tolist()


def test_rank_value_run_of_equal_keys_ends_at_the_cell_s_last_gene():
    # Scratch buffers are shared by the cells of a chunk: a cell's run of equal float32 keys must stop at its
    # own last gene and never take in the previous (longer) cell's stale entry behind it. Every value below is
    # float32 1.0; cell 0: tokens 11, 12 at 1 + 2e-12 and token 10 at 1 + 1e-12 (its stale entry); cell 1:
    # tokens 11, 12 at exactly 1.0, so a stale token 10 pulled into its run would sort first.
    # Kills: "k < m" -> "k <= m" and "k < m and ..." -> "or" in the run search of _rank_rows.
    counts = sp.csr_matrix(np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    medians = np.array([1.0, 1.0, (1 + 2e-12) / (1 + 1e-12)])
    totals = np.array([1e4 / (1 + 2e-12), 1e4])
    values = counts.toarray() / totals[:, None] * 1e4 / medians  # the encoder's operation order
    assert values[0, 0] == values[0, 1] > values[0, 2] > values[1, 0] == values[1, 1] == 1.0
    assert set(np.float32(values[counts.toarray() > 0]).tolist()) == {1.0}
    flat, lengths = rank_value_encode(counts, np.array([11, 12, 10]), medians, totals, 10)
    assert lengths.tolist() == [3, 2] and flat.tolist() == [11, 12, 10, 11, 12]

def test_rank_value_encode_ignores_columns_whose_median_is_not_positive_and_finite():
    # Documented: a median NaN or <= 0 means "column ignored" (a gene never seen expressed).
    # Kills: "& (medians > 0)" / "& np.isfinite(medians)" dropped from rank_value_encode's usable mask, "> 0" -> ">= 0".
    counts = sp.csr_matrix(np.array([[5.0, 4.0, 3.0, 2.0, 1.0]]))
    medians = np.array([0.0, -2.0, np.nan, np.inf, 2.0])
    flat, lengths = rank_value_encode(counts, np.array([10, 11, 12, 13, 14]), medians, np.array([15.0]), 10)
    assert flat.tolist() == [14] and lengths.tolist() == [1]


def test_shared_tokens_merge_leaves_columns_out_of_the_vocabulary_out():
    # Columns 0 and 1 share token 10 (merged: value 2); column 3 is out of the vocabulary with a large count and
    # must not land in any merged column. Kills: _merge_shared_tokens' column_map filled with 1 instead of -1.
    counts = sp.csr_matrix(np.array([[1.0, 1.0, 1.0, 100.0]]))
    flat, lengths = rank_value_encode(counts, np.array([10, 10, 11, -1]), np.ones(4), np.array([1e4]), 10)
    assert flat.tolist() == [10, 11] and lengths.tolist() == [2]


def test_special_tokens_with_only_a_prefix_only_a_suffix_or_two_of_each():
    # Kills: "n_pre == 0 and n_suf == 0" -> "or" (a prefix alone, e.g. the species token of style v1, was
    # dropped), and the positions of a second suffix token (ends - n_suf + i) shifted.
    flat, lengths = np.array([5, 6, 7], dtype=np.int32), np.array([2, 0, 1])
    out, new = add_special_tokens(flat, lengths, [9])
    assert out.tolist() == [9, 5, 6, 9, 9, 7] and new.tolist() == [3, 1, 2]
    out, new = add_special_tokens(flat, lengths, (), [3])
    assert out.tolist() == [5, 6, 3, 3, 7, 3] and new.tolist() == [3, 1, 2]
    out, new = add_special_tokens(flat, lengths, [2, np.array([8, 9, 8])], [3, 4])
    assert out.tolist() == [2, 8, 5, 6, 3, 4, 2, 9, 3, 4, 2, 8, 7, 3, 4] and new.tolist() == [6, 4, 5]


def test_cell_species_ties_go_to_the_input_s_species_and_single_species_inputs_give_one_per_cell():
    # Columns: 2 human genes, 1 mouse gene, 1 gene of neither (-1). Cell 0: 3 human vs 1 mouse counts; cell 1:
    # 2 vs 2 (a tie: the input's species, mouse here); cell 2: 0 vs 4. Kills: the tie rule (max == default's
    # count) flipped or dropped, argmax -> argmin, and a single-species input's answer sized by genes, not cells.
    column_species = np.array([0, 0, 1, -1], dtype=np.int8)
    columns = _Columns(np.arange(4), np.ones(4), np.ones(4, bool), "mouse", "", column_species)
    counts = sp.csr_matrix(np.array([[2.0, 1.0, 1.0, 9.0], [1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 4.0, 1.0]]))
    assert cell_species(counts, columns).tolist() == [0, 1, 1]
    columns.species = "human"
    assert cell_species(counts, columns).tolist() == [0, 0, 1]
    single = _Columns(np.arange(4), np.ones(4), np.ones(4, bool), "mouse", "")
    assert cell_species(counts, single).tolist() == [1, 1, 1]


# -- medians/histogram.py -------------------------------------------------------------------------

def _accumulate(values_per_cell, genes=("ENSG00000000003",), **settings):
    """An accumulator fed one cell per row of ``values_per_cell`` (count per 10,000 of each gene: count = value, total 1e4)."""
    acc = MedianAccumulator(genes=list(genes), **settings)
    dense = np.asarray(values_per_cell, dtype=np.float64).reshape(len(values_per_cell), len(genes))
    acc.update(sp.csr_matrix(dense), np.array(genes, dtype=object), np.full(len(dense), 1e4))
    return acc


def test_median_takes_the_middle_order_statistics_of_odd_and_even_counts():
    # Values a decade apart, so taking a neighbouring order statistic is off by ~10x, far beyond the 1.16 % bound.
    # Kills: the rank of the middle order statistics (k_low / k_high / n % 2) shifted or swapped, 0.5 * (a + b)
    # changed, "n >= min_cells" -> ">" (the single value); the realdata Baron test catches most of these too, this
    # one without any data file (e.g. under -m "not realdata").
    for values, expected in (([1, 10, 100], 10.0), ([1, 10, 100, 1000], 55.0), ([1000, 1, 100, 10], 55.0), ([7], 7.0)):
        acc = _accumulate([[v] for v in values])
        median = acc.finalize().values["ENSG00000000003"]
        assert abs(median / expected - 1) <= acc.relative_error_bound, (values, median)


def test_median_is_interpolated_geometrically_by_rank_within_its_bin():
    # One bin per decade, bins [1, 10), [10, 100), ...: the k-th of n values in a bin [lo, 10 lo) is estimated
    # as lo * 10 ** ((k - 0.5) / n) (module docstring: geometric interpolation by its rank within the bin).
    # Kills: "b > 0" -> "b >= 0" for the count before the bin (a median in the first bin came out below it); the
    # -0.5 and the in-bin count too (as does the realdata Baron test).
    coarse = {"bins_per_decade": 1, "min_value": 1.0, "max_value": 1e4}
    cases = (
        ([2], 10**0.5),  # k = 1 of 1 in [1, 10)
        ([2, 3], (10**0.25 + 10**0.75) / 2),  # k = 1, 2 of 2
        ([2, 3, 50], 10**0.75),  # k = 2: the 2nd of the 2 values in [1, 10)
        ([2, 50, 60, 70], (10 * 10 ** (1 / 6) + 10 * 10**0.5) / 2),  # k = 2, 3: the 1st and 2nd of the 3 in [10, 100)
    )
    for values, expected in cases:
        median = _accumulate([[v] for v in values], **coarse).finalize().values["ENSG00000000003"]
        assert np.isclose(median, expected, rtol=1e-12), (values, median, expected)


def test_values_outside_the_bin_range_are_clamped_into_the_end_bins_of_their_own_gene():
    # Bins [1, 10) ... [1e4, 1e5) (5 bins). 0.5 falls below: first bin; 2e5 and 5e5 (count > total, e.g.
    # totals over vocabulary genes only) fall past the last bin: last bin, and never into the next gene's row.
    # Kills: "b >= n_bins" -> "b > n_bins" (the write lands in the next gene's first bin), "b < 0" -> "b <= 0"
    # is equivalent (b = 0 is already the first bin).
    genes = ("ENSG00000000003", "ENSG00000000005")
    acc = _accumulate([[2e5, 3.0], [5e5, 3.0]], genes=genes, bins_per_decade=1, min_value=1.0, max_value=1e4)
    hist = acc.histograms
    assert hist.shape == (2, 5) and hist[0].tolist() == [0, 0, 0, 0, 2] and hist[1].tolist() == [2, 0, 0, 0, 0]
    low = _accumulate([[0.5]], bins_per_decade=1, min_value=1.0, max_value=1e4)
    assert low.histograms[0].tolist() == [1, 0, 0, 0, 0]


def test_histogram_skips_stored_zeros_and_cells_without_a_total():
    # A stored zero is not a nonzero value, and a cell whose total is 0 (or NaN) is skipped and not counted.
    # Kills: "not value > 0" -> "not value >= 0" (a stored zero fell in the first bin), "not total > 0" ->
    # "not total >= 0" (a division by zero), n_cells counting cells of total 0 ("totals > 0" -> ">= 0").
    gene = "ENSG00000000003"
    counts = sp.csr_matrix((np.array([0.0, 4.0, 3.0]), np.array([0, 0, 0]), np.array([0, 1, 2, 3])), shape=(3, 1))
    acc = MedianAccumulator(genes=[gene])
    acc.update(counts, np.array([gene], dtype=object), np.array([10.0, 0.0, 1e4]))
    assert int(acc.histograms.sum()) == 1 and acc.n_cells == 2  # cells 0 (its stored zero) and 2 count; 1 does not
    assert abs(acc.finalize().values[gene] / 3.0 - 1) <= acc.relative_error_bound


def test_finalize_keeps_genes_seen_in_at_least_min_cells():
    # A tracked gene never seen (a vocabulary gene absent from the data) has no median and breaks nothing.
    # Kills: "n >= max(min_cells, 1)" -> ">"; the bin search's upper limit h.shape[1] - 1 -> + 1 (an unseen
    # gene's search then indexes past its last bin).
    genes = ("ENSG00000000003", "ENSG00000000005", "ENSG00000000419")
    acc = _accumulate([[5.0, 5.0, 0.0], [6.0, 0.0, 0.0]], genes=genes)
    assert sorted(acc.finalize(min_cells=2).values) == ["ENSG00000000003"]
    assert sorted(acc.finalize(min_cells=0).values) == sorted(genes[:2])


# -- losses.py ------------------------------------------------------------------------------------


def test_cells_sharing_no_ortholog_gene_get_no_cross_species_partner():
    # A human and a mouse cell whose profiles share no gene (cosine 0) are each other's only candidate, and
    # mutually so, yet are not a pair: a partner needs a positive similarity. Kills: "best_sim > 0" -> ">= 0" in
    # mutual_nearest_partners and in mutual_nearest_in_pool.
    import torch

    from mixgeneformer import losses

    species = torch.tensor([0, 1])
    profiles = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.mutual_nearest_partners(profiles, species).tolist() == [-1, -1]
    overlapping = torch.tensor([[1.0, 0.2], [0.3, 1.0]])  # the same two cells sharing a little: paired
    assert losses.mutual_nearest_partners(overlapping, species).tolist() == [1, 0]
    classes, weights, norms = torch.tensor([[2], [3]]), torch.ones(2, 1), torch.ones(2)
    assert losses.mutual_nearest_in_pool(classes, weights, norms, species, 2, 4).tolist() == [-1, -1]
    shared = torch.tensor([[2, 3], [3, 2]])
    partners = losses.mutual_nearest_in_pool(shared, torch.tensor([[1.0, 0.5], [1.0, 0.5]]), torch.full((2,), 1.25**0.5), species, 2, 4)
    assert partners.tolist() == [1, 0]


def test_dimension_loss_of_a_batch_of_two_cells_is_computed_not_zero():
    # Two cells are the smallest batch with correlations (only one cell gives 0). By hand: each column of two
    # values standardises to -+d / sqrt(d^2 + eps), d its half-range. Kills: "batch < 2" -> "<= 2" / "< 3".
    import torch

    from mixgeneformer import losses

    eps = 1e-5
    a, b = 1 / (1 + eps) ** 0.5, 2 / (4 + eps) ** 0.5
    z1, z2 = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]])  # C = -a^2: one dimension, on-diagonal only
    assert losses.simcse_pp_dimension_loss(z1, z2).item() == pytest.approx((1 + a * a) ** 2, rel=1e-6)
    z1, z2 = torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[2.0, 5.0], [0.0, 1.0]])
    # C = [[-a^2, -ab], [-a^2, -ab]]: on-diagonal mean of (1 - C_dd)^2, off-diagonal mean of C_de^2.
    expected = ((1 + a * a) ** 2 + (1 + a * b) ** 2) / 2 + ((a * b) ** 2 + a**4) / 2
    assert losses.simcse_pp_dimension_loss(z1, z2).item() == pytest.approx(expected, rel=1e-6)
    assert losses.simcse_pp_dimension_loss(z1[:1], z2[:1]).item() == 0.0
