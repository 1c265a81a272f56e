"""The plan model: egress tiers per calendar month, idle-hour prices, timetables, restores, ranges.

Every expected figure is worked out by hand here, from the shipped catalogue's prices.
"""

import json
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from cloudexit.core.errors import UsageError
from cloudexit.plan.inputs import ClassLoad, Link, Range, Workload
from cloudexit.plan.model import make_plan, render_html, render_markdown, render_text
from cloudexit.plan.pricing import load_catalogue
from cloudexit.engine.schedule import Schedule, Slot, parse_schedule

GB = 10**9  # the shipped catalogues bill 1 GB = 1e9 bytes


def steady(rate: float) -> Link:
    """A link with no spread and no latency, so times are plain division."""
    return Link(Range(rate, rate, rate), latency_s=0.0, concurrency=1)


def standard(gb: float, objects: int = 1000) -> Workload:
    return Workload({"STANDARD": ClassLoad(objects, int(gb * GB))})


def egress_by_month(scenario):
    return {m.month: round(m.cost, 6) for m in scenario.breakdown.egress}


def test_12_tb_in_one_month_on_aws():
    plan = make_plan(standard(12_000), load_catalogue("aws-s3"), steady(1e9), datetime(2026, 3, 2))
    fastest = plan.scenario("fastest")
    # 100 GB free, the rest of the first 10,240 GB at 0.09, the remaining 1,760 GB at 0.085.
    expected = (10_240 - 100) * 0.09 + (12_000 - 10_240) * 0.085
    assert egress_by_month(fastest) == {"2026-03": pytest.approx(expected)}
    assert fastest.time_s.expected == pytest.approx(12_000)  # 12e12 bytes at 1e9 bytes/s
    items = [line.item for line in fastest.breakdown.egress[0].lines]
    assert items == [
        "free allowance",
        "egress tier 1 (0-10,240 GB per month)",
        "egress tier 2 (10,240-51,200 GB per month)",
    ]


def test_tiers_restart_each_calendar_month():
    # 30,000 GB over 12 h starting 18:00 on 31 March: half in March, half in April.
    rate = 30_000 * GB / (12 * 3600)
    plan = make_plan(
        standard(30_000), load_catalogue("aws-s3"), steady(rate), datetime(2026, 3, 31, 18)
    )
    per_month = 100 * 0 + 10_140 * 0.09 + (15_000 - 10_240) * 0.085  # each month starts afresh
    assert egress_by_month(plan.scenario("fastest")) == {
        "2026-03": pytest.approx(per_month),
        "2026-04": pytest.approx(per_month),
    }
    one_month = 10_140 * 0.09 + (30_000 - 10_240) * 0.085
    assert plan.scenario("fastest").breakdown.egress_total > one_month


def test_alibaba_night_only_is_cheaper_and_slower():
    # 1,000 GB at 10 MB/s = 100,000 s = 27 h 46 min 40 s, from Monday 00:00 (provider's clock).
    plan = make_plan(
        standard(1_000), load_catalogue("aliyun-oss"), steady(1e7), datetime(2026, 3, 2)
    )
    fastest, cheapest = plan.scenario("fastest"), plan.scenario("cheapest")
    # Fastest: 00-08 Monday (288 GB) and 00:00-03:46:40 Tuesday (136 GB) at the idle price.
    assert fastest.breakdown.egress_total == pytest.approx(424 * 0.25 + 576 * 0.50)
    assert fastest.finish[1] == datetime(2026, 3, 3, 3, 46, 40)
    # Night only: 288 GB a night; three nights and 136 GB of the fourth, all at 0.25.
    assert cheapest.breakdown.egress_total == pytest.approx(1_000 * 0.25)
    assert cheapest.finish[1] == datetime(2026, 3, 5, 3, 46, 40)
    assert cheapest.cost.expected < fastest.cost.expected
    assert cheapest.time_s.expected > fastest.time_s.expected


def test_night_window_follows_the_providers_clock_for_aware_starts():
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 3, 2, 0, 0, tzinfo=berlin)  # 07:00 in Shanghai
    plan = make_plan(standard(1_000), load_catalogue("aliyun-oss"), steady(1e7), start)
    cheapest = plan.scenario("cheapest")
    assert cheapest.breakdown.egress_total == pytest.approx(250)
    # Shanghai 00:00-08:00 is 17:00-01:00 in Berlin (UTC+1 in March): an hour at once, then
    # nothing until the next window opens at 17:00.
    assert cheapest.series[1] == (datetime(2026, 3, 2, 1, 0, tzinfo=berlin), 3600 * 1e7)
    assert cheapest.series[2] == (datetime(2026, 3, 2, 17, 0, tzinfo=berlin), 3600 * 1e7)


def test_night_window_across_a_dst_change_stays_on_the_providers_clock():
    berlin = ZoneInfo("Europe/Berlin")
    # Berlin moves to UTC+2 on 29 March 2026: the Shanghai night is then 18:00-02:00 in Berlin.
    start = datetime(2026, 3, 20, 0, 0, tzinfo=berlin)
    plan = make_plan(standard(10_000), load_catalogue("aliyun-oss"), steady(1e7), start)
    assert plan.scenario("cheapest").breakdown.egress_total == pytest.approx(10_000 * 0.25)


def test_cheap_hours_that_the_timetable_forbids_make_cheapest_unavailable():
    nights_paused = parse_schedule("00:00,0 08:00,off")
    plan = make_plan(
        standard(100),
        load_catalogue("aliyun-oss"),
        steady(1e7),
        datetime(2026, 3, 2),
        nights_paused,
    )
    cheapest = plan.scenario("cheapest")
    assert cheapest.available is False
    assert "never allows transfer in the cheap hours" in cheapest.reason
    assert plan.scenario("within_schedule").available


def test_weekends_off_timetable_stretches_the_duration():
    six_days = 6 * 86400 * 1e6
    workload = Workload({"STANDARD": ClassLoad(100, int(six_days))})
    schedule = parse_schedule("Mon-00:00,off Sat-00:00,0")
    plan = make_plan(
        workload, load_catalogue("aws-s3"), steady(1e6), datetime(2026, 3, 2), schedule
    )
    assert plan.scenario("fastest").time_s.expected == pytest.approx(6 * 86400)
    assert plan.scenario("within_schedule").time_s.expected == pytest.approx(8 * 86400)
    assert plan.schedule == "Mon-00:00,off Sat-00:00,0"


def test_a_never_on_schedule_is_refused():
    stopped = Schedule([Slot(0, 0.0)], "08:00,0")
    with pytest.raises(UsageError, match="'08:00,0' never allows transfer"):
        make_plan(
            standard(10), load_catalogue("aws-s3"), steady(1e6), datetime(2026, 3, 2), stopped
        )


def test_an_empty_inventory_says_to_run_inventory_first():
    with pytest.raises(UsageError) as caught:
        make_plan(Workload({}), load_catalogue("aws-s3"), steady(1e6), datetime(2026, 3, 2))
    assert "cloudexit inventory" in str(caught.value)


def test_requests_count_one_get_per_object_and_per_part():
    workload = Workload(
        {"STANDARD": ClassLoad(1_000, 10 * GB, multipart_objects=10, multipart_parts=200)},
        inventory_header_bytes=0,
        inventory_get_requests=1_000,
        inventory_list_requests=3,
    )
    plan = make_plan(workload, load_catalogue("aws-s3"), steady(1e9), datetime(2026, 3, 2))
    bd = plan.scenario("fastest").breakdown
    gets = bd.requests[0]
    assert gets.quantity == 990 + 200
    assert gets.cost == pytest.approx(1_190 * 0.0004 / 1000)
    assert [line.quantity for line in bd.inventory] == [3, 1_000]
    # LIST has no known price in the AWS catalogue: counted as 0 and reported, never hidden.
    assert "requests.list_per_1000" in bd.unknown_prices
    assert not plan.scenario("fastest").complete
    assert "requests.list_per_1000" in [f.name for f in plan.unknown]


def test_glacier_restores_cost_and_wait_by_tier():
    workload = Workload({"GLACIER": ClassLoad(2_000, 1_000 * GB)})
    rate = 1e9  # 1,000 s of transfer
    plan = make_plan(
        workload,
        load_catalogue("aws-s3"),
        steady(rate),
        datetime(2026, 3, 2),
        parse_schedule("off"),
    )

    def restore_cost(key):
        return sum(line.cost for line in plan.scenario(key).breakdown.restores)

    assert restore_cost("fastest") == pytest.approx(1_000 * 0.03 + 2_000 * 10 / 1000)  # Expedited
    assert restore_cost("within_schedule") == pytest.approx(
        1_000 * 0.01 + 2_000 * 0.05 / 1000
    )  # Standard
    assert restore_cost("cheapest") == 0  # Bulk is free
    standard_tier = plan.scenario("within_schedule")
    assert standard_tier.restore_tiers == {"GLACIER": "Standard"}
    # 2 s to send 2,000 restore requests at AWS's 1,000/s, 3-5 h of restore, 1,000 s of transfer.
    assert standard_tier.time_s.low == pytest.approx(2 + 3 * 3600 + 1_000)
    assert standard_tier.time_s.expected == pytest.approx(2 + 4 * 3600 + 1_000)
    assert standard_tier.time_s.high == pytest.approx(2 + 5 * 3600 + 1_000)


def test_ranges_come_from_the_links_spread():
    link = Link(Range(5e8, 1e9, 2e9), latency_s=0.0, concurrency=1)
    plan = make_plan(standard(1_000), load_catalogue("aws-s3"), link, datetime(2026, 3, 2))
    time_s = plan.scenario("fastest").time_s
    assert (time_s.low, time_s.expected, time_s.high) == pytest.approx((500, 1_000, 2_000))


def test_request_latency_over_concurrency_adds_time():
    # 1,000 objects x 0.1 s / 10 parallel = up to 10 s on top of 1,000 s of bandwidth: none of
    # it when parallel requests hide it all (low), half expected, all of it at worst (high).
    link = Link(Range(1e9, 1e9, 1e9), latency_s=0.1, concurrency=10)
    plan = make_plan(standard(1_000), load_catalogue("aws-s3"), link, datetime(2026, 3, 2))
    time_s = plan.scenario("fastest").time_s
    assert (time_s.low, time_s.expected, time_s.high) == pytest.approx((1_000, 1_005, 1_010))


def test_a_timetable_cap_gives_a_range_not_a_point():
    # 1 TB under a 100 MB/s cap on a faster link: the limiter delivers 90-100% of the cap.
    link = Link(Range(1e9, 1e9, 1e9), latency_s=0.0, concurrency=16)
    plan = make_plan(standard(1_000), load_catalogue("aws-s3"), link, datetime(2026, 3, 2),
                     schedule=parse_schedule("00:00,100MB/s"))
    time_s = plan.scenario("within_schedule").time_s
    assert time_s.low == pytest.approx(10_000)
    assert time_s.expected == pytest.approx(10_000 / 0.97)
    assert time_s.high == pytest.approx(10_000 / 0.90)


def test_nominal_bandwidth_is_not_all_usable():
    link = Link.from_bandwidth(125e6)  # 1 Gbit/s
    assert link.throughput.expected == pytest.approx(125e6 * 0.90)
    assert link.throughput.low < link.throughput.expected < link.throughput.high < 125e6


def test_free_exit_credits_egress_inside_the_window():
    catalogue = load_catalogue("aws-s3")
    quick = make_plan(standard(1_000), catalogue, steady(1e9), datetime(2026, 3, 2))
    free = quick.scenario("free_exit").breakdown
    assert free.exit_credit == pytest.approx(-free.egress_total)
    assert free.exit_credit == pytest.approx(-(900 * 0.09))
    # 120 days at a steady rate: only the first 60 days of egress are credited.
    slow_rate = 1_000 * GB / (120 * 86400)
    slow = make_plan(standard(1_000), catalogue, steady(slow_rate), datetime(2026, 3, 2)).scenario(
        "free_exit"
    )
    assert any("60-day window" in w for w in slow.warnings)
    assert -slow.breakdown.exit_credit < slow.breakdown.egress_total
    assert "free_exit" not in [
        s.key
        for s in make_plan(
            standard(10), load_catalogue("aliyun-oss"), steady(1e9), datetime(2026, 3, 2)
        ).scenarios
    ]


def test_offline_device_only_past_the_threshold():
    catalogue = load_catalogue("aws-s3")
    quick = make_plan(standard(1_000), catalogue, steady(1e9), datetime(2026, 3, 2))
    assert "offline_device" not in [s.key for s in quick.scenarios]
    # 300 TB at 100 MB/s is about 35 days: price the device.
    slow = make_plan(standard(300_000), catalogue, steady(1e8), datetime(2026, 3, 2))
    device = slow.scenario("offline_device")
    jobs = 2  # 300,000 GB in parts of at most 210,000 GB
    assert device.breakdown.total == pytest.approx(jobs * 300 + 300_000 * 0.03 + 0)
    assert device.time_s.low == pytest.approx(10 * 86400)
    assert device.time_s.high == pytest.approx(21 * 86400)
    assert any("closed to new customers" in w for w in device.warnings)
    # A provider with no known device service says so instead of inventing a price.
    oss = make_plan(
        standard(300_000), load_catalogue("aliyun-oss"), steady(1e8), datetime(2026, 3, 2)
    )
    assert oss.scenario("offline_device").available is False
    shorter = make_plan(
        standard(300_000),
        catalogue,
        steady(1e8),
        datetime(2026, 3, 2),
        offline_threshold=timedelta(days=60),
    )
    assert "offline_device" not in [s.key for s in shorter.scenarios]


def test_provider_throughput_cap_applies():
    # Huawei: 16 Mbit/s (2 MB/s) per TB stored, so 1 TB moves at 2 MB/s whatever the link.
    plan = make_plan(
        standard(1_000), load_catalogue("huawei-obs"), steady(1e9), datetime(2026, 3, 2)
    )
    assert plan.scenario("fastest").time_s.expected == pytest.approx(1e12 / 2e6)
    assert any("caps egress" in w for w in plan.warnings)


def test_series_is_cumulative_and_complete():
    plan = make_plan(
        standard(1_000), load_catalogue("aliyun-oss"), steady(1e7), datetime(2026, 3, 2)
    )
    for scenario in plan.scenarios:
        if not scenario.available:
            continue
        moved = [b for _, b in scenario.series]
        times = [t for t, _ in scenario.series]
        assert moved == sorted(moved) and times == sorted(times)
        assert moved[-1] == pytest.approx(1_000 * GB)
        assert scenario.series[0] == (plan.start, 0.0)


def test_unverified_prices_the_plan_uses_are_listed():
    plan = make_plan(standard(1_000), load_catalogue("aws-s3"), steady(1e9), datetime(2026, 3, 2))
    names = [f.name for f in plan.unverified]
    assert "requests.get_per_1000" in names
    assert "storage_classes.STANDARD_IA.retrieval_per_gb" not in names  # not in this workload


def test_to_dict_is_json_with_the_documented_fields():
    plan = make_plan(
        standard(1_000),
        load_catalogue("aws-s3"),
        steady(1e9),
        datetime(2026, 3, 2),
        parse_schedule("Mon-Fri 08:00,50M 18:00,off"),
    )
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["format"] == "cloudexit.plan/1"
    assert {
        "provider",
        "region",
        "currency",
        "start",
        "workload",
        "link",
        "schedule",
        "scenarios",
        "assumptions",
        "warnings",
        "unverified_prices",
        "unknown_prices",
    } <= set(data)
    assert [s["key"] for s in data["scenarios"]] == [
        "fastest",
        "cheapest",
        "within_schedule",
        "free_exit",
    ]
    scenario = data["scenarios"][0]
    assert set(scenario["cost"]) == {"low", "expected", "high"}
    assert {"egress", "requests", "restores", "inventory", "exit_credit", "total"} <= set(
        scenario["breakdown"]
    )
    assert scenario["breakdown"]["egress"][0]["month"] == "2026-03"


def test_renderers():
    plan = make_plan(
        standard(1_000), load_catalogue("aliyun-oss"), steady(1e7), datetime(2026, 3, 2)
    )
    text = render_text(plan)
    assert "fastest" in text and "cheapest" in text and "CNY" in text
    markdown = render_markdown(plan)
    assert "| scenario |" in markdown and "## Assumptions" in markdown
    page = render_html(plan)
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<polyline" in page
    for external in ("<script", "<link", "src=", "@import"):
        assert external not in page


def test_alibaba_plan_is_complete_and_says_there_is_no_free_allowance():
    """Alibaba's request prices are known now, so no cost is tagged incomplete; the mainland
    has no free egress allowance, and the plan no longer says one covers the first GB."""
    plan = make_plan(standard(1_000), load_catalogue("aliyun-oss"), steady(1e7), datetime(2026, 3, 2))
    assert all(s.complete for s in plan.scenarios if s.available)
    assert "incomplete" not in render_text(plan)
    words = " ".join(plan.assumptions)
    assert "no free egress allowance (0 GB per month)" in words
    assert "covers the first" not in words
    aws = make_plan(standard(1_000), load_catalogue("aws-s3"), steady(1e7), datetime(2026, 3, 2))
    assert "the free allowance covers the first 100 GB of each month" in " ".join(aws.assumptions)


def test_chart_axis_fits_the_data():
    """A 9 s scenario beside an 8 h one (night-only) was a sliver at the left edge of a linear
    axis: the axis turns logarithmic, and ends where the slowest scenario ends."""
    from cloudexit.plan.render import render_svg
    from cloudexit.engine.schedule import parse_schedule

    night = parse_schedule("Mon-Sun 07:30,0 19:00,off")
    plan = make_plan(standard(0.1, objects=100), load_catalogue("aliyun-oss"), steady(1e7),
                     datetime(2026, 3, 2, 10, 0), night)
    svg = render_svg(plan)
    assert 'data-axis="log"' in svg
    slowest = max((s.finish[1] - plan.start).total_seconds() for s in plan.scenarios if s.finish)
    assert f'data-span-s="{slowest:.0f}"' in svg
    # The fastest line reaches the top within the first third of the plot, not at x = 70-71.
    import re

    fastest = re.findall(r'points="([^"]+)"', svg)[0].split()
    xs = [float(p.split(",")[0]) for p in fastest]
    assert 80 < xs[-1] < 70 + (760 - 115) / 2
    linear = render_svg(make_plan(standard(0.1, objects=100), load_catalogue("aws-s3"),
                                  steady(1e7), datetime(2026, 3, 2, 10, 0)))
    assert 'data-axis="linear"' in linear


def test_chinese_plan_has_the_same_figures():
    from cloudexit.plan.render import render_html as html_of

    plan = make_plan(standard(1_000), load_catalogue("aliyun-oss"), steady(1e7), datetime(2026, 3, 2))
    en, zh = html_of(plan, "en"), html_of(plan, "zh")
    assert 'lang="zh-CN"' in zh and "最快方案" in zh and "假设条件" in zh
    assert 'lang="en"' not in zh.split("<body>", 1)[1]  # every model sentence found in the glossary
    import re

    def figures(page: str) -> list[str]:  # every figure of every table (summary, breakdowns)
        return re.findall(r"\d[\d,]*\.\d\d", "".join(re.findall(r"<table>.*?</table>", page)))

    assert figures(en) == figures(zh)


def test_many_tiny_objects_are_bound_by_the_client_not_the_link():
    """20,000 objects of 500 bytes on 1 Gbit/s: the link would move them in 0.01 s; the client
    spends ~1.5 ms of CPU on each, over its worker processes (was: about 0 s)."""
    from cloudexit.plan.timeline import CLIENT_CPU_PER_BYTE_S, CLIENT_CPU_PER_OBJECT_S

    work = Workload({"STANDARD": ClassLoad(20_000, 20_000 * 500)})
    link = Link(Range(125e6, 125e6, 125e6), latency_s=0.0, concurrency=32, cores=2)
    fastest = make_plan(work, load_catalogue("aws-s3"), link, datetime(2026, 3, 2)).scenario("fastest")
    cpu = 20_000 * CLIENT_CPU_PER_OBJECT_S + 20_000 * 500 * CLIENT_CPU_PER_BYTE_S
    assert fastest.time_s.expected == pytest.approx(cpu / 2, rel=1e-6)
    assert fastest.time_s.low < fastest.time_s.expected < fastest.time_s.high


def test_a_link_measured_by_migrating_is_not_slowed_twice():
    """A rate measured by migrate itself already holds latency and the client's work."""
    work = Workload({"STANDARD": ClassLoad(2_000, 10**9)})
    measured = Link(Range(1e7, 1e7, 1e7), latency_s=0.2, concurrency=4, cores=2,
                    overheads_included=True, startup_s=1.5)
    fastest = make_plan(work, load_catalogue("aws-s3"), measured, datetime(2026, 3, 2)).scenario("fastest")
    assert fastest.time_s.expected == pytest.approx(100 + 1.5)


def test_requests_use_migrates_range_size(tmp_path):
    """The plan counts the GETs migrate makes: one per 16 MiB range of a large object (was one
    per 64 MiB part: 4x too few)."""
    from cloudexit.core.config import MigrateConfig
    from cloudexit.plan.build import workload_from_state
    from cloudexit.state.db import State

    with State(tmp_path / "s.db", create=True) as state:
        with state.transaction() as tx:
            tx.execute("INSERT INTO objects(key, size, first_seen_round, last_seen_round) VALUES "
                       "('big', ?, 1, 1), ('small', 1000, 1, 1)", (2**30,))
        work = workload_from_state(state)
        assert work.get_requests == 1 + 2**30 // MigrateConfig().range_size == 65
