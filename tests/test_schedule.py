"""Bandwidth timetables: rclone's syntax, the issue's day-range form, and walking them fast."""

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from cloudexit.core.errors import UsageError
from cloudexit.engine.schedule import UNLIMITED, Schedule, Slot, parse_schedule

MIB = 2**20
KIB = 2**10
MONDAY = datetime(2026, 11, 23)  # a Monday


def at(day_offset: int, hour: int, minute: int = 0) -> datetime:
    return MONDAY + timedelta(days=day_offset, hours=hour, minutes=minute)


def test_daily_timetable_wraps_around_midnight():
    schedule = parse_schedule("08:00,512k 19:00,10M 23:00,off")
    assert schedule.rate_at(at(0, 7)) is None  # still 23:00's "off" from the day before
    assert schedule.rate_at(at(0, 8, 30)) == 512 * KIB
    assert schedule.rate_at(at(2, 20)) == 10 * MIB
    assert schedule.rate_at(at(6, 23, 30)) is None


def test_rclone_weekday_timetable():
    schedule = parse_schedule("Mon-08:00,512 Fri-23:59,10M Sat-10:00,1M Sun-20:00,off")
    assert schedule.rate_at(at(0, 7)) is None  # Sunday 20:00 "off" holds until Monday 08:00
    assert schedule.rate_at(at(2, 12)) == 512 * KIB  # bare number: KiB/s, as in rclone
    assert schedule.rate_at(at(5, 9)) == 10 * MIB  # Saturday before 10:00: Friday's rate
    assert schedule.rate_at(at(6, 10)) == 1 * MIB


def test_issue_day_range_form_leaves_the_weekend_at_fridays_last_rate():
    schedule = parse_schedule("Mon-Fri 08:00,50M 18:00,off")
    assert schedule.rate_at(at(1, 12)) == 50 * MIB
    assert schedule.rate_at(at(1, 19)) is None
    assert schedule.rate_at(at(5, 12)) is None  # Saturday midday: no limit
    assert schedule.rate_at(at(0, 7, 59)) is None


def test_explicit_units_and_upload_download_pairs():
    assert parse_schedule("Mon-Fri 08:00,50Mbit/s 18:00,off").rate_at(at(0, 9)) == 6_250_000
    assert parse_schedule("10M:100k").rate_at(at(0, 0)) == 100 * KIB  # we download


def test_next_change():
    schedule = parse_schedule("Mon-Fri 08:00,50M 18:00,off")
    assert schedule.next_change(at(1, 12)) == at(1, 18)
    assert schedule.next_change(at(4, 19)) == at(7, 8)  # Friday evening -> next Monday 08:00
    assert parse_schedule("10M").next_change(at(0, 0)) is None


def test_never_on_schedule_is_refused_by_name():
    with pytest.raises(UsageError) as caught:
        parse_schedule("08:00,0 20:00,0")
    assert "'08:00,0 20:00,0' never allows transfer" in str(caught.value)
    with pytest.raises(UsageError, match="never allows transfer"):
        parse_schedule("pause")


@pytest.mark.parametrize(
    "text, message",
    [
        ("25:00,1M", "bad time"),
        ("Xyz-08:00,1M", "unknown day"),
        ("Mon-Fri", "cannot read rate"),
        ("Sat 08:00,1M Sun", "has no times after it"),
        ("08:00,200Mb/s", "ambiguous"),
    ],
)
def test_bad_schedules_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        parse_schedule(text)


def test_weekends_off_stretch_the_transfer():
    weekdays_only = parse_schedule("Mon-00:00,off Sat-00:00,0")
    six_days = 6 * 86400 * 1e6
    assert UNLIMITED.finish_time(six_days, MONDAY, cap=1e6) == at(6, 0)
    # Mon-Fri moves five days' worth, the weekend nothing, Monday the sixth day.
    assert weekdays_only.finish_time(six_days, MONDAY, cap=1e6) == at(8, 0)
    assert weekdays_only.time_needed(six_days, MONDAY, cap=1e6) == timedelta(days=8)


def test_bytes_between_applies_the_tighter_of_cap_and_timetable():
    schedule = parse_schedule("Mon-Fri 08:00,1M 18:00,off")
    cap = 10 * MIB
    # Monday: 8 h at the cap, 10 h at 1 MiB/s, 6 h at the cap.
    expected = (8 + 6) * 3600 * cap + 10 * 3600 * MIB
    assert schedule.bytes_between(at(0, 0), at(1, 0), cap) == pytest.approx(expected)
    assert schedule.bytes_between(at(0, 0), at(0, 0), cap) == 0


def test_per_byte_overhead_slows_the_effective_rate():
    # 1 s of latency per MB at 1 MB/s halves the rate.
    one_hour = UNLIMITED.bytes_between(at(0, 0), at(0, 1), 1e6, per_byte_overhead=1e-6)
    assert one_hour == pytest.approx(3600 * 0.5e6)


def test_long_transfers_are_walked_fast_and_exactly():
    weekdays_only = parse_schedule("Mon-00:00,off Sat-00:00,0")
    weekly = 5 * 86400 * 1e6
    started = time.perf_counter()
    finish = weekdays_only.finish_time(52 * weekly, MONDAY, cap=1e6)
    assert time.perf_counter() - started < 0.5
    assert finish == MONDAY + timedelta(weeks=51, days=5)  # the last Friday's end


def test_combine_takes_the_tighter_limit():
    night = parse_schedule("00:00,off 08:00,0")
    cap = parse_schedule("Mon-Fri 08:00,50M 18:00,off 02:00,1M")
    both = night.combine(cap)
    assert both.rate_at(at(1, 1)) is None
    assert both.rate_at(at(1, 3)) == 1 * MIB
    assert both.rate_at(at(1, 12)) == 0


def test_never_transfers_guard_on_a_hand_built_schedule():
    stopped = Schedule([Slot(0, 0.0)], "0")
    assert stopped.never_transfers
    with pytest.raises(UsageError, match="never allows transfer"):
        stopped.finish_time(1, MONDAY, cap=1e6)


def test_timezone_aware_datetimes_use_their_wall_clock():
    schedule = parse_schedule("Mon-Fri 08:00,50M 18:00,off")
    berlin = datetime(2026, 11, 24, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert schedule.rate_at(berlin) == 50 * MIB
    assert schedule.next_change(berlin) == datetime(
        2026, 11, 24, 18, 0, tzinfo=ZoneInfo("Europe/Berlin")
    )
