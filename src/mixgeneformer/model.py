"""The Mix-Geneformer networks on a Hugging Face BERT encoder, and the one cell pooling.

* :class:`MixGeneformerForPretraining` holds ``bert`` (a ``BertModel`` with its pooler) and ``cls``
  (``BertOnlyMLMHead``, decoder tied to the word embeddings): the state-dict keys of
  ``BertForMaskedLM`` plus ``bert.pooler.*``. Its forward computes MLM + SimCSE (+ SimCSE++ and the
  cross-species term) in one encoder pass over the stacked views.
* :class:`MixGeneformerForCellClassification` is the fine-tuning head: the same encoder, pooled with
  :func:`pool_cells`, then dropout and a linear layer.
* Their configuration (:class:`MixGeneformerConfig`, :data:`PRESETS`, :func:`make_config`) lives in
  :mod:`mixgeneformer.model_config` and is re-exported here; model folders are written and read by
  :mod:`mixgeneformer.bundle`.

Embedding and perturbation code only needs ``model.bert`` (a ``transformers.BertModel``),
``model.config`` and the vocabulary's special ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertOnlyMLMHead
from transformers.utils import ModelOutput

from . import losses
from .cell_bank import CellBank
from .errors import ConfigError, VocabularyMismatchError
from .model_config import (
    CONTRASTIVE_MODES,
    CROSS_SPECIES_POSITIVES,
    POOLINGS,
    PRESETS,
    MixGeneformerConfig,
    check_vocabulary,
    make_config,
    validate_config,
)

if TYPE_CHECKING:
    from .vocab import Vocabulary

logger = logging.getLogger(__name__)

SPECIES_CODES = {"human": 0, "mouse": 1}
Pooling = Literal["mean", "cls"]  # cell pooling of embeddings and classification

__all__ = [
    "CONTRASTIVE_MODES",
    "CROSS_SPECIES_POSITIVES",
    "POOLINGS",
    "PRESETS",
    "SPECIES_CODES",
    "MixGeneformerConfig",
    "MixGeneformerForCellClassification",
    "MixGeneformerForPretraining",
    "MixGeneformerOutput",
    "Pooling",
    "check_vocabulary",
    "describe",
    "gene_positions",
    "make_config",
    "mean_over_genes",
    "pool_cells",
    "validate_config",
]


@dataclass
class MixGeneformerOutput(ModelOutput):
    """Output of :meth:`MixGeneformerForPretraining.forward`.

    ``loss`` carries the gradient; the parts (``mlm_loss`` …) are detached, for logging.
    ``logits`` are the full ``(B, L, vocab)`` MLM scores of view 1, returned when no labels are
    given or ``output_logits=True`` (in training only the masked positions go through the head).
    ``cell_embeddings`` are the pooled view-1 embeddings ``(B, hidden)``.
    ``masked_logits`` are the ``(n_masked, vocab)`` MLM scores at the labelled positions (row-major
    order of ``labels != -100``), returned with ``output_masked_logits=True`` (held-out diagnostics).
    """

    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    dimension_loss: torch.Tensor | None = None
    cross_species_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cell_embeddings: torch.Tensor | None = None
    masked_logits: torch.Tensor | None = None


class MixGeneformerForPretraining(BertPreTrainedModel):
    """BERT encoder + tied MLM head + contrastive pretraining objective.

    State-dict keys equal ``BertForMaskedLM``'s plus ``bert.pooler.*``, so weights move freely
    between this class and plain transformers.
    """

    config_class = MixGeneformerConfig
    # The loss is a mean over this micro-batch's masked positions (it never takes the Trainer's
    # num_items_in_batch); the Trainer must then divide it by the gradient-accumulation steps itself.
    # Without this flag it infers "accepts loss kwargs" from forward's **kwargs and skips that division:
    # accumulated gradients (and the logged loss) were gradient_accumulation_steps times too large.
    accepts_loss_kwargs = False
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertConfig):
        super().__init__(config)
        validate_config(config)
        self.bert = BertModel(config, add_pooling_layer=True)
        self.cls = BertOnlyMLMHead(config)
        special = torch.zeros(config.vocab_size, dtype=torch.bool)
        special_ids = getattr(config, "special_token_ids", None)
        special[list(special_ids) if special_ids is not None else [config.pad_token_id or 0]] = True
        # Lookup tables, rebuilt from the config / vocabulary; never part of the checkpoint.
        self.register_buffer("special_lookup", special, persistent=False)
        self.register_buffer("ortholog_lookup", torch.full((config.vocab_size,), -1, dtype=torch.long), persistent=False)
        # Per token: the species it marks (0 human, 1 mouse; -1 shared or special) and the class
        # of its one-to-one ortholog pair (-1 none), for the cross-species pairing.
        self.register_buffer("species_lookup", torch.full((config.vocab_size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("ortholog_class", torch.full((config.vocab_size,), -1, dtype=torch.long), persistent=False)
        self._cell_bank: CellBank | None = None  # cross_species_queue > 0: recent cells for the pairing
        self.has_ortholog_map = False
        self.pooler_is_trained = True
        self.post_init()
        # The pooler is kept (checkpoint layout) but frozen unless a loss uses it, so every
        # trainable parameter gets a gradient and DDP needs no find_unused_parameters.
        uses_pooler = config.pooling == "pooler" and (
            (config.contrastive != "none" and config.contrastive_weight > 0) or config.cross_species_weight > 0
        )
        self.bert.pooler.requires_grad_(uses_pooler)

    # -- HF plumbing ------------------------------------------------------------------------
    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @torch.no_grad()
    def init_mlm_bias(self, log_prob: torch.Tensor) -> None:
        """Start the MLM output bias at ``log_prob`` (``(V,)`` log gene frequencies), centred; special
        tokens (-inf there: never targets) get the lowest finite value."""
        bias = self.cls.predictions.bias
        values = log_prob.to(dtype=torch.float32, device=bias.device).reshape(bias.shape)
        values = torch.where(torch.isfinite(values), values, values[torch.isfinite(values)].min())
        bias.copy_((values - values.mean()).to(bias.dtype))

    # -- vocabulary-dependent tables ---------------------------------------------------------
    def attach_vocabulary(self, vocab: Vocabulary) -> None:
        """Record the vocabulary's special ids, hash and ortholog map (needed by mean pooling and
        the cross-species term). Raises :class:`VocabularyMismatchError` on a size or hash mismatch."""
        check_vocabulary(self.config, vocab)
        self.config.vocab_hash = vocab.hash
        self.config.special_token_ids = [int(i) for i in vocab.special_ids]
        device = self.special_lookup.device
        special = torch.zeros(len(vocab), dtype=torch.bool, device=device)
        special[torch.as_tensor(vocab.special_ids, dtype=torch.long, device=device)] = True
        self.special_lookup = special
        self.set_ortholog_map(torch.as_tensor(vocab.ortholog_map, dtype=torch.long),
                              species_ids=(vocab.species_token_id("human"), vocab.species_token_id("mouse")))
        species_tokens = [vocab.species_token_id(name) for name in SPECIES_CODES]
        self.species_lookup = losses.species_marks(torch.as_tensor(vocab.token_species.astype("int64")), species_tokens).to(device)

    def set_ortholog_map(self, ortholog_map: torch.Tensor, species_ids: tuple[int | None, int | None] = (None, None)) -> None:
        """Set the token → 1:1-ortholog-token table (``-1`` = no ortholog; specials map to themselves).

        ``species_ids`` (``<human>``, ``<mouse>``) are swapped, so a projected cell carries the
        other species' token.
        """
        table = torch.as_tensor(ortholog_map, dtype=torch.long).clone()
        if table.shape != (self.config.vocab_size,):
            raise VocabularyMismatchError(
                f"ortholog map has {tuple(table.shape)} entries but the model vocabulary has {self.config.vocab_size} tokens."
            )
        special = self.special_lookup.cpu()
        table[special] = torch.nonzero(special).flatten()
        human, mouse = species_ids
        if human is not None and mouse is not None:
            table[human], table[mouse] = mouse, human
        self.ortholog_lookup = table.to(self.ortholog_lookup.device)
        self.ortholog_class = losses.ortholog_classes(table, special).to(self.ortholog_lookup.device)
        self.has_ortholog_map = True

    # -- pieces of the forward ---------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cell embeddings ``(B, hidden)`` from the last hidden states, per ``config.pooling``."""
        pooling = self.config.pooling
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "pooler":
            return self.bert.pooler(hidden)
        return mean_over_genes(hidden, attention_mask.bool() & ~self.special_lookup[input_ids])

    def project_to_orthologs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-express each cell in the other species (:func:`losses.project_to_orthologs`): ``(ids, mask, valid)``."""
        self._require_ortholog_map()
        return losses.project_to_orthologs(
            input_ids, attention_mask, self.ortholog_lookup, self.special_lookup, self.config.pad_token_id or 0
        )

    def cell_species(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` species of each cell by a vote of its species-marking tokens (species token,
        genes without a shared token); -1 where none marks it or the vote ties."""
        return losses.cell_species(self.species_lookup[input_ids], attention_mask)

    def ortholog_profiles(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` rank-weighted profiles over one-to-one ortholog pairs (weight ``1/log2(position + 2)``)."""
        return losses.rank_weighted_profiles(self.ortholog_class[input_ids], attention_mask, self.config.vocab_size)

    def _require_ortholog_map(self) -> None:
        if not self.has_ortholog_map:
            raise ConfigError(
                "cross_species_weight > 0 needs the ortholog map: call model.attach_vocabulary(vocab) "
                "(load_bundle and the pretrain stage do it)."
            )

    def _mnn_cross_species(
        self, z: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        species: torch.Tensor | None,
    ) -> torch.Tensor:
        self._require_ortholog_map()
        original = torch.where(labels != losses.IGNORE_INDEX, labels, input_ids)  # masked genes count too
        if species is None:
            species = self.cell_species(original, attention_mask)
        species = species.to(device=z.device, dtype=torch.long)
        bank_size = int(getattr(self.config, "cross_species_queue", 0) or 0) if self.training else 0
        k = int(getattr(self.config, "cross_species_k", 1) or 1)
        temperature = self.config.cross_species_temperature
        if bank_size <= 0 and k <= 1:
            partner = losses.mutual_nearest_partners(self.ortholog_profiles(original, attention_mask), species)
            return losses.cross_species_nce(z, partner, temperature)
        classes = self.ortholog_class[original]
        weights = losses.rank_weights(classes, attention_mask)
        rows = (classes, weights, losses.sparse_row_norms(classes, weights), species)
        bank = None
        if bank_size > 0:
            if self._cell_bank is None or self._cell_bank.size != bank_size:
                self._cell_bank = CellBank(bank_size)
            bank = self._cell_bank
        pool = bank.pool(*rows, dim=z.shape[1]) if bank is not None else rows
        partner = losses.mutual_nearest_in_pool(*pool, n_queries=z.shape[0], n_classes=self.config.vocab_size, k=k)
        loss = losses.cross_species_nce(z, partner, temperature, bank=None if bank is None else bank.keys)
        if bank is not None:
            bank.push(*rows, z=z)
        return loss

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return hidden, self.pool(hidden, input_ids, attention_mask)

    def _encode_without_dropout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        was_training = self.bert.training
        self.bert.eval()
        try:
            return self._encode(input_ids, attention_mask)[1]
        finally:
            self.bert.train(was_training)

    # long: a 27-line docstring; the body stacks every view into one encoder call and sums the loss terms.
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        species: torch.Tensor | None = None,
        output_logits: bool = False,
        output_masked_logits: bool = False,
        **kwargs: Any,
    ) -> MixGeneformerOutput:
        """MLM + contrastive pretraining step (or plain MLM scoring when ``labels`` is None).

        Parameters
        ----------
        input_ids, attention_mask
            ``(B, L)`` masked cells from :class:`mixgeneformer.data.PretrainingCollator`.
        labels
            ``(B, L)`` original token at masked positions, ``-100`` elsewhere. None: no loss, the
            output holds full ``logits`` and ``cell_embeddings``.
        species
            ``(B,)`` 0 human / 1 mouse (from the collator), used by the ``"mnn"`` cross-species
            pairing; None: inferred from the cells' tokens (:meth:`cell_species`).
        output_logits
            Also return full ``(B, L, vocab)`` logits of view 1 when training.
        output_masked_logits
            Also return the MLM scores at the labelled positions only (``masked_logits``).

        Returns
        -------
        MixGeneformerOutput
            ``loss = mlm + contrastive_weight·(nt_xent [+ simcse_pp_weight·dimension])
            + cross_species_weight·info_nce``.

        Notes
        -----
        The two SimCSE views (and the ortholog projection) are stacked into one ``3B``/``2B``
        batch, so dropout draws independent masks per view in a single encoder call. Without
        dropout (``model.eval()``) both views are identical, so view 2 reuses view 1.
        """
        config = self.config
        if attention_mask is None:
            attention_mask = (input_ids != (config.pad_token_id or 0)).long()
        batch = input_ids.shape[0]

        if labels is None:
            hidden, pooled = self._encode(input_ids, attention_mask, **kwargs)
            return MixGeneformerOutput(logits=self.cls(hidden), cell_embeddings=pooled)

        use_contrastive = config.contrastive != "none" and config.contrastive_weight > 0
        use_cross = config.cross_species_weight > 0
        project = use_cross and getattr(config, "cross_species_positives", "mnn") == "projection"
        second_view_in_batch = use_contrastive and config.contrastive == "simcse" and self.training

        stacked_ids, stacked_mask = [input_ids], [attention_mask]
        if second_view_in_batch:
            stacked_ids.append(input_ids)
            stacked_mask.append(attention_mask)
        if project:
            projected_ids, projected_mask, cross_valid = self.project_to_orthologs(input_ids, attention_mask)
            stacked_ids.append(projected_ids)
            stacked_mask.append(projected_mask)
        all_ids = torch.cat(stacked_ids) if len(stacked_ids) > 1 else input_ids
        all_mask = torch.cat(stacked_mask) if len(stacked_mask) > 1 else attention_mask
        hidden, pooled = self._encode(all_ids, all_mask, **kwargs)
        view1_hidden, z1 = hidden[:batch], pooled[:batch]

        masked = labels != losses.IGNORE_INDEX
        mlm_logits = self.cls(view1_hidden[masked])
        mlm = losses.mlm_loss(mlm_logits, labels[masked])
        total = mlm
        parts: dict[str, torch.Tensor] = {"mlm_loss": mlm.detach()}

        if use_contrastive:
            if second_view_in_batch:
                z2 = pooled[batch : 2 * batch]
            elif config.contrastive == "simcse++" and self.training:
                z2 = self._encode_without_dropout(input_ids, attention_mask)
            else:
                z2 = z1
            contrastive = losses.nt_xent(z1, z2, config.temperature, gather=config.gather_negatives)
            if config.contrastive == "simcse++" and config.simcse_pp_weight > 0:
                dimension = losses.simcse_pp_dimension_loss(z1, z2)
                parts["dimension_loss"] = dimension.detach()
                contrastive = contrastive + config.simcse_pp_weight * dimension
            parts["contrastive_loss"] = contrastive.detach()
            total = total + config.contrastive_weight * contrastive

        if project:
            cross = losses.info_nce(
                z1, pooled[-batch:], config.cross_species_temperature, gather=config.gather_negatives, valid=cross_valid
            )
        elif use_cross:
            cross = self._mnn_cross_species(z1, input_ids, attention_mask, labels, species)
        if use_cross:
            parts["cross_species_loss"] = cross.detach()
            total = total + config.cross_species_weight * cross

        logits = self.cls(view1_hidden) if output_logits else None
        # Built last so ``loss`` is the first field (ModelOutput keeps insertion order).
        return MixGeneformerOutput(
            loss=total, **parts, logits=logits, cell_embeddings=z1,
            masked_logits=mlm_logits if output_masked_logits else None,
        )



def describe(model: MixGeneformerForPretraining) -> str:
    """One-line summary (sizes, parameters, pooling, objective) for logs."""
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return json.dumps(
        {
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "ffn": config.intermediate_size,
            "act": config.hidden_act,
            "max_len": config.max_position_embeddings,
            "vocab": config.vocab_size,
            "params": n_params,
            "pooling": config.pooling,
            "contrastive": config.contrastive,
            "cross_species_weight": config.cross_species_weight,
        }
    )


def gene_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int] | np.ndarray
) -> torch.Tensor:
    """Boolean (batch, length) mask of gene tokens: not padding and not a special token."""
    special = torch.as_tensor(np.asarray(special_ids, dtype=np.int64), device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def pool_cells(
    hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    special_ids: Sequence[int] | np.ndarray, pooling: Pooling = "mean", cls_id: int | None = None,
) -> torch.Tensor:
    """One float32 vector per cell from its token states.

    Parameters
    ----------
    hidden
        (batch, length, hidden) token states, e.g. from :func:`hidden_at_layer`.
    input_ids, attention_mask
        The (batch, length) inputs those states came from.
    special_ids
        Every non-gene token id (``Vocabulary.special_ids``): excluded from mean pooling.
    pooling
        ``"mean"``: average over gene positions (no padding, no special token);
        ``"cls"``: the state at position 0, which must hold ``<cls>``.
    cls_id
        The ``<cls>`` id (``Vocabulary.cls_id``). Without it, position 0 need only hold some special
        token, which cannot tell ``<cls>`` from a species token.

    Returns
    -------
    torch.Tensor
        (batch, hidden) float32.
    """
    if pooling == "cls":
        first = input_ids[:, 0]
        allowed = [cls_id] if cls_id is not None else np.asarray(special_ids, dtype=np.int64)
        if not bool(torch.isin(first, torch.as_tensor(allowed, dtype=torch.int64, device=input_ids.device)).all()):
            raise ConfigError(
                "pooling='cls' needs a <cls> token at position 0 of every cell, but the corpus "
                "starts with gene or species tokens; tokenize with style='v2' (adds <cls>/<eos>) or use "
                "pooling='mean'"
            )
        return hidden[:, 0].float()
    if pooling != "mean":
        raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    return mean_over_genes(hidden.float(), gene_positions(input_ids, attention_mask, special_ids))


def mean_over_genes(hidden: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch, length, hidden) over the positions where ``genes`` is True, in
    ``hidden``'s dtype; a cell without gene positions gets zeros."""
    weights = genes.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


# ------------------------------------------------------------------------------------------
# Cell classification (the fine-tuning head)
# ------------------------------------------------------------------------------------------
class MixGeneformerForCellClassification(BertPreTrainedModel):
    """BERT encoder + dropout + linear head on the pooled cell embedding.

    Pooling is the embedding protocol's (mean over gene tokens of the last layer, or the
    ``<cls>`` state, ``config.cell_pooling``); ``config.special_token_ids`` lists the
    non-gene tokens. Encoder keys match ``BertForMaskedLM``'s ``bert.*``.
    """

    config_class = MixGeneformerConfig

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        # A plain array, not a buffer: from_pretrained leaves non-persistent buffers uninitialised.
        self.special_ids = np.asarray(config.special_token_ids or [config.pad_token_id or 0], dtype=np.int64)
        # Per-class loss weights while fine-tuning (a plain attribute: not saved with the model).
        self.loss_weights: torch.Tensor | None = None
        self.post_init()

    def cell_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled cell embeddings the head reads (before its dropout)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_cells(hidden, input_ids, attention_mask, self.special_ids, self.config.cell_pooling,
                          getattr(self.config, "cls_token_id", None))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, **_: Any
    ) -> SequenceClassifierOutput:
        pooled = self.cell_embeddings(input_ids, attention_mask)
        logits = losses.linear_without_autocast(self.dropout(pooled), self.classifier)
        loss = None
        if labels is not None:
            weight = None if self.loss_weights is None else self.loss_weights.to(logits.device)
            loss = nn.functional.cross_entropy(logits.float(), labels, weight=weight)
        return SequenceClassifierOutput(loss=loss, logits=logits)
