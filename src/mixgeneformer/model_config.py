"""The configuration of the Mix-Geneformer network: :class:`MixGeneformerConfig`, the size presets,
their validation, and the check that a vocabulary is the one a model was built on.

:class:`MixGeneformerConfig` is a :class:`transformers.BertConfig` (``model_type`` stays ``"bert"``)
with the pretraining options as extra fields, so every checkpoint we write loads in plain
transformers as ``BertForMaskedLM``. The networks themselves are in :mod:`mixgeneformer.model`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from transformers import BertConfig
from transformers.activations import ACT2FN

from .errors import ConfigError, VocabularyMismatchError

try:  # transformers 5 validates config fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: configs raise TypeError / ValueError only
    StrictDataclassError = TypeError  # type: ignore[assignment,misc]

#: what building a config from bad values raises
CONFIG_VALUE_ERRORS = (TypeError, ValueError, StrictDataclassError)

if TYPE_CHECKING:
    from .vocab import Vocabulary

POOLINGS = ("cls", "pooler", "mean")
CONTRASTIVE_MODES = ("simcse", "simcse++", "none")
CROSS_SPECIES_POSITIVES = ("mnn", "projection")


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
        How the cross-species term pairs cells: ``"mnn"`` (default, :func:`losses.mutual_nearest_partners`
        on rank-weighted one-to-one-ortholog profiles) or ``"projection"`` (a cell and its own ortholog
        re-expression, :meth:`MixGeneformerForPretraining.project_to_orthologs`; in an ortholog vocabulary
        that is the cell itself minus its species-specific genes, so it never relates two species' cells).
    cross_species_queue
        ``"mnn"`` pairing only: how many earlier training cells (with their detached embeddings) the
        pairing searches besides the batch (:class:`mixgeneformer.cell_bank.CellBank`); 0 (default)
        = the batch only.
    cross_species_k
        ``"mnn"`` pairing only: a cell's nearest other-species cell is its partner when the cell is
        among that one's ``k`` nearest of its own species (1, default: mutual nearest neighbours).
        On the demo data at batch 16, queue 1,024 and k 20 pair 10 cells a step, 77% of them of
        the same type, against 6 at 60% in the batch alone (``benchmarks/mnn_purity.py``).
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
    cross_species_queue: int = 0
    cross_species_k: int = 1
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


def check_pooling_input(config: BertConfig, first_tokens: Iterable[int], cls_id: int | None) -> None:
    """Refuse ``pooling`` "cls" when position 0 of the cells (``first_tokens``, one id per cell of a
    sample) is not ``<cls>``: the contrastive terms would train on a species or gene token's state."""
    contrastive = getattr(config, "contrastive", "simcse") != "none" and getattr(config, "contrastive_weight", 1.0) > 0
    if getattr(config, "pooling", "cls") != "cls" or not (contrastive or getattr(config, "cross_species_weight", 0) > 0):
        return  # no term pools the cells
    if cls_id is None or any(int(token) != cls_id for token in first_tokens):
        raise ConfigError(
            "objective.pooling='cls' (the default) pools the <cls> token at position 0, but this corpus's cells do not "
            "start with <cls>. Tokenize with style='v2' (adds <cls>/<eos>), or set objective.pooling to 'mean' "
            "(over gene positions) or 'pooler' (the authors' variant, on position 0 whatever it holds)."
        )

#: size fields that must be positive integers (0 layers built a model without an encoder, without a word)
_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings")
#: fields the objective computes with: numbers ("hot" reached a bare TypeError in a comparison)
_NUMBERS = ("temperature", "cross_species_temperature", "contrastive_weight", "simcse_pp_weight", "cross_species_weight")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_values(config: BertConfig) -> None:
    """ConfigError for a size, number, dropout, activation or flag no model can be built or trained with."""
    for name in _SIZES:
        value = getattr(config, name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{name}={value!r} must be a positive integer.")
    for name in _NUMBERS:
        if not _is_number(getattr(config, name, 0.0)):
            raise ConfigError(f"model.{name}={getattr(config, name)!r} must be a finite number.")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = getattr(config, name, 0.0)
        if not (_is_number(value) and 0 <= value < 1):
            raise ConfigError(f"model.{name}={value!r} must be a dropout probability in [0, 1) (0.1 in the presets).")
    act = getattr(config, "hidden_act", "gelu")
    if isinstance(act, str) and act not in ACT2FN:
        raise ConfigError(f"model.hidden_act={act!r} is no activation transformers knows; use e.g. 'relu', 'gelu' or 'silu'.")
    if not isinstance(getattr(config, "gather_negatives", False), bool):
        raise ConfigError(f"model.gather_negatives={config.gather_negatives!r} must be true or false.")


def validate_config(config: BertConfig) -> None:
    """Raise :class:`ConfigError` for inconsistent pretraining options (names the field and the fix)."""
    _check_values(config)
    pooling = getattr(config, "pooling", "cls")
    if pooling not in POOLINGS:
        raise ConfigError(f"model.pooling={pooling!r} is not one of {list(POOLINGS)}.")
    positives = getattr(config, "cross_species_positives", "mnn")
    if positives not in CROSS_SPECIES_POSITIVES:
        raise ConfigError(f"model.cross_species_positives={positives!r} is not one of {list(CROSS_SPECIES_POSITIVES)}.")
    for name, least, meaning in (("cross_species_queue", 0, "0 = pair within the batch only"),
                                 ("cross_species_k", 1, "1 = mutual nearest neighbours")):
        value = getattr(config, name, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"model.{name}={value!r} must be an integer >= {least} ({meaning}).")
        if value != least and positives != "mnn":
            raise ConfigError(f"model.{name} needs model.cross_species_positives='mnn' (the projection pairs a cell with itself).")
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
    except CONFIG_VALUE_ERRORS as exc:
        raise ConfigError(f"invalid model option: {exc}") from exc
    validate_config(config)
    return config


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
