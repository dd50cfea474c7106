"""Faults found by walking through README.md and docs/USAGE.md as a user, one regression test each."""

from __future__ import annotations

import re
import shlex

from _tokenize_helpers import cli_exit_code
from test_perturb import bundle_and_cells, vocab  # noqa: F401  (fixtures)


# -- `mixgf classify --help` showed "obs column with the cell types ." ----------------------------------
def test_classify_label_help_names_its_default(capsys):
    """Rich read the help's "[default: ...]" as a markup tag and dropped it, so the default label
    column (cell_type1, which USAGE's `mixgf classify $MOUSE --test $HUMAN ...` relies on) was not shown."""
    assert cli_exit_code(["classify", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    start = text.index("--label")
    label_help = text[start:text.index("--mode", start)]
    assert "cell_type1" in label_help and "labels.key" in label_help


# -- `mixgf embed --help` said --umap takes .png/.pdf; USAGE (and the check) take png, pdf, svg, eps, ps ----
def test_embed_umap_help_lists_every_accepted_format(capsys):
    from mixgeneformer.filekinds import STAMPED_FIGURES

    assert cli_exit_code(["embed", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    start = text.index("--umap")
    umap_help = text[start:text.index("--color", start)]
    assert all(f".{fmt}" in umap_help for fmt in STAMPED_FIGURES), umap_help


# -- a perturb shard printed `mixgf perturb-merge OUT`, which fails without the required --model ---------
def test_perturb_shard_hint_is_a_merge_command_that_runs(tmp_path, vocab, capsys):  # noqa: F811
    bundle_and_cells(tmp_path, vocab)
    out = tmp_path / "sharded"
    common = ["perturb", tmp_path / "in.h5ad", "--model", tmp_path / "bundle", "--out", out, "--state-column", "kind",
              "--start", "x", "--goal", "y", "--cells-per-state", "1", "--device", "cpu", "--no-progress"]
    hints = []
    for index in (0, 1):
        assert cli_exit_code([*common, "--shard-index", index, "--num-shards", 2]) == 0
        hints += re.findall(r"when every shard is done: (.+)", capsys.readouterr().out)
    assert len(hints) == 2 and hints[0] == hints[1]
    words = shlex.split(hints[0])
    assert words[:2] == ["mixgf", "perturb-merge"] and "--model" in words
    assert cli_exit_code(words[1:]) == 0  # the printed command itself merges the shards
    assert (out / "merged" / "genes.csv").is_file()


# -- the documented Python calls pass load_bundle's model: its cells were tokenized with defaults ----------
def _bundle_with_tokenize_yaml(folder, vocab):  # noqa: F811
    from mixgeneformer.bundle import TOKENIZE_CONFIG_NAME
    from mixgeneformer.config import save_config
    from mixgeneformer.tokenize import TokenizeConfig

    bundle_and_cells(folder, vocab)
    recorded = TokenizeConfig(max_len=32, style="v2", add_species_token=True)
    save_config(recorded, folder / "bundle", TOKENIZE_CONFIG_NAME)
    return recorded


def test_model_from_load_bundle_tokenizes_like_its_folder(tmp_path, vocab):  # noqa: F811
    """README / USAGE: `model, vocab, medians = load_bundle(...)` then `run_classification(adata, model, vocab,
    medians, ...)`. The loaded model lost the bundle's tokenize.yaml, so cells were tokenized V1-style without
    the species token (unlike the CLI and the folder form of the same call); now it travels with the model."""
    from mixgeneformer.bundle import load_bundle, load_for_inference
    from mixgeneformer.tokenize import TokenizeConfig

    recorded = _bundle_with_tokenize_yaml(tmp_path, vocab)
    model, vocab_, medians = load_bundle(tmp_path / "bundle")
    from_object = load_for_inference(model, vocab_, medians)[3]
    from_folder = load_for_inference(tmp_path / "bundle", None, None)[3]
    assert from_object == from_folder == recorded
    explicit = TokenizeConfig(max_len=16)  # a configuration given still replaces it as a whole
    assert load_for_inference(model, vocab_, medians, explicit)[3] == explicit


def test_classification_tokens_of_a_loaded_model_follow_its_tokenize_yaml(tmp_path, vocab):  # noqa: F811
    import anndata as ad

    from mixgeneformer.bundle import load_bundle, load_for_inference
    from mixgeneformer.classify.tasks import tokenize_cells

    _bundle_with_tokenize_yaml(tmp_path, vocab)
    adata = ad.read_h5ad(tmp_path / "in.h5ad")
    model, vocab_, medians = load_bundle(tmp_path / "bundle")
    config = load_for_inference(model, vocab_, medians)[3]  # what run_classification(adata, model, vocab, medians) uses
    ids = tokenize_cells(adata, vocab_, medians, config, 64).dataset["input_ids"]
    assert all(cell[0] == vocab_.cls_id and cell[1] == vocab_.species_token_id("human") for cell in ids)
    assert max(len(cell) for cell in ids) <= 32


def _documented_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, its --options) of every `mixgf ...` line in the fenced code blocks of a Markdown text."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            match = re.search(r"(?:^|&& |\s)(?:mixgf|-m mixgeneformer)\s+(.*)", line.split("#")[0])
            if not match:
                continue
            words = match.group(1).split()
            words = words[1:] if words and words[0] == "--debug" else words
            name = " ".join(words[:2]) if words[:1] == ["vocab"] else words[0]
            commands.append((name, [w.split("=")[0] for w in words if w.startswith("--")]))
    return commands


def test_documented_command_lines_use_options_that_exist():
    """Every --option on a `mixgf` / `-m mixgeneformer` line of README.md and docs/USAGE.md exists in that command."""
    from pathlib import Path

    import typer.main

    from mixgeneformer.cli import app

    assert _documented_commands("```bash\nmixgf embed $H --modle m \\\n    --out o.h5ad  # --x\n```") == [("embed", ["--modle", "--out"])]
    root = typer.main.get_command(app)
    repo = Path(__file__).resolve().parents[1]
    seen = 0
    for doc in ("README.md", "docs/USAGE.md"):
        for name, options in _documented_commands((repo / doc).read_text()):
            command = root
            for part in name.split():
                command = command.commands[part]  # KeyError: a documented command that does not exist
            known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
            assert set(options) <= known, f"{doc}: mixgf {name}: unknown {sorted(set(options) - known)}"
            seen += 1
    assert seen >= 25  # the walk really found the documented command lines


# -- USAGE: "`finetune.max_len` is refused, not ignored" held only when fine-tuning ran -------------------
def test_finetune_max_len_is_refused_whatever_the_methods(tmp_path, vocab, capsys):  # noqa: F811
    """`mixgf classify --mode knn --set finetune.max_len=256` wrote its results with the cells at the
    bundle's length, the setting silently ignored; now exit 2 naming --max-len, before any output."""
    bundle_and_cells(tmp_path, vocab)
    for mode in ("knn", "none"):
        out = tmp_path / f"cls_{mode}"
        model = ["--model", tmp_path / "bundle"] if mode != "none" else ["--baselines"]
        args = ["classify", tmp_path / "in.h5ad", *model, "--label", "kind", "--mode", mode,
                "--set", "finetune.max_len=256", "--device", "cpu", "--out", out]
        assert cli_exit_code(args) == 2
        err = capsys.readouterr().err
        assert "finetune.max_len=256" in err and "--max-len" in err and "Traceback" not in err
        assert not out.exists()
