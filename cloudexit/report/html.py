"""audit.html: the report for management, one self-contained file (inline CSS and SVG only).

Renders the facts of `cloudexit.audit.audit_facts` in English or Chinese. Every figure is
wrapped as `<span class="n" data-v="VALUE">shown</span>`, so a test can check that both
languages show the same numbers, and so can anyone reading the source.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from html import escape
from itertools import pairwise
from typing import Any

from cloudexit.core import charts
from cloudexit.report.front import count_note, front_page
from cloudexit.report.i18n import texts
from cloudexit.core.html_bits import (
    _b,
    _code,
    _css_string,
    _d,
    _Html,
    _inline_md,
    _money,
    _n,
    _t,
    _table,
)
from cloudexit.core.i18n import reason as reason_of
from cloudexit.core.i18n import say
from cloudexit.core.units import format_bytes, format_duration

CSS = """
:root{--ok:#2e7d4f;--warn:#b26a00;--bad:#c62828;--line:#d0d7de;--soft:#f5f7f9}
*{box-sizing:border-box}
body{font-family:"Noto Sans CJK SC","Source Han Sans SC","WenQuanYi Micro Hei","Microsoft YaHei","PingFang SC","DejaVu Sans",Arial,sans-serif;
 color:#1d2329;max-width:62em;margin:1.5em auto;padding:0 1.2em;line-height:1.45;font-size:14px}
h1{font-size:1.7em;margin:.2em 0}h2{font-size:1.3em;border-bottom:2px solid var(--line);padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
p.meta{color:#57606a;font-size:.9em;margin:.2em 0}
table{border-collapse:collapse;margin:.5em 0 1em;width:100%}
td,th{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600}
td .n,td.num{font-variant-numeric:tabular-nums}
td.num{text-align:right;white-space:nowrap}
table.items td:first-child{width:34%}
table.xsum td:first-child{width:30%}table.xsum th{white-space:nowrap}
table.sign th:first-child{width:30%}table.sign th:nth-child(2){width:25%}table.sign th:nth-child(3){width:30%}
code{background:var(--soft);padding:0 3px;border-radius:3px;font-size:.92em;word-break:break-all}
.verdict{display:inline-block;padding:.35em .9em;border-radius:4px;color:#fff;font-weight:700;font-size:1.15em;margin:.5em 0}
.verdict.complete{background:var(--ok)}.verdict.complete_with_exceptions{background:var(--warn)}.verdict.incomplete{background:var(--bad)}
.phi{background:var(--bad);color:#fff;font-weight:700;padding:.5em .8em;margin-bottom:1em}
.note{color:#57606a}
.none{color:#57606a;font-style:italic}
nav ol{columns:2;margin:.3em 0}
.chart{max-width:100%;height:auto;display:block;margin:.3em 0 1em}
.fingerprint{font-family:"DejaVu Sans Mono",monospace;font-size:1.05em;word-break:break-all;background:var(--soft);padding:.4em .6em;border:1px solid var(--line)}
table.sign td{height:3.2em}
table.kv th{width:34%;font-weight:normal;background:#fafbfc}
.small{font-size:.85em}
section.front{border:2px solid var(--line);padding:.2em 1em .6em;margin:1em 0}
section.front h3{margin:.8em 0 .3em}section.front p{margin:.3em 0}
table.xfront{width:auto;min-width:50%}
.counting ul{margin:.2em 0 1em;padding-left:1.3em;color:#57606a}
@media print{
 body{max-width:none;margin:0;padding:0;font-size:10pt}
 nav{display:none}
 h2{break-after:avoid;page-break-after:avoid}
 h3{break-after:avoid}
 tr,svg,.verdict{break-inside:avoid;page-break-inside:avoid}
 section.signoff{break-before:page;page-break-before:always}
 section.front{break-after:page;page-break-after:always}
 section.front h2{margin-top:.4em}
 a{color:inherit;text-decoration:none}
}
"""


def render_html(facts: dict[str, Any], lang: str, fingerprint: str, link_digest: str = "") -> str:
    T = {**texts(lang), "lang": lang}  # "lang": for the glossary (cloudexit.i18n) in the sections

    def tr(key: str, **fields: Any) -> str:
        """Translated text: plain fields escaped, number markup (already HTML) kept."""
        template = _inline_md(T[key])
        return template.format(**{k: v if isinstance(v, _Html) else escape(str(v)) for k, v in fields.items()})

    src, dests = facts["source"], facts["destinations"]
    phi = facts["phi_included"]
    dest_names = _Html(", ".join(_code(d["dest"]) for d in dests) or "-")
    sections: list[str] = []
    head = [
        f'<h1>{escape(T["title"])}</h1>',
        f'<p class="meta">{tr("subtitle", source=_Html(_code(src["url"])), dests=dest_names)}</p>',
        f'<p class="meta">{tr("generated", at=facts["generated_at"], user=_Html(_code(facts["audit_by"]["user"])), host=_Html(_code(facts["audit_by"]["host"])), version=facts["tool_version"], db=_Html(_code(facts["db"]["path"])))}</p>',
        f'<p class="meta">{escape(T["phi_page"] if phi else T["no_phi"])}</p>',
    ]
    sections.append(front_page(facts, T, tr, lang, _verdict(facts, T, tr)))
    sections.append(_summary(facts, T, tr))
    sections.append(_charts(facts, T, tr))
    sections.append(_exceptions(facts, T, tr))
    sections.append(_verification(facts, T, tr))
    sections.append(_custody(facts, T, tr))
    sections.append(_delta(facts, T, tr))
    sections.append(_residency(facts, T, tr))
    sections.append(_decommission(facts, T, tr))
    sections.append(_deletion(facts, T, tr))
    sections.append(link_digest)  # the link evidence's one page (linkreport.digest_html), if any
    sections.append(_signoff(facts, T, tr, fingerprint))
    toc = "".join(f'<li><a href="#{k}">{escape(T["s." + k])}</a></li>' for k in
                  ("summary", "charts", "exceptions", "verification", "custody", "delta", "residency",
                   "decommission", "deletion", "signoff"))
    page_head = _css_string(f'{T["title"]} · {src["url"] or ""}')
    page_phi = _css_string(T["phi_page"]) if phi else '""'
    page_css = (
        "@page{size:A4;margin:16mm 13mm 17mm 13mm;"
        f"@top-left{{content:{page_head};font-size:8pt;color:#57606a}}"
        f"@top-right{{content:{page_phi};font-size:8pt;color:#c62828;font-weight:bold}}"
        f"@bottom-left{{content:{_css_string('SHA-256 ' + fingerprint[:16] + '…')};font-size:7pt;color:#57606a}}"
        '@bottom-right{content:counter(page) " / " counter(pages);font-size:8pt;color:#57606a}}'
    )
    banner = f'<div class="phi" role="alert">{escape(T["phi_banner"])}</div>' if phi else ""
    html_lang = "zh-CN" if lang == "zh" else "en"
    return (
        f'<!DOCTYPE html>\n<html lang="{html_lang}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="generator" content="cloudexit">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f'<title>{escape(T["title"])}: {escape(src["url"] or "")}</title>'
        f"<style>{CSS}{page_css}</style></head>\n<body>\n{banner}<header>{''.join(head)}</header>\n"
        f'<nav><h3>{escape(T["toc"])}</h3><ol>{toc}</ol></nav>\n'
        + "\n".join(sections)
        + f'\n<p class="small note">{tr("files", rows=_Html(_n(facts["manifest"]["rows"])), events=_Html(_n(facts["events_export"]["events"])))}</p>'
        + "\n</body></html>\n"
    )


def _reason_cell(text: str | None, state: str | None, T: dict[str, str]) -> str:
    """Why an object is listed, in the report's language; its machine code (and, translated,
    the English the state DB keeps) in the tooltip."""
    code, words = reason_of(text, state, T["lang"])
    tip = code if T["lang"] == "en" else f"{code}: {text or '-'}"
    return f'<span class="reason" data-code="{escape(code)}" title="{escape(tip)}">{escape(words)}</span>'


def _finding_cell(item: dict[str, Any], T: dict[str, str]) -> str:
    """A `cloudexit verify` finding: level and problem translated, details in the tooltip."""
    if T["lang"] == "en":
        return f'<span class="reason" data-code="{escape(str(item["state"]))}">{escape(item["reason"] or "-")}</span>'
    what = " ".join(item["reason"].split(" ", 2)[:2]) if item["reason"] else ""
    words = say(T["lang"])(what)
    return f'<span class="reason" data-code="{escape(str(item["state"]))}" title="{escape(item["reason"] or "")}">' \
           f'{escape(words if words != what else T["v.nc_other"])}</span>'


def _why(text: str | None, lang: str, other: str | None = None) -> str:
    """A free-text explanation from the state DB: the glossary's words, else (not in English) a
    generic label with the English in the tooltip."""
    if not text:
        return "-"
    words = say(lang)(text)
    if lang == "en" or words != text:
        return escape(words)
    return f'<span title="{escape(text)}">{escape(other or texts(lang)["see_tip"])}</span>'


def _reason_text(reason: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    code = reason["code"]
    fields: dict[str, Any] = {}
    if "n" in reason:
        fields["n"] = _Html(_n(reason["n"]))
    if "status" in reason:
        fields["status"] = say(T["lang"])(reason["status"])
    return tr("reason." + code, **fields)


def _verdict(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    v = facts["verdict"]
    out = [f'<div class="verdict {v["status"]}" id="verdict">{escape(T["verdict." + v["status"]])}</div>']
    if v["reasons"]:
        out.append(f'<p>{escape(T["verdict.why"])}</p><ul>'
                   + "".join(f"<li>{_reason_text(r, T, tr)}</li>" for r in v["reasons"]) + "</ul>")
    else:
        out.append(f'<p>{escape(T["verdict.why_complete"])}</p>')
    if v["notes"]:
        out.append('<ul class="note">' + "".join(f"<li>{_reason_text(r, T, tr)}</li>" for r in v["notes"]) + "</ul>")
    return "\n".join(out)


def _summary(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    src, dests = facts["source"], facts["destinations"]
    head = [escape(T["c.item"]), escape(T["c.source"])]
    for d in dests:
        head.append(tr("c.dest", dest=_Html(_code(d["dest"]))))
        head.append(escape(T["c.quarantined"]))
    rows = []
    for key, field, fmt in (("row.patients", "patients", _n), ("row.studies", "studies", _n),
                            ("row.series", "series", _n), ("row.dicom_objects", "dicom_objects", _n),
                            ("row.instances", "instances", _n),
                            ("row.objects", "objects", _n), ("row.bytes", "bytes", _b)):
        row = [escape(T[key]), fmt(src[field])]
        for d in dests:
            row.append(fmt(d[field]))
            q = d["quarantined"]
            row.append(fmt(q["objects"]) if field == "objects" else (_b(q["bytes"]) if field == "bytes" else ""))
        rows.append(row)
    rows.append([escape(T["row.studies_complete"]), _n(src["studies"])]
                + [cell for d in dests for cell in (_n(d["studies_complete"]), "")])
    rows.append([escape(T["row.non_dicom"]), _n(src["non_dicom"])] + ["", ""] * len(dests))
    rows.append([escape(T["row.unreadable"]), _n(src["unreadable"])] + ["", ""] * len(dests))
    if src.get("zip_archives"):
        rows.append([escape(T["row.zip_files"]), _n(src["zip_files"])] + ["", ""] * len(dests))
    envelopes = facts.get("containers") or {}
    for key, field in (("row.pacs_metadata", "pacs_metadata_total"), ("row.decoded", "decoded_total")):
        if envelopes.get(field):
            rows.append([escape(T[key]), _n(envelopes[field])] + ["", ""] * len(dests))
    tl, usage, inv = facts["timeline"], facts["usage"], src["inventory"]
    times = _table(None, [
        [escape(T["t.inventory"]), f'{_t(inv["started_at"])} – {_t(inv["finished_at"]) if inv["finished_at"] else escape(T["t.not_finished"])}'],
        [escape(T["t.start"]), _t(tl["started_at"])],
        [escape(T["t.end"]), _t(tl["finished_at"]) if tl["finished_at"] else escape(T["t.not_finished"])],
        [escape(T["t.duration"]), _d(tl["duration_s"])],
        [escape(T["t.active"]), _d(tl["active_s"])],
    ])
    req = usage["requests"]
    used = _table(None, [
        [escape(T["u.downloaded"]), _b(usage["bytes_downloaded"])],
        [escape(T["u.requests"]), " · ".join(f"{k} {_n(v)}" for k, v in req.items())],
        [escape(T["u.retries"]), _n(usage["retries"])],
        [escape(T["u.outages"]), _n(usage["link_outages"])],
        [escape(T["u.inventory"]), f'{_b(inv["header_bytes"])} · GET {_n(inv["get_requests"])} · LIST {_n(inv["list_requests"])}'],
    ])
    return (f'<section id="summary"><h2>{escape(T["s.summary"])}</h2>'
            f'<h3>{escape(T["counts"])}</h3>{_table(head, rows, "nums")}{count_note(facts, T, tr)}'
            f'<h3>{escape(T["times"])}</h3>{times}<h3>{escape(T["usage"])}</h3>{used}'
            f'<h3>{escape(T["cost"])}</h3>{_cost(facts, T, tr)}</section>')


def _range(r: dict[str, Any] | None, fmt: Callable[[Any], str]) -> str:
    if not r:
        return "-"
    return " / ".join(fmt(r.get(k)) for k in ("low", "expected", "high"))


def _cost(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    cost = facts["cost"]
    est, act = cost["estimated"], cost["actual"]
    if est is None:
        return (f'<p>{_inline_md(T["cost.none"])}</p>'
                + _table([escape(T["cost.scenario"]), escape(T["t.duration"]), escape(T["t.active"])],
                         [[escape(T["cost.actual"]), _d(act["time_s"]), _d(act["active_s"])]]))
    schedule = f', {est["schedule"]}' if est.get("schedule") else ""
    w = say(T["lang"])
    out = [f'<p class="note">{tr("cost.plan", at=est["made_at"] or "-", provider=_Html(_code(est["provider"])), region=_Html(_code(est["region"]) if est["region"] else ""), link=w(est["link"]), schedule=schedule)}</p>']
    rows = []
    for s in est["scenarios"]:
        if s.get("available"):
            rows.append([escape(w(s.get("title") or s["key"])), _range(s.get("time_s"), _d),
                         _range(s.get("cost"), _money)])
        else:
            rows.append([escape(w(s.get("title") or s["key"])), escape(T["cost.unavailable"]), "-"])
    rows.append([f'<strong>{escape(T["cost.actual"])}</strong>', f'<strong>{_d(act["time_s"])}</strong>',
                 f'<strong>{_money(act["cost"])}</strong>'])
    out.append(_table([escape(T["cost.scenario"]), escape(T["cost.time"]),
                       tr("cost.money", currency=est["currency"] or "")], rows, "nums"))
    if act["cost"] is not None:
        out.append(f'<p class="small note">{tr("cost.actual_note", catalogue=w(est["catalogue"]))}</p>')
    else:
        out.append(f'<p class="small note">{tr("cost.actual_unpriced", why=_Html(_why(act.get("why_not"), T["lang"])))}</p>')
    return "".join(out)


def _charts(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    ch = facts["charts"]
    tp = ch["throughput"]
    t0 = datetime.fromisoformat(tp["t0"]) if tp["t0"] else datetime.now()
    base = t0.timestamp()
    shaded: list[tuple[float, float, str, str]] = []
    sessions = sorted((s for r in facts["runs"] for s in r["sessions"]), key=lambda s: s["start"])
    for a, b in pairwise(sessions):
        if a["end"] and b["start"] > a["end"]:
            shaded.append((_sec(a["end"], base), _sec(b["start"], base), charts.PAUSE, T["ch.paused"]))
    for r in facts["runs"]:
        for o in r["outages"]:
            end = o["to"] or facts["timeline"]["last_activity_at"] or o["from"]
            shaded.append((_sec(o["from"], base), _sec(end, base), charts.OUTAGE, T["ch.outage"]))
    legend = [(charts.BAR, tr("ch.per", bucket=format_duration(tp["bucket_s"])))]
    if any(c == charts.OUTAGE for _, _, c, _ in shaded):
        legend.append((charts.OUTAGE, T["ch.outage"]))
    if any(c == charts.PAUSE for _, _, c, _ in shaded):
        legend.append((charts.PAUSE, T["ch.paused"]))
    svg1 = charts.throughput(t0, tp["end_s"], tp["bucket_s"], tp["points"], shaded,
                             T["ch.throughput"], T["ch.throughput_empty"], legend)
    years = [((r["name"] or T["ch.unknown"]), r["done_bytes"], r["bytes"],
              f'{format_bytes(r["done_bytes"])} / {format_bytes(r["bytes"])}') for r in ch["by_study_year"]]
    svg2 = charts.hbars(years, T["ch.year"], [(charts.DONE, T["ch.done"]), (charts.TODO, T["ch.todo"])])
    mods = [((r["name"] or T["ch.unknown"]), r["bytes"], r["bytes"],
             f'{format_bytes(r["bytes"])} · {r["objects"]:,}') for r in ch["by_modality"]]
    svg3 = charts.hbars(mods, T["ch.modality"])
    return (f'<section id="charts"><h2>{escape(T["s.charts"])}</h2>'
            f'<h3>{escape(T["ch.throughput"])}</h3>{svg1}'
            f'<h3>{escape(T["ch.year"])}</h3>{svg2}'
            f'<h3>{escape(T["ch.modality"])}</h3>{svg3}</section>')


def _sec(text: str, base: float) -> float:
    return datetime.fromisoformat(text).timestamp() - base


_X_ORDER = ("failed", "unfinished", "not_migrated", "quarantined", "conflicts", "changed", "missing",
            "deleted", "skipped", "duplicates")
_X_TITLE: dict[str, str] = {}


def _exceptions(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    x = facts["exceptions"]
    phi = facts["phi_included"]
    pacs = x["pacs"]
    summary = []
    for name in _X_ORDER:
        cat = x[name]
        summary.append([f'<a href="#x-{name}">{escape(T["x." + name])}</a>' if cat["count"] else escape(T["x." + name]),
                        _n(cat["count"]), _b(cat["bytes"]),
                        _inline_md(T["remedy." + cat["remedy"]]) if cat["count"] else f'<span class="none">{escape(T["x.none"])}</span>'])
    if pacs["checked"]:
        summary.append([_inline_md(T["x.pacs"]), _n(pacs["count"]), "",
                        _inline_md(T["remedy.verify"]) if pacs["count"] else f'<span class="none">{escape(T["x.none"])}</span>'])
    else:
        summary.append([_inline_md(T["x.pacs"]), "-", "", f'<span class="none">{_inline_md(T["x.pacs_unchecked"])}</span>'])
    out = [f'<section id="exceptions"><h2>{escape(T["s.exceptions"])}</h2><p class="note">{escape(T["x.intro"])}</p>',
           _table([escape(T["x.category"]), escape(T["v.objects"]), escape(T["row.bytes"]), escape(T["x.remedy"])],
                  summary, "xsum")]
    for name in _X_ORDER:
        cat = x[name]
        if not cat["count"]:
            continue
        out.append(f'<h3 id="x-{name}">{escape(T["x." + name])}: {_n(cat["count"])}</h3>')
        rows = [[_code(i["key"]), _code(i.get("dest")), _reason_cell(i.get("reason"), i.get("state"), T),
                 _patient(i, phi)] for i in cat["items"]]
        out.append(_table([escape(T["x.key"]), escape(T["x.dest"]), escape(T["x.reason"]),
                           escape(T["x.patient"])], rows, "small items"))
        if cat["count"] > len(cat["items"]):
            out.append(f'<p class="note">{tr("x.more", n=_Html(_n(cat["count"] - len(cat["items"]))))}</p>')
    if pacs["checked"] and pacs["count"]:
        out.append(f'<h3 id="x-pacs">{_inline_md(T["x.pacs"])}: {_n(pacs["count"])}</h3>')
        rows = [[_code(i["key"]), _code(i["dest"]), _finding_cell(i, T)] for i in pacs["items"]]
        out.append(_table([escape(T["x.key"]), escape(T["x.dest"]), escape(T["x.reason"])], rows, "small items"))
        if pacs["count"] > len(pacs["items"]):
            out.append(f'<p class="note">{tr("x.more", n=_Html(_n(pacs["count"] - len(pacs["items"]))))}</p>')
    out.append("</section>")
    return "".join(out)


def _patient(item: dict[str, Any], phi: bool) -> str:
    if phi and item.get("patient_id"):
        return escape(item["patient_id"])
    h = item.get("patient_hash")
    return f'<code title="{escape(h)}">{escape(h[:10])}…</code>' if h else "-"


def _verification(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    v = facts["verification"]
    rows = []
    for m in ("size", "md5", "multipart", "crc32", "crc64", "sha", "sha256", "dicom", "pacs", "sample"):
        if m in ("pacs", "sample") and not v[f"{m}_checked"]:
            count = _inline_md(T["v.not_run"])
        else:
            count = _n(v["methods"][m])
        rows.append([escape(T["m." + m]), _inline_md(T["m." + m + "_p"]), count])
    out = [f'<section id="verification"><h2>{escape(T["s.verification"])}</h2>',
           f'<p class="note">{escape(T["v.intro"])}</p>',
           _table([escape(T["v.method"]), escape(T["v.proves"]), escape(T["v.objects"])], rows)]
    if v["size_only"]:
        out.append(f'<p>{tr("v.size_only", n=_Html(_n(v["size_only"])))}</p>')
    out.append(f'<h3>{escape(T["v.not_checked"])}</h3>')
    if v["not_checked"]:
        out.append(_table([escape(T["x.reason"]), escape(T["v.objects"])],
                          [[_why(r["reason"], T["lang"], T["v.nc_other"]), _n(r["objects"])] for r in v["not_checked"]],
                          "small"))
    else:
        out.append(f'<p class="none">{escape(T["x.none"])}</p>')
    out.append(f'<h3>{_inline_md(T["v.verify"])}</h3>')
    runs = v["verify"]["runs"]
    if runs:
        rows = []
        for r in runs:
            rows.append([_code(r["dest"]), _t(r["finished_at"]),
                         escape(T.get("v.r." + r["status"], r["status"])) + (f': {_why(r["error"], T["lang"])}' if r["error"] else ""),
                         _n(r["files_rehashed"]) if r["deep"] else "-",
                         f'{_n(r["studies_ok"])} / {_n(r["studies_total"])}', _n(r["findings_total"]),
                         f'{_n(r["samples_same"])} / {_n(r["samples_total"])}' if r["samples_total"] else "-"])
        out.append(_table([escape(T["v.r." + k]) for k in ("dest", "when", "status", "deep", "studies",
                                                           "findings", "samples")], rows, "small"))
    if v["verify"]["unverified"]:
        out.append(f'<p>{tr("v.unverified", dests=_Html(", ".join(_code(d) for d in v["verify"]["unverified"])))}</p>')
    if not v["verify"]["run"]:
        out.append(f'<p>{_inline_md(T["v.verify_none"])}</p>')
    out.append("</section>")
    return "".join(out)


def _custody(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    k = facts["custody"]
    chain = facts["event_chain"]
    facts_rows = [
        [escape(T["k.operator"]), ", ".join(_code(u) for u in k["operators"]) or "-"],
        [escape(T["k.audit_by"]), _code(f'{facts["audit_by"]["user"]} @ {facts["audit_by"]["host"]}')],
        [escape(T["k.hosts"]), ", ".join(_code(h) for h in k["hosts"]) or "-"],
        [escape(T["k.tool"]), tr("k.tool_v", created=k["created_by_version"] or "-", now=k["audit_version"])],
        [escape(T["k.source"]), _code(k["source"])],
        [escape(T["k.endpoint"]), _code(k["endpoint"])],
        [escape(T["k.region"]), _code(k["region"]) if k["region"] else escape(T["r.unknown"])],
        [escape(T["k.dests"]), "<br>".join(_code(d) for d in k["destinations"])],
    ]
    if chain["intact"]:
        chain_text = tr("k.chain_ok", n=_Html(_n(chain["events"])), head=_Html(_code(chain["head_hash"])))
    else:
        problems = "; ".join(chain["problems"])
        if T["lang"] != "en":  # the problems name events in English: kept whole in the tooltip
            problems = _Html(f'<span title="{escape(problems)}">'
                             f'{tr("k.chain_problems", n=_Html(_n(len(chain["problems"]))))}</span>')
        chain_text = tr("k.chain_bad", n=_Html(_n(chain["events"])), problems=problems)
    facts_rows.append([escape(T["k.chain"]), chain_text])
    runs = []
    w = say(T["lang"])
    for r in facts["runs"]:
        for i, s in enumerate(r["sessions"]):
            how = w(s["how"] or "-")
            if s["how"] == "running":
                how = T["k.still_running"]
            elif s["how"] == "killed":
                how = f'{how} {T["k.open"]}'
            runs.append([_n(r["id"]) if i == 0 else "", escape(w(s["kind"])), _t(s["start"]), _t(s["end"]),
                         escape(how), _code(r["host"]), _code(r["user"]),
                         _code(r["dest"]) if i == 0 else ""])
    rounds = [[_n(x["id"]), _t(x["started_at"]), _t(x["finished_at"]), escape(w(x["status"])), _n(x["resumed"])]
              for x in k["inventory_rounds"]]
    return (f'<section id="custody"><h2>{escape(T["s.custody"])}</h2><p class="note">{escape(T["k.intro"])}</p>'
            + _table(None, facts_rows)
            + f'<h3>{escape(T["k.runs"])}</h3>'
            + _table([escape(T["k.run"]), escape(T["k.session"]), escape(T["k.from"]), escape(T["k.to"]),
                      escape(T["k.how"]), escape(T["k.host"]), escape(T["k.user"]), escape(T["x.dest"])],
                     runs, "small")
            + f'<h3>{escape(T["k.rounds"])}</h3>'
            + _table([escape(T["k.round"]), escape(T["k.from"]), escape(T["k.to"]), escape(T["k.status"]),
                      escape(T["k.resumed"])], rounds, "small")
            + "</section>")


def _residency(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    r = facts["residency"]
    s = r["source"]
    before = "<br>".join([
        f'{escape(T["r.provider"])}: {_code(s["provider"]) if s["provider"] else escape(T["r.unknown"])}',
        f'{escape(T["k.endpoint"])}: {_code(s["endpoint"])}',
        f'{escape(T["k.region"])}: {_code(s["region"]) if s["region"] else escape(T["r.unknown"])}',
        f'{escape(T["k.source"])}: {_code(s["url"])}',
    ])
    now = "<br>".join(
        f'{_code(d["dest"])} ' + (tr("r.dest_host", host=_Html(", ".join(_code(h) for h in d["hosts"]))) if d["hosts"] else "")
        for d in r["destinations"])
    return (f'<section id="residency"><h2>{escape(T["s.residency"])}</h2><p class="note">{escape(T["r.intro"])}</p>'
            + _table([escape(T["r.before"]), escape(T["r.now"])], [[before, now]]) + "</section>")


def _decommission(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    d = facts["decommission"]
    rows = [[f'<strong>{escape(T["d." + r["decision"]])}</strong>', _inline_md(T["dr." + r["reason"]]),
             _n(r["objects"]), _b(r["bytes"])] for r in d["rows"]]
    out = [_opening("decommission", "d.intro", T),
           _table([escape(T["d.decision"]), escape(T["d.reason"]), escape(T["v.objects"]),
                   escape(T["row.bytes"])], rows, "nums")]
    if any(r["reason"] == "no_verify" for r in d["rows"]):
        out.append(f'<p><strong>{_inline_md(T["d.verify_first"])}</strong></p>')
    out.append("</section>")
    return "".join(out)


def _opening(name: str, intro: str, T: dict[str, str]) -> str:
    """A section's start: its title and the note that says what it shows."""
    return f'<section id="{name}"><h2>{escape(T["s." + name])}</h2><p class="note">{_inline_md(T[intro])}</p>'


def _delta(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    d = facts["delta_rounds"]
    if not d["rounds"]:
        return _opening("delta", "dl.intro", T) + f'<p class="none">{escape(T["dl.none"])}</p></section>'
    out = [_opening("delta", "dl.intro", T)]
    rows = []
    for r in d["rounds"]:
        runs = ", ".join(str(x) for x in r["migration_runs"]) or "-"
        rows.append([_n(r["round"]), f'{_t(r["started_at"])} – {_t(r["finished_at"])}',
                     _n(r["new"]), _n(r["changed"]), _n(r["deleted"]),
                     f'{_n(r["moved"])} ({_b(r["moved_bytes"])})', escape(runs), _n(r["left"]),
                     escape(T["yes"] if r["playbook"] else T["no"])])
    out.append(_table([escape(T[k]) for k in ("k.round", "dl.when", "dl.new", "dl.changed", "dl.deleted",
                                              "dl.moved", "dl.runs", "dl.left", "dl.playbook")], rows, "small"))
    out.append("</section>")
    return "".join(out)


def _deletion(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    d = facts["deletion"]
    if not d["executed"]:
        return _opening("deletion", "del.intro", T) + (
            f'<p class="none">{tr("del.none", dry=_Html(_n(d["dry_runs"])), refused=_Html(_n(d["totals"]["refused"])))}</p></section>')
    out = [_opening("deletion", "del.intro", T)]
    for r in d["runs"]:
        how = T["del.all_versions"] if r["all_versions"] else (T["del.markers"] if r["versioning"] != "off" else T["del.if_match"])
        out.append(f'<h3>{tr("del.run", id=r["id"])}</h3>')
        out.append(_table(None, [
            [escape(T["del.token"]), _code(r["token"])],
            [escape(T["del.when"]), f'{_t(r["started_at"])} – {_t(r["finished_at"])}'],
            [escape(T["del.operator"]), _code(f'{r["operator"] or "-"} @ {r["host"] or "-"}')],
            [escape(T["k.status"]), escape(say(T["lang"])(r["status"]))],
            [escape(T["del.versioning"]), escape(f'{say(T["lang"])(r["versioning"])}: {how}')],
            [escape(T["k.dests"]), "<br>".join(_code(x) for x in r["destinations"])],
            [escape(T["del.deleted"]), f'{_n(r["deleted"])} ({_b(r["deleted_bytes"])})'],
            [escape(T["del.delete_markers"]), _n(r["delete_markers"])],
            [escape(T["del.failed"]), _n(r["failed"])],
            [escape(T["del.confirmed"]), f'{_n(r["confirmed"])} · {escape(T["del.unconfirmed"])} {_n(r["unconfirmed"])}'],
            [escape(T["del.kept"]), f'{_n(r["kept"])} ({_b(r["kept_bytes"])})'],
            [escape(T["del.manifest"]), _code(r["manifest_sha256"])],
        ]))
        rows = [[_n(b["batch"]), _code(b["request_id"]), _n(b["objects"]), _n(b["deleted"]), _n(b["failed"]),
                 _t(b["at"])] for b in r["batch_answers"]]
        out.append(f'<h3>{escape(T["del.batches"])}: {_n(r["batches"])}</h3>')
        out.append(_table([escape(T[k]) for k in ("del.batch", "del.request_id", "v.objects", "del.deleted",
                                                  "del.failed", "del.when")], rows, "small"))
    still = d["still_present"]
    out.append(f'<h3>{escape(T["del.still"])}</h3>')
    rows = [[_inline_md(T.get("dr." + reason, reason)), _n(c.get("objects")), _b(c.get("bytes"))]
            for reason, c in still["kept_by_reason"].items()]
    rows += [[f'<span title="{escape(str(e["code"]))}">{escape(T["del.error"])}</span>', _n(e["objects"]), ""]
             for e in still["errors"]]
    if still["noncurrent"]:
        rows.append([escape(T["del.noncurrent"]), _n(still["noncurrent"]), ""])
    if still["unconfirmed"]:
        rows.append([escape(T["del.unconfirmed"]), _n(still["unconfirmed"]), ""])
    if rows:
        out.append(_table([escape(T["x.reason"]), escape(T["v.objects"]), escape(T["row.bytes"])], rows, "small"))
    else:
        out.append(f'<p class="none">{escape(T["x.none"])}</p>')
    if d["refused"]:
        out.append(f'<p>{tr("del.refused", n=_Html(_n(d["totals"]["refused"])))}</p>')
    out.append("</section>")
    return "".join(out)


def _signoff(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str], fingerprint: str) -> str:
    rows = [[escape(T[f"o.r{i}"]), "", "", ""] for i in range(1, 5)]
    return (f'<section id="signoff" class="signoff"><h2>{escape(T["s.signoff"])}</h2>'
            f'<p>{_inline_md(T["o.intro"])}</p>'
            f'<p>{escape(T["o.fingerprint"])}:</p>'
            f'<p class="fingerprint" data-fingerprint="{fingerprint}">{fingerprint}</p>'
            + _signer(facts.get("signature"), T, tr) +
            f'<p class="verdict {facts["verdict"]["status"]}">{escape(T["verdict." + facts["verdict"]["status"]])}</p>'
            + _table([escape(T["o.role"]), escape(T["o.name"]), escape(T["o.signature"]), escape(T["o.date"])],
                     rows, "sign")
            + "</section>")


def _signer(signature: dict[str, Any] | None, T: dict[str, str], tr: Callable[..., str]) -> str:
    """Who signed SHA256SUMS (`audit --sign`), and the key fingerprint to write on the paper."""
    if not signature:
        return ""
    key = escape(signature["fingerprint"])
    return (f'<p>{tr("o.signed_by", who=signature["identity"], type=signature["key_type"])}</p>'
            f'<p class="fingerprint" data-signer-fingerprint="{key}">{key}</p>'
            f'<p>{tr("o.signed_check", file=signature["file"])}</p>')
