"""The plan as text, Markdown and one self-contained HTML page, in English or Chinese.

Rendering only: every figure comes from a :class:`cloudexit.plan.Plan`; the model's English
items, assumptions and warnings are translated by the glossary shared with the audit
(:mod:`cloudexit.i18n`), so a scenario or a cost line has one name in both documents.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timedelta

from cloudexit.core.charts import text_width
from cloudexit.core.i18n import phrase, plan_texts, say, zipped_words
from cloudexit.plan.result import Breakdown, CostLine, Plan, Scenario
from cloudexit.plan.pricing.catalogue import Fact, Span
from cloudexit.core.units import format_bytes, format_duration

# Log time axis when the slowest scenario takes this many times longer than the quickest.
_LOG_RATIO = 20.0


def _money(value: float) -> str:
    return f"{value:,.2f}"


def _cost_text(scenario: Scenario, T: dict[str, str]) -> str:
    if scenario.cost is None:
        return T["unknown"]
    c = scenario.cost
    text = f"{_money(c.expected)} ({_money(c.low)}-{_money(c.high)})"
    return text if scenario.complete else f"{text} {T['incomplete']}"


def _time_text(scenario: Scenario) -> str:
    if scenario.time_s is None:
        return "-"
    t = scenario.time_s
    return f"{format_duration(t.expected)} ({format_duration(t.low)}-{format_duration(t.high)})"


def _finish_text(scenario: Scenario) -> str:
    return scenario.finish[1].strftime("%Y-%m-%d %H:%M") if scenario.finish else "-"


def _name(scenario: Scenario, lang: str) -> str:
    """A scenario's short name: its key in English (as in the JSON), a word in Chinese."""
    return scenario.key if lang == "en" else say(lang)(scenario.key)


def _summary_rows(plan: Plan, lang: str) -> list[list[str]]:
    T, tr = plan_texts(lang), say(lang)
    rows = [[T["scenario"], T["time"], T["finish"], T["cost"].format(currency=plan.currency)]]
    for s in plan.scenarios:
        if s.available:
            rows.append([_name(s, lang), _time_text(s), _finish_text(s), _cost_text(s, T)])
        else:
            rows.append([_name(s, lang), "-", "-", T["not_available"].format(reason=tr(s.reason))])
    return rows


def _headline(plan: Plan, lang: str) -> str:
    w, T = plan.workload, plan_texts(lang)
    line = T["headline"].format(title=say(lang)(plan.title), provider=plan.provider, region=plan.region,
                                size=format_bytes(w.bytes), objects=f"{w.objects:,}",
                                start=plan.start.strftime("%Y-%m-%d %H:%M %Z").strip())
    extra = []
    if w.instances is not None and w.studies is not None:
        extra.append(T["headline.dicom"].format(instances=f"{w.instances:,}", studies=f"{w.studies:,}"))
    if w.zip_archives:
        extra.append(T["headline.zips"].format(zipped=zipped_words(lang, w.zip_files, w.zip_archives,
                                                                   w.zip_archives_not_unpacked)))
    if w.encoded_bytes:
        extra.append(T["headline.encoded"].format(encoded=format_bytes(w.encoded_bytes),
                                                  decoded=format_bytes(w.decoded_bytes)))
    return line + ("" if not extra else (" (" if lang == "en" else "（") + "; ".join(extra)
                   + (")" if lang == "en" else "）"))


def _assumed(plan: Plan, lang: str) -> str | None:
    """The banner of a plan sized by --assume-size, or None for the bucket as it is."""
    if not plan.assumed_size:
        return None
    real = plan.assumed_size
    return plan_texts(lang)["assumed"].format(
        size=real["size"], real_size=format_bytes(real["bytes"]), real_objects=f'{real["objects"]:,}')


def _notes(plan: Plan, lang: str) -> list[str]:
    tr = say(lang)
    return [tr(w) for w in plan.warnings] + [f"{_name(s, lang)}: {tr(w)}" for s in plan.scenarios
                                              for w in s.warnings]


def render_text(plan: Plan, lang: str = "en") -> str:
    """The terminal table: one row per scenario, then warnings."""
    T = plan_texts(lang)
    rows = _summary_rows(plan, lang)
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    banner = _assumed(plan, lang)
    lines = ([banner, ""] if banner else []) + [_headline(plan, lang), ""]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell + " " * (widths[i] - _width(cell)) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = _notes(plan, lang)
    if notes:
        lines += ["", T["warnings"] + ":"] + [f"  - {n}" for n in notes]
    if plan.unknown:
        lines += ["", T["unknown_prices"].format(names=", ".join(f.name for f in plan.unknown))]
    return "\n".join(lines) + "\n"


def _width(text: str) -> int:
    """Terminal columns: CJK characters take two."""
    return sum(2 if ord(ch) >= 0x1100 and _wide(ch) else 1 for ch in text)


def _wide(ch: str) -> bool:
    import unicodedata

    return unicodedata.east_asian_width(ch) in ("W", "F")


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return out


def _breakdown_rows(plan: Plan, bd: Breakdown, lang: str) -> list[list[str]]:
    T = plan_texts(lang)
    rows = [[T["item"], T["quantity"], T["unit_price"], T["cost"].split(" (")[0].split("（")[0]
             .format(currency=plan.currency)]]
    for month in bd.egress:
        for line in month.lines:
            rows.append(_line_row(line, lang, month=month.month))
    for line in bd.requests + bd.restores + bd.device + bd.inventory:
        rows.append(_line_row(line, lang))
    if bd.exit_credit:
        rows.append([T["credit"], "", "", _money(bd.exit_credit)])
    rows.append([f"**{T['total']}**", "", "", f"**{_money(bd.total)}**"])
    return rows


def _line_row(line: CostLine, lang: str, month: str = "") -> list[str]:
    tr = say(lang)
    unit = tr(line.unit) if lang != "en" else line.unit
    if line.unit_price is None:
        price = plan_texts(lang)["unknown"]
    else:
        # Request prices read as the catalogues quote them: per 1,000, not 1e-06 per request.
        per, scale = ("1,000 requests", 1000) if line.unit == "requests" else (line.unit.rstrip("s"), 1)
        price = f"{line.unit_price * scale:.6g}/{per if lang == 'en' or per == 'GB' else tr(per)}" + (
            f" ({tr(line.note)})" if line.note else "")
    quantity = f"{line.quantity:,.2f}" if line.unit == "GB" else f"{line.quantity:,.0f}"
    item = f"{month} {tr(line.item)}" if month else tr(line.item)
    return [item, f"{quantity} {unit}", price, _money(line.cost)]


def _fact_value(fact: Fact | Span, lang: str) -> str:
    unknown = plan_texts(lang)["unknown"]
    if isinstance(fact, Fact):
        if fact.value is None:
            return unknown
        return f"{int(fact.value):,}" if float(fact.value).is_integer() else f"{fact.value:g}"
    return unknown if not fact.known else f"{fact.min:g}-{fact.max:g}"


def render_markdown(plan: Plan, lang: str = "en") -> str:
    """The plan as a Markdown document for management and the project record."""
    T, tr = plan_texts(lang), say(lang)
    banner = _assumed(plan, lang)
    out = [f"# {T['title'].format(title=tr(plan.title))}", ""]
    out += [f"> **{banner}**", ""] if banner else []
    out += [_headline(plan, lang), ""] + _md_table(_summary_rows(plan, lang))
    for s in plan.scenarios:
        out += ["", f"## {tr(s.title)} (`{s.key}`)", ""]
        if not s.available:
            out += [T["not_available"].format(reason=tr(s.reason)), ""]
        out += [f"- {tr(a)}" for a in s.assumptions] + [f"- **{T['warning']}:** {tr(w)}" for w in s.warnings]
        if s.breakdown is not None:
            out += ["", *_md_table(_breakdown_rows(plan, s.breakdown, lang))]
    out += ["", f"## {T['assumptions']}", ""] + [f"- {tr(a)}" for a in plan.assumptions]
    if plan.warnings:
        out += ["", f"## {T['warnings']}", ""] + [f"- {tr(w)}" for w in plan.warnings]
    out += ["", f"## {T['unverified']}", ""]
    out += [
        f"- `{f.name}`: {_fact_value(f, lang)} ({f.source}, {T['read'].format(on=f.read_on)})"
        + (f" - {f.note}" if f.note and lang == "en" else "")
        for f in plan.unverified
    ] or [f"- {T['none']}"]
    return "\n".join(out) + "\n"


_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
_TICKS = (1, 10, 60, 600, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400)


def render_svg(plan: Plan, lang: str = "en", width: int = 760, height: int = 320) -> str:
    """Cumulative data moved over time, one line per scenario (inline SVG). The time axis ends
    where the slowest scenario does; when the quickest one would be a sliver at its left edge,
    the axis is logarithmic in the time since the start."""
    series = [(s, s.series) for s in plan.scenarios if s.available and s.series]
    left, right, top, bottom = 70, 45, 20, 50
    end = max((pts[-1][0] for _, pts in series), default=plan.start + timedelta(days=1))
    span_s = max((end - plan.start).total_seconds(), 1.0)
    quickest = min(((pts[-1][0] - plan.start).total_seconds() for _, pts in series), default=span_s)
    log = span_s / max(quickest, 1.0) > _LOG_RATIO
    total = max(float(plan.workload.bytes), 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xs(sec: float) -> float:
        if log:
            return left + plot_w * math.log10(1 + max(sec, 0.0)) / math.log10(1 + span_s)
        return left + plot_w * sec / span_s

    def x(t: datetime) -> float:
        return xs((t - plan.start).total_seconds())

    def y(b: float) -> float:
        return top + plot_h * (1 - b / total)

    parts = [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" class="chart" '
         f'data-axis="{"log" if log else "linear"}" data-span-s="{span_s:.0f}">'),
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for i in range(5):
        value = total * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f"{html.escape(format_bytes(value))}</text>")
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     'stroke="#eee"/>')
    if log:
        # Round durations, but none so near the end that its label runs into the last one.
        marks = [0.0] + [float(t) for t in _TICKS if xs(t) < xs(span_s) - 60] + [span_s]
        labels = ["0"] + [format_duration(t) for t in marks[1:]]
    else:
        marks = [span_s * i / 5 for i in range(6)]
        fmt = "%Y-%m-%d" if span_s > 3 * 86400 else ("%m-%d %H:%M" if span_s > 6 * 3600 else "%H:%M:%S")
        labels = [(plan.start + timedelta(seconds=m)).strftime(fmt) for m in marks]
    for mark, label in zip(marks, labels, strict=True):
        parts.append(f'<line x1="{xs(mark):.1f}" x2="{xs(mark):.1f}" y1="{top}" y2="{top + plot_h}" '
                     'stroke="#f0f0f0"/>')
        parts.append(f'<text x="{xs(mark):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f"{html.escape(label)}</text>")
    lx = left + 10.0
    for index, (scenario, pts) in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        coords = " ".join(f"{x(t):.1f},{y(b):.1f}" for t, b in pts)
        # Scenarios often share a curve: earlier lines are wider, so they show under later ones.
        stroke = 2 + 1.2 * (len(series) - 1 - index)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke:g}" '
                     f'stroke-linejoin="round" points="{coords}"/>')
        label = _name(scenario, lang)
        parts.append(f'<rect x="{lx:.1f}" y="{height - 16}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14:.1f}" y="{height - 7}">{html.escape(label)}</text>')
        lx += 30 + text_width(label)
    parts.append("</svg>")
    return "\n".join(parts)


_STYLE = (
    "body{font-family:\"Noto Sans CJK SC\",\"WenQuanYi Micro Hei\",\"Microsoft YaHei\",\"PingFang SC\","
    "sans-serif;max-width:60em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f4f4f4}code{background:#f4f4f4}"
    ".assumed{background:#fff4e0;border:2px solid #b26a00;padding:.5em .8em;font-weight:bold}"
)


def render_html(plan: Plan, lang: str = "en") -> str:
    """One self-contained HTML file: summary, chart, breakdowns, assumptions; nothing external."""
    esc = html.escape
    T, tr = plan_texts(lang), say(lang)

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c.strip('*'))}</td>" for c in row) + "</tr>" for row in rows[1:])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    svg = render_svg(plan, lang)
    log_axis = 'data-axis="log"' in svg
    banner = _assumed(plan, lang)
    sections = [f"<h1>{esc(T['title'].format(title=tr(plan.title)))}</h1>"]
    if banner:
        sections.append(f'<p class="assumed" role="note">{esc(banner)}</p>')
    sections += [
        f"<p>{esc(_headline(plan, lang))}</p>",
        table(_summary_rows(plan, lang)),
        f"<h2>{esc(T['chart_log'] if log_axis else T['chart'])}</h2>",
        svg,
    ]
    for s in plan.scenarios:
        sections.append(f"<h2>{esc(tr(s.title))} <code>{esc(s.key)}</code></h2>")
        if not s.available:
            sections.append(f"<p>{esc(T['not_available'].format(reason=tr(s.reason)))}</p>")
        items = [_li(a, lang) for a in s.assumptions] + [
            f"<strong>{esc(T['warning'])}:</strong> {_li(w, lang)}" for w in s.warnings]
        sections.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
        if s.breakdown is not None:
            sections.append(table(_breakdown_rows(plan, s.breakdown, lang)))
    sections.append(f"<h2>{esc(T['assumptions'])}</h2><ul>"
                    + "".join(f"<li>{_li(a, lang)}</li>" for a in plan.assumptions) + "</ul>")
    if plan.warnings:
        sections.append(f"<h2>{esc(T['warnings'])}</h2><ul>"
                        + "".join(f"<li>{_li(w, lang)}</li>" for w in plan.warnings) + "</ul>")
    facts = "".join(
        f'<li title="{esc(f.note)}"><code>{esc(f.name)}</code>: {esc(_fact_value(f, lang))} '
        f"(<code>{esc(f.source)}</code>, {esc(T['read'].format(on=f.read_on))})"
        + (f" {esc(f.note)}" if lang == "en" else "") + "</li>"
        for f in plan.unverified)
    sections.append(f"<h2>{esc(T['unverified'])}</h2><ul>{facts or '<li>' + esc(T['none']) + '</li>'}</ul>")
    return (
        f'<!DOCTYPE html>\n<html lang="{"zh-CN" if lang == "zh" else "en"}"><head><meta charset="utf-8">'
        f"<title>{esc(T['doc'].format(title=tr(plan.title)))}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(sections) + "\n</body></html>\n"
    )


def _li(text: str, lang: str) -> str:
    """A model sentence in `lang`; one the glossary lacks stays English, marked lang="en" (the
    Chromium test that reads the Chinese page lists any)."""
    words = phrase(text, lang)
    return html.escape(words) if words is not None else f'<span lang="en">{html.escape(text)}</span>'
