"""`cloudexit link-report`: the link evidence as files for a vendor meeting.

`write_link_report(conn, out)` writes, from one read of the DB (`linkfacts.link_facts`):
`link.html` (self-contained: inline CSS and SVG, no scripts, no network), `link.json` (every
figure, format `cloudexit.link-report/1`), `link-series.csv` (one row per interval) and
`link-outages.csv`, and the plan against what each run did per bandwidth-limit window
(`plan.actual.plan_windows`: in the JSON as `plan_windows`, `link-plan-windows.csv`, a table).
`digest_html(conn, lang)` is the one-page digest the audit includes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from cloudexit.core.files import make_private_dirs, write_private
from cloudexit.core.units import format_bytes, format_duration, format_rate
from cloudexit.plan.actual import plan_windows
from cloudexit.core import charts
from cloudexit.core.html_bits import _table
from cloudexit.report.link_i18n import words
from cloudexit.report.linkfacts import link_facts
from cloudexit.state.linkseries import ERROR_KINDS

FILES = ("link.html", "link.json", "link-series.csv", "link-outages.csv", "link-plan-windows.csv")
_PLAN, _LIMIT = "#e08a00", "#7b1fa2"
CSS = """body{font:14px/1.45 sans-serif;margin:2em auto;max-width:60em;color:#222;padding:0 1em}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;margin:.5em 0}th,td{border-bottom:1px solid #e6e6e6;padding:.3em .5em;
text-align:left;vertical-align:top}td.num{text-align:right}.summary{background:#f4f7fb;border-left:4px solid #3b6ea8;
padding:.6em 1em}.muted{color:#666;font-size:.9em}svg.chart{max-width:100%;height:auto}
@media print{body{margin:0;max-width:none}h2{break-after:avoid}}"""


def _when(text: str | None) -> str:
    return escape((text or "-").replace("T", " "))


def _mbit(rate: float | None) -> str:
    return "-" if rate is None else format_rate(rate)


def summary_lines(facts: dict[str, Any], w: dict[str, str]) -> list[str]:
    """The plain-language summary, one sentence a line (plain text, not escaped)."""
    s, t = facts["summary"], facts["totals"]
    lo, hi = facts["clinic_hours"]
    lines = []
    if s["outages"]:
        lines.append(w["s.outages"].format(n=s["outages"], total=format_duration(s["outage_seconds"]),
                                           longest=format_duration(s["longest_seconds"])))
        if s["peak_start_hour"] is not None and s["outages"] > 1:
            lines.append(w["s.peak"].format(n=s["peak_outages"], lo=f"{s['peak_start_hour']:02d}",
                                            hi=f"{(s['peak_start_hour'] + 2) % 24:02d}"))
        lines.append(w["s.cause"].format(cause=w[f"cause.{s['main_cause']}"]))
    else:
        lines.append(w["s.none"])
    if s["clinic_share_of_plan"] is not None:
        lines.append(w["s.clinic"].format(lo=f"{lo:02d}", hi=f"{hi:02d}", share=f"{s['clinic_share_of_plan']:.0%}",
                                          plan=_mbit(facts["plan_bytes_per_s"])))
    elif s["clinic_rate"]:
        lines.append(w["s.clinic_rate"].format(lo=f"{lo:02d}", hi=f"{hi:02d}", rate=_mbit(s["clinic_rate"])))
    errors = t["errors"]
    kinds = ", ".join(f"{w['cause.' + k]} {errors[k]}" for k in ERROR_KINDS if errors[k]) or "-"
    lines.append(w["s.errors"].format(requests=f"{sum(t['requests'].values()):,}",
                                      errors=f"{sum(errors.values()):,}", kinds=kinds))
    if t["rate_per_connection"]:
        lines.append(w["s.per_conn"].format(rate=_mbit(t["rate_per_connection"])))
    if t["ttfb_p50_ms"] is not None:
        lines.append(w["s.ttfb"].format(p50=f"<{t['ttfb_p50_ms']:.0f}", p95=f"<{t['ttfb_p95_ms']:.0f}"))
    return lines


def rate_chart(facts: dict[str, Any], w: dict[str, str], width: int = 760, height: int = 260) -> str:
    """Bars of bytes/s per interval, the plan and the bandwidth limit as lines, outages shaded."""
    window = facts["window"]
    t0, span, bucket = window["since"], window["until"] - window["since"], window["bucket_s"]
    points = [[(p["ts"] - t0) / bucket, p["bytes"], p["objects"]] for p in facts["series"]]
    shaded = [(o["start"] - t0, o["end"] - t0, charts.OUTAGE,
               f"{w['c.outage']}: {w['cause.' + o['cause']]}, {format_duration(o['seconds'])}")
              for o in facts["outages"]]
    legend = [(charts.BAR, w["c.rate"]), (charts.OUTAGE, w["c.outage"])]
    plan = facts["plan_bytes_per_s"]
    limits = [(p["ts"] - t0, p["bwlimit"]) for p in facts["series"] if p["bwlimit"]]
    top = max([p["rate"] for p in facts["series"]] + [plan or 0] + [b for _, b in limits] + [0])
    # A bar as high as the tallest line, past the right edge (drawn 0 px wide), keeps
    # charts.throughput's scale and the lines' the same.
    scale = [[span / bucket + 1, top * bucket, 0]] if top else []
    svg = charts.throughput(datetime.fromtimestamp(t0), span, bucket, points + scale, shaded,
                            w["h.throughput"], w["c.empty"], legend=legend + (
                                [(_PLAN, w["c.plan"])] if plan else []) + ([(_LIMIT, w["c.limit"])] if limits else []),
                            width=width, height=height)
    top_rate = charts._nice_max(top / 1.0) if top else 1.0
    left, right, ptop, bottom = 70, 40, 12, 48
    pw, ph = width - left - right, height - ptop - bottom

    def xy(sec: float, rate: float) -> str:
        return f"{left + pw * min(max(sec, 0), span) / span:.1f},{ptop + ph * (1 - rate / top_rate):.1f}"

    extra = []
    if plan:
        extra.append(f'<polyline points="{xy(0, plan)} {xy(span, plan)}" fill="none" stroke="{_PLAN}" '
                     f'stroke-width="2" stroke-dasharray="6 4"><title>{escape(w["c.plan"])}: '
                     f'{escape(_mbit(plan))}</title></polyline>')
    if limits:
        pts = " ".join(f"{xy(sec, rate)} {xy(sec + bucket, rate)}" for sec, rate in limits)
        extra.append(f'<polyline points="{pts}" fill="none" stroke="{_LIMIT}" stroke-width="1.5"/>')
    return svg.replace("</svg>", "\n".join(extra) + "\n</svg>") if extra else svg


def error_chart(facts: dict[str, Any], w: dict[str, str]) -> str:
    rows = [(f"{h['hour']:02d}:00", (h["error_rate"] or 0.0) * 100, (h["error_rate"] or 0.0) * 100,
             f"{(h['error_rate'] or 0):.2%} ({h['errors']:,} / {h['requests'] + h['errors']:,})")
            for h in facts["by_hour_of_day"] if h["requests"] or h["errors"]]
    return charts.hbars(rows, w["h.errors"]) if rows else f"<p>{escape(w['c.empty'])}</p>"


def outage_table(facts: dict[str, Any], w: dict[str, str]) -> str:
    rows = [[_when(o["start_local"]), _when(o["end_local"]) + (f" {escape(w['open'])}" if o["open"] else ""),
             (f'<span class="n" data-v="{o["seconds"]}">{escape(format_duration(o["seconds"]))} '
              f'({o["seconds"]:.0f} s)</span>'), escape(w["cause." + o["cause"]]), escape(o["seen"] or "-")]
            for o in facts["outages"]]
    head = [w["col.start"], w["col.end"], w["col.duration"], w["col.cause"], w["col.seen"]]
    return _table(head, rows, "outages") if rows else f"<p>{escape(w['s.none'])}</p>"


def worst_table(facts: dict[str, Any], w: dict[str, str]) -> str:
    rows = [[_when(h["hour_local"]), escape(_mbit(h["rate"])), f"{h['errors']:,}",
             escape(format_duration(h["down_seconds"])),
             escape(", ".join(f"{w['cause.' + k]} {n}" for k, n in h["errors_by_kind"].items()) or "-")]
            for h in facts["worst_hours"]]
    head = [w["col.hour"], w["col.rate"], w["col.errors"], w["col.down"], w["col.kinds"]]
    return _table(head, rows) if rows else "<p>-</p>"


def _facts(conn: sqlite3.Connection, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    facts = link_facts(conn, since, until)
    facts["plan_windows"] = plan_windows(conn, since, until)
    return facts


def _limit(bwlimit: int | None, w: dict[str, str]) -> str:
    return w["limit.none"] if bwlimit is None else w["limit.paused"] if bwlimit == 0 else format_rate(bwlimit)


def _error(error: float | None) -> str:
    return "-" if error is None else f'<span class="n" data-v="{error:.4f}">{error:+.1%}</span>'


def plan_table(facts: dict[str, Any], w: dict[str, str]) -> str:
    """Per run and per window of constant bandwidth limit: planned and achieved rate, error."""
    found = facts.get("plan_windows") or {"runs": [], "windows": []}
    if not found["windows"]:
        return f"<p>{escape(w['plan.none'])}</p>"
    rows = []
    for run in found["runs"]:
        for x in (x for x in found["windows"] if x["run"] == run["run"]):
            rows.append([str(run["run"]), _when(x["start_local"]) + " - " + _when(x["end_local"][11:19]),
                         escape(_limit(x["bwlimit"], w)), escape(format_bytes(x["bytes"])),
                         escape(format_duration(x["seconds"])), escape(_mbit(x["planned_rate"])),
                         escape(_mbit(x["rate"])), _error(x["error"])])
        if run["windows"] > 1:
            rows.append([f"<b>{escape(w['plan.run'].format(run=run['run']))}</b>", "", "",
                         escape(format_bytes(run["bytes"])), escape(format_duration(run["seconds"])), "",
                         escape(_mbit(run["rate"])), _error(run["error"])])
    head = [w["col.run"], w["col.window"], w["col.limit"], w["col.bytes"], w["col.duration"],
            w["col.planned"], w["col.achieved"], w["col.error"]]
    return f'<p class="muted">{escape(w["plan.intro"])}</p>' + _table(head, rows, "plan-windows")


def render_html(facts: dict[str, Any], lang: str) -> str:
    w = words(lang)
    window = facts["window"]
    sentence = "".join(f"<p>{escape(line)}</p>" for line in summary_lines(facts, w))
    return f"""<!DOCTYPE html>
<html lang="{'zh-CN' if lang == 'zh' else 'en'}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(w['title'])}</title><style>{CSS}</style></head><body>
<h1>{escape(w['title'])}</h1>
<p class="muted">{escape(w['window'].format(since=window['since_local'].replace('T', ' '), until=window['until_local'].replace('T', ' '),
                                            bucket=format_duration(window['bucket_s'])))} {escape(w['no_phi'])}</p>
<h2>{escape(w['summary'])}</h2><div class="summary">{sentence}</div>
<h2>{escape(w['h.throughput'])}</h2>{rate_chart(facts, w)}
<h2>{escape(w['h.plan'])}</h2>{plan_table(facts, w)}
<h2>{escape(w['h.errors'])}</h2>{error_chart(facts, w)}
<h2>{escape(w['h.outages'])}</h2>{outage_table(facts, w)}
<h2>{escape(w['h.worst'])}</h2>{worst_table(facts, w)}
<h2>{escape(w['h.data'])}</h2><p class="muted">{escape(w['data'])}</p>
</body></html>
"""


def _csv(rows: list[list[Any]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def write_link_report(conn: sqlite3.Connection, out: str | os.PathLike[str], since: float | None = None,
                      until: float | None = None, lang: str = "en") -> dict[str, Any]:
    """Write the four files into `out` (0700 folder, 0600 files); returns the facts."""
    folder = Path(out)
    make_private_dirs(folder)
    facts = _facts(conn, since, until)
    write_private(folder / "link.json", json.dumps(facts, indent=1, ensure_ascii=False) + "\n")
    head = ["start_unix", "start_local", "seconds", "bytes", "bytes_per_s", "bytes_per_s_per_connection",
            "objects", "get", "head", "list", *(f"err_{k}" for k in ERROR_KINDS), "ttfb_p50_ms",
            "ttfb_p95_ms", "down_seconds", "bwlimit_bytes_per_s", "plan_bytes_per_s"]
    from cloudexit.report.linkfacts import local

    rows: list[list[Any]] = [head]
    for p in facts["series"]:
        rows.append([p["ts"], local(p["ts"]), p["seconds"], p["bytes"], round(p["rate"], 1),
                     None if p["rate_per_connection"] is None else round(p["rate_per_connection"], 1),
                     p["objects"], *p["requests"].values(), *(p["errors"][k] for k in ERROR_KINDS),
                     p["ttfb_p50_ms"], p["ttfb_p95_ms"], p["down_seconds"], p["bwlimit"],
                     facts["plan_bytes_per_s"]])
    write_private(folder / "link-series.csv", _csv(rows))
    write_private(folder / "link-outages.csv", _csv(
        [["start_unix", "end_unix", "start_local", "end_local", "seconds", "cause", "seen", "still_down", "source", "run"]]
        + [[o["start"], o["end"], o["start_local"], o["end_local"], o["seconds"], o["cause"], o["seen"],
            int(o["open"]), o["source"], o["run"]] for o in facts["outages"]]))
    write_private(folder / "link-plan-windows.csv", _csv(
        [["run", "start_unix", "end_unix", "start_local", "end_local", "bwlimit_bytes_per_s", "bytes", "seconds",
          "planned_bytes_per_s", "achieved_bytes_per_s", "planned_seconds", "error", "plan_made_at",
          "mixed_minutes"]]
        + [[x["run"], x["start"], x["end"], x["start_local"], x["end_local"], x["bwlimit"], x["bytes"], x["seconds"],
            None if x["planned_rate"] is None else round(x["planned_rate"], 1), round(x["rate"], 1),
            None if x["planned_seconds"] is None else round(x["planned_seconds"], 1),
            None if x["error"] is None else round(x["error"], 4), x["plan_made_at"], x["mixed_minutes"]]
           for x in facts["plan_windows"]["windows"]]))
    write_private(folder / "link.html", render_html(facts, lang))
    return facts


def digest_html(conn: sqlite3.Connection, lang: str = "en", href: str | None = None) -> str:
    """The audit's one-page digest: the summary, the throughput chart and the outages; an empty
    string when nothing was recorded (a DB from before schema 11, or no run yet)."""
    try:
        if not conn.execute("SELECT 1 FROM link_series LIMIT 1").fetchone() and \
                not conn.execute("SELECT 1 FROM link_outages LIMIT 1").fetchone():
            return ""
    except sqlite3.OperationalError:
        return ""
    facts = _facts(conn)
    w = words(lang)
    link = f'<a href="{escape(href)}">{escape(href)}</a>' if href else "<code>DIR/link.html</code>"
    sentence = "".join(f"<p>{escape(line)}</p>" for line in summary_lines(facts, w))
    return (f'<section class="link-digest" id="link" style="break-before:page"><h2>{escape(w["title"])}</h2>'
            f'<div class="link-summary">{sentence}</div>{rate_chart(facts, w)}{outage_table(facts, w)}'
            f'<h3>{escape(w["h.plan"])}</h3>{plan_table(facts, w)}'
            f'<p class="small note">{escape(w["digest.more"])} <code>cloudexit link-report --out DIR</code>: '
            f'{link}</p></section>')
