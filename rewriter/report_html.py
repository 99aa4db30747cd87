"""report.html: one self-contained page (inline SVG, no scripts, no network) that shows at a glance what was done
to the model and what it cost: size/MACs/params and fidelity before and after each pass, the budget's sensitivity
curves and chosen cuts, every output's per-channel cosine, the per-layer table and the measured latencies."""

from __future__ import annotations

import html
from collections.abc import Sequence

BAR_W, CHART_H, PAD = 26, 180, 40
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.bad{color:#b00;font-weight:bold}
.chart{margin:8px 0 16px}.note{color:#666}
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _bars(title: str, labels: Sequence[str], values: Sequence[float], fmt: str = "{:.3g}",
          low: float = 0.0, high: float | None = None, warn_below: float | None = None) -> str:
    """A vertical bar chart as inline SVG (one bar per label)."""
    high = max([*values, low + 1e-12]) if high is None else high
    width = max(300, PAD + BAR_W * max(len(values), 1) + 20)  # wide enough for the title
    parts = [f'<svg class="chart" width="{width}" height="{CHART_H + 70}" role="img" aria-label="{_esc(title)}" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<text x="4" y="14" font-size="13" font-weight="bold">{_esc(title)}</text>',
             f'<line x1="{PAD}" y1="{CHART_H + 20}" x2="{width - 10}" y2="{CHART_H + 20}" stroke="#999"/>']
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        share = 0.0 if high <= low else max(0.0, min(1.0, (value - low) / (high - low)))
        h = max(1.0, share * CHART_H)
        x = PAD + i * BAR_W
        colour = "#c0392b" if warn_below is not None and value < warn_below else "#2e86c1"
        parts.append(f'<rect x="{x + 3}" y="{CHART_H + 20 - h:.1f}" width="{BAR_W - 6}" height="{h:.1f}" '
                     f'fill="{colour}"><title>{_esc(label)}: {_esc(fmt.format(value))}</title></rect>')
        if len(values) <= 40:
            parts.append(f'<text x="{x + BAR_W / 2}" y="{CHART_H + 34}" font-size="9" text-anchor="end" '
                         f'transform="rotate(-45 {x + BAR_W / 2} {CHART_H + 34})">{_esc(label[-14:])}</text>')
    parts.append(f'<text x="2" y="{CHART_H + 24}" font-size="10">{_esc(fmt.format(low))}</text>'
                 f'<text x="2" y="30" font-size="10">{_esc(fmt.format(high))}</text></svg>')
    return "".join(parts)


def _curves(title: str, series: Sequence[tuple[str, Sequence[tuple[float, float]], tuple[float, float] | None]],
            x_label: str, y_label: str) -> str:
    """Lines through (x, y) points, one per series, from (0, 0); a series' chosen point is ringed in red."""
    xs = [x for _, pts, _ in series for x, _ in pts] or [1.0]
    ys = [y for _, pts, _ in series for _, y in pts] or [1.0]
    x_high, y_high = max(max(xs), 1e-12), max(max(ys), 1e-12)
    width, height = 560, CHART_H

    def at(x: float, y: float) -> str:
        return f"{PAD + x / x_high * (width - PAD - 20):.1f},{20 + height - min(y / y_high, 1.0) * height:.1f}"

    parts = [f'<svg class="chart" width="{width}" height="{height + 60}" role="img" aria-label="{_esc(title)}" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<text x="4" y="14" font-size="13" font-weight="bold">{_esc(title)}</text>',
             f'<line x1="{PAD}" y1="{height + 20}" x2="{width - 10}" y2="{height + 20}" stroke="#999"/>',
             f'<line x1="{PAD}" y1="20" x2="{PAD}" y2="{height + 20}" stroke="#999"/>']
    for label, points, chosen in series:
        line = " ".join(at(x, y) for x, y in [(0.0, 0.0), *points])
        parts.append(f'<polyline points="{line}" fill="none" stroke="#2e86c1" stroke-width="2">'
                     f'<title>{_esc(label)}</title></polyline>')
        if chosen is not None:
            cx, cy = at(*chosen).split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="5" fill="none" stroke="#c0392b" stroke-width="2">'
                         f'<title>{_esc(label)}: chosen</title></circle>')
    parts.append(f'<text x="{width - 10}" y="{height + 36}" font-size="10" text-anchor="end">{_esc(x_label)} '
                 f'(0 – {x_high:.3g})</text><text x="2" y="30" font-size="10">{_esc(f"{y_high:.3g}")}</text>'
                 f'<text x="2" y="{height + 50}" font-size="10">{_esc(y_label)}</text></svg>')
    return "".join(parts)


def _budget(report: dict) -> str:
    budget = report.get("budget")
    if not budget:
        return ""
    head = ("<h2>Budget</h2><p>" + ", ".join(f"{_esc(k)} ≤ {v} of the input: reached {budget['achieved'][k]:.3f}"
                                             for k, v in budget["targets"].items())
            + f" ({'met' if budget['met'] else '<span class=bad>not met</span>'}; {_esc(budget['method'])})")
    if budget["method"] != "sensitivity":
        return head + "; one uniform setting per pass (no calibration data to measure sensitivity)</p>"
    parts = [head + f"; {budget['rounds']} round(s), estimated drop {budget['estimated_drop']:.4f}. Each line is "
             "one channel group or layer cut alone at the pass's levels, measured on the held-out samples; "
             "the ringed points are the cuts chosen.</p>"]
    rows = []
    for name, curve in budget["sensitivity"].items():
        base, chosen = curve["base"], budget["allocation"].get(name, {})
        series = []
        for unit, points in curve["units"].items():
            pts = [(1 - p["macs"] / max(base["macs"], 1), p["drop"]) for p in points if "error" not in p]
            pick = next((xy for p, xy in zip([p for p in points if "error" not in p], pts, strict=True)
                         if p["level"] == chosen.get(unit)), None)
            series.append((unit, pts, pick))
            if pick is not None:
                rows.append([_esc(name), _esc(unit), _esc(chosen[unit]), f"{pick[0]:.3f}", f"{pick[1]:.4f}"])
        parts.append(_curves(f"{name}: drop against MACs saved, per unit ({len(series)} units"
                             + (", from the cache)" if curve["cached"] else ")"), series,
                             "share of MACs saved", "drop"))
    parts.append(_table(["pass", "unit", "setting", "MACs saved (alone)", "drop (alone)"], rows))
    return "".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fid(fid: dict | None, key: str) -> str:
    return "–" if not fid or key not in fid else f"{fid[key]:.4f}"


def _summary(report: dict) -> str:
    stages = [("input", report["input"], report.get("canonical_fidelity"))]
    stages += [(f"after {p['name']}", {"macs": p["macs_after"], "bytes": p["bytes_after"], "params": None},
                p["fidelity"]) for p in report["passes"]]
    rows = [[_esc(name), f"{s['macs']:,}", f"{s['bytes']:,}", "–" if s.get("params") is None else f"{s['params']:,}",
             _fid(f, "drop"), _fid(f, "channel_cosine_min"), _fid(f, "top1_agreement"), _fid(f, "cosine")]
            for name, s, f in stages]
    base = report["input"]
    charts = _bars("MACs (share of the input)", [n for n, _, _ in stages],
                   [s["macs"] / max(base["macs"], 1) for _, s, _ in stages], "{:.2f}", 0, 1)
    charts += _bars("file bytes (share of the input)", [n for n, _, _ in stages],
                    [s["bytes"] / max(base["bytes"], 1) for _, s, _ in stages], "{:.2f}", 0, 1)
    table = _table(["stage", "MACs", "bytes", "params", "drop", "worst channel cos", "top-1 agree", "cosine"], rows)
    return f"<h2>Size, MACs and fidelity, pass by pass</h2>{charts}{table}"


def _retries(report: dict) -> str:
    """The milder settings a pass was run again with, when it lost more than the fidelity target."""
    retried = [p for p in report["passes"] if p.get("tried")]
    if not retried:
        return ""
    rows = []
    for record in retried:
        kept = {k: record["options"][k] for k in record["tried"][0]["options"]}
        rows += [[_esc(record["name"]), _esc(", ".join(f"{k}={v}" for k, v in t["options"].items())),
                  f"{t['drop']:.4f}", f"{t['macs_after']:,}", f"{t['bytes_after']:,}", f"{t['seconds']:.1f}",
                  "kept" if t["options"] == kept else ""] for t in record["tried"]]
    target = retried[0]["fidelity_target"]
    return (f"<h2>Settings tried (fidelity target: drop ≤ {target})</h2>"
            + _table(["pass", "settings", "drop", "MACs", "bytes", "seconds", ""], rows))


def _outputs(report: dict) -> str:
    fid = report.get("fidelity")
    if not fid:
        return "<h2>Fidelity</h2><p class='note'>not measured: no calibration data was given</p>"
    parts = ["<h2>Each output, channel by channel (held-out samples)</h2>"]
    for name, figures in fid["outputs"].items():
        layout = figures["layout"]
        cosines = figures.get("channel_cosines") or []
        parts.append(f"<p><b>{_esc(name)}</b>: read along axis {_esc(layout['feature_axis'])} "
                     f"({_esc(layout['why'])}); drop {figures['drop']:.4f}, sample cosine {figures['cosine']:.4f}"
                     + (f", top-1 agreement {figures['top1_agreement']:.4f}" if "top1_agreement" in figures else "")
                     + (f", reading (greedy CTC) {figures['reading_error']:.4f} of its characters edited, "
                        f"{figures['readings_same']:.0%} of the samples read the same"
                        if "reading_error" in figures else "")
                     + "</p>")
        if cosines:
            low = min(0.0, min(cosines))
            parts.append(_bars(f"{name}: cosine per channel", [str(i) for i in range(len(cosines))], cosines,
                               "{:.3f}", low, 1.0, warn_below=0.9))
    return "".join(parts)


def _layers(report: dict) -> str:
    layers = report.get("layers")
    if not layers:
        return ""
    rows = [[_esc(r["name"]), _esc(r["op"]), "x".join(map(str, r["output"] or [])), f"{r['params']:,}",
             f"{r['macs']:,}", _esc(r["group"])] for r in layers]
    top = sorted(layers, key=lambda r: -r["macs"])[:40]
    chart = _bars("MACs of the largest layers (rewritten model)", [r["name"] for r in top],
                  [float(r["macs"]) for r in top], "{:.3g}")
    return f"<h2>Layers of the rewritten model</h2>{chart}" + _table(
        ["layer", "op", "output", "params", "MACs", "channel group"], rows)


def _latency(report: dict) -> str:
    bench = report.get("bench")
    if not bench:
        return "<h2>Latency</h2><p class='note'>not measured (run with --bench)</p>"
    ort = bench["onnxruntime_ms"]
    labels, values = ["onnxruntime, input", "onnxruntime, output"], [ort["input"], ort["output"]]
    if bench.get("artifact_ms") is not None:
        labels.append(f"{report['target']['name']} artifact")
        values.append(bench["artifact_ms"])
    chart = _bars(f"latency, ms ({bench['threads']} threads, feed {bench['feed']})", labels, values, "{:.3f}")
    return f"<h2>Latency</h2>{chart}"


def render(report: dict) -> str:
    """The whole page for a finished report dict."""
    title = f"rewrite: {report['input'].get('path') or 'model'}"
    passes = ", ".join(p["name"] for p in report["passes"]) or "none (canonicalised only)"
    head = (f"<h1>{_esc(title)}</h1><p>passes: <b>{_esc(passes)}</b>; target: <b>{_esc(report['target']['name'])}"
            f"</b>; MACs ×{report['output']['macs'] / max(report['input']['macs'], 1):.3f}, file bytes "
            f"×{report['output']['bytes'] / max(report['input']['bytes'], 1):.3f}</p>")
    sections = (_summary, _retries, _budget, _outputs, _latency, _layers)
    body = head + "".join(section(report) for section in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")
