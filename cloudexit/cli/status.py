"""`cloudexit status`, and the summaries other commands print too."""

from __future__ import annotations

import json
from typing import Any

import click

from cloudexit.cli.group import db_option, examples, main, output_options, warn_patient_key
from cloudexit.core.i18n import zipped_words


@main.command(epilog=examples("status"))
@db_option
@output_options
def status(db_path: str, as_json: bool, quiet: bool) -> None:
    """Where the migration stands, at a glance."""
    from cloudexit.state.db import open_readable
    from cloudexit.report.status import delta_summary, inventory_summary, migration_summary, plan_vs_actual

    with open_readable(db_path) as state:
        warn_patient_key(state)
        totals = inventory_summary(state)
        migration = migration_summary(state)
        delta = delta_summary(state)
        versus = plan_vs_actual(state)
    if as_json:
        click.echo(json.dumps({**totals, "migration": migration, "delta": delta,
                               "plan_vs_actual": versus}, indent=2, default=str))
    else:
        print_summary(totals)
        if migration is not None:
            print_migration(migration)
        if delta is not None:
            print_delta(delta)
        if versus is not None:
            print_versus(versus)


def print_versus(v: dict[str, Any]) -> None:
    """The plan against the run: how far to trust the next plan."""
    from cloudexit.core.units import format_bytes, format_duration

    p = v["planned_s"]
    line = (f"Plan vs actual ({v['scenario']}; link {v['link']}): planned "
            f"{format_duration(p['expected'])} ({format_duration(p['low'])}-{format_duration(p['high'])}) "
            f"for {format_bytes(v['planned_bytes'] or 0)}; actual {format_duration(v['actual_s'])} "
            f"in {len(v['runs'])} run(s), {format_bytes(v['actual_bytes'])} downloaded")
    if v["error"] is not None:
        line += (f"; the plan was {abs(v['error']):.0%} {'long' if v['error'] > 0 else 'short'}"
                 + ("" if v["inside_range"] else ", outside its range"))
    else:
        line += " so far"
    click.echo(line)


def print_delta(d: dict[str, Any]) -> None:
    """What a delta round would still move: the figure a cutover is decided on."""
    from cloudexit.core.units import format_bytes

    lines = [f"Delta left (new or changed since migrated): {d['left_objects']} objects, "
             f"{format_bytes(d['left_bytes'])}"]
    lines += [f"  {x['dest']}: {x['objects']} objects, {format_bytes(x['bytes'])}"
              for x in d["destinations"]]
    for r in d["rounds"][:3]:
        lines.append(f"  inventory round {r['round']} ({r['finished_at']}): {r['new']} new, "
                     f"{r['changed']} changed, {r['deleted']} deleted")
    if d.get("exit_window_ends"):
        lines.append(f"  exit-program window ends {d['exit_window_ends']}")
    click.echo("\n".join(lines))


def print_summary(t: dict[str, Any]) -> None:
    from cloudexit.core.units import format_bytes

    inv = t["inventory"]
    lines = [
        f"Source: {t['source'] or '-'}  (endpoint {t['endpoint'] or '-'})",
        f"Inventory: {inv['status']} ({inv['rounds']} round(s), last finished {inv['finished_at'] or '-'})"
        if inv["status"] else "Inventory: none has completed yet; run `cloudexit inventory "
                              f"{t['source'] or 's3://BUCKET/PREFIX'}` with this --db",
        f"  objects          {t['objects']:>10}   {format_bytes(t['bytes'])}",
        f"  DICOM instances  {t['dicom_instances']:>10}   in {t['studies']} studies, "
        f"{t['series']} series, {t['patients']} patients",
        f"  non-DICOM        {t['non_dicom']:>10}",
        f"  unreadable       {t['unreadable']:>10}",
    ]
    if t.get("pacs_metadata"):
        lines.append(f"  PACS metadata    {t['pacs_metadata']:>10}   (Orthanc's header-only and JSON "
                     "copies of instances: not instances, copied to the side area)")
    if t.get("zip_archives"):
        # the glossary's words (core/i18n.py), as plan and audit say them
        lines.append(f"  files in zips    {t['zip_members']:>10}   "
                     + zipped_words("en", t["zip_members"], t["zip_archives"], t.get("zip_archives_not_unpacked", 0))
                     + ": each DICOM file counted above as an instance, unpacked by migrate")
    for row in t.get("by_encoding") or []:
        lines.append(f"  {row['name']:<16} {row['objects']:>10}   objects in this envelope "
                     f"({format_bytes(row['bytes'])} as stored)")
    if t["pending"]:
        lines.append(f"  not yet read     {t['pending']:>10}")
    if t["hostile_keys"]:
        lines.append(f"  unsafe keys      {t['hostile_keys']:>10}   (flagged; never used as paths as they are)")
    if t["duplicate_sop_uids"]:
        lines.append(f"  duplicate SOP Instance UIDs {t['duplicate_sop_uids']}")
    if t["deleted_at_source"]:
        lines.append(f"  deleted at source {t['deleted_at_source']:>9}")
    lines.append(f"  inventory egress: {format_bytes(inv['header_bytes'])} in "
                 f"{inv['get_requests']} GET and {inv['list_requests']} LIST requests")
    for title, key in (("modality", "by_modality"), ("study year", "by_study_year"),
                       ("storage class", "by_storage_class")):
        if t[key]:
            # bytes as stored: a file inside a zip counts its bytes in the zip, the zip once
            lines.append(f"By {title} (" + ("objects in the bucket" if key == "by_storage_class"
                                            else "DICOM objects, files in zips too") + ", bytes as stored):")
            lines += [f"  {row['name']:<16} {row['objects']:>10}   {format_bytes(row['bytes'])}"
                      for row in t[key]]
    click.echo("\n".join(lines))


def print_migration(m: dict[str, Any]) -> None:
    from cloudexit.core.units import format_bytes

    state = m["status"] + (f", live (pid {m['pid']})" if m["live"] else "")
    lines = [f"Migration run {m['run']} into {m['dest']}: {state}, started {m['started_at']}"
             + (f", resumed {m['resumed']}x" if m["resumed"] else "")]
    if m["waiting_since"]:
        lines.append(f"  waiting for the link since {m['waiting_since']}"
                     + (f" ({m['waiting_why']})" if m.get("waiting_why") else ""))
    if m["stop_reason"]:
        lines.append(f"  stopped: {m['stop_reason']}")
    if m["bwlimit"]:
        lines.append(f"  bandwidth timetable: {m['bwlimit']}")
    lines.append(f"  objects {m['done']}/{m['objects']} done, {format_bytes(m['bytes_done'])} of "
                 f"{format_bytes(m['bytes_total'])}")
    lines.append(f"  studies {m['studies_total']}: {m['studies_complete']} complete (every object verified), "
                 f"{m['studies_with_exceptions']} finished with exceptions (an object failed, missing or "
                 f"quarantined), {m['studies_unfinished']} in progress")
    lines.append("  by state: " + ", ".join(f"{k} {v}" for k, v in sorted(m["by_state"].items())))
    for pacs, d in m.get("deliveries", {}).items():
        lines.append(f"  delivered to {pacs}: {d['done']}/{d['objects']} ("
                     + ", ".join(f"{k} {v}" for k, v in sorted(d["by_state"].items())) + ")")
    if m["restores"]:
        lines.append("  restores: " + ", ".join(f"{k} {v}" for k, v in sorted(m["restores"].items())))
    u = m["usage"]
    lines.append(f"  used: {format_bytes(u['bytes_downloaded'])} downloaded, "
                 + ", ".join(f"{v} {k}" for k, v in u["requests"].items())
                 + f", {u['retries']} retries, {u['link_outages']} link outages")
    if m["studies_in_progress"]:
        lines.append("  studies not complete (study date, modality, objects done/total, exceptions):")
        for s in m["studies_in_progress"]:
            lines.append(f"    {s['study']}  {s['date'] or '-':<8} {s['modality'] or '-':<4} "
                         f"{s['done']}/{s['total']} done" + (f", {s['active']} downloading" if s["active"] else "")
                         + (f", {s['problems']} exception(s)" if s["problems"] else ""))
    for p in m["problems"][:10]:
        lines.append(f"  {p['state']:<11} {p['key']!r}: {p['reason']}")
    click.echo("\n".join(lines))
