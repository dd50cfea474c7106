"""Test-wide settings: offline, every cache in a temporary folder, paths to the shared real data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Set before anything imports transformers / datasets / matplotlib / torch inductor (RELIABILITY 20-21).
_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="mixgf-test-cache-"))
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
for _var, _sub in {
    "HF_HOME": "hf",
    "HF_DATASETS_CACHE": "hf/datasets",
    "TRANSFORMERS_CACHE": "hf/transformers",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "MPLCONFIGDIR": "matplotlib",
    "NUMBA_CACHE_DIR": "numba",
    "XDG_CACHE_HOME": "xdg",
}.items():
    os.environ[_var] = str(_CACHE_ROOT / _sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["WANDB_DISABLED"] = "true"
os.environ.setdefault("MPLBACKEND", "Agg")

from collections import Counter  # noqa: E402
from importlib import resources  # noqa: E402

import pytest  # noqa: E402

# Full public data (Geneformer V1 dictionaries, full Baron files): ../shared/data beside the checkout
# (CI), or the folder named by MIXGF_SHARED_DATA. Most real-data tests use the Baron subset shipped
# with the package instead, so they run in every clone.
SHARED_DATA = Path(os.environ.get("MIXGF_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
DEMO_DATA = Path(str(resources.files("mixgeneformer") / "data" / "demo"))
SHARED_DATA_SKIP = "needs the full data folder ../shared/data (Geneformer V1 dictionaries), absent here"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full public data folder; tests using it are skipped (and counted at the end) where it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA_SKIP}: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def baron_data() -> Path:
    """Real Baron et al. 2016 pancreas cells (human + mouse h5ad): the subset shipped in data/demo."""
    return DEMO_DATA


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say at the end how many tests were skipped and why (a skip must never pass unnoticed)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: Counter[str] = Counter()
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    terminalreporter.section("skipped tests")
    terminalreporter.line(f"{len(skipped)} test(s) skipped:")
    for reason, count in reasons.most_common():
        terminalreporter.line(f"  {count} x {reason}")
