"""Running the encoder over cells: hidden states at a layer, one padding,
one length order, and :func:`embed_corpus` (cell and gene embeddings of a tokenized corpus).

Shared by embedding, classification and perturbation (pooling lives in model.py beside the models
that use it). No files are read here."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import datasets
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .corpus import check_token_input
from .devices import Precision, autocast_dtype, inference_context, resolve_device
from .errors import ConfigError, InputDataError, VocabularyMismatchError
from .model import Pooling, gene_positions, pool_cells
from .vocab import Vocabulary


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """Return the ``transformers.BertModel`` inside ``model``.

    Accepts a ``BertModel`` itself or any wrapper exposing it as ``.bert``
    (``MixGeneformerForPretraining``, ``BertForMaskedLM``, classification heads).
    """
    if hasattr(model, "embeddings") and hasattr(model, "encoder"):
        return model
    bert = getattr(model, "bert", None)
    if bert is None or not hasattr(bert, "encoder"):
        raise ConfigError(
            f"model of type {type(model).__name__} has no BERT encoder; pass a "
            "MixGeneformerForPretraining, a BertForMaskedLM or a transformers.BertModel"
        )
    return bert


def layers_to_run(num_layers: int, layer: int) -> int:
    """Number of encoder blocks to run so the output is ``hidden_states[layer]``.

    ``layer`` indexes the ``num_layers + 1`` hidden states of Hugging Face's
    ``output_hidden_states`` (0 = embedding output, ``num_layers`` = last block); negative values
    count from the top (-1 = last block, -2 = second to last, Geneformer's default).
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ConfigError(f"layer must be an integer, got {layer!r}")
    layer = int(layer)
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ConfigError(
            f"layer={layer} is out of range for a model with {num_layers} encoder layers; "
            f"use 0..{num_layers} or -1..-{num_layers + 1} (-1 = last, -2 = second to last)"
        )
    return layer if layer >= 0 else num_layers + 1 + layer


def _attention_mask_for(bert: torch.nn.Module, attention_mask: torch.Tensor, dtype: torch.dtype):
    """The padding mask in the form the encoder's attention implementation expects.

    ``None`` when nothing is padded (SDPA then takes its fastest, mask-free kernel). SDPA gets a
    boolean (batch, 1, 1, length) mask, True = attend; eager attention an additive float mask.
    """
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    impl = getattr(bert.config, "_attn_implementation", None) or "eager"
    keep = keep[:, None, None, :]
    if impl == "sdpa":
        return keep
    if impl == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~keep, torch.finfo(dtype).min
        )
    # Other kernels (flash attention, flex) take the library's own mask format; imported here
    # because transformers.masking_utils exists only in recent transformers releases.
    from transformers.masking_utils import create_bidirectional_mask

    dummy = torch.empty(attention_mask.shape + (1,), dtype=dtype, device=attention_mask.device)
    return create_bidirectional_mask(
        config=bert.config, inputs_embeds=dummy, attention_mask=attention_mask
    )


def hidden_at_layer(
    bert: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int = -2,
) -> torch.Tensor:
    """Token states after ``layer``, computing no block above it.

    Parameters
    ----------
    bert
        A ``transformers.BertModel`` (or a model holding one as ``.bert``).
    input_ids
        (batch, length) int64 token ids, padded with the vocabulary's pad id.
    attention_mask
        (batch, length), 1 for real tokens and 0 for padding.
    layer
        Which of the ``num_layers + 1`` hidden states to return, indexed like
        ``BertModel(..., output_hidden_states=True).hidden_states`` (0 = embedding output,
        -1 = last block, -2 = second to last).

    Returns
    -------
    torch.Tensor
        (batch, length, hidden) states; identical to ``hidden_states[layer]`` of a full forward
        pass with the same attention implementation.
    """
    bert = encoder_of(bert)
    return continue_encoder(bert, bert.embeddings(input_ids=input_ids), attention_mask, 0, layer)


def continue_encoder(
    bert: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, done: int, layer: int = -2
) -> torch.Tensor:
    """Run the encoder from the states after ``done`` blocks up to hidden state ``layer``.

    ``hidden`` (batch, length, hidden) are ``hidden_states[done]`` (``done=0``: the embedding
    output); returns ``hidden_states[layer]`` like :func:`hidden_at_layer` (``layer`` must not be
    below ``done``).
    """
    bert = encoder_of(bert)
    blocks = bert.encoder.layer
    n_run = layers_to_run(len(blocks), layer)
    if n_run < done:
        raise ConfigError(f"layer {layer} lies below the {done} block(s) already run")
    mask = _attention_mask_for(bert, attention_mask, hidden.dtype)
    for block in blocks[done:n_run]:
        out = block(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns tuples
    return hidden


def pad_batch(
    flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad cells held in one flat token array (cell ``i`` is ``flat[starts[i]:starts[i] +
    lengths[i]]``) to ``width`` (default: the longest cell): (input_ids int64, attention_mask int64)."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(lengths.max()) if width is None else int(width)
    cols = np.arange(width)
    present = cols[None, :] < lengths[:, None]
    index = np.where(present, starts[:, None] + cols[None, :], 0)
    ids = np.where(present, flat[index] if flat.size else pad_id, pad_id)
    return ids.astype(np.int64), present.astype(np.int64)


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Indices longest first (stable), so consecutive batches hold cells of similar length and an
    out-of-memory batch shows up at once."""
    return np.argsort(-np.asarray(lengths), kind="stable")


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Row indices in batches of similar length, longest first."""
    order = length_order(lengths)
    for b in range(0, len(order), batch_size):
        yield order[b : b + batch_size]


def check_batch_size(batch_size: object) -> None:
    """Raise :class:`ConfigError` unless ``batch_size`` is a positive integer (cells per forward pass)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (cells per forward pass), got {batch_size!r}")


def check_embed_options(
    pooling: object, batch_size: object, precision: object, device: str | torch.device | None,
    gene_embeddings: object = False,
) -> torch.device:
    """Raise :class:`ConfigError` for an option of :func:`embed_corpus` it cannot run with (before
    any data is read or tokenized); returns the resolved device."""
    if gene_embeddings not in (False, True, "mean", "per_cell"):
        raise ConfigError(f"gene_embeddings must be False, True, 'mean' or 'per_cell', got {gene_embeddings!r}")
    check_batch_size(batch_size)
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    torch_device = resolve_device(device)
    autocast_dtype(torch_device, precision)  # type: ignore[arg-type]
    return torch_device


def check_output_key(key: object) -> None:
    """Raise :class:`ConfigError` unless ``key`` can name an obs / obsm / uns entry of an h5ad: a
    non-empty string without ``/`` (HDF5 reads ``a/b`` as a group path, so the file cannot be read back)."""
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"key must be a non-empty string, got {key!r}")
    if "/" in key:
        raise ConfigError(f"key {key!r} contains '/', which an h5ad cannot store as a name; use e.g. {key.replace('/', '_')!r}")


@dataclasses.dataclass
class CorpusEmbeddings:
    """What :func:`embed_corpus` returns when gene embeddings are requested.

    Attributes
    ----------
    cells
        (n_cells, hidden) float32 cell embeddings, in corpus order.
    genes
        Mean contextual embedding of each gene over the cells that express it: index = gene token
        (``Vocabulary.tokens``, name ``"gene"``), columns ``dim_0 … dim_{hidden-1}``, float32.
        Only genes seen in the corpus appear, sorted by token id.
    gene_counts
        Number of cells each gene of ``genes`` was averaged over (same index): the cells whose
        tokens hold the gene, i.e. where it is among the cell's top ``max_len`` ranked genes. That
        is fewer than the cells that express it (INS: 535 of 1,594 Baron human cells at 128 genes).
    per_cell
        With ``gene_embeddings="per_cell"``: one (n_genes_in_cell, hidden) float32 array per cell,
        rows aligned with that cell's gene tokens (special tokens removed), else ``None``.
    """

    cells: np.ndarray
    genes: pd.DataFrame
    gene_counts: pd.Series
    per_cell: list[np.ndarray] | None = None


# long: a 39-line docstring; the loop fills the cell and gene accumulators from the same batch states.
def embed_corpus(
    model: torch.nn.Module,
    dataset: datasets.Dataset | Sequence[Sequence[int]],
    vocab: Vocabulary,
    layer: int = -2,
    pooling: Pooling = "mean",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    gene_embeddings: bool | Literal["mean", "per_cell"] = False,
    progress: bool = True,
    precision: Precision = "auto",
) -> np.ndarray | CorpusEmbeddings:
    """Embed every cell of a tokenized corpus.

    Cells are batched by length (dynamic padding: a batch is padded only to its longest cell)
    and the result is put back in corpus order. Runs under ``torch.inference_mode``; on CUDA
    under bf16 autocast by default. A cell's embedding does not depend on its batch.

    Parameters
    ----------
    model
        ``MixGeneformerForPretraining``, ``BertForMaskedLM`` or ``BertModel``. Moved to
        ``device`` and put in eval mode for the call (its training mode is restored after).
    dataset
        A corpus from :mod:`mixgeneformer.tokenize` (column ``input_ids``), or a list of token
        id sequences.
    vocab
        The vocabulary the corpus was tokenized with (pad and special ids).
    layer
        Hidden state to pool, indexed like ``hidden_states`` (-2 = second to last block).
    pooling
        ``"mean"`` over gene tokens or ``"cls"`` (the ``<cls>`` state).
    batch_size
        Cells per forward pass.
    device
        ``"cpu"``, ``"cuda"``, ...; ``None`` picks CUDA when available.
    gene_embeddings
        ``False``: return only cell embeddings. ``True`` / ``"mean"``: also each gene's mean
        contextual embedding over the cells expressing it. ``"per_cell"``: additionally every
        cell's per-gene states (memory grows with the corpus: for small sets only).
    progress
        Show a progress bar (tqdm) over cells.
    precision
        ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"``.

    Returns
    -------
    numpy.ndarray or CorpusEmbeddings
        (n_cells, hidden) float32 when ``gene_embeddings`` is False, else a
        :class:`CorpusEmbeddings`.
    """
    torch_device = check_embed_options(pooling, batch_size, precision, device, gene_embeddings)
    bert = encoder_of(model)
    hidden_size = int(bert.config.hidden_size)
    layers_to_run(len(bert.encoder.layer), layer)  # validate before reading data
    if pooling == "cls" and vocab.cls_id is None:
        raise ConfigError("pooling='cls' needs a <cls> token, and the vocabulary has none; use pooling='mean'")

    n_cells = _n_cells(dataset)
    if n_cells == 0:
        raise InputDataError("the corpus has no cells to embed")
    _check_vocab_size(bert, vocab)

    special_ids = np.asarray(vocab.special_ids, dtype=np.int64)
    cells = np.full((n_cells, hidden_size), np.nan, dtype=np.float32)
    want_genes = gene_embeddings is not False
    per_cell: list[np.ndarray | None] | None = [None] * n_cells if gene_embeddings == "per_cell" else None
    gene_sum = torch.zeros((len(vocab), hidden_size), dtype=torch.float64, device=torch_device) if want_genes else None
    gene_count = torch.zeros(len(vocab), dtype=torch.int64, device=torch_device) if want_genes else None

    was_training = model.training
    model.to(torch_device)
    model.eval()
    bar = _progress_bar(n_cells, progress)
    try:
        with torch.inference_mode(), inference_context(torch_device, precision, bert):
            for rows, ids_np, mask_np in _batches(dataset, n_cells, bert, vocab, int(batch_size), pooling == "mean"):
                ids = torch.from_numpy(ids_np).to(torch_device, non_blocking=True)
                mask = torch.from_numpy(mask_np).to(torch_device, non_blocking=True)
                hidden = hidden_at_layer(bert, ids, mask, layer)
                cells[rows] = pool_cells(hidden, ids, mask, special_ids, pooling, vocab.cls_id).cpu().numpy()
                if want_genes:
                    genes = gene_positions(ids, mask, special_ids)
                    states = hidden[genes].double()
                    gene_sum.index_add_(0, ids[genes], states)
                    gene_count += torch.bincount(ids[genes], minlength=len(vocab))
                    if per_cell is not None:
                        split = torch.split(states.float().cpu(), genes.sum(1).tolist())
                        for row, block in zip(rows.tolist(), split, strict=True):
                            per_cell[row] = block.numpy()
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    if not want_genes:
        return cells
    counts = gene_count.cpu().numpy()
    seen = np.flatnonzero(counts > 0)
    means = (gene_sum[seen] / gene_count[seen, None]).float().cpu().numpy()
    index = pd.Index([vocab.tokens[i] for i in seen], name="gene")
    genes_df = pd.DataFrame(means, index=index, columns=[f"dim_{j}" for j in range(hidden_size)])
    return CorpusEmbeddings(
        cells=cells,
        genes=genes_df,
        gene_counts=pd.Series(counts[seen], index=index, name="n_cells"),
        per_cell=per_cell,  # type: ignore[arg-type]
    )


def _batches(
    dataset: Any, n_cells: int, bert: torch.nn.Module, vocab: Vocabulary, batch_size: int, need_genes: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(corpus rows, padded ids, mask) batches: the corpus is read ``_SORT_CHUNK`` cells at a time
    (bounded host memory) and length-sorted within each chunk. ``need_genes``: a cell without any
    gene token (only special tokens) is an error (mean pooling would average nothing)."""
    for start in range(0, n_cells, _SORT_CHUNK):
        flat, offsets = token_columns(dataset, start, min(start + _SORT_CHUNK, n_cells))
        lengths = np.diff(offsets)
        _check_tokens(flat, lengths, bert, start)
        if need_genes:
            _check_genes(flat, offsets, vocab, start)
        for rows in length_sorted_batches(lengths, batch_size):
            ids, mask = pad_batch(flat, offsets[rows], lengths[rows], vocab.pad_id)
            yield rows + start, ids, mask


#: Cells read from the corpus and length-sorted at a time; bounds host memory on huge corpora.
_SORT_CHUNK = 65_536


def _n_cells(dataset: Any) -> int:
    check_token_input(dataset)
    return len(dataset)


def token_columns(dataset: datasets.Dataset | Sequence[Sequence[int]], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 tokens, int64 offsets of n+1) of cells ``start:stop``, no Python loop per cell
    for an Arrow-backed corpus."""
    if isinstance(dataset, (list, tuple)):
        part = dataset[start:stop]
        lengths = np.fromiter((len(seq) for seq in part), dtype=np.int64, count=len(part))
        flat = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in part]) if len(part) else np.zeros(0, np.int64)
        if flat.size and (flat.min() < np.iinfo(np.int32).min or flat.max() > np.iinfo(np.int32).max):
            raise InputDataError(f"token ids range over [{flat.min()}, {flat.max()}]; not token ids of a vocabulary")
        return flat.astype(np.int32), np.concatenate([[0], np.cumsum(lengths)])
    column = dataset.with_format("arrow")[start:stop].column("input_ids").combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    flat = np.asarray(column.flatten(), dtype=np.int32)
    return flat, offsets - offsets[0]


def _check_vocab_size(bert: torch.nn.Module, vocab: Vocabulary) -> None:
    if len(vocab) != int(bert.config.vocab_size):
        raise VocabularyMismatchError(
            f"the vocabulary has {len(vocab)} tokens but the model's vocab_size is {bert.config.vocab_size}; "
            "use the vocabulary saved in the model bundle"
        )


def _check_tokens(flat: np.ndarray, lengths: np.ndarray, bert: torch.nn.Module, start: int) -> None:
    """Errors for cells the model cannot read: empty, too long, unknown token ids."""
    if (lengths == 0).any():
        raise InputDataError(
            f"{int((lengths == 0).sum())} cells have no tokens (first at corpus row "
            f"{start + int(np.argmax(lengths == 0))}); re-tokenize, the tokenizer drops such cells"
        )
    max_positions = int(getattr(bert.config, "max_position_embeddings", lengths.max()))
    if lengths.max() > max_positions:
        raise InputDataError(
            f"cell {start + int(np.argmax(lengths))} has {int(lengths.max())} tokens but the model accepts "
            f"at most {max_positions} (max_position_embeddings); tokenize with max_len<={max_positions}"
        )
    vocab_size = int(bert.config.vocab_size)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise InputDataError(
            f"token ids range over [{int(flat.min())}, {int(flat.max())}] but the model has "
            f"{vocab_size} tokens; the corpus was tokenized with another vocabulary"
        )


def _check_genes(flat: np.ndarray, offsets: np.ndarray, vocab: Vocabulary, start: int) -> None:
    """Error for cells holding only special tokens: their mean over gene tokens does not exist."""
    genes = np.add.reduceat((~vocab.is_special[flat]).astype(np.int64), offsets[:-1])
    if (genes == 0).any():
        raise InputDataError(
            f"{int((genes == 0).sum())} cells hold no gene token, only special tokens (first at corpus row "
            f"{start + int(np.argmax(genes == 0))}); mean pooling has nothing to average. Drop them, or use pooling='cls'"
        )


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, unit="cell", desc="embedding", dynamic_ncols=True)
