"""`cloudexit plan`."""

from __future__ import annotations

import json

import click

from cloudexit.cli.group import Number, db_option, examples, main, output_options, source_options
from cloudexit.cli.progress import ByteBar
from cloudexit.core.errors import UsageError


@main.command(epilog=examples("plan"))
@db_option
@click.option("--provider", help="Price catalogue: aws-s3, aliyun-oss, tencent-cos, huawei-obs, "
              "azure-blob, gcs (default: from the endpoint).")
@click.option("--price-file", type=click.Path(exists=True, dir_okay=False),
              help="Your contract prices, same format as the catalogue (docs/pricing.md).")
@click.option("--bandwidth", help="The link's nominal speed, with its unit: 200Mbit/s or 25MB/s.")
@click.option("--measure", is_flag=True,
              help="Migrate a sample of the bucket (its mix of sizes) with migrate's own engine "
                   "into a temporary folder and time it: the link as migrate will see it.")
@click.option("--measure-seconds", default=20.0, show_default=True, type=Number(3, 3600),
              help="Stop the --measure run after this long (the sample may finish sooner).")
@click.option("--measure-bytes", default="256MB", show_default=True,
              help="The --measure sample's size at most (egress you pay for).")
@click.option("--recalibrate", is_flag=True,
              help="Take the link's rate from this migration's own runs so far (the steady "
                   "minutes of the link series: no start-up, outage or bandwidth-limited minute) "
                   "and plan the rest with it.")
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

    from cloudexit import app
    from cloudexit.core.config import SourceConfig
    from cloudexit.core.units import format_bytes, format_rate, parse_duration, parse_rate, parse_size
    from cloudexit.engine.schedule import parse_schedule
    from cloudexit.plan.model import render_text
    from cloudexit.state.db import State

    for out in outs:  # a name no format fits: said before the plan is made
        if app.plan_format(out) is None:
            raise UsageError(f"--out {out}: unknown format", hint="end the name in .md, .html or .json")
    start = datetime.fromisoformat(start_text) if start_text else datetime.now()
    request = app.PlanRequest(
        provider=provider, region=region, price_file=price_file,
        bandwidth=parse_rate(bandwidth, limit=False) if bandwidth else None, measure=measure,
        measure_seconds=measure_seconds, measure_bytes=parse_size(measure_bytes),
        recalibrate=recalibrate,
        latency_s=parse_duration(latency_text).total_seconds() if latency_text else None,
        schedule=parse_schedule(schedule_text) if schedule_text else None, concurrency=concurrency,
        start=start if start.tzinfo else start.astimezone(),
        offline_threshold=parse_duration(offline_threshold),
        assume_bytes=parse_size(assume_size) if assume_size else None,
        source=SourceConfig(endpoint_url=endpoint_url, profile=profile, region=region, max_attempts=retries))
    with State(db_path) as state:
        with ByteBar(quiet or as_json or not measure, "measuring") as bar:
            measurement = app.measure_or_recall(state, request, app.plan_config(state), progress=bar.update)
        if measure and not quiet and not as_json:
            m = measurement
            click.echo(f"Measured the link by migrating {m.objects} sampled objects "
                       f"({m.seconds:.1f} s): steady state {format_rate(m.throughput_expected)}, "
                       f"{format_bytes(m.throughput_low)}/s to {format_bytes(m.throughput_high)}/s "
                       f"over {m.steady_seconds:.1f} s, "
                       f"latency {m.latency_s * 1000:.0f} ms (p90 {m.latency_p90_s * 1000:.0f} ms). "
                       f"The sample cost {format_bytes(m.bytes)} of egress and "
                       f"{m.get_requests:,} GET requests.")
        elif recalibrate and not quiet and not as_json:
            click.echo(f"Recalibrated: {format_rate(measurement.throughput_expected)} over "
                       f"{measurement.steady_seconds:.0f} s of transfer, from {measurement.basis}.")
        result = app.make_plan(state, request, measurement)
    for out in outs:
        app.write_plan(result, out, lang)
        if not quiet and not as_json:
            click.echo(f"Wrote {out}")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif not quiet:
        click.echo(render_text(result, lang))
