"""The Mix-Geneformer network: a Hugging Face BERT encoder, its pretraining heads and its bundle.

* :class:`MixGeneformerConfig` is a :class:`transformers.BertConfig` (``model_type`` stays
  ``"bert"``) with the pretraining options as extra fields, so every checkpoint we write loads in
  plain transformers as ``BertForMaskedLM``.
* :class:`MixGeneformerForPretraining` holds ``bert`` (a ``BertModel`` with its pooler) and ``cls``
  (``BertOnlyMLMHead``, decoder tied to the word embeddings): the state-dict keys of
  ``BertForMaskedLM`` plus ``bert.pooler.*``. Its forward computes MLM + SimCSE (+ SimCSE++ and the
  cross-species term) in one encoder pass over the stacked views.
* :func:`save_bundle` / :func:`load_bundle` write and read a model folder (safetensors only) with its
  vocabulary and gene medians; Geneformer's published ``BertForMaskedLM`` folders load too.

Embedding and perturbation code only needs ``model.bert`` (a ``transformers.BertModel``),
``model.config`` and the vocabulary's special ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead
from transformers.utils import ModelOutput

from . import losses
from .errors import ArtifactError, ConfigError, OfflineError, VocabularyMismatchError
from .fileio import atomic_directory, check_readable_file, read_json, write_json

if TYPE_CHECKING:
    from .medians import GeneMedians
    from .vocab import Vocabulary

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "pooler", "mean")
CONTRASTIVE_MODES = ("simcse", "simcse++", "none")
CROSS_SPECIES_POSITIVES = ("mnn", "projection")
BUNDLE_FORMAT = "mixgeneformer-model"
BUNDLE_MARKER = "mixgf.json"
TOKENIZE_CONFIG_NAME = "tokenize.yaml"  # how the training corpus was tokenized (written by pretraining)
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
SPECIES_CODES = {"human": 0, "mouse": 1}


class MixGeneformerConfig(BertConfig):
    """BERT configuration plus the Mix-Geneformer pretraining options.

    ``model_type`` stays ``"bert"``: ``BertForMaskedLM.from_pretrained`` reads our ``config.json``
    (it keeps the extra fields as plain attributes).

    Extra fields
    ------------
    vocab_hash
        Content hash of the vocabulary the embeddings index (checked on load).
    special_token_ids
        Ids of every non-gene token (excluded from mean pooling; never MLM targets).
    pooling
        Cell embedding for the contrastive terms: ``"cls"`` (hidden state at position 0, the
        ``<cls>`` token; default), ``"pooler"`` (BERT's dense+tanh pooler at position 0, the
        authors' variant, where position 0 is the top-ranked gene) or ``"mean"`` (mean over
        gene positions).
    contrastive
        ``"simcse"`` (two dropout views, NT-Xent), ``"simcse++"`` (second view without dropout
        plus the dimension-wise term) or ``"none"`` (MLM only).
    temperature, contrastive_weight
        NT-Xent temperature (0.05) and weight (1.0).
    simcse_pp_weight
        Weight of the SimCSE++ dimension-wise term (0.1).
    cross_species_weight, cross_species_temperature
        Weight (0 = off; 0.5 suggested) and temperature (0.1) of the cross-species InfoNCE.
    cross_species_positives
        How the cross-species term pairs cells. ``"mnn"`` (default): each cell with its mutual
        nearest neighbour of the other species in the batch, by cosine of rank-weighted
        one-to-one-ortholog gene profiles; negatives are the other species' cells.
        ``"projection"``: each cell with its own re-expression through one-to-one orthologs
        (:meth:`MixGeneformerForPretraining.project_to_orthologs`), negatives every other cell's
        projection. In an ortholog vocabulary a projection is the cell itself minus its
        species-specific genes, so that pairing never relates cells of two species.
    gather_negatives
        Take contrastive negatives from every GPU (all_gather with gradients).
    """

    model_type = "bert"

    vocab_hash: str | None = None
    special_token_ids: list[int] | None = None
    pooling: str = "cls"
    contrastive: str = "simcse"
    temperature: float = 0.05
    contrastive_weight: float = 1.0
    simcse_pp_weight: float = 0.1
    cross_species_weight: float = 0.0
    cross_species_temperature: float = 0.1
    cross_species_positives: str = "mnn"
    gather_negatives: bool = False


# layers / hidden / heads / FFN / activation / dropout / max length (SPEC §3).
PRESETS: dict[str, dict[str, Any]] = {
    "mix-geneformer": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=512,
                           hidden_act="silu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                           max_position_embeddings=2048),
    "geneformer-v1": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=512,
                          hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
                          max_position_embeddings=2048),
    "geneformer-v2-104m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                               hidden_act="relu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                               max_position_embeddings=4096),
    "geneformer-v2-316m": dict(num_hidden_layers=18, hidden_size=1152, num_attention_heads=18, intermediate_size=4608,
                               hidden_act="relu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                               max_position_embeddings=4096),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                 hidden_act="silu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 max_position_embeddings=2048),
}


def validate_config(config: BertConfig) -> None:
    """Raise :class:`ConfigError` for inconsistent pretraining options (names the field and the fix)."""
    pooling = getattr(config, "pooling", "cls")
    if pooling not in POOLINGS:
        raise ConfigError(f"model.pooling={pooling!r} is not one of {list(POOLINGS)}.")
    positives = getattr(config, "cross_species_positives", "mnn")
    if positives not in CROSS_SPECIES_POSITIVES:
        raise ConfigError(f"model.cross_species_positives={positives!r} is not one of {list(CROSS_SPECIES_POSITIVES)}.")
    contrastive = getattr(config, "contrastive", "simcse")
    if contrastive not in CONTRASTIVE_MODES:
        raise ConfigError(f"model.contrastive={contrastive!r} is not one of {list(CONTRASTIVE_MODES)}.")
    for name in ("temperature", "cross_species_temperature"):
        if not getattr(config, name, 1.0) > 0:
            raise ConfigError(f"model.{name}={getattr(config, name)!r} must be > 0 (SimCSE uses 0.05, cross-species 0.1).")
    for name in ("contrastive_weight", "simcse_pp_weight", "cross_species_weight"):
        if getattr(config, name, 0.0) < 0:
            raise ConfigError(f"model.{name}={getattr(config, name)!r} must be >= 0 (0 switches the term off).")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={config.hidden_size} is not divisible by model.num_attention_heads="
            f"{config.num_attention_heads}; choose sizes such as 256/4 or 768/12."
        )


def make_config(preset: str = "mix-geneformer", vocab: Vocabulary | None = None, **overrides: Any) -> MixGeneformerConfig:
    """Build a :class:`MixGeneformerConfig` from a preset, a vocabulary and free overrides.

    Parameters
    ----------
    preset
        A key of :data:`PRESETS`, or ``"custom"`` to give every size in ``overrides``.
    vocab
        Sets ``vocab_size``, ``pad_token_id``, ``special_token_ids`` and ``vocab_hash``. Without it,
        ``vocab_size`` must be in ``overrides``.
    **overrides
        Any BERT or Mix-Geneformer field (e.g. ``num_hidden_layers=4``, ``pooling="mean"``).

    Returns
    -------
    MixGeneformerConfig
        Validated configuration with SDPA attention.
    """
    if preset == "custom":
        values: dict[str, Any] = {}
    elif preset in PRESETS:
        values = dict(PRESETS[preset])
    else:
        raise ConfigError(f"model preset {preset!r} is unknown; choose one of {sorted(PRESETS)} or 'custom'.")
    if vocab is not None:
        values.update(
            vocab_size=len(vocab),
            pad_token_id=int(vocab.pad_id),
            special_token_ids=[int(i) for i in vocab.special_ids],
            vocab_hash=vocab.hash,
        )
    values.update(overrides)
    if "vocab_size" not in values:
        raise ConfigError("make_config needs a vocabulary (vocab=...) or an explicit vocab_size override.")
    if vocab is not None and values["vocab_size"] != len(vocab):
        raise VocabularyMismatchError(
            f"vocab_size={values['vocab_size']} was given but the vocabulary has {len(vocab)} tokens; drop the override."
        )
    try:
        config = MixGeneformerConfig(attn_implementation="sdpa", **values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid model option: {exc}") from exc
    validate_config(config)
    return config


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
        codes = torch.as_tensor(vocab.token_species.astype("int64"))
        marks = torch.where((codes == 0) | (codes == 1), codes, torch.full_like(codes, -1))
        for code, name in enumerate(SPECIES_CODES):
            token = vocab.species_token_id(name)
            if token is not None:
                marks[token] = code
        self.species_lookup = marks.to(device)

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
        ids = torch.arange(table.numel())
        paired = (table >= 0) & ~special
        self.ortholog_class = torch.where(paired, torch.minimum(ids, table), torch.full_like(ids, -1)).to(self.ortholog_lookup.device)
        self.has_ortholog_map = True

    # -- pieces of the forward ---------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cell embeddings ``(B, hidden)`` from the last hidden states, per ``config.pooling``."""
        pooling = self.config.pooling
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "pooler":
            return self.bert.pooler(hidden)
        genes = attention_mask.bool() & ~self.special_lookup[input_ids]
        weights = genes.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def project_to_orthologs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-express each cell in the other species: genes → 1:1 ortholog tokens, others dropped.

        Rank order is kept, dropped genes close up (stable compaction), the rest is padded; the
        length never grows. Returns ``(ids, mask, valid)``: ``valid`` is False for cells left
        without any gene (they get one attended pad token so attention stays finite, and are not
        scored).
        """
        if not self.has_ortholog_map:
            raise ConfigError(
                "cross_species_weight > 0 needs the ortholog map: call model.attach_vocabulary(vocab) "
                "(load_bundle and the pretrain stage do it)."
            )
        mapped = self.ortholog_lookup[input_ids]
        keep = attention_mask.bool() & (mapped >= 0)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        ids = mapped.gather(1, order)
        mask = keep.gather(1, order)
        ids = ids.masked_fill(~mask, self.config.pad_token_id or 0)
        valid = (mask & ~self.special_lookup[ids]).any(dim=1)
        empty = ~mask.any(dim=1)
        mask[:, 0] |= empty
        return ids, mask.to(attention_mask.dtype), valid

    def cell_species(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` species of each cell by a vote of its species-marking tokens (species token,
        genes without a shared token); -1 where none marks it or the vote ties."""
        marks = self.species_lookup[input_ids].masked_fill(~attention_mask.bool(), -1)
        human = (marks == 0).sum(1)
        mouse = (marks == 1).sum(1)
        species = torch.where(mouse > human, 1, 0)
        return torch.where(human == mouse, torch.full_like(species, -1), species)

    def ortholog_profiles(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` rank-weighted profiles over one-to-one ortholog pairs (weight ``1/log2(position + 2)``)."""
        classes = self.ortholog_class[input_ids]
        keep = attention_mask.bool() & (classes >= 0)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        weights = (1.0 / torch.log2(positions + 2.0)).expand(input_ids.shape) * keep
        profiles = torch.zeros(input_ids.shape[0], self.config.vocab_size, device=input_ids.device)
        return profiles.scatter_add_(1, classes.clamp_min(0), weights)

    def _mnn_cross_species(
        self, z: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        species: torch.Tensor | None,
    ) -> torch.Tensor:
        if not self.has_ortholog_map:
            raise ConfigError(
                "cross_species_weight > 0 needs the ortholog map: call model.attach_vocabulary(vocab) "
                "(load_bundle and the pretrain stage do it)."
            )
        original = torch.where(labels != losses.IGNORE_INDEX, labels, input_ids)  # masked genes count too
        if species is None:
            species = self.cell_species(original, attention_mask)
        species = species.to(device=z.device, dtype=torch.long)
        partner = losses.mutual_nearest_partners(self.ortholog_profiles(original, attention_mask), species)
        return losses.cross_species_nce(z, partner, self.config.cross_species_temperature)

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
            ``(B,)`` 0 human / 1 mouse; accepted for the collator's batches, not needed by the
            loss (the species token, when present, is swapped by the ortholog map).
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


# ------------------------------------------------------------------------------------------
# Bundles: a folder with config.json, model.safetensors, vocab.json, medians.tsv, mixgf.json
# ------------------------------------------------------------------------------------------
def check_vocabulary(config: BertConfig, vocab: Vocabulary) -> None:
    """Raise :class:`VocabularyMismatchError` unless ``vocab`` is the one the model was built on."""
    if len(vocab) != config.vocab_size:
        raise VocabularyMismatchError(
            f"the model has vocab_size={config.vocab_size} but the vocabulary has {len(vocab)} tokens "
            f"(hash {vocab.hash}); use the vocabulary the model was trained with (its bundle's vocab.json)."
        )
    recorded = getattr(config, "vocab_hash", None)
    if recorded and recorded != vocab.hash:
        raise VocabularyMismatchError(
            f"the model was trained with vocabulary hash {recorded} but this vocabulary's hash is {vocab.hash}; "
            "use the vocabulary the model was trained with (its bundle's vocab.json)."
        )


def save_bundle(
    model: MixGeneformerForPretraining,
    directory: str | os.PathLike,
    vocab: Vocabulary,
    medians: GeneMedians | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model bundle atomically: ``config.json``, ``model.safetensors``, ``vocab.json``,
    ``medians.tsv`` (when given) and ``mixgf.json`` (written last: its presence marks a complete
    bundle).

    Parameters
    ----------
    model
        The model (any device / dtype; weights are saved as they are).
    directory
        Target folder; must not exist unless ``overwrite``.
    vocab
        The model's vocabulary (size and hash are checked and recorded in the config).
    medians
        The gene medians used to tokenize its corpus, so users tokenize new data identically.
    overwrite
        Replace an existing folder (only after the new one is complete).

    Returns
    -------
    Path
        The bundle folder.
    """
    check_vocabulary(model.config, vocab)
    model.config.vocab_hash = vocab.hash
    if getattr(model.config, "special_token_ids", None) is None:
        model.config.special_token_ids = [int(i) for i in vocab.special_ids]
    from . import __version__

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if not (tmp / WEIGHTS_NAME).exists() and not (tmp / WEIGHTS_INDEX_NAME).exists():
            raise ArtifactError(f"transformers did not write {WEIGHTS_NAME} in {tmp}; cannot create the bundle.")
        vocab.save(tmp / "vocab.json")
        if medians is not None:
            medians.save(tmp / "medians.tsv")
        write_json(
            tmp / BUNDLE_MARKER,
            {
                "format": BUNDLE_FORMAT,
                "version": 1,
                "mixgeneformer_version": __version__,
                "vocab_hash": vocab.hash,
                "vocab_size": len(vocab),
                "medians_hash": medians.hash if medians is not None else None,
            },
        )
    return Path(directory)


def bundle_tokenize_config(directory: str | os.PathLike) -> Any:
    """The ``TokenizeConfig`` a bundle's training corpus was made with, or None if it records none.

    Embedding, classification and perturbation tokenize new cells with it by default, so a model
    trained on V2-style cells with species tokens sees such cells again.
    """
    path = Path(directory) / TOKENIZE_CONFIG_NAME
    if not path.is_file():
        return None
    from .config import load_config
    from .tokenize import TokenizeConfig

    return load_config(TokenizeConfig, path)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _resolve_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ArtifactError(f"model path {folder} is a file; pass the folder that holds config.json and model.safetensors.")
        return folder
    if isinstance(path, str) and _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        raise OfflineError(
            f"{path!r} is not a local folder and looks like a Hugging Face Hub ID; mixgeneformer never downloads at "
            f"run time. Download it first (e.g. `huggingface-cli download {path} --local-dir ./{path.split('/')[-1]}`) "
            "and pass the local folder. If you meant a local path, it does not exist (relative to "
            f"{Path.cwd()})."
        )
    raise ArtifactError(f"model folder not found: {folder}. Check the path (relative paths are taken from {Path.cwd()}).")


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a folder: safetensors (single or sharded) or, for old HF folders, a torch
    pickle read with ``weights_only=True`` (never executes code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
        check_readable_file(path, "model weights")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ArtifactError(f"model weights {path} could not be read ({exc}); the file is truncated or corrupt. "
                                "Re-download or re-save the model.") from exc

    if (folder / WEIGHTS_NAME).exists():
        return load_safetensors(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).exists():
        index = read_json(folder / WEIGHTS_INDEX_NAME, "safetensors index")
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ArtifactError(f"{folder / WEIGHTS_INDEX_NAME} lists no weight shards; re-save the model.")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(folder / shard))
        return state
    if (folder / PICKLE_WEIGHTS_NAME).exists():
        path = check_readable_file(folder / PICKLE_WEIGHTS_NAME, "model weights")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for code-carrying pickles, EOFError/RuntimeError if truncated
            raise ArtifactError(
                f"model weights {path} were refused or unreadable ({type(exc).__name__}: {str(exc)[:200]}). Only plain "
                "tensor pickles are accepted (weights_only=True); convert trusted weights to model.safetensors."
            ) from exc
        if not isinstance(state, dict):
            raise ArtifactError(f"model weights {path} hold a {type(state).__name__}, not a state dict.")
        return state
    raise ArtifactError(f"model weights not found in {folder}: expected {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}).")


def _load_weights(model: MixGeneformerForPretraining, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Load a BertForMaskedLM / BertForPreTraining / BertModel / our state dict into ``model``."""
    expected = set(model.state_dict())
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel checkpoint
        state = {f"bert.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected}
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = sorted(expected - set(state) - tied)
    pooler_missing = [k for k in missing if k.startswith("bert.pooler.")]
    other_missing = [k for k in missing if not k.startswith("bert.pooler.") and not k.endswith("position_ids")]
    if other_missing:
        raise ArtifactError(
            f"model weights in {folder} lack {len(other_missing)} tensors (e.g. {other_missing[:3]}); the checkpoint is "
            "incomplete or not a BERT masked-LM model."
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ArtifactError(f"model weights in {folder} do not fit config.json: {str(exc)[:300]}") from exc
    model.tie_weights()
    if pooler_missing:
        # The pooler stays randomly initialised; it only matters for pooling="pooler".
        model.pooler_is_trained = False
        logger.warning("checkpoint %s has no BERT pooler weights; pooling='pooler' would use an untrained pooler.", folder)


def load_bundle(
    path: str | os.PathLike,
    vocab: Vocabulary | str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[MixGeneformerForPretraining, Vocabulary, GeneMedians | None]:
    """Load a model bundle (or a plain Hugging Face BERT folder such as Geneformer's).

    Parameters
    ----------
    path
        Local folder. A string that is no local path but looks like a Hub ID raises
        :class:`OfflineError` at once (nothing is ever downloaded).
    vocab
        A :class:`Vocabulary` or a path to its JSON. Optional for our bundles (their
        ``vocab.json`` is used and must match when both are given); required for plain HF
        folders (e.g. ``vocab.import_geneformer(...)`` for Geneformer).
    device, dtype
        Where and in which dtype to put the model.

    Returns
    -------
    (model, vocab, medians)
        The model in eval mode with its vocabulary attached, and the bundle's medians (None when
        the folder has none).
    """
    from .medians import GeneMedians
    from .vocab import Vocabulary

    folder = _resolve_folder(path)
    config_path = check_readable_file(folder / "config.json", "model config")
    raw_config = read_json(config_path, "model config")
    model_type = raw_config.get("model_type", "bert") if isinstance(raw_config, dict) else type(raw_config).__name__
    if model_type != "bert":
        raise ArtifactError(f"{config_path} is not a BERT config (model_type={model_type!r}); pass a BERT / Geneformer model folder.")
    try:
        config = MixGeneformerConfig.from_dict(raw_config)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{config_path} is not a valid BERT config: {exc}") from exc

    bundle_vocab = None
    if (folder / "vocab.json").exists() or (folder / BUNDLE_MARKER).exists():
        bundle_vocab = Vocabulary.load(check_readable_file(folder / "vocab.json", "bundle vocabulary"))
    if vocab is not None and not isinstance(vocab, Vocabulary):
        vocab = Vocabulary.load(vocab)
    if vocab is None:
        if bundle_vocab is None:
            raise ArtifactError(
                f"{folder} has no vocab.json (a plain Hugging Face folder); pass its vocabulary, e.g. for Geneformer "
                "`vocab.import_geneformer(token_dictionary.pkl, gene_median_dictionary.pkl)` / CLI --vocab."
            )
        vocab = bundle_vocab
    elif bundle_vocab is not None and bundle_vocab.hash != vocab.hash:
        raise VocabularyMismatchError(
            f"the vocabulary given (hash {vocab.hash}) differs from the bundle's vocab.json (hash {bundle_vocab.hash}); "
            "omit the vocabulary argument to use the bundle's own."
        )
    if (folder / BUNDLE_MARKER).exists():
        marker = read_json(folder / BUNDLE_MARKER, "bundle marker")
        if marker.get("vocab_hash") not in (None, vocab.hash):
            raise VocabularyMismatchError(
                f"{folder / BUNDLE_MARKER} records vocabulary hash {marker.get('vocab_hash')} but vocab.json has {vocab.hash}; "
                "the bundle was edited by hand. Re-save it with save_bundle."
            )
    check_vocabulary(config, vocab)

    state = _read_state_dict(folder)
    model = MixGeneformerForPretraining(config)
    _load_weights(model, state, folder)
    model.attach_vocabulary(vocab)

    medians = None
    if (folder / "medians.tsv").exists():
        medians = GeneMedians.load(check_readable_file(folder / "medians.tsv", "bundle gene medians"))
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, vocab, medians


def load_model(
    path: str | os.PathLike, vocab: Vocabulary | str | os.PathLike | None = None, **kwargs: Any
) -> MixGeneformerForPretraining:
    """Like :func:`load_bundle` but return only the model."""
    return load_bundle(path, vocab, **kwargs)[0]


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
