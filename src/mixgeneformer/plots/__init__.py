"""Figures: UMAP of embeddings, confusion matrices, perturbation rankings, training curves.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, so it is
safe on headless machines and in loops), returns it, and writes it atomically when ``save`` is
given (format from the file suffix; PNG at 150 dpi by default).

The figures live one kind per module (``embedding``: UMAP, ``confusion``, ``ranking``: perturbation
ranking, ``curves``: training curves) over ``common`` (the atomic writer, colours, class names);
every name is re-exported here, so ``from mixgeneformer import plots`` / ``from mixgeneformer.plots
import X`` work as before. Patch a helper where it is used (e.g. ``plots.embedding.umap_coordinates``).
"""

from __future__ import annotations

# every name stays importable as plots.<name> (the private helpers too, for anyone who reached for them)
from .common import _class_names, _finish, _pick, category_colours, plain_text, save_figure  # noqa: F401
from .confusion import _counts_of_labels, _matrix_in_order, confusion_matrix  # noqa: F401
from .curves import _plot_series, _read_metrics_csv, _series, training_curves  # noqa: F401
from .embedding import (  # noqa: F401
    _MAX_LEGEND,
    EXACT_KNN_MAX_CELLS,
    MIN_UMAP_CELLS,
    _annotation,
    _scatter,
    umap,
    umap_coordinates,
)
from .ranking import _NAME_COLUMNS, _bar_names, perturbation_ranking  # noqa: F401

__all__ = ["confusion_matrix", "perturbation_ranking", "save_figure", "training_curves", "umap"]
