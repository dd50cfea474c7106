"""Cell and gene embeddings from a trained encoder.

The encoder math lives in :mod:`mixgeneformer.inference`, shared with classification and
perturbation: :func:`~mixgeneformer.inference.hidden_at_layer` runs only the encoder blocks needed to
reach the requested layer, :func:`~mixgeneformer.model.pool_cells` turns token states into one vector
per cell, and :func:`embed_corpus` streams a tokenized corpus through both in length-sorted batches
with dynamic padding, returning the embeddings in corpus order.

* :mod:`.cells`: :func:`embed_anndata` is the user API (AnnData in, ``adata.obsm[key]`` out,
  scverse conventions; tokenized on the fly with the bundle's vocabulary and medians),
  :func:`embed_corpus_folder` a tokenized corpus, :func:`embed_file` either from a path.
* :mod:`.run`: ``mixgf embed`` / ``embed-merge``: :func:`embed_to_outputs` (every option checked
  first, then one process or :func:`embed_sharded`), :func:`write_outputs`, :func:`merge_embed_shards`.
"""

from __future__ import annotations

from ..inference import CorpusEmbeddings, embed_corpus
from .cells import embed_anndata, embed_corpus_folder, embed_file, gene_table
from .run import check_outputs, embed_sharded, embed_to_outputs, merge_embed_shards, write_outputs

__all__ = [
    "CorpusEmbeddings",
    "check_outputs",
    "embed_anndata",
    "embed_corpus",
    "embed_corpus_folder",
    "embed_file",
    "embed_sharded",
    "embed_to_outputs",
    "gene_table",
    "merge_embed_shards",
    "write_outputs",
]
