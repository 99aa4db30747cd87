"""report.html: self-contained, and its plots are really drawn (headless Chromium screenshot)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from rewriter import rewrite
from tests.helpers import CALIB, SAMPLES

BAR = (0x2E, 0x86, 0xC1)  # the charts' bar colour


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REWRITER_CACHE", str(out.parent / "cache"))
        result = rewrite(SAMPLES / "digits_mlp.onnx", passes=["svd"], calib=CALIB, out_dir=out,
                         budget={"params": 0.6})
    return result.artifacts["html"]


def test_report_html_is_self_contained_with_every_section(page):
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text) and "<script" not in text
    for section in ("pass by pass", "Budget", "channel by channel", "Latency", "Layers of the rewritten model"):
        assert section in text
    assert text.count("<svg") >= 5 and text.count("<rect") >= 10
    assert text.count("<polyline") == 2 and text.count("<circle") >= 1  # a curve per hidden layer, chosen cuts


def test_report_html_plots_render_in_a_browser(page, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    from PIL import Image

    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1800", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    bars = np.all(np.abs(pixels - BAR) <= 6, axis=1).mean()
    ink = (pixels.sum(axis=1) < 600).mean()
    assert bars > 0.01, f"plots not drawn: {bars:.4f} of the page in bar colour"
    assert ink > 0.002, "no text on the page"


def test_report_html_lists_the_settings_a_pass_was_retried_with():
    from rewriter.report_html import render
    from tests.helpers import conv1d_model, smooth_signals

    report = rewrite(conv1d_model(), passes=["binary"], calib={"x": smooth_signals(96)}).report
    text = render(report)
    assert "Settings tried (fidelity target: drop ≤ 0.05)" in text
    for tried in report["passes"][0]["tried"]:
        assert f"bases={tried['options']['bases']}" in text and f"{tried['drop']:.4f}" in text
    assert text.count(">kept<") == 1
