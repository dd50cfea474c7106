"""The CLI turns user errors into one message and exit code 2 (RELIABILITY: every failure)."""

from __future__ import annotations

import subprocess
import sys


def _mixgf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixgeneformer", *args], capture_output=True, text=True, timeout=300)


def test_user_error_exits_2_without_traceback(tmp_path):
    result = _mixgf("vocab", "build", "--out", str(tmp_path / "v.json"), "--mode", "bogus")
    assert result.returncode == 2
    assert "vocabulary mode must be 'separate' or 'ortholog'" in result.stderr
    assert "Traceback" not in result.stderr
    debug = _mixgf("--debug", "vocab", "build", "--out", str(tmp_path / "v.json"), "--mode", "bogus")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_vocab_build_and_info(tmp_path):
    out = tmp_path / "v.json"
    assert _mixgf("vocab", "build", "--out", str(out), "--species", "mouse").returncode == 0
    info = _mixgf("vocab", "info", str(out))
    assert info.returncode == 0 and "mouse-only tokens: 21,807" in info.stdout
