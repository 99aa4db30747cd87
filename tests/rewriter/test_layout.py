"""The core knows passes and targets only by name: no static imports of them in rewriter/."""

from __future__ import annotations

import ast

from rewriter.registry import available_passes
from tests.helpers import REPO


def test_core_imports_no_pass_or_target_module():
    for path in (REPO / "rewriter").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"passes", "targets", "tvm"}, f"{path.name} imports {name}"


def test_every_pass_file_registers_its_own_name():
    files = sorted(p.stem for p in (REPO / "passes").glob("*.py") if not p.stem.startswith("_"))
    assert available_passes() == files
