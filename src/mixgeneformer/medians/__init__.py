"""Per-gene medians of nonzero normalized expression, computed by streaming and mergeable.

Rank-value encoding divides each gene's normalized count (count / cell total × 10,000) by the
gene's median over the whole corpus of its *nonzero* normalized values (SPEC §2).

* :mod:`.table`      :class:`GeneMedians`, the finished table (TSV + content hash)
* :mod:`.histogram`  :class:`MedianAccumulator`, mergeable log-binned histograms (the accuracy bound)
* :mod:`.run`        :func:`compute_medians` / :func:`compute_file_medians` over many inputs and workers
"""

from .histogram import MedianAccumulator
from .run import MedianRunStats, accumulate_medians, compute_file_medians, compute_medians
from .table import GeneMedians

__all__ = [
    "GeneMedians",
    "MedianAccumulator",
    "MedianRunStats",
    "accumulate_medians",
    "compute_file_medians",
    "compute_medians",
]
