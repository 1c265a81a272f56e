"""From the state DB to a plan: the workload in numbers, the provider, the link."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import UsageError
from cloudexit.plan.measure import Measurement
from cloudexit.plan.inputs import START_UP_S, ClassLoad, Link, Range, Workload
from cloudexit.plan.model import make_plan
from cloudexit.plan.result import Plan
from cloudexit.plan.pricing import load_catalogue
from cloudexit.engine.schedule import Schedule
from cloudexit.state.db import State
from cloudexit.state.members import ZIP_UNPACKED, zip_counts

# Endpoint host fragments -> catalogue names, so `--provider` is rarely needed.
PROVIDER_HOSTS = {
    "amazonaws.com": "aws-s3", "aliyuncs.com": "aliyun-oss", "myqcloud.com": "tencent-cos",
    "myhuaweicloud.com": "huawei-obs", "blob.core.windows.net": "azure-blob",
    "storage.googleapis.com": "gcs",
}


def guess_provider(endpoint: str | None) -> str | None:
    if not endpoint or endpoint == "aws":
        return "aws-s3"
    return next((name for host, name in PROVIDER_HOSTS.items() if host in endpoint), None)


def workload_from_state(state: State, config: MigrateConfig | None = None) -> Workload:
    """What is left to move, by storage class, plus what the inventory already cost. Large
    objects count one GET per range, at migrate's own threshold and range size."""
    config = config or MigrateConfig()
    threshold, part = config.large_object, config.range_size
    # A zip whose files are recorded (state/members.py) is fetched through them, one ranged GET
    # each, not whole (unless --keep-containers); a member is no object of the bucket.
    unpacked = "0" if config.keep_containers else f"({ZIP_UNPACKED})"
    whole = f"container IS NULL AND NOT {unpacked} AND size >= :t"
    classes = {}
    for row in state.query(
            "SELECT coalesce(storage_class, 'STANDARD') AS sc, sum(container IS NULL) AS n, sum(size) AS b, "
            f"sum({whole}) AS big, sum(CASE WHEN {whole} THEN (size + :p - 1) / :p ELSE 0 END) AS parts, "
            f"sum({unpacked}) AS zips, sum(container IS NOT NULL) AS files "
            "FROM objects WHERE status = 'present' GROUP BY 1", {"t": threshold, "p": part}):
        classes[row["sc"]] = ClassLoad(row["n"] or 0, row["b"] or 0, row["big"] or 0, row["parts"] or 0,
                                       row["zips"] or 0, row["files"] or 0)
    rounds = state.query("SELECT sum(list_requests) AS l, sum(get_requests) AS g, "
                         "sum(header_bytes) AS b FROM inventory_rounds")[0]
    # Instances and studies, not objects: Orthanc keeps ~2 objects per instance.
    counts = state.query(
        "SELECT count(DISTINCT sop_uid) AS i, count(DISTINCT study_uid) AS s, "
        "sum(CASE WHEN encoding IS NOT NULL THEN size END) AS e, "
        "sum(CASE WHEN encoding IS NOT NULL THEN coalesce(plain_size, size) END) AS d "
        "FROM objects WHERE status = 'present' AND kind = 'dicom'")[0]
    zips, not_unpacked, files = zip_counts(state.conn)
    return Workload(classes, inventory_header_bytes=rounds["b"] or 0,
                    inventory_get_requests=rounds["g"] or 0,
                    inventory_list_requests=rounds["l"] or 0,
                    instances=counts["i"] or 0, studies=counts["s"] or 0,
                    encoded_bytes=counts["e"] or 0, decoded_bytes=counts["d"] or 0,
                    zip_archives=zips, zip_files=files, zip_archives_not_unpacked=not_unpacked)


def link_from(bandwidth: float | None, measurement: Measurement | None,
              concurrency: int | None = None, latency_s: float | None = None,
              config: MigrateConfig | None = None) -> Link:
    """A measured link when there is a measurement, else the nominal bandwidth. Concurrency
    and worker processes are migrate's own unless given."""
    config = config or MigrateConfig()
    concurrency = concurrency or config.requests_in_flight()
    if measurement is not None:
        by_engine = measurement.method in ("engine", "runs")
        how = {"engine": "by migrating a sample of", "runs": "from the migration's runs, "}.get(
            measurement.method, "with a boto3 sample of")
        return Link(Range(measurement.throughput_low, measurement.throughput_expected,
                          measurement.throughput_high), latency_s=measurement.latency_s,
                    concurrency=concurrency,
                    source=f"measured {measurement.measured_at} {how} "
                           + (f"{measurement.objects} objects" if measurement.objects
                              else measurement.basis or f"{measurement.steady_seconds:.0f} s of transfer"),
                    overheads_included=by_engine, cores=config.worker_processes(),
                    startup_s=measurement.startup_s or START_UP_S)
    if bandwidth is None:
        raise UsageError("the plan needs the link's speed",
                         hint="give --bandwidth (e.g. 200Mbit/s or 25MB/s) or --measure")
    link = Link.from_bandwidth(bandwidth, latency_s=0.05 if latency_s is None else latency_s,
                               concurrency=concurrency, cores=config.worker_processes())
    return replace(link, startup_s=START_UP_S)


def scale_workload(workload: Workload, target_bytes: int) -> Workload:
    """The inventory's mix (storage classes, object sizes, multipart share, inventory requests)
    scaled to `target_bytes`: what the same bucket would cost and take at that size."""
    if workload.bytes <= 0:
        raise UsageError("the inventory holds no bytes: there is no mix to scale",
                         hint="run `cloudexit inventory s3://BUCKET` first")
    factor = target_bytes / workload.bytes

    def n(value: int) -> int:
        return max(round(value * factor), 1 if value else 0)

    classes = {name: ClassLoad(n(c.objects), n(c.bytes), n(c.multipart_objects), n(c.multipart_parts),
                               n(c.zips_unpacked), n(c.zip_files))
               for name, c in workload.classes.items()}
    objects = sum(c.objects for c in classes.values())
    # A LIST page holds up to 1,000 keys: a small bucket's walk of many short prefixes (35 pages
    # for the demo's 116 objects) does not grow with the bucket the way its objects do.
    pages = max(workload.inventory_list_requests, -(-objects // 1000))
    return Workload(classes, inventory_header_bytes=n(workload.inventory_header_bytes),
                    inventory_get_requests=n(workload.inventory_get_requests),
                    inventory_list_requests=pages)


def build_plan(state: State, provider: str | None, region: str | None, price_file: str | None,
               link: Link, schedule: Schedule | None, start: datetime,
               offline_threshold: timedelta, assume_bytes: int | None = None,
               config: MigrateConfig | None = None) -> Plan:
    """The plan of the inventoried bucket, kept in the state DB for the audit to compare with;
    with `assume_bytes`, of the same mix at that size (labelled as such, and not kept).
    `config`: the migration's settings (range size, large-object threshold) the GETs are
    counted at; migrate's defaults when not given."""
    provider = provider or (None if price_file else guess_provider(state.meta("endpoint_url")))
    if provider is None and price_file is None:
        from cloudexit.plan.pricing import known_providers
        raise UsageError(f"cannot tell the provider from endpoint {state.meta('endpoint_url')}",
                         hint=f"give --provider, one of: {', '.join(known_providers())}")
    if state.scalar("SELECT count(*) FROM inventory_rounds") == 0:
        raise UsageError("the inventory is empty: nothing to plan",
                         hint="run `cloudexit inventory s3://BUCKET` first")
    catalogue = load_catalogue(provider, region or state.meta("region") or None, price_file)
    workload = workload_from_state(state, config)
    if assume_bytes is not None:
        from cloudexit.core.units import format_bytes

        real = workload
        workload = scale_workload(real, assume_bytes)
        plan = make_plan(workload, catalogue, link, start, schedule, offline_threshold)
        plan.assumed_size = {"size": format_bytes(assume_bytes), "bytes": real.bytes,
                             "objects": real.objects, "factor": assume_bytes / real.bytes}
        plan.assumptions.insert(0, (
            f"assumed size: {format_bytes(assume_bytes)}, the inventory's mix of {real.objects:,} "
            f"objects and {format_bytes(real.bytes)} scaled by {assume_bytes / real.bytes:,.0f}"))
        state.log("plan.assumed", provider=catalogue.provider, bytes=assume_bytes)
        return plan
    plan = make_plan(workload, catalogue, link, start, schedule, offline_threshold)
    state.set_meta(plan=json.dumps(plan.to_dict(), default=str))
    state.log("plan.made", provider=catalogue.provider, region=catalogue.region,
              link=link.source, schedule=schedule.text if schedule else None,
              rate_model=plan.rate_model)  # the plan in force from now: plan/actual.py reads it
    return plan
