"""Exceptions raised for problems a user can fix.

Every error says what is wrong (the offending field or value) and how to fix it. The CLI turns
any :class:`MixGeneformerError` into a one-paragraph message and exit code 2.
"""


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
