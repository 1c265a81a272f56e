"""`cloudexit inventory`."""

from __future__ import annotations

import json
import sys

import click

from cloudexit.cli.cluster import cluster_headers, inventory_cluster_options  # inventory --cluster
from cloudexit.cli.group import (EXIT_PARTIAL, db_option, examples, main, output_options, source_options,
                                 warn_patient_key)
from cloudexit.cli.progress import InventoryBar
from cloudexit.cli.status import print_summary
from cloudexit.core.config import InventoryConfig, SourceConfig


@main.command(epilog=examples("inventory"))
@click.argument("url", metavar="s3://BUCKET[/PREFIX]")
@db_option
@source_options
@click.option("--workers", default=InventoryConfig.workers, show_default=True, type=click.IntRange(1, 256),
              help="Threads reading DICOM headers (with --cluster: on each worker).")
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
@inventory_cluster_options  # --cluster (cloudexit/cli/cluster.py)
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
    from cloudexit import app
    from cloudexit.report.status import inventory_summary
    from cloudexit.s3.source import Source

    source = Source(url, SourceConfig(endpoint_url=endpoint_url, profile=profile, region=region,
                                      max_attempts=retries))
    config = InventoryConfig(workers=workers, list_workers=list_workers, header_bytes=header_bytes,
                             key_pattern=key_pattern)
    cluster = cluster_headers(quiet or as_json)  # refused here: no dask, forwarding not allowed
    with app.first_state(db_path) as state, InventoryBar(quiet or as_json) as bar:
        warn_patient_key(state)
        summary = app.inventory(state, source, config, since, bar.update, cluster=cluster)
        totals = inventory_summary(state)
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
        print_summary(totals)
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
