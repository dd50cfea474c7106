"""``mixgf medians`` and ``mixgf tokenize``: gene medians and rank-value corpora from count files."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from ._app import app

_OBS_FILTER_HELP = ("TileDB-SOMA inputs only: read the cells this tiledbsoma value_filter over obs selects, e.g. "
                    "\"tissue_general == 'pancreas' and is_primary_data == True\".")


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _table_name(path: Path) -> str:
    """An input's name without its format's extension (``x.v2.h5ad`` → ``x.v2``, ``m.mtx.gz`` → ``m``)."""
    name = path.name
    for suffix in (".gz", ".h5ad", ".loom", ".h5", ".mtx"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) and len(name) > len(suffix) else name
    return name


@app.command("medians")
def medians_command(
    inputs: list[Path] = typer.Argument(..., help="Count files: .h5ad, .loom, 10x .h5 / mtx folder, SOMA experiment."),
    out: Path = typer.Option(..., "--out", "-o", help="Medians TSV to write (with --per-file: a folder of TSVs)."),
    species: str = typer.Option("auto", help="'auto', 'human' or 'mouse' (applies to every input)."),
    per_file: bool = typer.Option(False, "--per-file", help="One median table per input (the authors' variant)."),
    workers: int = typer.Option(1, min=1, help="Worker processes."),
    layer: str | None = typer.Option(None, help="Read counts from this layer instead of X ('raw': adata.raw, scanpy's raw counts)."),
    gene_column: str | None = typer.Option(None, help="var column holding gene IDs (default: var_names)."),
    totals: str = typer.Option("all", help="'all' (n_counts over all genes) or 'kept' (vocabulary genes)."),
    vocab: Path | None = typer.Option(None, help="Only track the genes of this vocabulary (bounds memory)."),
    chunk_size: int = typer.Option(10_000, help="Cells per chunk."),
    allow_fractional: bool = typer.Option(False, "--allow-fractional", help="Accept non-integer counts."),
    min_coverage: float = typer.Option(0.5, help="Minimum fraction of gene IDs that must resolve."),
    allow_mixed_species: bool = typer.Option(
        False, "--allow-mixed-species", help="Accept human and mouse gene IDs in one file (symbols of the other species stay unmapped)."
    ),
    obs_filter: str | None = typer.Option(None, "--obs-filter", help=_OBS_FILTER_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (a medians TSV / folder)."),
) -> None:
    """Compute per-gene medians of nonzero normalized expression, streamed over all inputs."""
    from ..errors import ConfigError
    from ..fileio import check_output, check_outputs_of, claim_outputs

    logging.basicConfig(level=logging.WARNING)

    def check() -> None:
        if per_file:  # a folder of <name>.medians.tsv
            check_output(out, [*inputs, vocab], overwrite=overwrite, option="--out")
        else:
            check_outputs_of({"--out": (out, {".tsv"})}, [*inputs, vocab], overwrite)

    names = [_table_name(path) for path in inputs] if per_file else []
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ConfigError(f"--per-file writes one <name>.medians.tsv per input, and several inputs are named {clashes}; "
                          "rename or link them so each input's name (without its extension) differs.")
    with claim_outputs(check, out):
        genes = None
        if vocab is not None:
            from ..vocab import Vocabulary

            genes = sorted(Vocabulary.load(vocab).gene_to_id)
        options = {"workers": workers, "genes": genes, "layer": layer, "gene_column": gene_column, "species": species,
                   "totals": totals, "chunk_size": chunk_size, "allow_fractional": allow_fractional,
                   "min_coverage": min_coverage, "allow_mixed_species": allow_mixed_species, "obs_filter": obs_filter}
        _write_medians(inputs, out, names, per_file, overwrite, options)


def _write_medians(inputs: list[Path], out: Path, names: list[str], per_file: bool, overwrite: bool, options: dict) -> None:
    """Compute the median table(s) and write them; print what was read."""
    from ..fileio import atomic_directory
    from ..medians import compute_file_medians, compute_medians

    compute = compute_file_medians if per_file else compute_medians
    result = compute([str(p) for p in inputs], progress=True, **options)
    if per_file:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for name, table in zip(names, result, strict=True):
                table.save(tmp / f"{name}.medians.tsv")
        typer.echo(f"wrote {len(result)} median tables into {out}")
    else:
        result.save(out)
        typer.echo(f"wrote {out}: {len(result):,} genes, hash {result.hash}")
    stats = (result[0] if per_file else result).stats
    for name, read, cov in zip(stats.inputs, stats.cells_read, stats.coverage, strict=True):
        typer.echo(f"  {name}: {read:,} cells; {cov}")
    typer.echo(f"{stats.total_cells:,} cells in {stats.seconds:.1f}s ({stats.total_cells / max(stats.seconds, 1e-9):,.0f} cells/s)")


@app.command("tokenize")
def tokenize_command(  # long: one line per typer option (21 options), then one call
    inputs: list[Path] = typer.Argument(..., help="Count files (human and mouse may be mixed)."),
    vocab: Path = typer.Option(..., help="Vocabulary JSON (mixgf vocab build / import-geneformer)."),
    medians: Path | None = typer.Option(None, help="Gene medians TSV (mixgf medians); omit with --per-file-medians."),
    out: Path = typer.Option(..., "--out", "-o", help="Corpus folder to create."),
    max_len: int = typer.Option(2048, help="Maximum tokens per cell, special tokens included."),
    style: str = typer.Option("v1", help="'v1' (genes only) or 'v2' (<cls> genes <eos>)."),
    species_token: bool = typer.Option(False, "--species-token", help="Start each cell with its species token."),
    obs_columns: str | None = typer.Option(None, help="Comma-separated obs columns to keep, e.g. cell_type1,donor."),
    workers: int = typer.Option(1, min=1, help="Worker processes."),
    layer: str | None = typer.Option(None, help="Read counts from this layer instead of X ('raw': adata.raw, scanpy's raw counts)."),
    gene_column: str | None = typer.Option(None, help="var column holding gene IDs (default: var_names)."),
    species: str = typer.Option("auto", help="'auto', 'human' or 'mouse'."),
    totals: str = typer.Option("all", help="'all' (Geneformer) or 'kept' (authors' variant)."),
    per_file_medians: bool = typer.Option(False, "--per-file-medians", help="Normalize each file by its own medians."),
    chunk_size: int = typer.Option(4096, help="Cells per chunk."),
    allow_fractional: bool = typer.Option(False, "--allow-fractional", help="Accept non-integer counts."),
    min_coverage: float = typer.Option(0.5, help="Minimum fraction of gene IDs that must resolve."),
    duplicate_genes: str = typer.Option(
        "sum", "--duplicate-genes", help="Columns resolving to one gene: 'sum' their counts (Geneformer) or 'error'."
    ),
    allow_mixed_species: bool = typer.Option(
        False, "--allow-mixed-species", help="Accept human and mouse gene IDs in one file (symbols of the other species stay unmapped)."
    ),
    obs_filter: str | None = typer.Option(None, "--obs-filter", help=_OBS_FILTER_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing corpus folder."),
) -> None:
    """Rank-value encode cells into a Hugging Face datasets corpus (resumable, multi-process)."""
    from ..config import from_dict
    from ..corpus import CORPUS_JSON
    from ..fileio import check_output, read_json
    from ..medians import GeneMedians
    from ..tokenize import TokenizeConfig, tokenize_files
    from ..vocab import Vocabulary

    logging.basicConfig(level=logging.WARNING)
    check_output(out, [*inputs, vocab, medians], overwrite=overwrite, option="--out")
    config = from_dict(TokenizeConfig, {
        "max_len": max_len, "style": style, "add_species_token": species_token, "totals": totals,
        "medians": "per_file" if per_file_medians else "corpus", "species": species, "layer": layer,
        "gene_column": gene_column, "chunk_size": chunk_size, "allow_fractional": allow_fractional,
        "min_coverage": min_coverage, "duplicate_genes": duplicate_genes, "allow_mixed_species": allow_mixed_species,
        "obs_filter": obs_filter,
    }, "tokenize")
    if (medians is None) != per_file_medians:
        from ..errors import ConfigError

        raise ConfigError("pass one of --medians TSV (the corpus's medians) and --per-file-medians (each file's own).")
    table = None if per_file_medians else GeneMedians.load(medians)
    out_dir = tokenize_files(
        [str(p) for p in inputs], out, Vocabulary.load(vocab), table, config, _split(obs_columns),
        workers=workers, overwrite=overwrite, progress=True,
    )
    report = read_json(out_dir / CORPUS_JSON)
    for item in report["inputs"]:
        typer.echo(f"  {item['path']}: {item['cells_in']:,} in, {item['cells_out']:,} out; {item['coverage']}")
    typer.echo(
        f"wrote {out_dir}: {report['cells_in']:,} cells in, {report['cells_out']:,} out (dropped {report['dropped_zero_counts']:,} "
        f"zero-count, {report['dropped_no_vocab_gene']:,} without vocabulary genes, {report['dropped_filter_pass']:,} by "
        f"filter_pass); {report['seconds']:.1f}s, {report['cells_in'] / max(report['seconds'], 1e-9):,.0f} cells/s"
    )
