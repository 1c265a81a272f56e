"""The audit's first page, for the hospital's director: verdict, counts, cost, exceptions, next
step, on one A4 page; and the note saying how each number is counted.

Every figure is one the later sections show too (same facts, same definitions), marked up as
they are, so a test can check the first page against them.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from cloudexit.core.html_bits import _b, _d, _Html, _money, _n
from cloudexit.core.i18n import say, zipped_words

_X_FRONT = ("failed", "unfinished", "not_migrated", "quarantined", "conflicts", "changed", "missing",
            "deleted", "skipped")


def front_page(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str], lang: str,
               verdict: str) -> str:
    """The director's page: `verdict` is the rendered verdict block (status and reasons)."""
    src = facts["source"]
    out = [f'<section id="front" class="front"><h2>{escape(T["s.front"])}</h2>', verdict,
           f'<h3>{escape(T["f.moved"])}</h3>',
           "<p>" + tr("f.source", objects=_Html(_n(src["objects"])), bytes=_Html(_b(src["bytes"])),
                      studies=_Html(_n(src["studies"])), patients=_Html(_n(src["patients"])),
                      instances=_Html(_n(src["instances"]))) + "</p><ul>"]
    for d in facts["destinations"]:
        out.append("<li>" + tr("f.dest", dest=_Html(f'<code>{escape(d["dest"])}</code>'),
                               objects=_Html(_n(d["objects"])), complete=_Html(_n(d["studies_complete"])),
                               studies=_Html(_n(src["studies"])),
                               quarantined=_Html(_n(d["quarantined"]["objects"]))) + "</li>")
    out.append("</ul>")
    out.append(f'<h3>{escape(T["f.cost"])}</h3>{_front_cost(facts, T, tr, lang)}')
    out.append(f'<h3>{escape(T["f.exceptions"])}</h3>{_front_exceptions(facts, T)}')
    status = facts["verdict"]["status"]
    out.append(f'<h3>{escape(T["f.next"])}</h3><p><strong>{escape(T["f.next." + status])}</strong></p>')
    out.append(f'<p class="small note">{escape(T["f.more"])}</p></section>')
    return "".join(out)


def _front_cost(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str], lang: str) -> str:
    cost = facts["cost"]
    est, act = cost["estimated"], cost["actual"]
    if est is None:
        return f'<p>{tr("f.cost_none", time=_Html(_d(act["time_s"])))}</p>'
    scenarios = {s["key"]: s for s in est["scenarios"] if s.get("available") and s.get("cost")}
    chosen = next((scenarios[k] for k in ("within_schedule", "fastest") if k in scenarios), None)
    lines = []
    if chosen is not None:
        name = say(lang)(chosen.get("title") or chosen["key"])
        lines.append(tr("f.cost_plan", scenario=name, cost=_Html(_money(chosen["cost"]["expected"])),
                        currency=est["currency"] or "", time=_Html(_d((chosen.get("time_s") or {}).get("expected")))))
    lines.append(tr("f.cost_actual", cost=_Html(_money(act["cost"])), currency=est["currency"] or "",
                    time=_Html(_d(act["time_s"]))))
    return "".join(f"<p>{line}</p>" for line in lines)


def _front_exceptions(facts: dict[str, Any], T: dict[str, str]) -> str:
    x = facts["exceptions"]
    rows = [(T["x." + name], x[name]["count"]) for name in _X_FRONT if x[name]["count"]]
    if x["pacs"]["checked"] and x["pacs"]["count"]:
        rows.append((T["x.pacs"].replace("`", ""), x["pacs"]["count"]))
    if not rows:
        return f'<p class="none">{escape(T["x.none"])}</p>'
    return ('<table class="xfront"><tbody>'
            + "".join(f'<tr><td>{escape(what)}</td><td class="num">{_n(n)}</td></tr>' for what, n in rows)
            + "</tbody></table>")


def count_note(facts: dict[str, Any], T: dict[str, str], tr: Callable[..., str]) -> str:
    """One definition per number, said where the numbers are."""
    src = facts["source"]
    items = [escape(T["count.objects"]),
             tr("count.dicom", n=_Html(_n(src["dicom_objects"]))),
             tr("count.instances", n=_Html(_n(src["instances"])), copies=_Html(_n(src.get("duplicate_copies", 0)))),
             escape(T["count.quarantined"])]
    if src.get("zip_archives"):  # the glossary's words (core/i18n.py), as status and plan say them
        items.insert(1, tr("count.zips", zipped=zipped_words(T["lang"], src["zip_files"], src["zip_archives"],
                                                             src["zip_archives_not_unpacked"])))
    return (f'<div class="counting"><h3>{escape(T["count.title"])}</h3><ul class="small">'
            + "".join(f"<li>{i}</li>" for i in items) + "</ul></div>")
