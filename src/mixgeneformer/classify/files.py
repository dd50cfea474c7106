"""Classification of count files: the train (and test) cells of any count input, read as ``mixgf classify`` reads them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..bundle import resolve_tokenize_config
from ..corpus import check_cells_input
from ..errors import ConfigError, InputDataError, check_config, name_list
from ..fileio import read_h5ad
from ..readers.cells import H5AD, count_format, read_cells
from ..sharding import cells_tokenize_config, model_tokenize_config
from .config import BaselineMethod, ClassifyConfig, Method
from .run import ClassificationRun, check_methods, run_classification

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from ..medians import GeneMedians
    from ..tokenize import TokenizeConfig
    from ..vocab import Vocabulary


def classify_file(
    input: str | os.PathLike,
    model: str | os.PathLike | torch.nn.Module | None = None,
    test: str | os.PathLike | None = None,
    *,
    methods: Sequence[Method] = ("knn", "logreg"),
    baseline_methods: Sequence[BaselineMethod] = (),
    config: ClassifyConfig | None = None,
    tokenize_config: TokenizeConfig | None = None,
    vocab: Vocabulary | str | os.PathLike | None = None,
    medians: GeneMedians | str | os.PathLike | None = None,
    device: str | None = None,
    max_len: int | None = None,
) -> ClassificationRun:
    """``mixgf classify`` in Python: :func:`run_classification` on the cells of ``input`` (split 80/20)
    or trained on ``input`` and tested on ``test``, each a path of any count format (an ``.h5ad``,
    ``.loom`` or 10x ``.h5`` file, a 10x ``matrix.mtx`` folder or a TileDB-SOMA experiment).

    An ``.h5ad`` is read by anndata; another format by :func:`readers.cells.read_cells` with the reader
    options the run tokenizes with (``tokenize_config`` over the model bundle's recorded options, e.g.
    ``layer``, ``gene_column``, a SOMA ``obs_filter``, which is then applied already). Both files need
    the label column ``config.labels.key`` (default ``cell_type1``): a missing one raises
    :class:`~mixgeneformer.errors.InputDataError` naming it and the obs columns (10x files carry no
    labels). The other arguments are :func:`run_classification`'s; write the run with :func:`save_run`.
    """
    check_methods(model, name_list(methods, "methods"), name_list(baseline_methods, "baseline_methods"))  # before reading
    check_arguments(model, config, device)
    check_test_file(Path(input), Path(test) if test is not None else None)
    paths = [check_cells_input(input, "input", corpus=False)]
    if test is not None:
        paths.append(check_cells_input(test, "--test", corpus=False))
    cells, tokenize_config = read_classify_cells(paths[0], paths[1] if test is not None else None, model, tokenize_config)
    key = (config or ClassifyConfig()).labels.key
    train_data = check_label_column(cells[0], key, paths[0])  # type: ignore[arg-type]
    test_data = check_label_column(cells[1], key, paths[1]) if test is not None else None  # type: ignore[arg-type]
    return run_classification(
        train_data, model, vocab, medians, test=test_data, methods=methods, baseline_methods=baseline_methods,
        config=config, tokenize_config=tokenize_config, device=device, max_len=max_len,
    )


def check_arguments(model: str | os.PathLike | torch.nn.Module | None, config: ClassifyConfig | None, device: str | None) -> None:
    """The arguments checked before a cell is read (run_classification checks them only once the files are read):
    ``config`` a ClassifyConfig (a dict failed with a bare AttributeError), the model folder there, ``device`` a
    device of this machine."""
    from ..bundle import resolve_model_folder
    from ..devices import resolve_device

    check_config(config, ClassifyConfig)
    if isinstance(model, (str, os.PathLike)):
        resolve_model_folder(model)
    if device is not None:
        resolve_device(device)


def check_test_file(input: Path, test: Path | None) -> None:
    """Refuse a ``test`` file that is the training ``input`` itself: its score would be measured on the
    cells the classifiers were trained on."""
    if test is not None and test.exists() and input.exists() and test.resolve() == input.resolve():
        raise ConfigError(
            f"--test {test} is the training file: its score would be measured on the training cells. "
            "Leave out --test (test=None in Python) for a held-out split of the input, or give another file."
        )


def check_label_column(data: AnnData, label: str, path: Path) -> AnnData:
    """``data`` (read from ``path``) when its obs has the label column, else one error naming the
    column and the obs columns there are."""
    if label not in data.obs.columns:
        raise InputDataError(
            f"label column {label!r} not found in the obs of {path}. Available obs columns: "
            f"{list(map(str, data.obs.columns))}. Pass the right one with --label (config.labels.key in Python)."
        )
    return data


def read_classify_cells(
    input: Path, test: Path | None, model: str | os.PathLike | torch.nn.Module | None,
    tokenize_config: TokenizeConfig | None,
) -> tuple[list[AnnData | None], TokenizeConfig | None]:
    """The train (and test) cells, and the tokenize options to give run_classification. An .h5ad is read
    as before; another count input with the reader options the run tokenizes with (``tokenize_config`` over
    the model's recorded ones), whose obs_filter (a SOMA experiment's cells) is then applied already."""
    paths = [p for p in (input, test) if p is not None]
    h5ad = [count_format(path) == H5AD for path in paths]
    read = None
    if not all(h5ad):
        config = model_tokenize_config(model, tokenize_config) if model is not None else resolve_tokenize_config(tokenize_config, None)
        read = config.read_options if config is not None else None
    cells = [read_h5ad(path, what) if is_h5ad else read_cells(path, read)
             for path, what, is_h5ad in zip(paths, ("input h5ad", "test h5ad (--test)"), h5ad, strict=False)]
    if not any(h5ad):  # else an h5ad's obs_filter is refused as before
        tokenize_config = cells_tokenize_config(input, tokenize_config)
    return [*cells, None][:2], tokenize_config
