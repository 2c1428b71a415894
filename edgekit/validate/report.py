"""The files ``edgekit validate`` writes: ``validate.json`` and a self-contained ``validate.html``.

The HTML is one file with no external resource (it is opened on laptops after being copied off
a device): inline CSS, and the TTFT / TPOT histograms as inline SVG drawn here (no plotting
library: a device needs nothing more than edgekit's runtime to write its report). Every
string from the report is HTML-escaped.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from edgekit.yamlio import atomic_write_json, atomic_write_text

JSON_NAME = "validate.json"
HTML_NAME = "validate.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#106b21;font-weight:600} .fail{color:#b00020;font-weight:600}
.verdict{display:inline-block;padding:.2em .8em;border-radius:.3em;color:#fff;font-weight:700}
.verdict.pass{background:#1e7d32;color:#fff} .verdict.fail{background:#b00020;color:#fff}
.warning{border:2px solid #c77700;background:#fff4e0;padding:.8em 1em;margin:1em 0;border-radius:.3em}
.note{color:#555;font-size:.9em} .hist{display:flex;flex-wrap:wrap;gap:1em}
.hist svg{max-width:100%;height:auto;border:1px solid #eee}
code{background:#f5f5f5;padding:0 .2em}
"""


class _Raw(str):
    """Markup built here (never report data): inserted into a cell unescaped."""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            raw = cell if isinstance(cell, _Raw) else _fmt(cell)
            cells.append(f'<td class="num">{raw}</td>' if i in numeric else f"<td>{raw}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _nice_step(span: float, target: int = 5) -> float:
    """A 1/2/5 x 10^k tick step giving about ``target`` ticks over ``span``."""
    raw = span / target
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= step * factor:
            return step * factor
    return step * 10


def histogram_svg(values_ms: list[float], *, element_id: str, title: str, summary: dict[str, Any] | None,
                  budget: float | None) -> str | None:
    """An inline SVG histogram of ``values_ms`` (bins: 2 * sqrt(n), 5 to 60) with p50 (dotted),
    p90 (dashed), p99 (solid) and the budget (red, when it lies within one data span of the
    data; else named in a corner) as vertical lines. Each bar carries ``data-count``. None
    without values."""
    if not values_ms:
        return None
    width, height, left, right, top, bottom = 780, 300, 56, 200, 30, 42  # the legend sits in the right margin
    low, high = min(values_ms), max(values_ms)
    span = high - low
    budget_in_view = budget is not None and low - max(span, 1e-9) <= budget <= high + max(span, 1e-9)
    x_low, x_high = low, high
    if budget_in_view:
        x_low, x_high = min(x_low, budget), max(x_high, budget)
    if x_high - x_low <= 0:
        pad = max(abs(x_low) * 0.05, 1e-3)
        x_low, x_high = x_low - pad, x_high + pad
    if high > low:
        bins = max(5, min(60, int(2 * math.sqrt(len(values_ms)))))
        bin_low, bin_width = low, (high - low) / bins
    else:  # every value the same: one bar centred on it
        bins, bin_width = 1, (x_high - x_low) / 10
        bin_low = low - bin_width / 2
    counts = [0] * bins
    for value in values_ms:
        index = min(bins - 1, int((value - bin_low) / bin_width)) if bin_width > 0 else 0
        counts[index] += 1
    y_max = max(counts)
    y_top = y_max * 1.05
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(value: float) -> float:
        return left + (value - x_low) / (x_high - x_low) * plot_w

    def y(count: float) -> float:
        return top + plot_h - count / y_top * plot_h

    out = [f'<svg id="{escape(element_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
           f'<text x="{left + plot_w / 2:.1f}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>']
    for i, count in enumerate(counts):
        x0, x1 = x(bin_low + i * bin_width), x(bin_low + (i + 1) * bin_width)
        out.append(f'<rect class="bar" data-count="{count}" x="{x0:.2f}" y="{y(count):.2f}" width="{max(x1 - x0 - 1, 0.5):.2f}" '
                   f'height="{top + plot_h - y(count):.2f}" fill="#4c72b0"><title>{bin_low + i * bin_width:.4g}–'
                   f'{bin_low + (i + 1) * bin_width:.4g} ms: {count}</title></rect>')
    step = _nice_step(x_high - x_low)
    tick = math.ceil(x_low / step) * step
    while tick <= x_high + step * 1e-9:
        out.append(f'<line x1="{x(tick):.2f}" y1="{top + plot_h}" x2="{x(tick):.2f}" y2="{top + plot_h + 4}" stroke="#333"/>'
                   f'<text x="{x(tick):.2f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:.6g}</text>')
        tick += step
    y_step = max(1, int(_nice_step(y_max, 5)))
    for count in range(0, y_max + 1, y_step):
        out.append(f'<text x="{left - 6}" y="{y(count) + 4:.2f}" text-anchor="end">{count}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">ms</text>'
               f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2:.1f})">'
               f'count</text>')
    legend = []
    for key, dash in (("p50", "2,3"), ("p90", "6,3"), ("p99", "")):
        value = (summary or {}).get(key)
        if value is not None:
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line class="{key}" x1="{x(value):.2f}" y1="{top}" x2="{x(value):.2f}" y2="{top + plot_h}" '
                       f'stroke="#222" stroke-width="1.3"{dash_attr}/>')
            legend.append((f"{key} {value:.4g} ms", "#222", dash))
    if budget is not None:
        if budget_in_view:
            out.append(f'<line class="budget" x1="{x(budget):.2f}" y1="{top}" x2="{x(budget):.2f}" y2="{top + plot_h}" '
                       f'stroke="#b00020" stroke-width="2"/>')
            legend.append((f"budget {budget:g} ms", "#b00020", ""))
        else:
            legend.append((f"budget {budget:g} ms (off the axis)", "#b00020", None))
    for i, (label, color, dash) in enumerate(legend):
        ly = top + 12 + i * 15
        lx = left + plot_w + 14
        if dash is not None:
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 18}" y2="{ly - 4}" stroke="{color}" '
                       f'stroke-width="1.5"{dash_attr}/>')
        out.append(f'<text x="{lx + 24}" y="{ly}" fill="{color}">{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    bundle, settings, latency = report["bundle"], report["settings"], report["latency"]
    host, memory, power, predicted = report["host"], report["memory"], report["power"], report["predicted"]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>edgekit validate: {escape(bundle['name'])}"
             f"</title><style>{_CSS}</style></head><body>"]
    verdict = "pass" if report["passed"] else "fail"
    verdict_text = "ALL BUDGETS MET" if report["passed"] else "BUDGET BREACHED: " + ", ".join(report["breached"])
    if report["passed"] and not report["budgets"]:
        verdict_text = "NO BUDGETS SET"
    parts.append(f"<h1>edgekit validate: {escape(bundle['name'])} "
                 f"<span class=\"verdict {verdict}\">{escape(verdict_text)}</span></h1>")
    parts.append(f"<p class=\"note\">{escape(report['created'])} · bundle <code>{escape(bundle['path'])}</code> · target "
                 f"<b>{escape(str(bundle['target']))}</b> · backend {escape(settings['backend'])} · "
                 f"{settings['requests']} requests × {settings['max_new_tokens']} tokens, concurrency {settings['concurrency']}, "
                 f"warm-up {settings['warmup']}</p>")
    if not host["is_target"]:
        parts.append(f"<div class=\"warning\"><b>Not the target.</b> {escape(host['note'])}</div>")
    if settings.get("backend_note"):
        parts.append(f"<div class=\"warning\"><b>Not the target's runtime.</b> {escape(settings['backend_note'])}</div>")

    # -- budgets and summary
    parts.append("<h2>Budgets</h2>")
    if report["budgets"]:
        rows = [[key, check["measure"], check["budget"], check["measured"],
                 _Raw(f'<span class="{"pass" if check["meets"] else "fail"}">{"meets" if check["meets"] else "BREACHED"}</span>'),
                 check["source"]] for key, check in report["budgets"].items()]
        parts.append(_table(["budget", "compared with", "budget", "measured", "verdict", "from"], rows, {2, 3}))
    else:
        parts.append("<p>The manifest sets no budget and none was given: nothing to check.</p>")
    parts.append("<h2>Latency and throughput (measured)</h2>")
    rows = []
    for label, key in (("time to first token (TTFT), ms", "ttft_ms"), ("time per output token (TPOT), ms", "tpot_ms"),
                       ("whole request, ms", "request_ms"), ("decode tokens/s per stream", "decode_tokens_per_s_per_stream")):
        s = latency.get(key) or {}
        rows.append([label, s.get("count"), s.get("mean"), s.get("p50"), s.get("p90"), s.get("p99"), s.get("min"), s.get("max")])
    parts.append(_table(["", "n", "mean", "p50", "p90", "p99", "min", "max"], rows, {1, 2, 3, 4, 5, 6, 7}))
    parts.append(f"<p>Aggregate throughput <b>{_fmt(latency['aggregate_tokens_per_s'])} tokens/s</b> "
                 f"({latency['generated_tokens']} tokens in {_fmt(latency['wall_seconds'])} s over {settings['concurrency']} "
                 f"stream(s); at most {latency['max_in_flight']} request(s) in flight). Loading the branch (runtime libraries, "
                 f"tokenizer, graph or engine) took {_fmt(report['load_seconds'])} s.</p>")
    stream_rows = [[s["stream"], s["requests"], s["generated_tokens"], s["busy_seconds"], s["tokens_per_s"]]
                   for s in report["streams"]]
    parts.append(_table(["stream", "requests", "tokens", "busy s", "tokens/s"], stream_rows, {0, 1, 2, 3, 4}))

    # -- histograms
    parts.append("<h2>Latency histograms</h2><div class=\"hist\">")
    ttft = [r["ttft_ms"] for r in report["requests"]]
    tpot = [t for r in report["requests"] for t in r["tpot_ms"]]
    budgets = report["budgets"]
    for key, values, title, budget_key in (
        ("ttft", ttft, f"time to first token, {len(ttft)} requests", "ttft_p99_ms"),
        ("tpot", tpot, f"time per output token, {len(tpot)} tokens", "latency_p99_ms"),
    ):
        svg = histogram_svg(values, element_id=f"hist-{key}", title=title, summary=latency.get(f"{key}_ms"),
                            budget=(budgets.get(budget_key) or {}).get("budget"))
        if svg:
            parts.append(f"<figure>{svg}<figcaption class=\"note\">{escape(title)}; lines: p50 dotted, p90 dashed, p99 solid, "
                         f"budget red</figcaption></figure>")
    parts.append("</div>")

    # -- predicted vs measured
    parts.append("<h2 id=\"predicted-vs-measured\">Predicted vs measured</h2>")
    if not predicted.get("available"):
        parts.append(f"<p>No prediction: {escape(predicted.get('reason', ''))}</p>")
    else:
        inputs = predicted["inputs"]
        parts.append(f"<p class=\"note\">Predictions from <code>edgekit plan</code> for the bundle's config.json, "
                     f"{escape(str(inputs['precision']))} weights ({escape(inputs['weights'])}), "
                     f"context {inputs['context_length']}, "
                     f"batch 1, {inputs['prompt_tokens']}-token prompt, KV cache {inputs['kv_fill']:.0%} full. "
                     f"{escape(predicted['note'])}</p>")
        for entry in predicted["targets"]:
            title = f"{entry['target']} ({entry['role']})"
            if not entry.get("supported"):
                parts.append(f"<h3>{escape(title)}</h3><p>{escape(entry.get('reason') or 'not supported')}</p>")
                continue
            where = "measured on this target" if entry["measured_on_this_target"] else "measured on THIS HOST, not on this target"
            parts.append(f"<h3>{escape(title)}, power mode {escape(entry['power_mode'])}: {escape(where)}</h3>")
            rows = [[c["quantity"], c["predicted"], c["measured"], c["measured_over_predicted"]] for c in entry["comparison"]]
            parts.append(_table(["quantity", "predicted", "measured", "measured / predicted"], rows, {1, 2, 3}))
            flags = [name for name, key in (("decode", "predicted_decode_extrapolated"), ("TTFT", "predicted_ttft_extrapolated"))
                     if entry.get(key)]
            if flags:
                parts.append(f"<p class=\"note\">predicted {' and '.join(flags)}: outside the range of model sizes the "
                             f"planner's efficiency was fitted on (extrapolated).</p>")

    # -- memory, power
    parts.append("<h2>Memory</h2>")
    gpu = memory["gpu"]
    rows = [["peak RSS, GiB", memory["peak_rss_gb"], memory["peak_rss_source"]],
            ["RSS when validation started, GiB", memory["rss_at_start_gb"], "before the runtime's libraries and the model were loaded"],
            ["GPU, GiB", gpu.get("gb"), gpu.get("source") or gpu.get("reason")],
            ["measured (for the budget), GiB", memory["measured_gb"], memory["measured_is"]]]
    parts.append(_table(["", "value", "source"], rows, {1}))
    parts.append("<h2>Power and temperature (tegrastats)</h2>")
    if not power.get("available"):
        parts.append(f"<p>Not available: {escape(power.get('reason', ''))}.</p>")
    else:
        rail = f" ({power['input_rail']})" if power.get("input_rail") else ""
        rows = [[f"board input power, W{rail}", power.get("input_power_w")],
                ["CPU temperature, °C", power["temperature_c"].get("cpu")],
                ["GPU temperature, °C", power["temperature_c"].get("gpu")],
                ["junction temperature, °C", power["temperature_c"].get("junction")],
                ["device RAM used, GiB", power.get("device_ram_used_gb")]]
        rows += [[f"rail {name}, W", stats] for name, stats in power.get("rails_w", {}).items()]
        table_rows = [[label, (s or {}).get("mean"), (s or {}).get("max"), (s or {}).get("min")] for label, s in rows]
        parts.append(_table(["", "mean", "max", "min"], table_rows, {1, 2, 3}))
        extra = f"{power['samples']} samples every {power['interval_ms']} ms."
        if power.get("joules_per_token") is not None:
            extra += f" Energy per generated token ≈ {power['joules_per_token']:.4g} J (mean input power × wall time / tokens)."
        if power.get("note"):
            extra += " " + power["note"] + "."
        parts.append(f"<p class=\"note\">{escape(extra)}</p>")

    # -- host and settings
    parts.append("<h2>Host</h2>")
    keys = ("platform", "machine", "cpu", "cores", "cores_usable", "memory_gb", "jetson_model", "l4t", "jetpack", "onnxruntime",
            "tensorrt", "python", "edgekit", "load_average", "load_average_end", "target", "is_target", "target_match")
    rows = [[k, host.get(k)] for k in keys]
    rows.insert(6, ["gpus", ", ".join(g["name"] for g in host.get("gpus") or []) or None])
    parts.append(_table(["", ""], rows))
    parts.append("<h2>Settings and definitions</h2>")
    prompts = settings["prompts"]
    prompt_words = prompts.get("description") or f"{prompts['count']} prompts from {prompts.get('file')}"
    rows = [["prompts", f"{prompt_words}; tokens per prompt: min {_fmt((prompts['tokens'] or {}).get('min'))}, "
                        f"median {_fmt((prompts['tokens'] or {}).get('p50'))}, max {_fmt((prompts['tokens'] or {}).get('max'))}"],
            ["decoding", settings["decoding"]], ["TTFT", settings["ttft"]], ["TPOT", settings["tpot"]],
            ["concurrency", settings["concurrency_semantics"]], ["quantiles", settings["quantiles"]],
            ["threads", settings["threads"] if settings["threads"] else "ONNX Runtime's default"]]
    parts.append(_table(["", ""], rows))

    # -- per request
    parts.append("<h2>Requests</h2>")
    rows = [[r["request"], r["stream"], r["prompt_tokens"], r["start_s"], r["ttft_ms"], r["decode_tokens_per_s"], r["request_ms"]]
            for r in report["requests"]]
    parts.append(_table(["request", "stream", "prompt tokens", "start s", "TTFT ms", "decode tok/s", "request ms"], rows,
                        {0, 1, 2, 3, 4, 5, 6}))
    parts.append(f"<p class=\"note\">Every per-token latency is in {JSON_NAME} (requests[].tpot_ms).</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(report: dict[str, Any], out: Path) -> dict[str, str]:
    """Write ``validate.json`` and ``validate.html`` into ``out`` (each through a temporary
    file + rename); records their paths under ``report["report"]`` and returns them."""
    paths = {"json": str(out / JSON_NAME), "html": str(out / HTML_NAME)}
    report["report"] = paths
    atomic_write_json(out / JSON_NAME, report)
    atomic_write_text(out / HTML_NAME, render_html(report))
    return paths


__all__ = ["HTML_NAME", "JSON_NAME", "histogram_svg", "render_html", "write_report"]
