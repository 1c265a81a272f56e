"""The command line: one thin command per verb over the library.

The only module that imports click and tqdm. Library errors become messages and exit codes in
one place (`CloudexitGroup.invoke`); `--traceback` shows the stack instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import click

from . import __version__
from .config import InventoryConfig, SourceConfig
from .errors import CloudexitError, UsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CloudexitGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CloudexitError as exc:
            if ctx.meta.get("traceback"):
                raise
            click.secho(f"Error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("traceback"):
                raise
            click.echo("\nInterrupted. Everything committed so far is kept; "
                       "run the same command again to continue.", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _set_traceback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["traceback"] = ctx.meta.get("traceback") or value
    return value


def db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--db", "db_path", envvar="CLOUDEXIT_DB", default="cloudexit.db",
                        show_default=True, type=click.Path(dir_okay=False),
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
@main.command()
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
@output_options
def inventory(url: str, db_path: str, endpoint_url: str | None, profile: str | None,
              region: str | None, retries: int, workers: int, list_workers: int, header_bytes: int,
              key_pattern: str | None, as_json: bool, quiet: bool) -> None:
    """List and classify every object in a bucket, reading DICOM headers.

    Resumable: interrupt it and run it again to continue. Run it again later to record new,
    changed and deleted objects.
    """
    from .inventory import Inventory
    from .source import Source
    from .state import State
    from .status import inventory_summary

    source = Source(url, SourceConfig(endpoint_url=endpoint_url, profile=profile, region=region,
                                      max_attempts=retries))
    config = InventoryConfig(workers=workers, list_workers=list_workers, header_bytes=header_bytes,
                             key_pattern=key_pattern)
    with State(db_path, create=True) as state, _InventoryBar(quiet or as_json) as bar:
        summary = Inventory(state, source, config, progress=bar.update).run()
        totals = inventory_summary(state)
    if as_json:
        click.echo(json.dumps({"round": summary.__dict__, "inventory": totals}, indent=2, default=str))
    elif not quiet:
        verb = "resumed and finished" if summary.resumed else "finished"
        click.echo(f"Inventory round {summary.round} {verb}: {summary.new} new, "
                   f"{summary.changed} changed, {summary.deleted} deleted, "
                   f"{summary.unchanged} unchanged.")
        _print_summary(totals)
    if summary.failed:
        click.echo(f"{len(summary.failed)} object(s) could not be read; run inventory again to retry:",
                   err=True)
        for key, reason in summary.failed[:10]:
            click.echo(f"  {key!r}: {reason}", err=True)
        sys.exit(EXIT_PARTIAL)


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
@main.command()
@db_option
@output_options
def status(db_path: str, as_json: bool, quiet: bool) -> None:
    """Where the migration stands, at a glance."""
    from .state import State
    from .status import inventory_summary

    with State(db_path) as state:
        totals = inventory_summary(state)
    if as_json:
        click.echo(json.dumps(totals, indent=2, default=str))
    else:
        _print_summary(totals)


def _print_summary(t: dict[str, Any]) -> None:
    from .units import format_bytes

    inv = t["inventory"]
    lines = [
        f"Source: {t['source']}  (endpoint {t['endpoint']})",
        f"Inventory: {inv['status']} ({inv['rounds']} round(s), last finished {inv['finished_at'] or '-'})",
        f"  objects          {t['objects']:>10}   {format_bytes(t['bytes'])}",
        f"  DICOM instances  {t['dicom_instances']:>10}   in {t['studies']} studies, "
        f"{t['series']} series, {t['patients']} patients",
        f"  non-DICOM        {t['non_dicom']:>10}",
        f"  unreadable       {t['unreadable']:>10}",
    ]
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


# -- plan -----------------------------------------------------------------------------------
@main.command()
@db_option
@click.option("--provider", help="Price catalogue: aws-s3, aliyun-oss, tencent-cos, huawei-obs, "
              "azure-blob, gcs (default: from the endpoint).")
@click.option("--price-file", type=click.Path(exists=True, dir_okay=False),
              help="Your contract prices, same format as the catalogue (docs/pricing.md).")
@click.option("--bandwidth", help="The link's nominal speed, with its unit: 200Mbit/s or 25MB/s.")
@click.option("--measure", is_flag=True,
              help="Download a stratified sample from the bucket to measure throughput and latency.")
@click.option("--measure-bytes", default="512MB", show_default=True,
              help="At most this much for the large objects of the --measure sample.")
@click.option("--schedule", "schedule_text",
              help='Bandwidth timetable, e.g. "Mon-Fri 08:00,50M 18:00,off" (as migrate --bwlimit).')
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Parallel requests the migration will use.")
@click.option("--start", "start_text", help="When the migration starts (ISO 8601; default now).")
@click.option("--offline-threshold", default="7d", show_default=True,
              help="Price an offline device when the network would take longer (e.g. 7d, 36h).")
@click.option("--out", "outs", multiple=True, type=click.Path(dir_okay=False),
              help="Write the plan: .md, .html (with a chart) or .json; repeatable.")
@source_options
@output_options
def plan(db_path: str, provider: str | None, region: str | None, price_file: str | None,
         bandwidth: str | None, measure: bool, measure_bytes: str, schedule_text: str | None,
         concurrency: int, start_text: str | None, offline_threshold: str, outs: tuple[str, ...],
         endpoint_url: str | None, profile: str | None, retries: int, as_json: bool,
         quiet: bool) -> None:
    """Estimate egress cost and transfer time, as ranges, per scenario.

    Scenarios side by side: fastest, cheapest (e.g. night-only on Alibaba OSS), within your
    timetable, the provider's free-exit program, and an offline device when the network would
    take too long. Every price carries its source and date; unverified ones are flagged.
    """
    from datetime import datetime

    from . import plan as plan_model
    from .measure import measure_link, stored_measurement
    from .planning import build_plan, link_from
    from .schedule import parse_schedule
    from .source import Source
    from .state import State
    from .units import format_bytes, format_duration, parse_duration, parse_rate, parse_size

    rate = parse_rate(bandwidth) if bandwidth else None
    schedule = parse_schedule(schedule_text) if schedule_text else None
    threshold = parse_duration(offline_threshold)
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
                measurement = measure_link(state, source, max_bytes=parse_size(measure_bytes),
                                           progress=bar.update)
            if not quiet and not as_json:
                click.echo(f"Measured the link on {measurement.objects} objects "
                           f"({format_bytes(measurement.bytes)}, {measurement.get_requests} GETs, "
                           f"{format_duration(measurement.seconds)}): "
                           f"{format_bytes(measurement.throughput_expected)}/s, "
                           f"latency {measurement.latency_s * 1000:.0f} ms. "
                           f"The sample itself cost {format_bytes(measurement.bytes)} of egress.")
        elif rate is None:
            measurement = stored_measurement(state)
        link = link_from(rate, measurement, concurrency)
        result = build_plan(state, provider, region, price_file, link, schedule, start, threshold)
    for out in outs:
        suffix = out.rsplit(".", 1)[-1].lower()
        render = {"md": plan_model.render_markdown, "html": plan_model.render_html,
                  "json": lambda p: json.dumps(p.to_dict(), indent=2, default=str)}.get(suffix)
        if render is None:
            raise UsageError(f"--out {out}: unknown format", hint="end the name in .md, .html or .json")
        _write_private(out, render(result))
        if not quiet and not as_json:
            click.echo(f"Wrote {out}")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif not quiet:
        click.echo(plan_model.render_text(result))


def _write_private(path: str, text: str) -> None:
    """Reports may name the bucket and counts: write them 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


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


# -- demo -----------------------------------------------------------------------------------
@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default="cloudexit-demo",
              show_default=True,
              help="Where the demo keeps its state DB, archive and reports (reset on each run).")
@click.option("--size", type=click.Choice(["tiny", "demo"]), default="demo", show_default=True,
              help="How big a synthetic PACS to make.")
@output_options
def demo(workdir: str | None, size: str, as_json: bool, quiet: bool) -> None:
    """Run the whole job on an embedded S3 server holding a synthetic PACS."""
    from .demo import run_demo

    def say(text: str) -> None:
        if not quiet and not as_json:
            click.echo(text)

    def show(step: str, data: Any) -> None:
        if quiet or as_json:
            return
        if step == "inventory":
            _print_summary(data)
        elif step == "plan":
            from .plan import render_text
            click.echo(render_text(data))

    result = run_demo(workdir, size=size, say=say, show=show)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    main()
