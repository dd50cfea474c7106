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


def load_tokenize_config(path):
    """The TokenizeConfig of ``--tokenize-config``, or None (a model bundle then supplies its own)."""
    from ..config import load_config
    from ..tokenize import TokenizeConfig

    return None if path is None else load_config(TokenizeConfig, path)
