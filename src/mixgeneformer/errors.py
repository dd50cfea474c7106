"""Exceptions raised for problems a user can fix.

Every error says what is wrong (the offending field or value) and how to fix it. The CLI turns
any :class:`MixGeneformerError` into a one-paragraph message and exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class MixGeneformerError(Exception):
    """Base class of all errors caused by input, configuration or files a user controls."""


class InputDataError(MixGeneformerError, ValueError):
    """The count matrix, gene identifiers or metadata are unusable as given."""


class GeneIdError(InputDataError):
    """Gene identifiers cannot be resolved (wrong species, symbols vs IDs, low coverage)."""


class NoTokenizableCellError(InputDataError):
    """None of the cells given could be tokenized (no counts, no vocabulary gene, or filtered out)."""


class ConfigError(MixGeneformerError, ValueError):
    """A configuration has unknown keys, wrong types or inconsistent values."""


class ArtifactError(MixGeneformerError, OSError):
    """A file or folder we need is missing, truncated, a Git-LFS pointer or otherwise unreadable."""


class VocabularyMismatchError(MixGeneformerError, ValueError):
    """A model, corpus or median table was built with a different vocabulary."""


class OfflineError(MixGeneformerError, RuntimeError):
    """Something would need the network (e.g. a hub model ID) but we never download at run time."""


class TrainingDivergedError(MixGeneformerError, RuntimeError):
    """The training loss became NaN or infinite: the settings (learning rate, warmup) need changing."""


# -- argument checks of the public Python API: a wrong argument is refused at the door with a ConfigError
#    naming it, not an AttributeError from deep inside ------------------------------------------------------
def check_anndata(value: object, name: str = "adata") -> None:
    """ConfigError unless ``value`` is an AnnData (in memory, backed, or a view of one)."""
    if hasattr(value, "obs") and hasattr(value, "var") and hasattr(value, "n_obs"):
        return
    hint = ""
    if isinstance(value, (str, os.PathLike)):
        hint = f" (a path: read it first, e.g. {name} = anndata.read_h5ad({str(value)!r}))"
    raise ConfigError(f"{name} must be an AnnData, got {type(value).__name__}{hint}.")


def check_config(value: object, cls: type, name: str = "config") -> None:
    """ConfigError unless ``value`` is None (the defaults) or a ``cls``; a dict is told how to build one."""
    if value is None or isinstance(value, cls):
        return
    hint = ""
    if isinstance(value, dict):
        hint = f"; build one from a dict with mixgeneformer.config.from_dict({cls.__name__}, {{...}})"
    raise ConfigError(f"{name} must be a {cls.__name__} (or None for the defaults), got {type(value).__name__}{hint}.")


def name_list(value: str | Iterable[str], name: str) -> list[str]:
    """``value`` as a list of names: one string is one name (not a list of its characters)."""
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise ConfigError(f"{name} must be a name or a list of names, got {type(value).__name__}.") from None


def species_for_every_input(error: GeneIdError, n_inputs: int, species: str) -> GeneIdError:
    """``error`` of one input read with a given ``species``, saying that the setting applies to all ``n_inputs``
    inputs: the species it names for this one would misread the others when they are of the other species."""
    if n_inputs < 2 or species == "auto":
        return error
    return GeneIdError(f"{error} Note: species={species!r} (CLI: --species {species}) applies to every one of the "
                       f"{n_inputs} inputs; for inputs of both species leave it at 'auto' (each input's species is "
                       "detected from its genes), or run each species' inputs on their own.")
