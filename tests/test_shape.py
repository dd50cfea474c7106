"""The package keeps its shape: short modules, no import cycles, imports that point one way.

A ratchet: the redesign cut the package into stages; these tests fail when a module grows past
500 lines, when two modules import each other (directly or around a loop), when a stage imports a
later stage or a sibling user API, when a function grows past 60 lines with no reason written
beside it, or when more public signatures fall back to ``Any``. Measured by
scripts/shape_report.py (ast only: nothing is imported).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "mixgeneformer"

# The stages, lowest first. A module may import modules of earlier stages only; modules in one
# stage are siblings and may not import each other (user APIs share code through lower stages).
# A subpackage (plots/, classify/, perturb/, demo/, cli/) is one stage: its modules import each other freely
# (cycles still fail).
STAGES: list[tuple[str, ...]] = [
    ("__init__",),  # __version__ only
    ("errors", "filekinds"),  # filekinds: the stamp in each kind of file this package writes
    ("locks",),  # one writer per output (re-exported by fileio)
    ("fileio",),
    ("pickles",),  # Geneformer's dictionary pickles, read without running code
    ("jit",),  # numba kernels, cached on disk where a cache folder is writable
    ("config",),
    ("plots",),  # figures: errors and fileio only
    ("genes",),
    ("simulate",),  # planted-truth data over the shipped gene tables
    ("readers",),
    ("parallel",),
    ("devices",),  # the device a user names, its bf16 support, autocast and attention kernels
    ("medians",),
    ("vocab",),
    ("corpus",),
    ("tokenize",),
    ("losses",),  # pure torch
    ("cell_bank",),  # the cross-species pairing's queue of earlier cells (torch only)
    ("model_config",),  # MixGeneformerConfig, presets, validation (transformers' BertConfig only)
    ("model",),
    ("bundle",),
    ("inference",),
    ("sharding",),  # shard plan, shard files, barrier, merge of sharded embed / predict runs
    ("seeds",),  # masking seeds hashed from (run seed, epoch, tokens): shared by collator and sampling
    # the pieces the pretraining Trainer and run assemble: masking, data order, checkpoint folders,
    # FLOPs / MFU, the metrics.csv, the run's typed configuration
    ("collator", "sampling", "checkpoints", "flops", "metrics_csv", "pretrain_config"),
    # held-out masked-gene diagnostics and their frequency baselines; the checks that a resumed run
    # continues its checkpoint's run (settings, training cells, processes)
    ("diagnostics", "resume"),
    # stop signals of pretraining (handler + Trainer callback); TrainingArguments for one device per process
    ("stopping", "training_args"),
    ("fsdp",),  # FSDP2 sharding of the tied BERT-MLM model, gathered weights (torch, accelerate)
    ("trainer",),  # the Trainer subclass and callbacks of pretraining
    ("pretrain", "embed", "classify", "perturb"),  # the user APIs
    ("integration",),  # species mixing and cross-species transfer scores (on classify)
    ("demo",),
    ("cli",),
    ("__main__",),
]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
REASON_MARK = "# long:"  # a function over MAX_FUNCTION_LINES says why on its def line or the line above
# Public functions / methods whose annotations hold Any (dict[str, Any] aside); only ever lower it.
# The one left: collator.species_codes reads heterogeneous corpus rows (Mapping[str, Any]).
MAX_ANY_SIGNATURES = 1


def _shape():
    spec = importlib.util.spec_from_file_location("shape_report", ROOT / "scripts" / "shape_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["shape_report"] = module
    spec.loader.exec_module(module)
    return module.measure(PACKAGE_DIR)


SHAPE = _shape()


def _stage_of(module: str) -> int:
    top = module.split(".")[0]
    for rank, names in enumerate(STAGES):
        if top in names:
            return rank
    raise AssertionError(f"module {module!r} has no stage in tests/test_shape.py STAGES: add it there")


def test_every_module_has_a_stage():
    for module in SHAPE.file_lines:
        _stage_of(module)


@pytest.mark.parametrize("module", sorted(SHAPE.file_lines))
def test_module_is_short(module):
    assert SHAPE.file_lines[module] <= MAX_MODULE_LINES, (
        f"{module} has {SHAPE.file_lines[module]} lines (> {MAX_MODULE_LINES}): split it by idea"
    )


def test_no_import_cycles():
    assert SHAPE.cycles() == []


def test_imports_point_down_the_stages():
    wrong = []
    for module, targets in SHAPE.imports.items():
        for target in targets:
            if module.split(".")[0] == target.split(".")[0] and "." in module + target:
                continue  # inside one subpackage
            if _stage_of(target) >= _stage_of(module):
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports against the stage order (or between siblings): " + ", ".join(sorted(wrong))


def test_long_functions_say_why():
    unexplained = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if n > MAX_FUNCTION_LINES and not any(REASON_MARK in line for line in lines[first - 2 : node.lineno]):
                unexplained.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} {node.name} ({n} lines)")
    assert unexplained == [], "functions over 60 lines without a '# long:' reason: " + ", ".join(unexplained)


def test_public_signatures_do_not_gain_any():
    found = SHAPE.any_in_public_signatures
    assert len(found) <= MAX_ANY_SIGNATURES, (
        f"{len(found)} public signatures use Any (at most {MAX_ANY_SIGNATURES}): {', '.join(found)}. "
        "Annotate the real type (a TYPE_CHECKING import avoids a run-time dependency)."
    )
