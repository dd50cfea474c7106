"""The Typer application object every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mixgf",
    help="Mix-Geneformer: tokenize, pretrain and use one transformer for human and mouse scRNA-seq.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

state = {"debug": False}

# The model-file options of every command that loads a model (passed on to bundle.load_for_inference).
VOCAB_OPTION = typer.Option(
    None, "--vocab", help="Vocabulary JSON, for a plain Hugging Face model folder (Geneformer: `mixgf vocab import-geneformer`)."
)
MEDIANS_OPTION = typer.Option(None, "--medians", help="Gene medians TSV, instead of the bundle's (a plain Hugging Face folder has none).")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state["debug"] = debug


# The help of every --tokenize-config option: the file overlays the model's tokenize.yaml.
CELLS_INPUT_HELP = (
    "Raw counts: an .h5ad, .loom or 10x .h5 file, a 10x matrix.mtx folder or a TileDB-SOMA experiment (read as mixgf "
    "tokenize reads it, with the layer / gene_column of the tokenize options), or a tokenized corpus folder."
)
TOKENIZE_CONFIG_HELP = (
    "YAML of tokenize options (layer, style, max_len, ...). Only the options it sets change: the others keep "
    "the model's tokenize.yaml (how its training corpus was tokenized), e.g. `layer: counts` alone keeps its "
    "max_len, style and species token."
)


GENE_COLUMN_OPTION = typer.Option(
    None, "--gene-column",
    help="Where the input's gene IDs / symbols are: an .h5ad var column, a loom row attribute or a 10x feature field "
    "(default var_names; loom: ensembl_id, Accession, gene_ids, Gene, var_names; 10x: id). The tokenize option gene_column.",
)


def load_tokenize_config(path, gene_column: str | None = None, input=None, action: str = "use"):
    """The options of ``--tokenize-config`` as a ``bundle.TokenizeOverrides`` (the options the file sets,
    laid over the model bundle's tokenize.yaml when the model loads), or None (the bundle's own then).
    ``--gene-column`` is laid over the file's options; with a corpus ``input`` (tokenized already) both are
    refused, naming the command's ``action``."""
    from ..bundle import TokenizeOverrides
    from ..config import load_config
    from ..corpus import is_corpus_folder, refuse_tokenize_options

    if input is not None and is_corpus_folder(input):  # before the file is read, before any output
        refuse_tokenize_options(input, action, tokenize_config=path, gene_column=gene_column)
    overrides = None if path is None else load_config(TokenizeOverrides, path)
    if gene_column is None:
        return overrides
    given = overrides.options() if overrides is not None else {}
    return TokenizeOverrides(**{**given, "gene_column": gene_column})


def claim_cell_outputs(outputs: dict, shard_index: int | None, num_shards: int | None):
    """The outputs of ``embed`` / ``predict`` (``{option: path or None}``): each can be written (no file
    where a folder is needed), checked before anything is created; a one-process run holds the lock of
    every one for its whole run (a second writer of any is refused) and removes the folders the locks
    created if it fails (:func:`fileio.claim_outputs`). The shards of one run share them by design."""
    import contextlib

    from ..fileio import check_writable, claim_outputs
    from ..sharding import shard_role

    given = {option: path for option, path in outputs.items() if path is not None}

    def check() -> None:
        for option, path in given.items():
            check_writable(path, (), option)

    if shard_role(shard_index, num_shards).world > 1:
        check()
        return contextlib.nullcontext()
    return claim_outputs(check, *given.values())
