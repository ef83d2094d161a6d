"""The tree passes `ruff check` with the settings in pyproject.toml ([tool.ruff]): a long line, an unused import or
an import block out of order fails here, with ruff's own file:line list, instead of in review."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

PATHS = ["src", "tests", "benchmarks"]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed: it comes with the test extra (pip install -e '.[test]')")
def test_the_tree_passes_ruff_check():
    # --no-cache: a test leaves no .ruff_cache folder in the working tree
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *PATHS],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"ruff check {' '.join(PATHS)} found:\n{done.stdout}{done.stderr}"
