"""The code stays ruff-clean (the project's conventions)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    done = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
