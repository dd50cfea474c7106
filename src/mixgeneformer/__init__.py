"""Mix-Geneformer: one transformer foundation model for human and mouse scRNA-seq."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixgeneformer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
