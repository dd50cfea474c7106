"""Pretraining losses against naive reference implementations, plus distributed gathering."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from mixgeneformer import losses


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = torch.cat([z1, z2]).double()
    n = z.shape[0]
    b = n // 2
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        sims = {j: float(F.cosine_similarity(z[i], z[j], dim=0)) / temperature for j in range(n) if j != i}
        denom = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n


def naive_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, rows=None) -> float:
    a, b = a.double(), b.double()
    n = a.shape[0]
    rows = range(n) if rows is None else rows
    parts = []
    for x, y in ((a, b), (b, a)):
        total = 0.0
        for i in rows:
            sims = [float(F.cosine_similarity(x[i], y[j], dim=0)) / temperature for j in range(n)]
            total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
        parts.append(total / len(rows))
    return 0.5 * sum(parts)


def test_nt_xent_equals_naive_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    for temperature in (0.05, 0.5):
        assert losses.nt_xent(z1, z2, temperature).item() == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-5)


def test_nt_xent_rewards_aligned_views_and_has_gradients():
    torch.manual_seed(1)
    z1 = torch.randn(8, 16, requires_grad=True)
    aligned = losses.nt_xent(z1, z1.detach() + 0.01 * torch.randn(8, 16), 0.05)
    shuffled = losses.nt_xent(z1, z1.detach()[torch.randperm(8)], 0.05)
    assert aligned < 0.1 < shuffled
    aligned.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_nt_xent_is_computed_in_float32_for_bf16_inputs():
    torch.manual_seed(2)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    loss = losses.nt_xent(z1.bfloat16(), z2.bfloat16(), 0.05)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(naive_nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.05), rel=1e-4)


def test_info_nce_equals_naive_reference_and_respects_valid_rows():
    torch.manual_seed(3)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert losses.info_nce(a, b, 0.1).item() == pytest.approx(naive_info_nce(a, b, 0.1), rel=1e-5)
    valid = torch.tensor([True, False, True, True, False])
    expected = naive_info_nce(a, b, 0.1, rows=[0, 2, 3])
    assert losses.info_nce(a, b, 0.1, valid=valid).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_with_no_valid_row_is_zero_and_differentiable():
    a = torch.randn(3, 4, requires_grad=True)
    loss = losses.info_nce(a, torch.randn(3, 4), 0.1, valid=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert a.grad is not None


def test_mlm_loss_matches_cross_entropy_on_labelled_positions():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 3, 7, 10
    picked = logits[labels != -100]
    expected = F.cross_entropy(picked, labels[labels != -100])
    assert losses.mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mlm_loss_without_labelled_positions_is_zero_not_nan():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = losses.mlm_loss(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dimension_loss_matches_formula():
    torch.manual_seed(5)
    z1, z2 = torch.randn(10, 4), torch.randn(10, 4)

    def standardise(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)

    corr = standardise(z1).T @ standardise(z2) / 10
    on = sum((1 - corr[d, d]) ** 2 for d in range(4)) / 4
    off = sum(corr[d, e] ** 2 for d in range(4) for e in range(4) if d != e) / 12
    assert losses.simcse_pp_dimension_loss(z1, z2).item() == pytest.approx(float(on + off), rel=1e-5)


def test_dimension_loss_is_zero_for_identical_decorrelated_views_and_positive_otherwise():
    # Columns 2..4 of a 4x4 Hadamard matrix: zero mean, unit variance, mutually orthogonal.
    z = torch.tensor([[1.0, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]])
    assert losses.simcse_pp_dimension_loss(z, z).item() == pytest.approx(0.0, abs=1e-4)
    correlated = torch.stack([z[:, 0], z[:, 0], z[:, 0]], dim=1)  # every dimension the same
    assert losses.simcse_pp_dimension_loss(correlated, correlated).item() > 0.5


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        losses.nt_xent(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="equal shape"):
        losses.info_nce(torch.randn(3, 4), torch.randn(3, 5))


def test_gather_without_distributed_equals_local():
    torch.manual_seed(6)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    assert losses.nt_xent(z1, z2, 0.05, gather=True).item() == pytest.approx(losses.nt_xent(z1, z2, 0.05).item())
    assert losses.info_nce(z1, z2, 0.1, gather=True).item() == pytest.approx(losses.info_nce(z1, z2, 0.1).item())


def _gather_worker(rank: int, sizes: list[int], init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(sizes))
    try:
        torch.manual_seed(123)
        total = sum(sizes)
        full1, full2 = torch.randn(total, 8), torch.randn(total, 8)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        z1 = full1[rows].clone().requires_grad_(True)
        z2 = full2[rows].clone().requires_grad_(True)
        # Each rank's mean weighted by its share of the rows: the weighted losses sum to the
        # big-batch loss, so the gradients (summed over ranks by the gather's backward) match.
        share = sizes[rank] / total
        ntx = losses.nt_xent(z1, z2, 0.1, gather=True) * share
        nce = losses.info_nce(z1, z2, 0.2, gather=True) * share
        (ntx + nce).backward()
        torch.save({"ntx": ntx.detach(), "nce": nce.detach(), "g1": z1.grad, "g2": z2.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 3], [3, 2]])
def test_gathered_losses_and_gradients_equal_one_big_batch(sizes):
    """Two gloo ranks with gathered negatives == one process with the whole batch, also when the
    ranks hold different numbers of cells."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_gather_worker, args=(sizes, init_file, tmp), nprocs=len(sizes), join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(len(sizes))]

    torch.manual_seed(123)
    full1 = torch.randn(sum(sizes), 8).requires_grad_(True)
    full2 = torch.randn(sum(sizes), 8).requires_grad_(True)
    ntx = losses.nt_xent(full1, full2, 0.1)
    nce = losses.info_nce(full1, full2, 0.2)
    (ntx + nce).backward()

    assert sum(r["ntx"] for r in results).item() == pytest.approx(ntx.item(), rel=1e-5)
    assert sum(r["nce"] for r in results).item() == pytest.approx(nce.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([r["g1"] for r in results]), full1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["g2"] for r in results]), full2.grad, rtol=1e-4, atol=1e-6)
