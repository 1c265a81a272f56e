"""`cloudexit migrate`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cloudexit.cli.cluster import cluster_executor, cluster_options  # migrate --cluster
from cloudexit.cli.group import (Number, db_option, examples, main, output_options, pacs_options,
                                 source_options, warn_patient_key)
from cloudexit.core.errors import UsageError
from cloudexit.cli.progress import MigrateBar


@main.command(epilog=examples("migrate"))
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
@pacs_options
@db_option
@source_options
@click.option("--layout", type=click.Choice(["uid", "keys"]), default=None,
              help="uid: STUDY/SERIES/SOP.dcm (default); keys: the source keys, sanitised.")
@click.option("--non-dicom", type=click.Choice(["copy", "skip"]), default=None,
              help="Objects that are not DICOM: copy into DEST/_non-dicom/ (default) or skip (recorded).")
@click.option("--keep-containers", is_flag=True, default=None,
              help="Zipped studies: also keep each zip as stored, in DEST/_non-dicom/ (its members "
                   "are unpacked as instances either way; the zip is then downloaded a second time).")
@click.option("--order", type=click.Choice(["newest", "oldest", "key"]), default=None,
              help="Which studies first (default newest); a study's objects go together.")
@click.option("--restore-tier", type=click.Choice(["bulk", "standard", "expedited"]), default=None,
              help="Tier of RestoreObject for archived storage classes (default bulk); expedited "
                   "is not offered for DEEP_ARCHIVE, whose objects then get standard (said once).")
@click.option("--restore-days", type=click.IntRange(1, 365), default=None,
              help="Days a restored copy stays readable (default 7).")
@click.option("--restore-poll", type=Number(1, 86400), default=None,
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
@click.option("--backup-every", "backup_minutes", type=Number(0, 7 * 24 * 60), default=None,
              help="Minutes between backups of the state DB (<db>.backup-1, -2; default 30, 0: none).")
@click.option("--join-archive", is_flag=True, default=None,
              help="Write into an archive folder another migration (another state DB) claimed, to "
                   "consolidate several buckets into one archive; its files are never replaced.")
@cluster_options  # --cluster (cloudexit/cli/cluster.py)
@output_options
def migrate(dests: tuple[str, ...], resume: bool, yes: bool, calling_aet: str | None, db_path: str,
            endpoint_url: str | None,
            profile: str | None, region: str | None, retries: int, layout: str | None,
            non_dicom: str | None, keep_containers: bool | None, order: str | None,
            restore_tier: str | None,
            restore_days: int | None, restore_poll: float | None, bwlimit: str | None,
            processes: int | None, threads: int | None, large_object: int | None,
            range_size: int | None, backup_minutes: float | None, join_archive: bool | None,
            pacs_timeouts: dict[str, float], as_json: bool, quiet: bool) -> None:
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
    from cloudexit import app
    from cloudexit.core.config import SourceConfig
    from cloudexit.engine.migrate import set_live_bwlimit
    from cloudexit.state.db import State

    if dests and resume:
        raise UsageError("give either --to DEST (a new run) or --resume (the last run), not both")
    settings = {"layout": layout, "non_dicom": non_dicom, "keep_containers": keep_containers,
                "order": order,
                "restore_tier": {"bulk": "Bulk", "standard": "Standard",
                                 "expedited": "Expedited"}.get(restore_tier or ""),
                "restore_days": restore_days, "restore_poll": restore_poll, "bwlimit": bwlimit,
                "processes": processes, "threads": threads, "large_object": large_object,
                "range_size": range_size, "backup_minutes": backup_minutes,
                "join_archive": join_archive}
    with State(db_path) as state:
        if dests or resume:
            warn_patient_key(state)
        elif bwlimit is not None:
            run = set_live_bwlimit(state, bwlimit)
            if not quiet:
                click.echo(f"Migration run {run['id']} (pid {run['pid']}) now uses --bwlimit {bwlimit!r}.")
            return
        choice = app.choose_run(state, dests, resume, settings, confirmed=yes, pacs=pacs_timeouts)
        source = app.open_source(state, SourceConfig(endpoint_url=endpoint_url, profile=profile,
                                                     region=region, max_attempts=retries))
        note = app.restore_note(state, choice.config)
        if note and not quiet:
            click.echo(note, err=True)
        executor = cluster_executor(profile, quiet or as_json)  # None: worker processes here
        with MigrateBar(quiet or as_json) as bar:
            summary = app.migrate(state, source, choice, calling_aet, progress=bar.update,
                                  executor=executor)
    if as_json:
        click.echo(json.dumps(summary.__dict__, indent=2, default=str))
    elif not quiet:
        print_migration_result(summary)
    if summary.backup_error:
        click.secho(f"Warning: the last backup of the state DB failed: {summary.backup_error}", fg="yellow", err=True)
    if summary.exit_code:
        sys.exit(summary.exit_code)


def print_migration_result(s: Any) -> None:
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
