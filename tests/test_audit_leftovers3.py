"""Leftovers of earlier audits: fine-tuning's scratch folder after kill -9, Ctrl-C while the CLI is
still importing, a rerun perturb-merge, and histogram counters near their width."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# -- Ctrl-C while Python is still importing the command line -------------------------------------------
# The console script (`mixgf = "mixgeneformer.cli:main"`) imports mixgeneformer.cli outside any guard,
# and that import pulled in numpy, pandas, typer and every command module: a Ctrl-C during it printed a
# KeyboardInterrupt traceback. A Ctrl-C during a command's own imports (torch) said "interrupted".
_INTERRUPT_ON_IMPORT = """
import sys

class InterruptOn:  # a deterministic Ctrl-C: the moment MODULE is first imported
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, InterruptOn())
sys.argv = ["mixgf", *{argv!r}]
{launch}
"""
_LAUNCH = {
    # what the installed console script runs: its entry point, resolved by name
    "console script": "from importlib.metadata import entry_points\n"
                      "sys.exit(entry_points(group='console_scripts')['mixgf'].load()())",
    "python -m": "import runpy\nrunpy.run_module('mixgeneformer', run_name='__main__', alter_sys=True)",
}


@pytest.mark.parametrize(("module", "launch"), [("typer", "console script"), ("pandas", "python -m"), ("torch", "console script")])
def test_ctrl_c_while_importing_exits_130_with_one_line(tmp_path, module, launch):
    argv = ["embed", str(tmp_path / "cells.h5ad"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.h5ad")]
    script = _INTERRUPT_ON_IMPORT.format(module=module, argv=argv, launch=_LAUNCH[launch])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted\n"  # the line an interrupted command prints; no traceback
    assert not list(tmp_path.iterdir())


def test_cli_module_stays_light_and_keeps_app_and_main():
    code = ("import sys, mixgeneformer.cli as cli\n"
            "print(sorted(m for m in ('typer', 'pandas', 'numpy', 'torch') if m in sys.modules))\n"
            "print(type(cli.app).__name__, cli.state['debug'], callable(cli.main))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "Typer False True"]
