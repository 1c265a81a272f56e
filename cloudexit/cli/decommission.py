"""`cloudexit decommission`."""

from __future__ import annotations

import json
import sys

import click

from cloudexit.cli.group import EXIT_PARTIAL, db_option, main, examples, output_options, source_options
from cloudexit.core.errors import UsageError


@main.command(epilog=examples("decommission"))
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

    from cloudexit.decommission import execute as run_execute, plan as run_plan, summary_text
    from cloudexit.state.db import State

    if token and not execute:
        raise UsageError("--confirm goes with --execute", hint="add --execute to delete")
    if execute and not token:
        raise UsageError("--execute needs the confirmation token of a dry run: --confirm TOKEN",
                         hint="run `cloudexit decommission` (a dry run) first, review its manifest")
    default_manifest = str(Path(db_path).resolve().parent / "decommission-manifest.csv")
    manifest = manifest or default_manifest
    with State(db_path) as state:
        from cloudexit.app import open_source
        from cloudexit.core.config import SourceConfig

        source = open_source(state, SourceConfig(endpoint_url=endpoint_url, profile=profile,
                                                 region=region, max_attempts=retries))
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
