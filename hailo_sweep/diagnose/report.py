"""One self-contained HTML diagnosis report: findings first, then the explanation, the numbers and the plots.

Self-contained means it opens offline and from any place it is copied to (an MLflow artifact, an e-mail): inline CSS,
plots embedded as base64 PNG ``data:`` URIs, no script, no link or image that points anywhere else. Every text that
comes from data (names, messages, settings) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html as _html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from hailo_sweep.atomic import atomic_write_text
from hailo_sweep.backends.base import LayerNoise
from hailo_sweep.diagnose import plots
from hailo_sweep.diagnose.findings import Finding
from hailo_sweep.diagnose.ladder import STAGE_LABELS, STEP_LABELS, STEPS, explain, ladder_steps

REPORT_STAGES = ("fp_optimized", "emulated", "bit_exact", "device")
METRIC_ORDER = (
    "nmae",
    "snr_db",
    "cosine",
    "mae",
    "max_abs",
    "rmse",
    "top1_agreement",
    "softmax_mae",
    "accuracy",
    "accuracy_ref",
    "accuracy_drop",
    "softmax_label_mae",
)
AGREEMENT_ORDER = ("lsb_max", "lsb_p99", "lsb_mean", "identical_share")
NOISE_TABLE_ROWS = 10

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
table.noise td:nth-child(2), table.noise th:nth-child(2) { text-align: left; font-family: ui-monospace, monospace; }
.finding { border-left: 5px solid #999; background: #fafafa; padding: 0.5em 1em; margin: 0.8em 0; }
.finding.error { border-color: #c62828; }
.finding.warning { border-color: #ef8f00; }
.finding.info { border-color: #1565c0; }
.badge { display: inline-block; font-size: 0.75em; font-weight: bold; text-transform: uppercase; padding: 0.1em 0.5em;
         border-radius: 3px; color: #fff; background: #777; margin-right: 0.5em; }
.badge.error { background: #c62828; } .badge.warning { background: #ef8f00; } .badge.info { background: #1565c0; }
.code { font-family: ui-monospace, monospace; font-size: 0.85em; color: #555; }
.fix { margin-top: 0.3em; }
.clean { color: #2e7d32; font-weight: bold; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
ul.explain li { margin: 0.3em 0; }
"""


def _e(value: object) -> str:
    return _html.escape(str(value), quote=True)


def _num(value: float) -> str:
    """Compact number: 4 significant digits, scientific only for very large or very small magnitudes."""
    if isinstance(value, float) and not math.isfinite(value):
        return _e(value)
    v = float(value)
    if v != 0.0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    """An HTML table; header cells are escaped here, row cells must already be HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    attr = f' class="{_e(css_class)}"' if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _findings_section(findings: Sequence[Finding]) -> str:
    if not findings:
        return '<p class="clean">No findings: none of the checks found a mistake.</p>'
    order = {"error": 0, "warning": 1, "info": 2}
    parts = []
    for f in sorted(findings, key=lambda f: order.get(f.severity, 3)):
        output = f' <span class="code">output {_e(f.output)}</span>' if f.output else ""
        parts.append(
            f'<div class="finding {_e(f.severity)}">'
            f'<h3><span class="badge {_e(f.severity)}">{_e(f.severity)}</span>{_e(f.title)}</h3>'
            f'<div class="code">{_e(f.code)}</div>{output}'
            f"<p>{_e(f.message)}</p>"
            f'<p class="fix"><strong>Fix:</strong> {_e(f.fix)}</p></div>'
        )
    return "\n".join(parts)


def _metrics_tables(metrics: Mapping[str, float], outputs: Sequence[str]) -> str:
    parts = []
    for output in outputs:
        stages = [s for s in REPORT_STAGES if any(f"{s}.{output}.{m}" in metrics for m in METRIC_ORDER)]
        columns = [m for m in METRIC_ORDER if any(f"{s}.{output}.{m}" in metrics for s in stages)]
        if not stages:
            continue
        rows = [
            [_e(STAGE_LABELS[s])] + [_num(metrics[f"{s}.{output}.{m}"]) if f"{s}.{output}.{m}" in metrics else "" for m in columns]
            for s in stages
        ]
        parts.append(f"<h3>{_e(output)}</h3>" + _table(["stage", *columns], rows))
    return "\n".join(parts) or "<p>No stage metrics were recorded.</p>"


def _ladder_table(metrics: Mapping[str, float], outputs: Sequence[str]) -> str:
    steps = ladder_steps(metrics, outputs)
    names = [s for s, _, _ in STEPS if any(f"ladder.{o}.{s}_cost" in steps for o in outputs)]
    if not names:
        return ""
    rows = [[_e(o)] + [_num(steps[f"ladder.{o}.{s}_cost"]) if f"ladder.{o}.{s}_cost" in steps else "" for s in names] for o in outputs]
    return _table(["output (nmae added)", *[STEP_LABELS[s] for s in names]], rows)


def _agreement_table(metrics: Mapping[str, float], outputs: Sequence[str]) -> str:
    present = [o for o in outputs if any(f"agreement.{o}.{m}" in metrics for m in AGREEMENT_ORDER)]
    if not present:
        return "<p>The device was not compared with the emulation in this run.</p>"
    rows = []
    for o in present:
        cells = []
        for m in AGREEMENT_ORDER:
            value = metrics.get(f"agreement.{o}.{m}")
            cells.append("" if value is None else (f"{value:.2%}" if m == "identical_share" else _num(value)))
        rows.append([_e(o), *cells])
    return _table(["output", "max |LSB|", "p99 |LSB|", "mean |LSB|", "bit-identical"], rows)


def _noise_table(noise: Sequence[LayerNoise]) -> str:
    ranked = sorted(noise, key=lambda n: (n.snr_db, n.layer))[:NOISE_TABLE_ROWS]
    rows = [[str(i), _e(n.layer), _e(n.kind), _num(n.snr_db)] for i, n in enumerate(ranked, 1)]
    return _table(["rank", "layer", "kind", "SNR (dB)"], rows, css_class="noise")


def render_report(
    *,
    title: str,
    settings: Mapping[str, object],
    metrics: Mapping[str, float],
    outputs: Sequence[str],
    findings: Sequence[Finding],
    lsb_histograms: Mapping[str, Mapping[int, int]],
    layer_noise: Sequence[LayerNoise],
    notes: Sequence[str] = (),
    work_dir: Path,
) -> str:
    """The report's HTML. Plots are drawn as PNG files under ``work_dir`` and embedded; nothing else is read."""
    work_dir = Path(work_dir)
    sections = [f"<h1>{_e(title)}</h1>", "<h2>Findings</h2>", _findings_section(findings)]

    sentences = explain(metrics, outputs)
    ladder_png = plots.ladder_plot(metrics, outputs, work_dir / "ladder.png")
    sections += [
        "<h2>Where the error comes from</h2>",
        '<ul class="explain">' + "".join(f"<li>{_e(s)}</li>" for s in sentences) + "</ul>",
        _image(ladder_png, "error ladder"),
        _ladder_table(metrics, outputs),
        "<h2>Error of each stage against the float model</h2>",
        _metrics_tables(metrics, outputs),
    ]

    sections += ["<h2>Device vs emulation</h2>", _agreement_table(metrics, outputs)]
    if lsb_histograms:
        sections.append(_image(plots.lsb_histogram_plot(lsb_histograms, work_dir / "lsb_histograms.png"), "LSB histograms"))

    sections.append("<h2>Per-layer noise</h2>")
    if layer_noise:
        worst = sorted(layer_noise, key=lambda n: (n.snr_db, n.layer))[:3]
        named = ", ".join(f"{n.layer} ({n.snr_db:.1f} dB)" for n in worst)
        sections += [
            f"<p>The layers that lose most precision: {_e(named)}. They are the first candidates for 16-bit.</p>",
            _noise_table(layer_noise),
            _image(plots.layer_noise_plot(layer_noise, work_dir / "layer_noise.png"), "per-layer noise"),
        ]
    else:
        sections.append("<p>No per-layer noise analysis in this run.</p>")

    if notes:
        sections += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"]
    settings_rows = [[_e(k), _e(v)] for k, v in settings.items()]
    sections += ["<h2>Settings</h2>", _table(["setting", "value"], settings_rows)]

    body = "\n".join(s for s in sections if s)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(path: Path, html: str) -> Path:
    """Write the report atomically (a crash never leaves half a report under the final name)."""
    return atomic_write_text(Path(path), html)
