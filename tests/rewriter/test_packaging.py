"""The built-in passes and targets cannot be shadowed, and user passes add to them instead of hiding them."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import CALIB, SAMPLES

HOSTILE = "raise SystemExit('hostile {} module imported')\n"


def _rewrite(tmp_path, cwd, env_extra):
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, "-m", "rewriter.cli", str(SAMPLES / "digits_mlp.onnx"), "--passes", "svd",
           "--calib", str(CALIB), "--target", "none", "-o", str(tmp_path / "out"), "--quiet"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_hostile_modules_in_cwd_and_pythonpath_change_nothing(tmp_path):
    evil = tmp_path / "evil"
    (evil / "passes").mkdir(parents=True)
    (evil / "passes" / "__init__.py").write_text(HOSTILE.format("passes package"))
    (evil / "targets.py").write_text(HOSTILE.format("targets"))
    (evil / "passes.py").write_text(HOSTILE.format("passes"))
    done = _rewrite(tmp_path, evil, {"PYTHONPATH": str(evil)})
    assert done.returncode == 0, done.stderr
    assert "hostile" not in done.stderr
    assert (tmp_path / "out" / "model.onnx").exists()


def test_user_pass_does_not_hide_the_builtins():
    code = (
        "from rewriter.registry import register_pass, available_passes\n"
        "@register_pass('mine')\n"
        "class Mine:\n"
        "    def run(self, model, ctx): ...\n"
        "names = available_passes()\n"
        "assert 'svd' in names and 'mine' in names, names\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_third_party_pass_registers_through_the_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "myplugin-0.1.dist-info").mkdir(parents=True)
    (site / "myplugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (site / "myplugin-0.1.dist-info" / "entry_points.txt").write_text("[rewriter.passes]\nmine = myplugin\n")
    (site / "myplugin.py").write_text(
        "from rewriter.registry import register_pass\n"
        "@register_pass('mine')\n"
        "class Mine:\n"
        "    def run(self, model, ctx): ...\n")
    code = "from rewriter.registry import available_passes; print(','.join(available_passes()))"
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    names = done.stdout.strip().split(",")
    assert "mine" in names and "svd" in names
