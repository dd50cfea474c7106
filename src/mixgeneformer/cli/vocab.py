"""``mixgf vocab``: build, import and inspect gene vocabularies."""

from __future__ import annotations

from pathlib import Path

import typer

from ..fileio import check_outputs_of, claim_outputs, written_together
from ..vocab import build_vocabulary, import_geneformer
from ._app import app

vocab_app = typer.Typer(help="Build, import and inspect the unified human + mouse gene vocabulary.", no_args_is_help=True)
app.add_typer(vocab_app, name="vocab")


@vocab_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the vocabulary JSON."),
    mode: str = typer.Option("separate", help="'separate' (every gene its own token) or 'ortholog' (1:1 orthologs share a token)."),
    gene_set: str = typer.Option("protein_coding", help="'protein_coding' (+ genes with medians), 'medians' or 'all'."),
    medians: Path | None = typer.Option(None, help="Corpus medians TSV; genes it covers join the vocabulary."),
    species: str = typer.Option("human,mouse", help="Comma-separated species to include."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing vocabulary JSON at --out."),
) -> None:
    """Build a unified vocabulary from the shipped gene tables."""
    with claim_outputs(lambda: check_outputs_of({"--out": (out, {".json"})}, [medians], overwrite), out):
        gene_medians = None
        if medians is not None:
            from ..medians import GeneMedians

            gene_medians = GeneMedians.load(medians)
        vocab = build_vocabulary(mode, gene_set, gene_medians, tuple(s.strip() for s in species.split(",") if s.strip()))
        vocab.save(out)
    typer.echo(f"wrote {out}: {vocab}")


@vocab_app.command("import-geneformer")
def import_gf(
    token_dictionary: Path = typer.Option(..., help="Geneformer token_dictionary.pkl"),
    gene_median_dictionary: Path | None = typer.Option(None, help="Geneformer gene_median_dictionary.pkl"),
    out: Path = typer.Option(..., "--out", "-o", help="Vocabulary JSON to write."),
    medians_out: Path | None = typer.Option(None, help="Medians TSV to write (needs --gene-median-dictionary)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --out / --medians-out files."),
) -> None:
    """Convert Geneformer's pickled dictionaries (read safely, never executed) to JSON/TSV."""
    from ..errors import ConfigError

    if (medians_out is None) != (gene_median_dictionary is None):
        given, missing = ("--medians-out", "--gene-median-dictionary") if gene_median_dictionary is None else ("--gene-median-dictionary", "--medians-out")
        raise ConfigError(f"{given} needs {missing}: the medians TSV is written from Geneformer's gene median dictionary. Give both, or neither.")
    outputs = {"--out": (out, {".json"}), "--medians-out": (medians_out, {".tsv"})}
    with claim_outputs(lambda: check_outputs_of(outputs, [token_dictionary, gene_median_dictionary], overwrite), out, medians_out):
        vocab, medians = import_geneformer(token_dictionary, gene_median_dictionary)
        with written_together():  # a pair or nothing: an interrupt between the two left a vocabulary without its medians
            vocab.save(out)
            if medians is not None and medians_out is not None:  # both given or neither (checked above)
                medians.save(medians_out)
    typer.echo(f"wrote {out}: {vocab}")
    if medians is not None and medians_out is not None:
        typer.echo(f"wrote {medians_out}: {len(medians):,} gene medians")


@vocab_app.command("info")
def info(path: Path = typer.Argument(..., help="Vocabulary JSON.")) -> None:
    """Summarise a vocabulary: mode, size, genes per species, hash."""
    from ..vocab import HUMAN, MOUSE, SHARED, Vocabulary

    vocab = Vocabulary.load(path)
    codes = vocab.token_species
    typer.echo(str(vocab))
    typer.echo(
        f"special tokens: {[vocab.tokens[i] for i in vocab.special_ids]}; human-only tokens: {(codes == HUMAN).sum():,}; "
        f"mouse-only tokens: {(codes == MOUSE).sum():,}; shared ortholog tokens: {(codes == SHARED).sum():,}"
    )
