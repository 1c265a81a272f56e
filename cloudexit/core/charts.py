"""Small inline SVG charts for self-contained HTML reports (no scripts, no fonts, no network).

Each function returns one `<svg>` element that scales to the page width and prints on A4.
Numbers arrive already computed; labels arrive already translated and formatted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape
from unicodedata import east_asian_width

from cloudexit.core.units import format_bytes

_GRID, _AXIS, _TEXT = "#e6e6e6", "#888", "#333"
DONE, TODO, BAR, OUTAGE, PAUSE = "#2e7d4f", "#e3e8ee", "#3b6ea8", "#d9534f", "#9e9e9e"


def _open(width: int, height: int, title: str) -> list[str]:
    return [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="100%" role="img" aria-label="{escape(title)}" class="chart" '
            f'font-family="sans-serif" font-size="11" fill="{_TEXT}">'),
            f"<title>{escape(title)}</title>"]


def text_width(label: str, size: float = 11) -> float:
    """Width of `label` in px at font size `size`: CJK (wide) characters are a full em, the rest
    about 0.62 em (sans-serif digits and lowercase; capitals a little wider)."""
    return sum(size if east_asian_width(ch) in ("W", "F") else size * 0.62 for ch in label)


def _legend(legend: Sequence[tuple[str, str]], x: float, y: float, faded: bool) -> list[str]:
    """Legend swatches and labels from `x`, each label measured so the next one starts after it."""
    parts = []
    for colour, label in legend:
        opacity = ' fill-opacity="0.35"' if faded and colour != BAR else ""
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="10" height="10" fill="{colour}"{opacity}/>')
        parts.append(f'<text x="{x + 14:.1f}" y="{y + 9}">{escape(label)}</text>')
        x += 14 + text_width(label) + 14
    return parts


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1)
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return float(step * magnitude)
    return float(10 * magnitude)


def throughput(t0: datetime, span_s: float, bucket_s: int, points: Sequence[Sequence[float]],
               shaded: Sequence[tuple[float, float, str, str]], title: str, empty: str,
               legend: Sequence[tuple[str, str]] = (), width: int = 760, height: int = 260) -> str:
    """Bars of bytes per second, one per `bucket_s` (points: [bucket index, bytes, objects]);
    `shaded`: (from_s, to_s, colour, label) intervals such as outages."""
    left, right, top, bottom = 70, 40, 12, 48
    pw, ph = width - left - right, height - top - bottom
    parts = _open(width, height, title)
    span_s = max(span_s, float(bucket_s))
    rates = [b / bucket_s for _, b, _ in points]
    top_rate = _nice_max(max(rates, default=0.0))

    def x(sec: float) -> float:
        return left + pw * min(max(sec, 0.0), span_s) / span_s

    def y(rate: float) -> float:
        return top + ph * (1 - rate / top_rate)

    for lo, hi, colour, label in shaded:
        x0, x1 = x(lo), x(hi)
        parts.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 2):.1f}" height="{ph}" '
                     f'fill="{colour}" fill-opacity="0.18"><title>{escape(label)}</title></rect>')
    for i in range(5):
        value = top_rate * i / 4
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="{_GRID}"/>')
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{escape(format_bytes(value))}/s</text>')
    bar_w = max(pw * bucket_s / span_s - 1, 1.0)
    for (index, nbytes, objects), rate in zip(points, rates):
        bx = x(index * bucket_s)
        parts.append(f'<rect x="{bx:.1f}" y="{y(rate):.1f}" width="{min(bar_w, left + pw - bx):.1f}" '
                     f'height="{top + ph - y(rate):.1f}" fill="{BAR}"><title>'
                     f'{escape(format_bytes(nbytes))}, {int(objects)}</title></rect>')
    if not points:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">{escape(empty)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="{_AXIS}"/>')
    fmt = "%Y-%m-%d" if span_s > 3 * 86400 else ("%m-%d %H:%M" if span_s > 6 * 3600 else "%H:%M:%S")
    ticks = max(1, min(5, int(span_s // bucket_s)))
    for i in range(ticks + 1):
        sec = span_s * i / ticks
        label = (t0 + timedelta(seconds=sec)).strftime(fmt)
        parts.append(f'<text x="{x(sec):.1f}" y="{top + ph + 15}" text-anchor="middle">{label}</text>')
    parts += _legend(legend, left, height - 16, faded=True)
    parts.append("</svg>")
    return "\n".join(parts)


def hbars(rows: Sequence[tuple[str, float, float, str]], title: str,
          legend: Sequence[tuple[str, str]] = (), width: int = 760) -> str:
    """Horizontal bars: (label, done, total, note). `done` == `total` draws one solid bar;
    otherwise the done part over a light bar for the total."""
    left, right, top, row_h = 110, 150, 8, 22
    height = top + row_h * max(len(rows), 1) + (26 if legend else 8)
    pw = width - left - right
    biggest = max((total for _, _, total, _ in rows), default=0.0) or 1.0
    parts = _open(width, height, title)
    for i, (label, done, total, note) in enumerate(rows):
        y = top + i * row_h
        parts.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        w_total = pw * total / biggest
        w_done = pw * done / biggest
        if done < total:
            parts.append(f'<rect x="{left}" y="{y + 3}" width="{max(w_total, 1):.1f}" height="15" fill="{TODO}"/>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{max(w_done, 0 if done <= 0 else 1):.1f}" '
                     f'height="15" fill="{DONE if done < total or legend else BAR}"/>')
        parts.append(f'<text x="{left + max(w_total, w_done) + 6:.1f}" y="{y + 14}">{escape(note)}</text>')
    parts += _legend(legend, left, height - 16, faded=False)
    parts.append("</svg>")
    return "\n".join(parts)
