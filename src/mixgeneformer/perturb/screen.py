"""Fast screening: first-order estimates of every single-gene deletion, the top ones re-scored exactly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..devices import inference_context
from ..errors import InputDataError
from ..inference import encoder_of, hidden_at_layer, layers_to_run
from ..model import pool_cells
from .config import PerturbConfig
from .engine import (
    _CellJob,
    _cosine,
    _length_order,
    _progress,
    _run_variants,
    _score_columns,
    _sorted_cells,
)
from .variants import _Variants, perturbation_indices

if TYPE_CHECKING:

    from ..vocab import Vocabulary


def _probe_directions(embedding: np.ndarray, n_probes: int, seed: int) -> np.ndarray:
    """(1 + n_probes, d): the unit embedding, then random orthonormal directions orthogonal to it."""
    d = len(embedding)
    n_probes = min(n_probes, d - 1)
    rng = np.random.default_rng(seed)
    basis = np.concatenate([embedding[:, None], rng.standard_normal((d, n_probes))], axis=1)
    q, _ = np.linalg.qr(basis)
    q[:, 0] *= np.sign(q[:, 0] @ embedding) or 1.0
    return q.T


# long: a 21-line docstring; the body (41 lines) is one first-order estimate.
def screen_deletions(
    bert: torch.nn.Module,
    tokens: np.ndarray,
    embedding: np.ndarray,
    targets: dict[str, np.ndarray],
    vocab: Vocabulary,
    config: PerturbConfig,
    device: torch.device,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """First-order estimates of every single-gene deletion of one cell (see the module docstring).

    Parameters
    ----------
    bert
        The encoder.
    tokens
        (length,) token ids of the cell.
    embedding
        The cell's exact (unperturbed) embedding.
    targets
        State name -> mean state embedding (goal / alternatives).
    seed
        Seed of the random probe directions.

    Returns
    -------
    dict
        ``gene_token``, ``gene_rank``, ``shift`` and one ``goal_shift`` / ``alt_shift:<state>``
        per state, each (n_genes,) in rank order.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    special = vocab.special_ids
    gene_pos = np.flatnonzero(~np.isin(tokens, special))
    first, last = int(gene_pos[0]), int(gene_pos[-1])
    if last - first + 1 != len(gene_pos):
        raise InputDataError("screening needs the genes of a cell in one contiguous block (as the tokenizer writes them)")
    embedding = np.asarray(embedding, dtype=np.float64)
    probes = _probe_directions(embedding, config.screen_probes, seed)
    names = list(targets)
    embeddings = encoder_of(bert).embeddings
    if config.screen_method == "shift":
        # Base z: the last gene deleted (exact); then t_j -> t_{j+1} on [p, last) linearised.
        base = np.delete(tokens, last)
        at_base, grad_x, _ = _readout_gradients(bert, base, probes, targets, vocab, config, device, relax=False)
        weight = embeddings.word_embeddings.weight.detach().double()
        tok = torch.from_numpy(tokens).to(device)
        delta = weight[tok[first + 1 : last + 1]] - weight[tok[first:last]]  # W[t_{j+1}] - W[t_j]
        contrib = (grad_x[:, first:last] * delta[None]).sum(-1)  # (n_readouts, n_genes - 1)
        suffix = torch.flip(torch.cumsum(torch.flip(contrib, [1]), 1), [1])  # sum over j >= p
        change = torch.cat([suffix, torch.zeros_like(suffix[:, :1])], dim=1)  # last gene: exact
    else:
        # Base x: removing gene p = its presence weight 1 -> 0 (attention and pooling), plus the
        # tokens after it moving one position up: P[j-1] - P[j] at every position j > p.
        at_base, grad_x, grad_m = _readout_gradients(bert, tokens, probes, targets, vocab, config, device, relax=True)
        positions = embeddings.position_embeddings.weight.detach().double()[: len(tokens)]
        step = positions[:-1] - positions[1:]  # P[j-1] - P[j] for j = 1..L-1
        contrib = (grad_x[:, 1:] * step[None]).sum(-1)  # (n_readouts, L - 1), index j-1
        after = torch.flip(torch.cumsum(torch.flip(contrib, [1]), 1), [1])  # after[:, j-1] = sum_{i>=j}
        after = torch.cat([after, torch.zeros_like(after[:, :1])], dim=1)  # after[:, p] = sum_{j>p}
        change = after[:, gene_pos] - grad_m[:, gene_pos]
    estimate = at_base.double().cpu().numpy()[:, None] + change.cpu().numpy()  # read-outs at every deletion
    n_probe = len(probes) - 1
    parallel = estimate[0]  # e·ê after deletion
    orthogonal_sq = (len(embedding) - 1) / max(n_probe, 1) * (estimate[1 : 1 + n_probe] ** 2).sum(0)
    cos_est = parallel / np.sqrt(parallel**2 + orthogonal_sq)
    result = {"gene_token": tokens[gene_pos], "gene_rank": np.arange(len(gene_pos)), "shift": 1.0 - cos_est}
    for i, name in enumerate(names):
        key = "goal_shift" if name == config.goal else f"alt_shift:{name}"
        original = float(_cosine(embedding[None, :], targets[name][None, :])[0])
        result[key] = estimate[1 + n_probe + i] - original
    return result


def _readout_gradients(bert, tokens, probes, targets, vocab, config, device, relax):
    """Read-outs of one sequence's embedding and their input gradients (one batched backward).

    Read-outs: ``probes @ e`` then ``cos(e, state)`` per state. Returns the read-outs, their
    gradients with respect to the word-embedding output at each position (n_readouts, L, d)
    and, with ``relax``, with respect to each position's presence weight (n_readouts, L): a
    weight scales the token's attention (additive log-weight on the keys) and its pooling weight.
    """
    bert = encoder_of(bert)
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)[None, :]).to(device)
    mask = torch.ones_like(ids)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = bert.embeddings.word_embeddings.register_forward_hook(hook)
    try:
        with torch.enable_grad(), inference_context(device, config.precision, bert):
            if relax:
                presence = torch.ones(ids.shape, dtype=torch.float32, device=device, requires_grad=True)
                hidden = bert.embeddings(input_ids=ids)
                bias = torch.log(presence)[:, None, None, :].to(hidden.dtype)
                for block in bert.encoder.layer[: layers_to_run(len(bert.encoder.layer), config.layer)]:
                    out = block(hidden, bias)
                    hidden = out[0] if isinstance(out, tuple) else out
                if config.pooling == "cls":
                    e = hidden[0, 0].double()
                else:
                    weights = (presence * ~torch.isin(ids, torch.as_tensor(vocab.special_ids, device=device)))[0]
                    e = (hidden[0].double() * weights[:, None]).sum(0) / weights.sum()
            else:
                hidden = hidden_at_layer(bert, ids, mask, config.layer)
                e = pool_cells(hidden, ids, mask, vocab.special_ids, config.pooling, vocab.cls_id)[0].double()
            readouts = [torch.as_tensor(probes, device=device) @ e]
            for state in targets.values():
                goal = torch.as_tensor(state, device=device)
                readouts.append((e @ goal / (e.norm() * goal.norm()))[None])
            out = torch.cat(readouts)
            eye = torch.eye(len(out), dtype=out.dtype, device=device)
            inputs = (captured[0], presence) if relax else (captured[0],)
            grads = torch.autograd.grad(out, inputs, grad_outputs=eye, is_grads_batched=True)
    finally:
        handle.remove()
    grad_x = grads[0][:, 0].double()
    grad_m = grads[1][:, 0].double() if relax else None
    return out.detach(), grad_x, grad_m


# long: estimate every deletion of a cell, then re-score its top k exactly; the two passes share the cell jobs.
def _screen(bert, flat, offsets, rows, base_of, targets, vocab, config, device, progress):
    """Screening mode: estimates for all single-gene deletions, top-k re-scored exactly."""
    score = "goal_shift" if config.goal else "shift"
    estimates: dict[int, dict[str, np.ndarray]] = {}
    order = _length_order(rows, offsets).tolist()
    bar = _progress(len(order), progress, "screen (first order)")
    was_grad = [p.requires_grad for p in bert.parameters()]
    for p in bert.parameters():
        p.requires_grad_(False)  # only input gradients are needed
    try:
        for row in order:
            tokens = flat[offsets[row] : offsets[row + 1]]
            estimates[row] = screen_deletions(
                bert, tokens, base_of[row], targets, vocab, config, device, seed=config.seed * 1_000_003 + row
            )
            if bar is not None:
                bar.update(1)
    finally:
        for p, flag in zip(bert.parameters(), was_grad, strict=True):
            p.requires_grad_(flag)
        if bar is not None:
            bar.close()

    exact: dict[int, dict[str, np.ndarray]] = {}

    def jobs() -> Iterator[_CellJob]:
        for row in order:
            est = estimates[row]
            k = min(config.screen_top_k, len(est[score]))
            if k == 0:
                continue
            top = np.sort(np.argsort(-est[score], kind="stable")[:k])  # gene ranks to re-score
            tokens = flat[offsets[row] : offsets[row + 1]]
            gene_pos = np.flatnonzero(~np.isin(tokens, vocab.special_ids))
            src = perturbation_indices(tokens, gene_pos[top][:, None], "delete", vocab.special_ids)
            variants = _Variants(src, tokens[gene_pos[top]], top, [], tokens[gene_pos[top]][:, None], np.zeros(k, bool))
            yield _CellJob(row, tokens, variants, base_of[row])

    def done(job: _CellJob) -> None:
        exact[job.row] = {"gene_rank": job.variants.gene_rank, **_score_columns(job.embedding, job.emb, targets, config)}

    with torch.inference_mode(), inference_context(device, config.precision, bert):
        _run_variants(bert, jobs(), vocab, config, device, done)

    frames = []
    for row in sorted(estimates):
        est = estimates[row]
        n = len(est["gene_token"])
        frame = {"cell": np.full(n, row), "perturbed": np.asarray(vocab.tokens, dtype=object)[est["gene_token"]],
                 "gene_token": est["gene_token"], "gene_rank": est["gene_rank"]}
        keys = [k for k in est if k not in ("gene_token", "gene_rank")]
        is_exact = np.zeros(n, dtype=bool)
        if row in exact:
            is_exact[exact[row]["gene_rank"]] = True
        for key in keys:  # exact values only, NaN where a gene was only estimated (its *_estimate)
            value = np.full(n, np.nan)
            if row in exact:
                value[exact[row]["gene_rank"]] = exact[row][key]
            frame[key] = value
        frame["exact"] = is_exact
        for key in keys:
            frame[f"{key}_estimate"] = est[key]
        frames.append(pd.DataFrame(frame))
    frame = _sorted_cells(frames, targets, config, anchor=False)
    counts = {
        "cells_perturbed": len(estimates),
        "cells_skipped_gene_absent": 0,
        "variants": int(len(frame)),
        "variants_exact": int(frame["exact"].sum()) if len(frame) else 0,
    }
    return frame, counts
