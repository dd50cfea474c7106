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
TOKENIZE_CONFIG_HELP = (
    "YAML of tokenize options (layer, style, max_len, ...). Only the options it sets change: the others keep "
    "the model's tokenize.yaml (how its training corpus was tokenized), e.g. `layer: counts` alone keeps its "
    "max_len, style and species token."
)


def load_tokenize_config(path):
    """The options of ``--tokenize-config`` as a ``bundle.TokenizeOverrides`` (the options the file sets,
    laid over the model bundle's tokenize.yaml when the model loads), or None (the bundle's own then)."""
    from ..bundle import TokenizeOverrides
    from ..config import load_config

    return None if path is None else load_config(TokenizeOverrides, path)
