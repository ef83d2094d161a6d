"""`vistrain report RUN`: one self-contained HTML file to look at a run -- no server, no network, no script.

Curves of every logged metric, one chart group per split (train / val / eval), drawn here as inline SVG; the
eval metrics per checkpoint step with `best` marked; every sample grid, embedded as a data: URI; the config and
the provenance of the checkpoints. The page's Content-Security-Policy forbids loading anything from elsewhere, so
what it shows is exactly what the file holds.
"""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path

from vistrain import provenance
from vistrain.durable import write_atomic
from vistrain.run_folder import Run, best_text, disk_usage, format_number, human_bytes, last_eval_text

SPLIT_ORDER = ("train", "val", "eval")  # other splits, if a task logs any, come after these
SPLIT_COLORS = {"train": "#1f77b4", "val": "#d62728", "eval": "#2ca02c"}
OTHER_COLOR = "#9467bd"
MAX_POINTS = 2000  # per curve; longer ones keep each stretch's lowest and highest point, so spikes stay visible
MARKERS_UP_TO = 60  # points: fewer than this (evals), each is drawn and has a tooltip

# chart geometry, in SVG pixels
WIDTH, HEIGHT = 380, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 28, 34

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
.summary td { padding: 2px 12px 2px 0; vertical-align: top; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { border: 1px solid #e4e4e4; background: #fff; }
.chart text { font: 11px system-ui, sans-serif; fill: #444; }
.chart .title { font-size: 12px; font-weight: 600; fill: #222; }
.chart .grid { stroke: #eee; } .chart .axis { stroke: #999; }
table.evals { border-collapse: collapse; } table.evals td, table.evals th { border: 1px solid #ddd; padding: 3px 8px; }
table.evals td { text-align: right; } tr.best { background: #fff4c2; font-weight: 600; }
.grids { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; }
img.grid { min-width: 256px; max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.note { color: #777; }
"""


def render(run: Run) -> str:
    """The report of `run` as one HTML document."""
    name = html.escape(run.path.name)
    body = [f"<h1>vistrain run {name}</h1>", _summary(run), "<h2>Curves</h2>", _curves(run),
            "<h2>Evaluations</h2>", _eval_table(run), "<h2>Samples</h2>", _samples(run),
            "<h2>Config</h2>", _pre(run.config_text) if run.config_text else _note("no config.yaml"),
            "<h2>Provenance</h2>", _provenance(run)]
    # The policy forbids every fetch (scripts too): only inline styles and data: images may appear.
    policy = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        f"<title>vistrain run {name}</title><style>{STYLE}</style></head><body>", *body, "</body></html>", ""])


def _summary(run: Run) -> str:
    rows = [("folder", str(run.path)), ("task", run.task),
            ("step", f"{run.step} of {run.max_steps if run.max_steps is not None else '?'}"), ("state", run.state()),
            ("best", best_text(run)), ("last eval", last_eval_text(run, shown=8)),
            ("size on disk", human_bytes(disk_usage(run.path))),
            ("report written", time.strftime("%Y-%m-%d %H:%M:%S"))]
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{cells}</table>'


# ------------------------------------------------------------------------------------------------ curves


def _curves(run: Run) -> str:
    if not run.curves:
        return _note("no metrics logged (metrics.jsonl is missing or empty: run.loggers needs jsonl)")
    splits = sorted(run.curves, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    parts = []
    for split in splits:
        color = SPLIT_COLORS.get(split, OTHER_COLOR)
        # plain names (the losses, the eval metrics) first, then the prefixed families: grad_norm/, lr/, time/
        names = sorted(run.curves[split], key=lambda n: ("/" in n, n))
        charts = "".join(line_chart(f"{split}/{n}", run.curves[split][n], color) for n in names)
        parts.append(f'<h3>{html.escape(split)}</h3><div class="charts">{charts}</div>')
    return "\n".join(parts)


def line_chart(title: str, points: list[tuple[int, float]], color: str) -> str:
    """One metric against the step, as an <svg>; a log y axis when the values are positive and span more than
    a decade (losses, FID early in training), and a note of the values that are not finite."""
    finite = [(step, value) for step, value in points if math.isfinite(value)]
    skipped = len(points) - len(finite)
    values = [value for _, value in finite]
    log = bool(values) and min(values) > 0 and max(values) >= 10 * min(values)
    heading = f"{title}" + (f" = {format_number(finite[-1][1])}" if finite else "") + (" (log)" if log else "")
    parts = [f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" role="img" data-metric="{html.escape(title)}">',
             f'<text class="title" x="{LEFT}" y="16">{html.escape(heading)}</text>']
    if skipped:
        parts.append(f'<text x="{WIDTH - RIGHT}" y="16" text-anchor="end">{skipped} not finite</text>')
    if not finite:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no finite values</text></svg>')
        return "".join(parts)
    transform = math.log10 if log else float
    x_lo, x_hi = _padded(min(s for s, _ in finite), max(s for s, _ in finite), 0.5)
    y_lo, y_hi = _padded(min(transform(v) for _, v in finite), max(transform(v) for _, v in finite), 0.5 if log else 0)
    y_ticks = _log_ticks(y_lo, y_hi) if log else _nice_ticks(y_lo, y_hi)
    if log:  # whole decades at both ends, so that the axis labels say where the curve is
        y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    else:  # a little room above and below, so that no point sits on the frame
        margin = (y_hi - y_lo) * 0.05
        y_lo, y_hi = y_lo - margin, y_hi + margin

    def px(step: float) -> float:
        return LEFT + (step - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)

    def py(value: float) -> float:
        return HEIGHT - BOTTOM - (transform(value) - y_lo) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM)

    for tick in y_ticks:
        y = HEIGHT - BOTTOM - (tick - y_lo) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM)
        label = format_number(10**tick) if log else _tick_label(tick, y_ticks)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    x_ticks = [tick for tick in _nice_ticks(x_lo, x_hi) if float(tick).is_integer()]  # steps are whole
    for tick in x_ticks:
        x = px(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
                     f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">'
                     f"{_tick_label(tick, x_ticks)}</text>")
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}"/>'
                 f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 4}" text-anchor="end">step</text>')
    shown = _thinned(finite)
    line = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in shown)
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{line}"/>')
    if len(finite) <= MARKERS_UP_TO:
        parts += [f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="3" fill="{color}">'
                  f"<title>step {s}: {format_number(v)}</title></circle>" for s, v in finite]
    parts.append("</svg>")
    return "".join(parts)


def _padded(lo: float, hi: float, pad: float) -> tuple[float, float]:
    """An axis range around [lo, hi]: a single value gets `pad` (or 5% of itself, or 1) on each side."""
    if hi > lo:
        return lo, hi
    pad = pad or (abs(lo) * 0.05) or 1.0
    return lo - pad, hi + pad


def _nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round numbers (1, 2 or 5 times a power of ten apart) inside [lo, hi], at most `most` of them."""
    raw = (hi - lo) / max(most - 1, 1)
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if (hi - lo) / (m * base) <= most - 1)
    first = math.ceil(lo / step)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step) + 1)]


def _tick_label(value: float, ticks: list[float]) -> str:
    """A tick's value with just the digits that tell it from its neighbours (971.45 beside 971.5, not 971.5 twice)."""
    if len(ticks) < 2 or value == 0:
        return format_number(value)
    spacing = ticks[1] - ticks[0]
    if spacing >= 1 and all(float(t).is_integer() for t in ticks) and max(abs(t) for t in ticks) < 1e7:
        return str(int(value))  # steps: 15000, not 1.5e+04
    digits = math.floor(math.log10(max(abs(t) for t in ticks))) - math.floor(math.log10(spacing)) + 1
    return f"{value:.{max(digits, 1)}g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Whole decades (in log10 units) covering [lo, hi]; every few when they are many."""
    first, last = math.floor(lo), math.ceil(hi)
    every = max(1, math.ceil((last - first) / 6))
    return [float(d) for d in range(first, last + 1, every)]


def _thinned(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most about MAX_POINTS points: the lowest and highest of each stretch, in step order."""
    if len(points) <= MAX_POINTS:
        return points
    per = math.ceil(len(points) / (MAX_POINTS // 2))
    kept = []
    for start in range(0, len(points), per):
        stretch = points[start:start + per]
        low, high = min(stretch, key=lambda p: p[1]), max(stretch, key=lambda p: p[1])
        kept += sorted({low, high})
    return kept


# ------------------------------------------------------------------------------------------ evaluations


def _eval_table(run: Run) -> str:
    if not run.evals:
        return _note("no evaluation yet")
    best = run.best()
    best_step, best_name = (best[0], best[1]) if best else (None, None)
    names = sorted({n for metrics in run.evals.values() for n in metrics}, key=lambda n: (n != best_name, n))
    header = "".join(f"<th>{html.escape(n)}{' (picks best)' if n == best_name else ''}</th>" for n in names)
    rows = [f"<tr><th>step</th>{header}<th>checkpoint</th></tr>"]
    for step, metrics in run.evals.items():
        row_class = ' class="best"' if step == best_step else ""
        cells = "".join(f"<td>{format_number(metrics[n]) if n in metrics else ''}</td>" for n in names)
        kept = "best" if step == best_step else ("on disk" if step in run.checkpoints else "")
        rows.append(f"<tr{row_class}><td>{step}</td>{cells}<td>{kept}</td></tr>")
    return f'<table class="evals">{"".join(rows)}</table>'


# ------------------------------------------------------------------------------------------------ samples


def _samples(run: Run) -> str:
    grids = run.samples()
    if not grids:
        return _note("no sample grids (samples/ is empty)")
    parts = []
    for step, images in grids.items():
        figures = "".join(f"<figure>{_image(path, f'{tag} at step {step}')}"
                          f"<figcaption>{html.escape(tag)}</figcaption></figure>" for tag, path in images)
        parts.append(f'<h3>step {step}</h3><div class="grids">{figures}</div>')
    return "\n".join(parts)


def _image(path: Path, alt: str) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode()
    except OSError as err:
        return _note(f"{path.name}: cannot be read ({err.strerror})")
    return f'<img class="grid" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# ------------------------------------------------------------------------------------------- provenance


def _provenance(run: Run) -> str:
    groups = run.provenances()
    if not groups:
        return _note("no checkpoint on disk records its provenance")
    parts = []
    for steps, record in groups:
        which = ", ".join(str(s) for s in steps)
        parts.append(f"<h3>checkpoints at step {html.escape(which)}</h3>"
                     + _pre("\n".join(provenance.describe(record))))
    return "\n".join(parts)


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def write(run: Run, out: Path) -> int:
    """Write the report of `run` to `out` in one piece; returns its size in bytes."""
    text = render(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, text)
    return len(text.encode())
