"""Package-wide safety rules (RELIABILITY 13, 20-22)."""

from __future__ import annotations

import re
from pathlib import Path

import mixgeneformer

PACKAGE = Path(mixgeneformer.__file__).parent


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_unsafe_pickle_or_torch_load_in_the_package():
    offenders = []
    for path, text in _sources():
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bcloudpickle\.|\bdill\.load|\bjoblib\.load\(", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "unsafe deserialisation:\n" + "\n".join(offenders)


def test_only_the_restricted_unpickler_touches_pickle():
    users = [p.name for p, text in _sources() if re.search(r"^\s*import pickle|^\s*from pickle", text, re.M)]
    assert users == ["pickles.py"]


def test_nothing_downloads_at_run_time():
    pattern = re.compile(r"urllib\.request|requests\.get|hf_hub_download|snapshot_download|http[s]?://(?!git-lfs\.github\.com/spec)")
    offenders = [p.name for p, text in _sources() if pattern.search(text)]
    assert not offenders, f"network access in {offenders}"
