"""The command line: one thin command per verb over the library.

The only module that imports click and tqdm. Library errors become messages and exit codes in
one place (`CloudexitGroup.invoke`); `--traceback` shows the stack instead.
"""

from __future__ import annotations

import json
import sqlite3
import os
import sys
import time
from typing import Any, Callable

import click

from cloudexit import __version__
from cloudexit.cli.cluster import cluster_executor, cluster_options  # migrate --cluster
from cloudexit.core.config import InventoryConfig, SourceConfig
from cloudexit.core.errors import CloudexitError, FileSystemError, UsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CloudexitGroup(click.Group):
    """Maps every error to one line (`Error: ...` and a hint on stderr) and its exit code; with
    --json, to `{"error", "hint", "exit"}` on stdout instead."""

    def invoke(self, ctx: click.Context) -> Any:
        words = [*getattr(ctx, "_protected_args", []), *ctx.args]
        as_json = "--json" in words[:words.index("--")] if "--" in words else "--json" in words
        try:
            try:
                return super().invoke(ctx)
            except sqlite3.Error as exc:  # met outside the State's own methods
                from pathlib import Path

                from cloudexit.state.file import translate

                error = translate(exc, Path(ctx.meta.get("db_path") or "cloudexit.db"))
                if error is None:
                    raise
                raise error from exc
        except CloudexitError as exc:
            if ctx.meta.get("traceback"):
                raise
            _fail(ctx, as_json, exc.message, exc.hint, exc.exit_code)
        except OSError as exc:  # a path, permission or disk problem the library did not name
            if ctx.meta.get("traceback"):
                raise
            err = FileSystemError.from_os_error(exc)
            _fail(ctx, as_json, err.message, err.hint, err.exit_code)
        except click.ClickException as exc:
            if not as_json:
                raise
            _fail(ctx, as_json, exc.format_message(), "see --help", exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("traceback"):
                raise
            if not as_json:
                click.echo("\nInterrupted. Everything committed so far is kept; "
                           "run the same command again to continue.", err=True)
                ctx.exit(EXIT_INTERRUPTED)
            _fail(ctx, as_json, "interrupted", "everything committed so far is kept; run the "
                  "same command again to continue", EXIT_INTERRUPTED)


def _fail(ctx: click.Context, as_json: bool, message: str, hint: str | None, code: int) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "hint": hint, "exit": code}, ensure_ascii=False))
    else:
        click.secho(f"Error: {message}" + (f"\n  hint: {hint}" if hint else ""), fg="red", err=True)
    ctx.exit(code)


# Shown under each command's --help; `\b` keeps click from re-wrapping the lines.
EXAMPLES: dict[str, list[str]] = {
    "inventory": ["cloudexit inventory s3://hospital-pacs/archive/ --endpoint-url "
                  "https://oss-cn-hangzhou.aliyuncs.com --db pacs-exit.db",
                  "cloudexit inventory s3://hospital-pacs/ --db pacs-exit.db --since last   "
                  "# a later round, dated folders only"],
    "status": ["cloudexit status --db pacs-exit.db", "cloudexit status --db pacs-exit.db --json"],
    "plan": ["cloudexit plan --db pacs-exit.db --bandwidth 200Mbit/s --out plan.html",
             'cloudexit plan --db pacs-exit.db --bandwidth 200Mbit/s --schedule "Mon-Fri 07:30,0 19:00,off"',
             "cloudexit plan --db pacs-exit.db --measure --provider aliyun-oss"],
    "migrate": ["cloudexit migrate --db pacs-exit.db --to /srv/pacs-archive",
                'cloudexit migrate --db pacs-exit.db --to /srv/pacs-archive --bwlimit "Mon-Fri 07:30,0 19:00,off"',
                "cloudexit migrate --db pacs-exit.db --resume   # after Ctrl-C, a reboot, a cut link"],
    "verify": ["cloudexit verify --db pacs-exit.db --deep",
               "cloudexit verify --db pacs-exit.db --to dicom://ORTHANC@pacs.local:4242 --sample 20"],
    "audit": ["cloudexit audit --db pacs-exit.db --out audit/ --lang zh",
              "cloudexit audit verify audit/"],
    "audit_verify": ["cloudexit audit verify audit/", "cloudexit audit verify audit/ --db pacs-exit.db"],
    "run_playbook": ["cloudexit run playbooks/branch-hospital-pacs.yaml --dry-run",
                     "cloudexit run playbooks/aws-s3-exit.yaml --ack exit-approval",
                     "cloudexit run playbooks/branch-hospital-pacs.yaml --confirm TOKEN"],
    "decommission": ["cloudexit decommission --db pacs-exit.db   # dry run: prints a token",
                     "cloudexit decommission --db pacs-exit.db --execute --confirm TOKEN"],
    "demo": ["cloudexit demo", "cloudexit demo --size tiny --workdir /tmp/cloudexit-demo"],
}


def _examples(command: str) -> str:
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[command])


def _set_traceback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["traceback"] = ctx.meta.get("traceback") or value
    return value


def _note_db(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    ctx.meta["db_path"] = value  # for errors met on the DB outside the library's own handling
    return value


def db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--db", "db_path", envvar="CLOUDEXIT_DB", default="cloudexit.db",
                        show_default=True, type=click.Path(dir_okay=False), callback=_note_db,
                        help="The migration's state database (env CLOUDEXIT_DB).")(f)


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress, only the result.")(f)
    f = click.option("--traceback", is_flag=True, expose_value=False, callback=_set_traceback,
                     help="Show the full stack on errors.")(f)
    return f


def source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--endpoint-url", envvar="AWS_ENDPOINT_URL",
                     help="S3 API endpoint (OSS, COS, OBS, MinIO...). Env AWS_ENDPOINT_URL.")(f)
    f = click.option("--profile", envvar="AWS_PROFILE", help="Credentials profile from ~/.aws.")(f)
    f = click.option("--region", envvar="AWS_REGION", help="Region of the bucket.")(f)
    f = click.option("--retries", default=SourceConfig.max_attempts, show_default=True,
                     type=click.IntRange(1, 100),
                     help="Attempts per request (exponential backoff with jitter) before giving up.")(f)
    return f


@click.group(cls=CloudexitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudexit")
@click.option("--traceback", is_flag=True, expose_value=False, callback=_set_traceback,
              is_eager=True, help="Show the full stack on errors.")
def main() -> None:
    """Move a hospital's PACS out of cloud object storage, verified, and prove it.

    Start with `cloudexit demo` to see the whole job on an embedded S3 server, or
    `cloudexit inventory s3://BUCKET/PREFIX --endpoint-url URL` on your own bucket.
    """


# -- inventory ------------------------------------------------------------------------------
@main.command(epilog=_examples("inventory"))
@click.argument("url", metavar="s3://BUCKET[/PREFIX]")
@db_option
@source_options
@click.option("--workers", default=InventoryConfig.workers, show_default=True, type=click.IntRange(1, 256),
              help="Threads reading DICOM headers.")
@click.option("--list-workers", default=InventoryConfig.list_workers, show_default=True,
              type=click.IntRange(1, 64), help="Threads listing key ranges in parallel.")
@click.option("--header-bytes", default=InventoryConfig.header_bytes, show_default=True,
              type=click.IntRange(256, 2**30), help="First ranged read per object; grown when the header is longer.")
@click.option("--key-pattern", default=None,
              help="Take UIDs from keys, e.g. '{study}/{series}/{sop}.dcm'; headers are read only on a random sample to check it.")
@click.option("--since", metavar="YYYY-MM-DD|last", default=None,
              help="Do not list folders dated wholly before this day (YYYY/, YYYY/MM/, YYYY/MM/DD/, "
                   "YYYYMMDD/ anywhere in the path); 'last': the day before the last complete round "
                   "started. Objects in skipped folders are kept as they were, not marked deleted.")
@output_options
def inventory(url: str, db_path: str, endpoint_url: str | None, profile: str | None,
              region: str | None, retries: int, workers: int, list_workers: int, header_bytes: int,
              key_pattern: str | None, since: str | None, as_json: bool, quiet: bool) -> None:
    """List and classify every object in a bucket, reading DICOM headers.

    Resumable: interrupt it and run it again to continue. Run it again later to record new,
    changed and deleted objects.

    S3 has no change feed, so a re-run lists the whole prefix. With --since, folders whose name
    dates them wholly before the day are not listed (a dated layout such as dcm4chee's
    YYYY/MM/DD/... makes re-runs cheap); such a round is partial: it finds new and changed
    objects in the folders it lists and reports deletions only there. It trusts the dates in
    folder names: an object written later into an old-dated folder is not seen.
    """
    from cloudexit.inventory import Inventory, resolve_since
    from cloudexit.s3.source import Source
    from cloudexit.state import patientkey
    from cloudexit.state.db import State, discard_if_empty
    from cloudexit.report.status import inventory_summary

    source = Source(url, SourceConfig(endpoint_url=endpoint_url, profile=profile, region=region,
                                      max_attempts=retries))
    config = InventoryConfig(workers=workers, list_workers=list_workers, header_bytes=header_bytes,
                             key_pattern=key_pattern)
    first = not os.path.exists(db_path)
    new_key = not patientkey.key_path(db_path).exists()
    try:
        with State(db_path, create=True) as state, _InventoryBar(quiet or as_json) as bar:
            _warn_patient_key(state)
            day = resolve_since(state, since)
            summary = Inventory(state, source, config, progress=bar.update, since=day).run()
            totals = inventory_summary(state)
    except BaseException:
        # A wrong bucket or no credentials: leave no empty state DB (nor the key made for it).
        if first and discard_if_empty(db_path) and new_key:
            patientkey.key_path(db_path).unlink(missing_ok=True)
        raise
    if as_json:
        click.echo(json.dumps({"round": summary.__dict__, "inventory": totals}, indent=2, default=str))
    elif not quiet:
        verb = "resumed and finished" if summary.resumed else "finished"
        click.echo(f"Inventory round {summary.round} {verb}: {summary.new} new, "
                   f"{summary.changed} changed, {summary.deleted} deleted, "
                   f"{summary.unchanged} unchanged.")
        if summary.since:
            click.echo(f"Partial round (--since {summary.since}): {summary.skipped_folders} dated "
                       f"folder(s) not listed; their {summary.not_listed} object(s) kept as they "
                       "were, deletions counted only in the folders listed.")
        _print_summary(totals)
    if summary.backup_error:
        click.secho(f"Warning: no backup of the state DB was made: {summary.backup_error}", fg="yellow", err=True)
    if summary.archived and not quiet:
        classes = ", ".join(f"{n} {cls}" for cls, n in sorted(summary.archived.items()))
        click.echo(f"{sum(summary.archived.values())} object(s) are in an archive storage class "
                   f"({classes}): `cloudexit migrate` restores them, then reads their headers.",
                   err=True)
    if summary.customer_key:
        click.echo(f"{summary.customer_key} object(s) are encrypted with a customer-provided key "
                   "(SSE-C): the store serves them only with that key, so no retry reads them; "
                   "re-encrypt them at the source (copy with the key to SSE-S3 or no encryption) "
                   "and run inventory again:", err=True)
        for key in summary.customer_key_sample:
            click.echo(f"  {key!r}", err=True)
    if summary.failed:
        click.echo(f"{len(summary.failed)} object(s) could not be read; run inventory again to retry:",
                   err=True)
        for key, reason in summary.failed[:10]:
            click.echo(f"  {key!r}: {reason}", err=True)
    if summary.failed or summary.customer_key:
        sys.exit(EXIT_PARTIAL)


def _warn_patient_key(state: Any) -> None:
    """One line when patients cannot be matched (the key file is missing or not this DB's)."""
    warning = state.patient_key().warning()
    if warning:
        click.secho(f"Warning: {warning}", fg="yellow", err=True)


class _InventoryBar:
    """tqdm bars on a terminal; a plain line every 10 s otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last = 0.0

    def __enter__(self) -> "_InventoryBar":
        if not self.quiet and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit="obj", desc="inventory", file=sys.stderr, dynamic_ncols=True)
        return self

    def update(self, p: Any) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.total = p.listed
            self.bar.n = max(0, p.listed - p.pending)
            self.bar.set_postfix(listed=p.listed, pending=p.pending, failed=p.failed,
                                 listing="done" if p.listing_done else "running", refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last > 10:
            self.last = time.monotonic()
            click.echo(f"inventory: {p.listed} listed, {p.listed - p.pending} classified, "
                       f"{p.pending} pending, {p.failed} failed", err=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# -- status ---------------------------------------------------------------------------------
@main.command(epilog=_examples("status"))
@db_option
@output_options
def status(db_path: str, as_json: bool, quiet: bool) -> None:
    """Where the migration stands, at a glance."""
    from cloudexit.state.db import open_readable
    from cloudexit.report.status import delta_summary, inventory_summary, migration_summary, plan_vs_actual

    with open_readable(db_path) as state:
        _warn_patient_key(state)
        totals = inventory_summary(state)
        migration = migration_summary(state)
        delta = delta_summary(state)
        versus = plan_vs_actual(state)
    if as_json:
        click.echo(json.dumps({**totals, "migration": migration, "delta": delta,
                               "plan_vs_actual": versus}, indent=2, default=str))
    else:
        _print_summary(totals)
        if migration is not None:
            _print_migration(migration)
        if delta is not None:
            _print_delta(delta)
        if versus is not None:
            _print_versus(versus)


def _print_versus(v: dict[str, Any]) -> None:
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


def _print_delta(d: dict[str, Any]) -> None:
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


def _print_summary(t: dict[str, Any]) -> None:
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
            lines.append(f"By {title}:")
            lines += [f"  {row['name']:<16} {row['objects']:>10}   {format_bytes(row['bytes'])}"
                      for row in t[key]]
    click.echo("\n".join(lines))


def _print_migration(m: dict[str, Any]) -> None:
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


# -- plan -----------------------------------------------------------------------------------
@main.command(epilog=_examples("plan"))
@db_option
@click.option("--provider", help="Price catalogue: aws-s3, aliyun-oss, tencent-cos, huawei-obs, "
              "azure-blob, gcs (default: from the endpoint).")
@click.option("--price-file", type=click.Path(exists=True, dir_okay=False),
              help="Your contract prices, same format as the catalogue (docs/pricing.md).")
@click.option("--bandwidth", help="The link's nominal speed, with its unit: 200Mbit/s or 25MB/s.")
@click.option("--measure", is_flag=True,
              help="Migrate a sample of the bucket (its mix of sizes) with migrate's own engine "
                   "into a temporary folder and time it: the link as migrate will see it.")
@click.option("--measure-seconds", default=20.0, show_default=True, type=click.FloatRange(3, 3600),
              help="Stop the --measure run after this long (the sample may finish sooner).")
@click.option("--measure-bytes", default="256MB", show_default=True,
              help="The --measure sample's size at most (egress you pay for).")
@click.option("--recalibrate", is_flag=True,
              help="Take the link's rate from this migration's own runs so far (downloaded bytes "
                   "over active time, outages left out) and plan the rest with it.")
@click.option("--latency", "latency_text",
              help="Round trip to the endpoint for a --bandwidth plan, e.g. 30ms (default 50ms).")
@click.option("--schedule", "schedule_text",
              help='Bandwidth timetable, as migrate --bwlimit: "Mon-Fri 07:30,0 19:00,off" moves '
                   'nothing (0) on weekdays from 07:30 and without limit (off) from 19:00.')
@click.option("--concurrency", type=click.IntRange(1, 1024),
              help="Parallel requests the migration will use (default: migrate's own, "
                   "2 x threads per worker process).")
@click.option("--start", "start_text", help="When the migration starts (ISO 8601; default now).")
@click.option("--offline-threshold", default="7d", show_default=True,
              help="Price an offline device when the network would take longer (e.g. 7d, 36h).")
@click.option("--out", "outs", multiple=True, type=click.Path(dir_okay=False),
              help="Write the plan: .md, .html (with a chart) or .json; repeatable.")
@click.option("--lang", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Language of the plan's text and documents (the JSON stays English).")
@click.option("--assume-size", "assume_size",
              help="Plan the same mix of objects at this size instead (e.g. 40TB); every output "
                   "says it is an assumption, and the audit keeps comparing with the real plan.")
@source_options
@output_options
def plan(db_path: str, provider: str | None, region: str | None, price_file: str | None,
         bandwidth: str | None, measure: bool, measure_seconds: float, measure_bytes: str,
         recalibrate: bool, latency_text: str | None, schedule_text: str | None,
         concurrency: int | None, start_text: str | None, offline_threshold: str,
         outs: tuple[str, ...], lang: str, assume_size: str | None,
         endpoint_url: str | None, profile: str | None, retries: int, as_json: bool,
         quiet: bool) -> None:
    """Estimate egress cost and transfer time, as ranges, per scenario.

    Scenarios side by side: fastest, cheapest (e.g. night-only on Alibaba OSS), within your
    timetable, the provider's free-exit program, and an offline device when the network would
    take too long. Every price carries its source and date; unverified ones are flagged.
    """
    from datetime import datetime

    from cloudexit.plan import model as plan_model
    from cloudexit.plan.measure import measure_link, recalibrated, stored_measurement
    from cloudexit.plan.build import build_plan, link_from
    from cloudexit.engine.schedule import parse_schedule
    from cloudexit.s3.source import Source
    from cloudexit.state.db import State
    from cloudexit.core.files import write_private
    from cloudexit.core.units import format_bytes, format_rate, parse_duration, parse_rate, parse_size

    rate = parse_rate(bandwidth, limit=False) if bandwidth else None
    schedule = parse_schedule(schedule_text) if schedule_text else None
    threshold = parse_duration(offline_threshold)
    assume_bytes = parse_size(assume_size) if assume_size else None
    start = datetime.fromisoformat(start_text) if start_text else datetime.now()
    start = start if start.tzinfo else start.astimezone()
    with State(db_path) as state:
        measurement = None
        if measure:
            url = state.meta("source_url")
            if url is None:
                raise UsageError("the inventory is empty: nothing to measure",
                                 hint="run `cloudexit inventory s3://BUCKET` first")
            endpoint = endpoint_url or (None if state.meta("endpoint_url") == "aws"
                                        else state.meta("endpoint_url"))
            source = Source(url, SourceConfig(endpoint_url=endpoint, profile=profile,
                                              max_attempts=retries))
            with _ByteBar(quiet or as_json, "measuring") as bar:
                measurement = measure_link(state, source, seconds=measure_seconds,
                                           max_bytes=parse_size(measure_bytes), progress=bar.update)
            if not quiet and not as_json:
                m = measurement
                click.echo(f"Measured the link by migrating {m.objects} sampled objects "
                           f"({m.seconds:.1f} s): steady state {format_rate(m.throughput_expected)}, "
                           f"{format_bytes(m.throughput_low)}/s to {format_bytes(m.throughput_high)}/s "
                           f"over {m.steady_seconds:.1f} s, "
                           f"latency {m.latency_s * 1000:.0f} ms (p90 {m.latency_p90_s * 1000:.0f} ms). "
                           f"The sample cost {format_bytes(m.bytes)} of egress and "
                           f"{m.get_requests:,} GET requests.")
        elif recalibrate:
            measurement = recalibrated(state)
            if not quiet and not as_json:
                click.echo(f"Recalibrated from {measurement.classes['runs']['count']} migration run(s): "
                           f"{format_rate(measurement.throughput_expected)} over "
                           f"{measurement.steady_seconds:.0f} s of transfer.")
        elif rate is None:
            measurement = stored_measurement(state)
        latency = parse_duration(latency_text).total_seconds() if latency_text else None
        link = link_from(rate, measurement, concurrency, latency)
        result = build_plan(state, provider, region, price_file, link, schedule, start, threshold,
                            assume_bytes)
    for out in outs:
        suffix = out.rsplit(".", 1)[-1].lower()
        render = {"md": lambda p: plan_model.render_markdown(p, lang),
                  "html": lambda p: plan_model.render_html(p, lang),
                  "json": lambda p: json.dumps(p.to_dict(), indent=2, default=str)}.get(suffix)
        if render is None:
            raise UsageError(f"--out {out}: unknown format", hint="end the name in .md, .html or .json")
        write_private(out, render(result))
        if not quiet and not as_json:
            click.echo(f"Wrote {out}")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif not quiet:
        click.echo(plan_model.render_text(result, lang))


class _ByteBar:
    """A tqdm byte counter on a terminal, nothing otherwise."""

    def __init__(self, quiet: bool, desc: str) -> None:
        self.show = not quiet and sys.stderr.isatty()
        self.desc = desc
        self.bar: Any = None

    def __enter__(self) -> "_ByteBar":
        if self.show:
            from tqdm import tqdm
            self.bar = tqdm(unit="B", unit_scale=True, desc=self.desc, file=sys.stderr)
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# -- migrate --------------------------------------------------------------------------------
@main.command(epilog=_examples("migrate"))
@click.option("--to", "dests", metavar="DEST", multiple=True,
              help="The archive folder (/srv/pacs-archive or file:///srv/pacs-archive), first; then "
                   "any PACS to deliver to: dicom://AET@HOST:PORT (C-STORE) or "
                   "dicomweb+https://HOST/PATH (STOW-RS). Repeatable.")
@click.option("--resume", is_flag=True,
              help="Continue the last migration run (and its PACS deliveries); needs no other arguments.")
@click.option("--yes", is_flag=True,
              help="Start a run into a folder other than the archive an earlier run filled "
                   "(everything is downloaded again).")
@click.option("--calling-aet", envvar="CLOUDEXIT_CALLING_AET", default=None,
              help="Our AE title for C-STORE destinations (default CLOUDEXIT; env CLOUDEXIT_CALLING_AET).")
@db_option
@source_options
@click.option("--layout", type=click.Choice(["uid", "keys"]), default=None,
              help="uid: STUDY/SERIES/SOP.dcm (default); keys: the source keys, sanitised.")
@click.option("--non-dicom", type=click.Choice(["copy", "skip"]), default=None,
              help="Objects that are not DICOM: copy into DEST/_non-dicom/ (default) or skip (recorded).")
@click.option("--order", type=click.Choice(["newest", "oldest", "key"]), default=None,
              help="Which studies first (default newest); a study's objects go together.")
@click.option("--restore-tier", type=click.Choice(["bulk", "standard", "expedited"]), default=None,
              help="Tier of RestoreObject for archived storage classes (default bulk); expedited "
                   "is not offered for DEEP_ARCHIVE, whose objects then get standard (said once).")
@click.option("--restore-days", type=click.IntRange(1, 365), default=None,
              help="Days a restored copy stays readable (default 7).")
@click.option("--restore-poll", type=click.FloatRange(1, 86400), default=None,
              help="Seconds between checks of restores in progress (default 900).")
@click.option("--bwlimit", default=None,
              help='Bandwidth timetable, rclone syntax: "20M" (20 MiB/s), "08:00,20M 18:00,off", '
                   '"Mon-Fri 07:30,0 19:00,off". Each entry TIME,RATE holds until the next; 0 '
                   'pauses, off means no limit. While a migration runs, '
                   '`cloudexit migrate --bwlimit TIMETABLE` changes its limit within seconds.')
@click.option("--processes", type=click.IntRange(0, 64), default=None,
              help="Worker processes (default 0: one per CPU).")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="Download threads per worker process (default 8); each process also runs "
                   "twice as many small objects at once on its main thread.")
@click.option("--large-object", type=click.IntRange(1024, 2**40), default=None,
              help="Objects of this many bytes or more download in parallel ranges (default 64 MiB).")
@click.option("--range-size", type=click.IntRange(65536, 2**32), default=None,
              help="Bytes per ranged GET of a large object (default 16 MiB).")
@click.option("--backup-every", "backup_minutes", type=click.FloatRange(0, 7 * 24 * 60), default=None,
              help="Minutes between backups of the state DB (<db>.backup-1, -2; default 30, 0: none).")
@click.option("--join-archive", is_flag=True, default=None,
              help="Write into an archive folder another migration (another state DB) claimed, to "
                   "consolidate several buckets into one archive; its files are never replaced.")
@cluster_options  # --cluster (cloudexit/cli/cluster.py)
@output_options
def migrate(dests: tuple[str, ...], resume: bool, yes: bool, calling_aet: str | None, db_path: str,
            endpoint_url: str | None,
            profile: str | None, region: str | None, retries: int, layout: str | None,
            non_dicom: str | None, order: str | None, restore_tier: str | None,
            restore_days: int | None, restore_poll: float | None, bwlimit: str | None,
            processes: int | None, threads: int | None, large_object: int | None,
            range_size: int | None, backup_minutes: float | None, join_archive: bool | None,
            as_json: bool, quiet: bool) -> None:
    """Download every inventoried object into the archive, verified; resumable; then deliver
    each verified DICOM object to every PACS given with more `--to`.

    Each object is fetched with If-Match on its inventoried ETag and counts as done only when
    size, MD5 or multipart ETag, provider checksums and its DICOM SOP Instance UID check out,
    after fsync and an atomic rename; the state DB records its SHA-256. Stop it any way you
    like (Ctrl-C, kill, power cut), then `cloudexit migrate --resume`.

    PACS destinations (`--to dicom://AET@HOST:PORT`, `--to dicomweb+https://HOST/PATH`) get each
    DICOM object once, from the archive copy, as soon as it is verified; the state DB records
    every destination's answer per object (stored, warning, conflict, failed). A PACS that stops
    answering pauses its deliveries until it is back. Objects already in the archive are
    delivered without downloading them again (a PACS added to a later run). Non-DICOM objects
    stay in the archive only.

    Exit 0: every object verified and delivered; 3: some failed, are missing or quarantined, or
    a PACS refused or conflicted (listed).
    """
    from cloudexit.core.config import MigrateConfig
    from cloudexit.engine.migrate import (Migration, check_new_archive, config_from_run, last_run, restore_tier_note,
                          set_live_bwlimit)
    from cloudexit.s3.source import Source
    from cloudexit.state.db import State
    from cloudexit.stores import open_store
    from cloudexit.stores.filesystem import FilesystemStore
    from cloudexit.verify import open_destination

    if dests and resume:
        raise UsageError("give either --to DEST (a new run) or --resume (the last run), not both")
    dest = dests[0] if dests else None
    overrides = {"layout": layout, "non_dicom": non_dicom, "order": order,
                 "restore_tier": {"bulk": "Bulk", "standard": "Standard",
                                  "expedited": "Expedited"}.get(restore_tier or ""),
                 "restore_days": restore_days, "restore_poll": restore_poll, "bwlimit": bwlimit,
                 "processes": processes, "threads": threads, "large_object": large_object,
                 "range_size": range_size, "backup_minutes": backup_minutes,
                 "join_archive": join_archive}
    with State(db_path) as state:
        if dest or resume:
            _warn_patient_key(state)
        if not dest and not resume:
            if bwlimit is None:
                raise UsageError("say where to: --to DEST starts a run, --resume continues the last one")
            run = set_live_bwlimit(state, bwlimit)
            if not quiet:
                click.echo(f"Migration run {run['id']} (pid {run['pid']}) now uses --bwlimit {bwlimit!r}.")
            return
        if resume:
            run = last_run(state)
            if run is None:
                raise UsageError("nothing to resume: no migration has started with this state DB",
                                 hint="start one with: cloudexit migrate --to DEST")
            config = config_from_run(run, **overrides)
            store = FilesystemStore(run["dest"][len("file://"):], layout=config.layout)
            pacs = list(json.loads(run["options"] or "{}").get("deliver") or [])
        else:
            assert dest is not None
            config = MigrateConfig(**{k: v for k, v in overrides.items() if v is not None})
            opened = open_store(dest)
            if not isinstance(opened, FilesystemStore):
                raise UsageError(f"--to {dest}: the first --to must be a folder (downloads land in the "
                                 "archive before any PACS gets them)",
                                 hint="e.g. --to /srv/pacs-archive --to dicom://PACS@pacs.example.org:104")
            store = FilesystemStore(opened.root, layout=config.layout)
            check_new_archive(state, store.id, yes)
            pacs = list(dests[1:])
        deliver_to = []
        for url in pacs:
            target = open_destination(url, calling_aet=calling_aet)
            if isinstance(target, FilesystemStore):
                raise UsageError(f"--to {url}: one folder only (the first --to); the others must be a PACS",
                                 hint="dicom://AET@HOST:PORT or dicomweb+https://HOST/PATH")
            deliver_to.append(target)
        url = state.meta("source_url")
        bound = state.meta("endpoint_url")
        source = Source(url or "", SourceConfig(
            endpoint_url=endpoint_url or (None if bound in (None, "aws") else bound),
            profile=profile, region=region or state.meta("region"), max_attempts=retries))
        note = restore_tier_note(state, config.restore_tier)
        if note and not quiet:
            click.echo(note, err=True)
        executor = cluster_executor(profile, quiet or as_json)  # None: worker processes here
        with _MigrateBar(quiet or as_json) as bar:
            summary = Migration(state, source, store, config, progress=bar.update,
                                resume=resume, deliver_to=deliver_to, executor=executor).run()
    if as_json:
        click.echo(json.dumps(summary.__dict__, indent=2, default=str))
    elif not quiet:
        _print_migration_result(summary)
    if summary.backup_error:
        click.secho(f"Warning: the last backup of the state DB failed: {summary.backup_error}", fg="yellow", err=True)
    if summary.exit_code:
        sys.exit(summary.exit_code)


def _print_migration_result(s: Any) -> None:
    from cloudexit.core.units import format_bytes, format_duration

    verb = "resumed and finished" if s.resumed else "finished"
    lines = [f"Migration run {s.run} into {s.dest} {verb} in {format_duration(s.elapsed)}:",
             f"  verified     {s.verified:>10}   {format_bytes(s.bytes_verified)} in the archive"]
    for label, value in (("duplicates", s.duplicates), ("quarantined", s.quarantined),
                         ("failed", s.failed), ("missing", s.missing), ("skipped", s.skipped),
                         ("unfinished", s.unfinished)):
        if value:
            lines.append(f"  {label:<12} {value:>10}")
    req = s.requests
    lines.append(f"  used: {format_bytes(s.bytes_downloaded)} downloaded (retries included), "
                 f"{req['GET']} GET, {req['HEAD']} HEAD, {req['LIST']} LIST, {req['RESTORE']} RESTORE "
                 f"requests, {s.retries} retries")
    for dest, c in (getattr(s, "deliveries", None) or {}).items():
        done = sum(c.get(k, 0) for k in ("stored", "warning", "duplicate"))
        rest = ", ".join(f"{n} {k}" for k, n in sorted(c.items()) if k not in ("stored",) and n)
        lines.append(f"  delivered to {dest}: {done} of {sum(c.values())}" + (f" ({rest})" if rest else ""))
    click.echo("\n".join(lines))
    if s.failures:
        click.echo("Not verified or not delivered (see `cloudexit status`):", err=True)
        for key, state, reason in s.failures[:20]:
            click.echo(f"  {state:<11} {key!r}: {reason}", err=True)


class _MigrateBar:
    """A tqdm bar (bytes, objects, rate, ETA, failures) on a terminal; a plain line every
    30 s otherwise, and at once when the run starts or stops waiting for the link."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last = time.monotonic()
        self.last_bytes = 0
        self.waiting: str | None = None  # the waiting_since last shown
        self.stopping = False

    def __enter__(self) -> "_MigrateBar":
        if not self.quiet and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit="B", unit_scale=True, desc="migrate", file=sys.stderr,
                            dynamic_ncols=True)
        return self

    def update(self, p: Any) -> None:
        if p.stopping is not None and not self.stopping:  # Ctrl-C: said at once, even with -q
            self.stopping = True
            if self.bar is not None:
                self.bar.clear()
            click.echo(f"\nstopping: finishing {p.stopping} objects in flight "
                       "(Ctrl-C again to stop now)", err=True)
            return
        if self.quiet:
            return
        from cloudexit.core.units import format_bytes, format_rate

        waiting = ""
        if p.waiting_since:
            waiting = f"waiting for the link since {p.waiting_since}" + (
                f" ({p.waiting_why})" if p.waiting_why else "")
        if self.bar is not None:
            self.bar.total = p.bytes_total
            self.bar.n = p.bytes_done
            self.bar.set_postfix_str(
                f"{p.done}/{p.total} obj, {p.failed} failed"
                + (f", {p.restoring} restoring" if p.restoring else "")
                + (f", limit {format_rate(p.rate_limit)}" if p.rate_limit is not None else "")
                + (f", {waiting}" if waiting else ""), refresh=False)
            self.bar.refresh()
            return
        clock = time.monotonic()
        if p.waiting_since != self.waiting:  # a log under nohup or systemd says so at once
            self.waiting = p.waiting_since
            click.echo(f"migrate: {waiting or 'the link is back'}", err=True)
        if clock - self.last >= 30:
            rate = (p.bytes_done - self.last_bytes) / (clock - self.last)
            self.last, self.last_bytes = clock, p.bytes_done
            eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else None
            click.echo(f"migrate: {p.done}/{p.total} objects, {format_bytes(p.bytes_done)} of "
                       f"{format_bytes(p.bytes_total)}, {format_bytes(rate)}/s"
                       + (f", ETA {int(eta)} s" if eta is not None else "")
                       + f", {p.failed} failed" + (f", {waiting}" if waiting else ""), err=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# -- verify -------------------------------------------------------------------------------
class _PhaseBar:
    """One tqdm bar per phase (files, studies, samples) on a terminal, with rate and ETA; a
    plain line every 30 s otherwise."""

    def __init__(self, quiet: bool, desc: str) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.desc = desc
        self.bar: Any = None
        self.phase = ""
        self.started = self.last = time.monotonic()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if phase != self.phase:
            self.close()
            self.phase, self.started = phase, time.monotonic()
            if self.tty:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit=phase, desc=f"{self.desc} {phase}", file=sys.stderr,
                                dynamic_ncols=True)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        elif time.monotonic() - self.last >= 30:
            self.last = time.monotonic()
            rate = done / max(self.last - self.started, 1e-6)
            eta = f", ETA {int((total - done) / rate)} s" if rate > 0 and total >= done else ""
            click.echo(f"{self.desc}: {phase} {done}/{total}{eta}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

@main.command(epilog=_examples("verify"))
@db_option
@click.option("--to", "dests", multiple=True, metavar="DEST",
              help="A destination to verify: a folder, dicom://AET@HOST:PORT or dicomweb+https://HOST/PATH; "
                   "repeatable (default: every destination of the migration).")
@click.option("--deep", is_flag=True,
              help="Re-read every archived file and re-check its SHA-256 (reads everything again).")
@click.option("--sample", default=0, show_default=True, type=click.IntRange(0, 100_000),
              help="Fetch N instances back from a PACS (C-GET / WADO-RS) and compare them with the archive.")
@click.option("--seed", type=int, help="Random seed of --sample (recorded; default: random).")
@click.option("--calling-aet", envvar="CLOUDEXIT_CALLING_AET", default="CLOUDEXIT", show_default=True,
              help="Our AE title towards a dicom:// PACS (env CLOUDEXIT_CALLING_AET).")
@output_options
def verify(db_path: str, dests: tuple[str, ...], deep: bool, sample: int, seed: int | None,
           calling_aet: str, as_json: bool, quiet: bool) -> None:
    """Re-check what landed against the inventory: files, hashes, PACS counts.

    A folder: every recorded file present with its size (and SHA-256 with --deep), no extra
    files, instances per study. A PACS: C-FIND or QIDO-RS counts per study and series, missing and
    extra instances; --sample compares instances fetched back with the archived copies. Results
    are stored in the state DB for the audit. Exit 0: all verified; 3: differences found.
    """
    from cloudexit.state.db import open_readable
    from cloudexit.stores import QueryRefused
    from cloudexit.verify import check_sample, destinations, dicomweb_twin, open_destination, verify as run_verify

    reports = []
    with open_readable(db_path, scratch=True) as state:
        recorded = state.scratch_of is None
        targets = list(dests) or destinations(state)
        if not targets:
            raise UsageError("nothing to verify: no migration has delivered anywhere yet",
                             hint="run `cloudexit migrate --to DEST` first, or pass --to")
        check_sample(targets, sample)
        for dest in targets:  # a DICOMweb URL appended below (C-FIND refused) is verified too
            store = open_destination(dest, calling_aet=calling_aet)
            bar = _PhaseBar(quiet or as_json, "verify")
            try:
                reports.append(run_verify(state, store, deep=deep, sample=sample, seed=seed, progress=bar))
            except QueryRefused as exc:
                twin = dicomweb_twin(state, store.id, targets)
                if twin is None:
                    raise
                click.echo(f"{store.id}: {exc.message}; verifying through its DICOMweb URL "
                           f"{twin} (QIDO-RS) instead. Hint: {exc.hint}", err=True)
                if twin not in targets:
                    targets.append(twin)
            finally:
                bar.close()
                store.close()
    if as_json:
        click.echo(json.dumps({"verified": all(r.passed for r in reports), "recorded": recorded,
                               "destinations": [r.to_dict() for r in reports]}, indent=2, default=str))
    elif not quiet:
        for r in reports:
            _print_verify(r)
    if not recorded:
        click.echo(f"Note: {db_path} is read-only: these results were NOT recorded in it (the audit "
                   "will not show them); run verify on a writable DB to record them.", err=True)
    if not all(r.passed for r in reports):
        sys.exit(EXIT_PARTIAL)


def _print_verify(r: Any) -> None:
    c = r.counts
    ok = sum(1 for s in r.studies if s.status == "ok")
    lines = [f"{r.dest}: {'verified' if r.passed else 'DIFFERENCES FOUND'} (verify run {r.run_id})",
             f"  studies {ok}/{len(r.studies)} match; instances {c.get('found_instances', 0)} "
             f"of {c.get('expected_instances', 0)} expected"]
    if r.kind == "filesystem":
        lines.append(f"  files {c.get('files_ok', 0)}/{c.get('files_checked', 0)} ok"
                     + (f", {c.get('files_rehashed', 0)} re-hashed" if r.options.get("deep") else ""))
    if r.samples:
        same = sum(1 for s in r.samples if s.result in ("identical", "equivalent"))
        lines.append(f"  samples {same}/{len(r.samples)} identical or equivalent")
    lines += [f"  {f.text()}" for f in r.findings[:20]]
    if len(r.findings) > 20:
        lines.append(f"  ... {len(r.findings) - 20} more (cloudexit verify --json, or table verify_findings)")
    for s in r.samples:
        if s.result not in ("identical", "equivalent"):
            changed = ", ".join(f"{d['keyword']} {d['change']}" for d in s.differences[:8])
            lines.append(f"  sample {s.sop_uid}: {s.result}; pixel data {s.pixel or '-'}"
                         + (f"; transfer syntax {s.transfer_syntax}" if s.transfer_syntax else "")
                         + (f"; {changed}" if changed else "") + (f"; {s.detail}" if s.detail else ""))
    click.echo("\n".join(lines))


# -- audit ----------------------------------------------------------------------------------
@main.group(invoke_without_command=True, epilog=_examples("audit"))
@click.option("--out", "out", type=click.Path(file_okay=False),
              help="The folder to write (created 0700; refused if it holds other files).")
@click.option("--lang", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Language of audit.html (zh: Chinese for the hospital's management).")
@click.option("--include-phi", is_flag=True,
              help="Add Patient ID and Name (read from the archived files) to the manifest and "
                   "exceptions; every page then says it holds patient identity.")
@click.option("--force", is_flag=True, help="Write into a folder that is not empty (replaces a previous audit).")
@click.option("--redact-keys", is_flag=True,
              help="Write manifest.csv with object keys and archive paths hashed per folder level "
                   "(keyed, not reversible from the manifest): for keys that embed patient names.")
@click.option("--sign", "sign_key", metavar="KEY", type=click.Path(dir_okay=False),
              help="Sign SHA256SUMS with this SSH key (ssh-keygen -Y sign; a key without passphrase, "
                   "or KEY.pub of a key in ssh-agent): SHA256SUMS.sig; the report names the signer.")
@db_option
@output_options
@click.pass_context
def audit(ctx: click.Context, out: str | None, lang: str, include_phi: bool, force: bool,
          redact_keys: bool, sign_key: str | None, db_path: str, as_json: bool, quiet: bool) -> None:
    """Write the migration audit: audit.html, audit.json, manifest.csv, events.jsonl, SHA256SUMS.

    The report management signs: complete or not and why, counts at the source and in each
    destination, charts, exceptions with remedies, how each object was verified, chain of
    custody, data residency, decommission readiness, sign-off. Check a written audit later
    with `cloudexit audit verify DIR`.

    Exit 0: the migration is complete; 3: the audit is written but the migration is not
    complete or has exceptions to review (the report says which).
    """
    if ctx.invoked_subcommand is not None:
        return
    if not out:
        raise UsageError("say where to write the audit: --out DIR",
                         hint="or check an audit written before: cloudexit audit verify DIR")
    from cloudexit.report.audit import open_state, write_audit
    from cloudexit.report.sign import signer_of

    if include_phi and redact_keys:
        raise UsageError("--redact-keys hides the names keys may hold; --include-phi adds patient names",
                         hint="choose one of them")
    signer = signer_of(sign_key) if sign_key else None  # a bad key stops before anything is written
    with open_state(db_path) as state:
        result = write_audit(state, out, lang=lang, include_phi=include_phi, force=force,
                             redact_keys=redact_keys, signer=signer)
        recorded = state.scratch_of is None
    status = result.verdict["status"]
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "verdict": result.verdict,
                               "fingerprint": result.fingerprint, "files": result.files,
                               "manifest_rows": result.manifest_rows, "events": result.events,
                               "signer": signer.facts() if signer else None},
                              indent=2, default=str))
    elif not quiet:
        # The verdict's one name (as in audit.json and the report), then what it means.
        meaning = {"complete": "nothing left to do", "complete_with_exceptions": "nothing left to do by "
                   "the tool; exceptions for a person to review", "incomplete": "the migration is NOT complete"}
        click.echo(f"Audit written to {result.out}/audit.html (verdict {status}: {meaning[status]}).")
        click.echo(f"  {result.manifest_rows} manifest rows, {result.events} events; fingerprint {result.fingerprint}")
        if signer:
            click.echo(f"  signed by {signer.identity}, key {signer.fingerprint} (SHA256SUMS.sig)")
            click.echo(f"  check it any time with: cloudexit audit verify {result.out} --signer {signer.key}"
                       + ("" if signer.key.endswith(".pub") else ".pub"))
        else:
            click.echo(f"  check it any time with: cloudexit audit verify {result.out}")
    if not recorded:
        click.echo(f"Note: {db_path} is read-only: this audit is NOT recorded in its event log, so "
                   f"`cloudexit audit verify {result.out} --db {db_path}` will say the DB has no "
                   "record of it.", err=True)
    if result.others:
        click.echo(f"Note: {len(result.others)} other file(s) in {result.out} are not part of the audit; "
                   "`cloudexit audit verify` reports them as added.", err=True)
    if status != "complete":
        sys.exit(EXIT_PARTIAL)


@audit.command("verify", epilog=_examples("audit_verify"))
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None, callback=_note_db,
              help="Also check the events against this state database and that it recorded this audit.")
@click.option("--signer", metavar="KEYFILE|allowed_signers", type=click.Path(dir_okay=False),
              help="Check SHA256SUMS.sig was made by this public key (or a key in this allowed_signers file).")
@output_options
def audit_verify(folder: str, db_path: str | None, signer: str | None, as_json: bool, quiet: bool) -> None:
    """Check a written audit: every file against SHA256SUMS, the event hash chain, the fingerprint,
    and with --signer the SSH signature of SHA256SUMS.

    Prints OK, or exactly which file was altered, added or removed and where the event chain
    breaks. Exit 0: intact; 1: tampered.
    """
    from cloudexit.report.audit import verify_audit

    report = verify_audit(folder, db_path, signer=signer)
    sig = report["signature"]
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif report["ok"]:
        if not quiet:
            chain = report["chain"]
            click.echo(f"OK: {len(report['files'])} files match SHA256SUMS; event chain intact "
                       f"({chain['events']} events, head {chain['head']}); fingerprint {report['fingerprint']}")
            if sig["ok"]:
                click.echo(f"OK: SHA256SUMS signed by {sig['identity']} (key {sig['fingerprint']})")
            elif sig["note"]:
                click.echo(f"Note: {sig['note']}")
    else:
        click.echo(f"TAMPERED: {folder}", err=True)
        for problem in report["problems"]:
            click.echo(f"  {problem}", err=True)
    if not report["ok"]:
        sys.exit(EXIT_ERROR)


# -- run ------------------------------------------------------------------------------------
@main.command("run", epilog=_examples("run_playbook"))
@click.argument("playbook_path", metavar="PLAYBOOK.yaml", type=click.Path(dir_okay=False))
@click.option("--db", "db_path", envvar="CLOUDEXIT_DB", type=click.Path(dir_okay=False),
              help="The migration's state database (env CLOUDEXIT_DB; default: the playbook's `db:`, "
                   "else ./cloudexit.db).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a playbook field, e.g. --set source.endpoint=http://127.0.0.1:8333; repeatable.")
@click.option("--from", "from_step", metavar="STEP", help="Start at this step (run it again even if done).")
@click.option("--until", metavar="STEP", help="Stop after this step.")
@click.option("--dry-run", is_flag=True, help="Print what each step would do; change nothing.")
@click.option("--ack", multiple=True, metavar="STEP", help="Pass a checkpoint step (recorded with your user name).")
@click.option("--confirm", "token", metavar="TOKEN",
              help="Let the decommission step delete: the token its dry run printed.")
@output_options
def run_playbook(playbook_path: str, db_path: str | None, overrides: tuple[str, ...], from_step: str | None,
                 until: str | None, dry_run: bool, ack: tuple[str, ...], token: str | None,
                 as_json: bool, quiet: bool) -> None:
    """Run a playbook's steps in order, resumably (see docs/playbooks.md).

    Each step's state is recorded in the state DB: run the same command again and it continues
    at the step in progress. `${VAR}` in the playbook comes from the environment. Gates (a pilot
    with mismatches, a delta above the cutover threshold, a checkpoint, the decommission token)
    stop the run with a message saying what to do.

    Exit 0: the steps ran; 3: a gate stopped the run; 1: a step failed.
    """
    from cloudexit.playbook import Runner, load

    book = load(playbook_path, overrides)
    db = db_path or (str(book.db) if book.db else "cloudexit.db")
    say = (lambda text: None) if (quiet or as_json) else click.echo
    runner = Runner(book, db, say=say, ack=ack, confirm=token)
    report = runner.run(from_step=from_step, until=until, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    if quiet:
        return
    if dry_run:
        click.echo(f"Playbook {book.name} on {db} (dry run: nothing changes)")
        for s in report.steps:
            state = "done" if s.status == "skipped" else s.result.get("status", "pending")
            verb = "skip" if s.status == "skipped" else "run "
            click.echo(f"  {verb} {s.name:<14} [{state}] {s.message}")
    elif report.message:
        click.echo(report.message)


# -- decommission ---------------------------------------------------------------------------
@main.command(epilog=_examples("decommission"))
@db_option
@source_options
@click.option("--to", "dests", multiple=True, metavar="DEST",
              help="A destination that must hold a verified copy; repeatable (default: every destination "
                   "the migration delivered to or `verify` checked).")
@click.option("--all-versions", is_flag=True,
              help="Versioned buckets: delete every version whose content is the verified one (by "
                   "VersionId). Without it a verified key only gets a delete marker: its data stays.")
@click.option("--manifest", type=click.Path(dir_okay=False),
              help="Where to write the deletion manifest (CSV, 0600; default: "
                   "decommission-manifest.csv beside the state DB).")
@click.option("--execute", is_flag=True, help="Delete for real; needs --confirm TOKEN from a dry run.")
@click.option("--confirm", "token", metavar="TOKEN", help="The confirmation token the dry run printed.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 1000),
              help="Objects per DeleteObjects request.")
@click.option("--no-if-match", is_flag=True,
              help="Unversioned buckets: do not send the verified ETag as a delete condition (for "
                   "stores that refuse conditional deletes).")
@output_options
def decommission(db_path: str, endpoint_url: str | None, profile: str | None, region: str | None,
                 retries: int, dests: tuple[str, ...], all_versions: bool, manifest: str | None,
                 execute: bool, token: str | None, batch_size: int, no_if_match: bool,
                 as_json: bool, quiet: bool) -> None:
    """Delete the cloud copy: only objects verified at every destination. Dry run by default.

    Lists the bucket as it is now, writes a deletion manifest (every version: delete or keep,
    and why) and prints a confirmation token. `--execute --confirm TOKEN` deletes exactly those
    objects in DeleteObjects batches and records each answer (table `deletions`). Versioned
    buckets: see --all-versions and docs/decommission.md.

    Exit 0: everything in the bucket is (or would be) deleted; 3: something stays (listed).
    """
    from pathlib import Path

    from cloudexit.decommission import execute as run_execute, plan as run_plan, source_from_state, summary_text
    from cloudexit.state.db import State

    if token and not execute:
        raise UsageError("--confirm goes with --execute", hint="add --execute to delete")
    if execute and not token:
        raise UsageError("--execute needs the confirmation token of a dry run: --confirm TOKEN",
                         hint="run `cloudexit decommission` (a dry run) first, review its manifest")
    default_manifest = str(Path(db_path).resolve().parent / "decommission-manifest.csv")
    manifest = manifest or default_manifest
    with State(db_path) as state:
        source = source_from_state(state, endpoint_url, profile, region, retries)
        if not execute:
            p = run_plan(state, source, dests or None, all_versions, manifest)
            if as_json:
                click.echo(json.dumps(p.summary(), indent=2, default=str))
            elif not quiet:
                click.echo("\n".join(summary_text(p)))
                click.echo(f"Manifest: {p.manifest} (sha256 {p.manifest_sha256})")
                if p.to_delete:
                    # The same command as this dry run, so it can be pasted as printed.
                    import shlex

                    same = ["--db", db_path] + (["--endpoint-url", endpoint_url] if endpoint_url else []) \
                        + (["--profile", profile] if profile else []) \
                        + [arg for d in dests for arg in ("--to", d)] \
                        + (["--manifest", manifest] if manifest != default_manifest else []) \
                        + (["--all-versions"] if all_versions else [])
                    click.echo(f"Nothing deleted (dry run). To delete the {len(p.to_delete)} objects above:\n"
                               f"  cloudexit decommission {shlex.join(same)} --execute --confirm {p.token}")
            if p.kept or not p.to_delete:
                sys.exit(EXIT_PARTIAL)
            return
        assert token is not None
        result = run_execute(state, source, token, dests or None, all_versions, manifest, batch_size,
                             conditional=not no_if_match)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif not quiet:
        from cloudexit.core.units import format_bytes

        click.echo(f"Decommission run {result.run_id}: {result.deleted} deleted in {result.batches} "
                   f"DeleteObjects batch(es), {format_bytes(result.deleted_bytes)}; {result.confirmed} "
                   "confirmed gone by a new listing.")
        if result.markers:
            click.echo(f"  {result.markers} got a delete marker: their data STILL EXISTS in the bucket as "
                       "noncurrent versions (and is billed); --all-versions deletes it.")
        kept = result.plan.summary()
        if kept["kept"]:
            click.echo(f"  {kept['kept']} object version(s), {format_bytes(kept['kept_bytes'])}, stay in "
                       f"the bucket (not verified everywhere): see {result.plan.manifest}")
    for key, version, error in result.failed[:20]:
        click.echo(f"  not deleted {key!r}" + (f" v{version}" if version else "") + f": {error}", err=True)
    if result.exit_code:
        sys.exit(result.exit_code)


# -- demo -----------------------------------------------------------------------------------
@main.command(epilog=_examples("demo"))
@click.option("--workdir", type=click.Path(file_okay=False), default="cloudexit-demo",
              show_default=True,
              help="Where the demo keeps its state DB, archive and reports (reset on each run).")
@click.option("--size", type=click.Choice(["tiny", "demo"]), default="demo", show_default=True,
              help="How big a synthetic PACS to make.")
@output_options
def demo(workdir: str | None, size: str, as_json: bool, quiet: bool) -> None:
    """Run the whole job on an embedded S3 server holding a synthetic PACS."""
    from cloudexit.demo import run_demo

    def say(text: str) -> None:
        if not quiet and not as_json:
            click.echo(text)

    def show(step: str, data: Any) -> None:
        if quiet or as_json:
            return
        if step == "inventory":
            _print_summary(data)
        elif step == "plan":
            from cloudexit.plan.model import render_text
            click.echo(render_text(data))

    try:
        result = run_demo(workdir, size=size, say=say, show=show)
    except KeyboardInterrupt:
        # Not "run the same command again to continue": the demo resets its folder each run.
        click.echo(f"\nInterrupted. The demo starts afresh each time: `cloudexit demo` runs it again "
                   f"from the start (it resets {workdir or 'its folder'}).", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    main()
