"""The live page's figures (`snapshot`) and the page itself (`page`): self-contained HTML, CSS,
JavaScript and SVG, no external asset, polling `/api/live` (see `cloudexit.report.server`).

Only counts, sizes, rates, times, destinations and link causes: no object key, study identifier,
patient name or ID ever goes into a snapshot, so nothing on the page can carry one.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from html import escape
from typing import Any

from cloudexit.report.link_i18n import words
from cloudexit.report.linkfacts import link_facts, local, outages, plan_rate
from cloudexit.state.db import State


def _rate_last(state: State, seconds: int, now: float) -> float | None:
    row = state.query("SELECT sum(bytes) AS b, min(ts) AS lo FROM link_series WHERE span = 60 AND source = 'migrate' "
                      "AND ts >= ?", (int(now) - seconds,))[0]
    if not row["b"]:
        return None
    return row["b"] / max(60.0, now - row["lo"])


def snapshot(state: State, now: float | None = None) -> dict[str, Any]:
    """Where the migration stands, for the live page (works with no run, and with no run alive)."""
    from cloudexit.report.status import migration_summary

    now = time.time() if now is None else now
    run = migration_summary(state)
    conn = state.conn
    plan = plan_rate(conn)
    hour = link_facts(conn, now - 3600, now, now=now, bucket=60)
    day = link_facts(conn, now - 86400, now, now=now, bucket=900)
    chart = lambda f: {"since": f["window"]["since"], "until": f["window"]["until"],  # noqa: E731
                       "bucket": f["window"]["bucket_s"], "plan": plan,
                       "points": [[p["ts"], p["rate"], p["bwlimit"], sum(p["errors"].values())] for p in f["series"]],
                       "outages": [[o["start"], o["end"], o["cause"]] for o in f["outages"]]}
    recent = outages(conn, 0, now + 1, now)[-20:]
    out: dict[str, Any] = {"now": now, "now_local": local(now), "plan_bytes_per_s": plan,
                           "chart_hour": chart(hour), "chart_day": chart(day),
                           "outages": [{k: o[k] for k in ("start_local", "end_local", "seconds", "cause", "open")}
                                       for o in reversed(recent)],
                           "run": None}
    if run is None:
        return out
    live = run["live"]
    rate = _rate_last(state, 300, now) if live else None
    left = max(0, (run["bytes_total"] or 0) - (run["bytes_done"] or 0))
    open_outage = next((o for o in recent if o["open"]), None) if live and run["waiting_since"] else None
    waiting: list[dict[str, Any]] = []
    if open_outage is not None:
        waiting.append({"what": "link_down", "since": open_outage["start_local"], "cause": open_outage["cause"]})
    elif live and run["waiting_since"]:
        waiting.append({"what": "link_down", "since": run["waiting_since"], "cause": "other"})
    restoring = run["by_state"].get("restoring", 0)
    if live and restoring:
        waiting.append({"what": "restores", "n": restoring})
    if live:
        waiting += [{"what": "pacs", "dest": dest, "since": since} for dest, since in _paused_pacs(state, run["run"])]
    out["run"] = {
        "id": run["run"], "status": run["status"] if live or run["status"] != "running" else "interrupted",
        "live": live, "pid": run["pid"],
        "host": state.scalar("SELECT host FROM migration_runs WHERE id = ?", (run["run"],)) if live else None,
        "started_local": _iso_local(run["started_at"]),
        "objects": run["objects"], "done": run["done"], "bytes_total": run["bytes_total"], "bytes_done": run["bytes_done"],
        "studies_total": run["studies_total"], "studies_complete": run["studies_complete"],
        "rate": rate, "eta_s": left / rate if rate else None, "plan_eta_s": left / plan if plan and left else None,
        "bwlimit": run["bwlimit"], "waiting": waiting,
        "by_state": run["by_state"],
        "exceptions": {k: run["by_state"].get(k, 0) for k in ("failed", "missing", "quarantined")},
        "deliveries": [{"dest": d, "done": v["done"], "objects": v["objects"], "by_state": v["by_state"]}
                       for d, v in run["deliveries"].items()],
        "requests": run["usage"]["requests"], "bytes_downloaded": run["usage"]["bytes_downloaded"],
        # migrate --cluster: each dask worker's objects, bytes, errors and last report (none on one machine)
        "workers": [{**w, "last_seen": _iso_local(w["last_seen"])} for w in run.get("workers", [])],
    }
    return out


def _paused_pacs(state: State, run_id: int) -> list[tuple[str, str | None]]:
    """PACS destinations of this run whose last word was `migrate.pacs_down` (the engine probes
    them and carries on once they answer): (destination, since). The PACS's answer is not shown."""
    last: dict[str, tuple[str, str]] = {}
    for r in state.query("SELECT kind, at, detail FROM events WHERE kind IN ('migrate.pacs_down', 'migrate.pacs_up') "
                         "ORDER BY id DESC LIMIT 200"):
        detail = json.loads(r["detail"] or "{}")
        if detail.get("run") == run_id and detail.get("dest") and detail["dest"] not in last:
            last[detail["dest"]] = (r["kind"], r["at"])
    return [(dest, _iso_local(at)) for dest, (kind, at) in sorted(last.items()) if kind == "migrate.pacs_down"]


def _iso_local(text: str | None) -> str | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return local(moment.timestamp())


def page(lang: str) -> str:
    """The live page: its words in `lang`, everything else fetched by its script."""
    w = words(lang)
    return (_PAGE.replace("__LANG__", "zh-CN" if lang == "zh" else "en")
            .replace("__TITLE__", escape(w["live.title"]))
            .replace("__WORDS__", json.dumps(w, ensure_ascii=False).replace("</", "<\\/"))
            .replace("__OTHER__", "en" if lang == "zh" else "zh")
            .replace("__OTHER_NAME__", "English" if lang == "zh" else "中文"))


_PAGE = r"""<!DOCTYPE html>
<html lang="__LANG__"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font:14px/1.45 sans-serif;margin:1.5em auto;max-width:64em;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:0}h2{font-size:1.1em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(13em,1fr));gap:.6em}
.card{background:#f4f7fb;border-radius:6px;padding:.6em .8em}.card b{display:block;font-size:1.3em}
.bar{height:10px;background:#e3e8ee;border-radius:5px;overflow:hidden;margin-top:.3em}.bar i{display:block;height:100%;background:#2e7d4f}
.down{background:#fdecea;border-left:4px solid #d9534f;padding:.5em .8em;margin:.6em 0}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #e6e6e6;padding:.25em .5em;text-align:left}
.muted{color:#666;font-size:.9em}svg{width:100%;height:auto}a{color:#3b6ea8}
</style></head><body>
<p style="float:right"><a id="other" href="#">__OTHER_NAME__</a></p>
<h1 id="title">__TITLE__</h1><p class="muted" id="updated"></p>
<div id="norun" class="muted" hidden></div>
<div id="problem" class="down" hidden></div>
<div id="waiting"></div>
<div class="grid">
<div class="card"><span id="l-objects"></span><b id="objects">-</b><div class="bar"><i id="objects-bar" style="width:0"></i></div></div>
<div class="card"><span id="l-bytes"></span><b id="bytes">-</b><div class="bar"><i id="bytes-bar" style="width:0"></i></div></div>
<div class="card"><span id="l-studies"></span><b id="studies">-</b></div>
<div class="card"><span id="l-rate"></span><b id="rate">-</b></div>
<div class="card"><span id="l-eta"></span><b id="eta">-</b></div>
<div class="card"><span id="l-plan-eta"></span><b id="plan-eta">-</b></div>
<div class="card"><span id="l-status"></span><b id="status">-</b></div>
</div>
<h2 id="h-hour"></h2><div id="chart-hour"></div>
<h2 id="h-day"></h2><div id="chart-day"></div>
<h2 id="h-outages"></h2><table><thead><tr id="outage-head"></tr></thead><tbody id="outages"></tbody></table>
<h2 id="h-exceptions"></h2><table><tbody id="exceptions"></tbody></table>
<h2 id="h-deliveries"></h2><table><tbody id="deliveries"></tbody></table>
<h2 id="h-workers" hidden></h2><table><tbody id="workers"></tbody></table>
<p class="muted" id="nophi"></p>
<script>
"use strict";
const W = __WORDS__;
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
const lang = "__LANG__" === "en" ? "en" : "zh";
function txt(id, s) { document.getElementById(id).textContent = s; }
function fmt(s, f) { return s.replace(/\{(\w+)\}/g, (m, k) => (k in f ? f[k] : m)); }
function bytes(n) { if (n == null) return "-"; const u = ["B","kB","MB","GB","TB","PB"]; let i = 0;
  while (Math.abs(n) >= 1000 && i < u.length - 1) { n /= 1000; i++; } return (i ? n.toFixed(1) : Math.round(n)) + " " + u[i]; }
function rate(r) { if (r == null) return "-"; const b = r * 8; const m = b >= 1e9 ? [1e9, "Gbit/s"] : b >= 1e6 ? [1e6, "Mbit/s"] : [1e3, "kbit/s"];
  return (b / m[0]).toPrecision(3) + " " + m[1] + " (" + bytes(r) + "/s)"; }
function dur(s) { if (s == null) return "-"; s = Math.max(0, s); if (s < 60) return Math.round(s) + " s";
  const m = s / 60; if (m < 60) return Math.round(m) + " min"; const h = Math.floor(m / 60);
  if (h < 24) return h + " h " + Math.round(m - h * 60) + " min"; const d = Math.floor(h / 24); return d + " d " + (h - d * 24) + " h"; }
function when(t) { return t ? t.replace("T", " ") : "-"; }
function cause(c) { return W["cause." + c] || c; }
function row(cells, tag) { const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement(tag || "td"); td.textContent = c; tr.appendChild(td); } return tr; }
function chart(el, c) {
  const w = 760, h = 200, L = 70, R = 20, T = 10, B = 28, pw = w - L - R, ph = h - T - B, span = c.until - c.since;
  let top = c.plan || 0; for (const p of c.points) top = Math.max(top, p[1], p[2] || 0);
  top = top > 0 ? top * 1.1 : 1;
  const x = t => L + pw * Math.min(Math.max(t - c.since, 0), span) / span, y = r => T + ph * (1 - r / top);
  const s = ['<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ' + w + ' ' + h + '" font-size="11" font-family="sans-serif">'];
  for (const o of c.outages) s.push('<rect class="outage" data-cause="' + o[2] + '" x="' + x(o[0]).toFixed(1) + '" y="' + T +
    '" width="' + Math.max(x(o[1]) - x(o[0]), 2).toFixed(1) + '" height="' + ph + '" fill="#d9534f" fill-opacity="0.25"><title>' +
    cause(o[2]) + '</title></rect>');
  const bw = Math.max(pw * c.bucket / span - 1, 1);
  for (const p of c.points) s.push('<rect x="' + x(p[0]).toFixed(1) + '" y="' + y(p[1]).toFixed(1) + '" width="' + bw.toFixed(1) +
    '" height="' + (T + ph - y(p[1])).toFixed(1) + '" fill="#3b6ea8"/>');
  if (c.plan) s.push('<line x1="' + L + '" x2="' + (L + pw) + '" y1="' + y(c.plan).toFixed(1) + '" y2="' + y(c.plan).toFixed(1) +
    '" stroke="#e08a00" stroke-width="2" stroke-dasharray="6 4"><title>' + W["c.plan"] + '</title></line>');
  for (const p of c.points) if (p[2]) s.push('<line x1="' + x(p[0]).toFixed(1) + '" x2="' + x(p[0] + c.bucket).toFixed(1) + '" y1="' +
    y(p[2]).toFixed(1) + '" y2="' + y(p[2]).toFixed(1) + '" stroke="#7b1fa2" stroke-width="1.5"/>');
  for (let i = 0; i <= 4; i++) { const r = top * i / 4; s.push('<line x1="' + L + '" x2="' + (L + pw) + '" y1="' + y(r).toFixed(1) +
    '" y2="' + y(r).toFixed(1) + '" stroke="#e6e6e6"/><text x="' + (L - 4) + '" y="' + (y(r) + 4).toFixed(1) + '" text-anchor="end">' +
    bytes(r) + '/s</text>'); }
  for (let i = 0; i <= 4; i++) { const t = c.since + span * i / 4, d = new Date(t * 1000);
    s.push('<text x="' + x(t).toFixed(1) + '" y="' + (h - 8) + '" text-anchor="middle">' + d.toTimeString().slice(0, 5) + '</text>'); }
  s.push('<rect x="' + L + '" y="' + T + '" width="' + pw + '" height="' + ph + '" fill="none" stroke="#888"/></svg>');
  el.innerHTML = s.join("");
}
function labels() {
  txt("l-objects", W["live.objects"]); txt("l-bytes", W["live.bytes"]); txt("l-studies", W["live.studies"]);
  txt("l-rate", W["live.rate"]); txt("l-eta", W["live.eta"]); txt("l-plan-eta", W["live.plan_eta"]);
  txt("l-status", W["live.status"]); txt("h-hour", W["live.chart_hour"]); txt("h-day", W["live.chart_day"]);
  txt("h-outages", W["live.outages"]); txt("h-exceptions", W["live.exceptions"]); txt("h-deliveries", W["live.deliveries"]);
  txt("nophi", W["no_phi"]);
  const head = document.getElementById("outage-head");
  for (const k of ["col.start", "col.end", "col.duration", "col.cause"]) head.appendChild(row([W[k]], "th").firstChild);
  const other = new URLSearchParams(params); other.set("lang", "__OTHER__");
  document.getElementById("other").href = "?" + other.toString();
}
function show(d) {
  txt("updated", fmt(W["live.updated"], {at: when(d.now_local)}));
  chart(document.getElementById("chart-hour"), d.chart_hour);
  chart(document.getElementById("chart-day"), d.chart_day);
  const ot = document.getElementById("outages"); ot.textContent = "";
  for (const o of d.outages) { const tr = row([when(o.start_local), o.open ? W["open"] : when(o.end_local), dur(o.seconds), cause(o.cause)]);
    tr.className = "outage"; tr.dataset.cause = o.cause; tr.dataset.seconds = o.seconds; ot.appendChild(tr); }
  const r = d.run, norun = document.getElementById("norun");
  norun.hidden = !!r; norun.textContent = W["live.no_run"];
  const wait = document.getElementById("waiting"); wait.textContent = "";
  if (!r) { txt("status", W["status.idle"]); return; }
  txt("objects", r.done.toLocaleString() + " / " + r.objects.toLocaleString());
  document.getElementById("objects").dataset.done = r.done;
  document.getElementById("objects-bar").style.width = (r.objects ? 100 * r.done / r.objects : 0) + "%";
  txt("bytes", bytes(r.bytes_done) + " / " + bytes(r.bytes_total));
  document.getElementById("bytes").dataset.done = r.bytes_done;
  document.getElementById("bytes-bar").style.width = (r.bytes_total ? 100 * r.bytes_done / r.bytes_total : 0) + "%";
  txt("studies", r.studies_complete + " / " + r.studies_total);
  txt("rate", rate(r.rate)); txt("eta", dur(r.eta_s)); txt("plan-eta", dur(r.plan_eta_s));
  // a run no longer alive is "interrupted" already; a live one says where it runs
  txt("status", (W["status." + r.status] || r.status) + (r.live && r.pid ? " (pid " + r.pid + ", " + r.host + ")" : ""));
  for (const w of r.waiting) { const div = document.createElement("div"); div.className = "down"; div.id = "wait-" + w.what;
    div.dataset.cause = w.cause || "";
    div.textContent = W["live.waiting"] + ": " + (w.what === "link_down" ? fmt(W["live.link_down"], {since: when(w.since), cause: cause(w.cause)})
      : w.what === "pacs" ? fmt(W["live.pacs_paused"], {dest: w.dest, since: when(w.since)}) : fmt(W["live.restores"], {n: w.n}));
    wait.appendChild(div); }
  const ex = document.getElementById("exceptions"); ex.textContent = "";
  for (const k in r.exceptions) ex.appendChild(row([W["ex." + k] || k, r.exceptions[k].toLocaleString()]));
  const dl = document.getElementById("deliveries"); dl.textContent = "";
  for (const x of r.deliveries) dl.appendChild(row([x.dest, x.done + " / " + x.objects,
    Object.entries(x.by_state).map(e => e[0] + " " + e[1]).join(", ")]));
  const wk = document.getElementById("workers"); wk.textContent = "";
  txt("h-workers", W["live.workers"]); document.getElementById("h-workers").hidden = !r.workers.length;
  for (const x of r.workers) wk.appendChild(row([x.worker, x.objects.toLocaleString() + " " + W["live.count"],
    bytes(x.bytes), W["ex.failed"] + " " + x.errors, when(x.last_seen)]));
}
async function poll() {
  try {
    const res = await fetch("api/live", {headers: {"Authorization": "Bearer " + token}, cache: "no-store"});
    const problem = document.getElementById("problem");
    problem.hidden = res.ok;
    if (res.ok) { show(await res.json()); document.body.dataset.polls = (+(document.body.dataset.polls || 0) + 1); }
    else if (res.status === 503) problem.textContent = W[(await res.json()).error === "gone" ? "live.gone" : "live.unreadable"];
  } catch (e) { /* the server restarts or the network blinks: try again */ }
  setTimeout(poll, +(params.get("every") || 2) * 1000);
}
labels(); poll();
</script></body></html>
"""
