"""Bandwidth timetables in rclone's ``--bwlimit`` syntax, and how much they let through.

A timetable is a list of space- (or ``;``-) separated entries; each sets a rate from a moment
of the week until the next entry::

    10M                                       constant 10 MiB/s
    08:00,512k 19:00,10M 23:00,off            every day: 512 KiB/s from 08:00, 10 MiB/s
                                              from 19:00, no limit from 23:00 to 08:00
    Mon-08:00,512 Fri-23:59,10M Sat-10:00,1M Sun-20:00,off
                                              one entry per weekday-time; each rate holds
                                              until the next entry of the week
    Mon-Fri 08:00,50M 18:00,off               a day or day range on its own (``Mon-Fri``,
                                              ``Sat``) applies to the times that follow it
                                              without a day; here the weekend stays at the
                                              Friday 18:00 rate (no limit)

Times are ``HH:MM`` (24 h) on the wall clock of the datetimes you pass in; days are ``Mon`` ..
``Sun`` or full names, any case. Before the week's first entry, the week's last entry holds
(the timetable wraps around). Two entries at the same moment: the later one wins.

Rates read as rclone reads them: a letter suffix is binary bytes per second (``10M`` = 10 MiB/s,
``512k`` = 512 KiB/s), a bare number is KiB/s; explicit units such as ``50Mbit/s`` or
``6MB/s`` mean what they say. rclone's ``upload:download`` pair (``10M:100k``) is accepted and
the download side is used, because migrating out of the cloud downloads.

Beware the word ``off``: as in rclone it turns the *limit* off, i.e. unlimited transfer. To stop
transfer, write ``0`` (or ``pause``); unlike rclone, which treats 0 as no limit, cloudexit
pauses, because a hospital writing 0 for clinical hours means "nothing". A timetable whose every
entry is 0 never moves a byte and is refused.

DST changes are not modelled: the timetable follows the wall clock of the datetimes given, so
around a DST switch an estimate can be off by an hour.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from cloudexit.core.errors import UsageError
from cloudexit.core.units import parse_rate

WEEK = timedelta(days=7)
_US_PER_DAY = 86_400 * 10**6
_US_PER_WEEK = 7 * _US_PER_DAY
_DAYS = {
    "mon": 0,
    "monday": 0,
    "tue": 1,
    "tuesday": 1,
    "wed": 2,
    "wednesday": 2,
    "thu": 3,
    "thursday": 3,
    "fri": 4,
    "friday": 4,
    "sat": 5,
    "saturday": 5,
    "sun": 6,
    "sunday": 6,
}
_HHMM = re.compile(r"^(\d{2}):(\d{2})$")


@dataclass(frozen=True)
class Slot:
    """From ``position`` (microseconds after Monday 00:00) the rate is ``rate`` bytes/s.

    ``rate`` None means unlimited and 0 means paused.
    """

    position: int
    rate: float | None


def week_position(when: datetime) -> int:
    """Microseconds since Monday 00:00 on ``when``'s wall clock (integers keep boundaries exact)."""
    seconds = ((when.weekday() * 24 + when.hour) * 60 + when.minute) * 60 + when.second
    return seconds * 10**6 + when.microsecond


def effective_rate(rate: float | None, cap: float, per_byte_overhead: float = 0.0) -> float:
    """Bytes/s actually moved when the timetable allows ``rate`` and the link gives ``cap``.

    ``per_byte_overhead`` is time spent per byte beyond the bandwidth (request latency spread
    over the bytes), so the effective rate is ``1 / (1/rate + overhead)``.
    """
    limit = cap if rate is None else min(cap, rate)
    if limit <= 0:
        return 0.0
    return 1.0 / (1.0 / limit + per_byte_overhead)


class Schedule:
    """A weekly bandwidth timetable. Build it with :func:`parse_schedule`."""

    def __init__(self, slots: list[Slot], text: str) -> None:
        if not slots:
            raise ValueError("a schedule needs at least one slot")
        by_position: dict[int, float | None] = {}
        for slot in slots:  # later entries at the same moment win, as in rclone
            by_position[slot.position] = slot.rate
        self.slots = [Slot(pos, by_position[pos]) for pos in sorted(by_position)]
        self._positions = [slot.position for slot in self.slots]
        self._constant = len({slot.rate for slot in self.slots}) == 1
        self.text = text

    def __repr__(self) -> str:
        return f"Schedule({self.text!r})"

    def __str__(self) -> str:
        return self.text

    @property
    def never_transfers(self) -> bool:
        """True when every entry pauses transfer."""
        return all(slot.rate == 0 for slot in self.slots)

    @property
    def is_constant(self) -> bool:
        return self._constant

    def _index_at(self, position: int) -> int:
        # The last slot at or before position; -1 wraps to the week's last slot.
        return bisect.bisect_right(self._positions, position) - 1

    def rate_at(self, when: datetime) -> float | None:
        """The limit in force at ``when``: bytes/s, None for unlimited, 0 for paused."""
        return self.slots[self._index_at(week_position(when))].rate

    def next_change(self, when: datetime) -> datetime | None:
        """The first moment after ``when`` at which the rate differs; None if it never changes."""
        if self.is_constant:
            return None
        position = week_position(when)
        index = self._index_at(position)
        current = self.slots[index].rate
        count = len(self.slots)
        for step in range(1, count + 1):
            slot = self.slots[(index + step) % count]
            if slot.rate == current:
                continue
            offset = (slot.position - position) % _US_PER_WEEK
            return when + timedelta(microseconds=offset or _US_PER_WEEK)
        raise AssertionError("a non-constant schedule must change")

    def segments(self, start: datetime) -> Iterator[tuple[datetime, datetime, float | None]]:
        """Endless constant-rate pieces ``(begin, end, rate)`` from ``start`` (a week at most)."""
        moment = start
        while True:
            change = self.next_change(moment)
            end = change if change is not None else moment + WEEK
            yield moment, end, self.rate_at(moment)
            moment = end

    def bytes_between(
        self, start: datetime, end: datetime, cap: float, per_byte_overhead: float = 0.0
    ) -> float:
        """Bytes a link of ``cap`` bytes/s moves from ``start`` to ``end`` under this timetable."""
        total = 0.0
        if end <= start:
            return total
        for begin, stop, rate in self.segments(start):
            stop = min(stop, end)
            total += effective_rate(rate, cap, per_byte_overhead) * (stop - begin).total_seconds()
            if stop >= end:
                return total
        raise AssertionError("segments never end")

    def finish_time(
        self, nbytes: float, start: datetime, cap: float, per_byte_overhead: float = 0.0
    ) -> datetime:
        """When ``nbytes`` will have moved, starting at ``start`` on a link of ``cap`` bytes/s.

        Whole weeks are skipped arithmetically, so a transfer of years costs a week's walk.
        """
        if self.never_transfers:
            raise UsageError(f"schedule {self.text!r} never allows transfer: every entry is 0")
        if cap <= 0:
            raise UsageError(f"link throughput must be above 0 bytes/s, not {cap}")
        remaining = float(nbytes)
        moment = start
        if remaining <= 0:
            return moment
        weekly = self.bytes_between(start, start + WEEK, cap, per_byte_overhead)
        whole_weeks = int(remaining // weekly)
        if whole_weeks and whole_weeks * weekly >= remaining:
            whole_weeks -= 1  # finish inside the last week, not on its boundary
        moment += WEEK * whole_weeks
        remaining -= whole_weeks * weekly
        for begin, stop, rate in self.segments(moment):
            speed = effective_rate(rate, cap, per_byte_overhead)
            if speed <= 0:
                continue
            possible = speed * (stop - begin).total_seconds()
            if possible >= remaining:
                return begin + timedelta(seconds=remaining / speed)
            remaining -= possible
        raise AssertionError("segments never end")

    def time_needed(
        self, nbytes: float, start: datetime, cap: float, per_byte_overhead: float = 0.0
    ) -> timedelta:
        """How long moving ``nbytes`` takes from ``start`` (see :meth:`finish_time`)."""
        return self.finish_time(nbytes, start, cap, per_byte_overhead) - start

    def combine(self, other: Schedule) -> Schedule:
        """The tighter of two timetables at every moment (e.g. a daytime cap and a night window)."""
        positions = sorted(set(self._positions) | set(other._positions))
        slots = [
            Slot(
                pos,
                _tighter(
                    self.slots[self._index_at(pos)].rate, other.slots[other._index_at(pos)].rate
                ),
            )
            for pos in positions
        ]
        return Schedule(slots, f"{self.text} + {other.text}")


def _tighter(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


UNLIMITED = Schedule([Slot(0, None)], "off")


def parse_schedule(text: str) -> Schedule:
    """Parse a timetable (see the module docstring); refuse one that never allows transfer."""
    tokens = [token for token in re.split(r"[\s;]+", text.strip()) if token]
    if not tokens:
        raise UsageError("empty schedule", hint='write e.g. "Mon-Fri 08:00,50M 18:00,off"')
    if len(tokens) == 1 and "," not in tokens[0]:
        schedule = Schedule([Slot(0, _slot_rate(tokens[0], text))], text.strip())
    else:
        schedule = Schedule(_parse_entries(tokens, text), text.strip())
    if schedule.never_transfers:
        raise UsageError(
            f"schedule {text.strip()!r} never allows transfer: every entry is 0",
            hint="give at least one time with a rate above 0, or off for no limit",
        )
    return schedule


def _parse_entries(tokens: list[str], text: str) -> list[Slot]:
    slots: list[Slot] = []
    scope: list[int] | None = None  # days from a "Mon-Fri" token; None = every day
    scope_token, scope_used = "", True
    for token in tokens:
        if "," not in token:
            if not scope_used:
                break
            scope, scope_token, scope_used = _parse_day_scope(token, text), token, False
            continue
        when, _, rate_text = token.partition(",")
        rate = _slot_rate(rate_text, text)
        if "-" in when:
            day_text, _, clock = when.partition("-")
            days = [_parse_day(day_text, text)]
        else:
            clock, days = when, scope if scope is not None else list(range(7))
            scope_used = True
        minute = _parse_clock(clock, text)
        slots.extend(Slot((day * 1440 + minute) * 60 * 10**6, rate) for day in days)
    if not scope_used:
        raise UsageError(f"day range {scope_token!r} in schedule {text!r} has no times after it")
    return slots


def _slot_rate(rate_text: str, text: str) -> float | None:
    # rclone's "upload:download" pair: we only download.
    download = rate_text.split(":")[-1]
    try:
        return parse_rate(download, bare_unit="MiB")
    except UsageError as error:
        raise UsageError(f"in schedule {text!r}: {error}") from None


def _parse_day(day_text: str, text: str) -> int:
    day = _DAYS.get(day_text.lower())
    if day is None:
        raise UsageError(
            f"unknown day {day_text!r} in schedule {text!r}", hint="use Mon, Tue, ... Sun"
        )
    return day


def _parse_day_scope(token: str, text: str) -> list[int]:
    first_text, dash, last_text = token.partition("-")
    first = _parse_day(first_text, text)
    last = _parse_day(last_text, text) if dash else first
    span = (last - first) % 7  # Fri-Mon wraps over the weekend
    return [(first + step) % 7 for step in range(span + 1)]


def _parse_clock(clock: str, text: str) -> int:
    match = _HHMM.match(clock)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise UsageError(
            f"bad time {clock!r} in schedule {text!r}", hint="write HH:MM, 00:00 to 23:59"
        )
    return int(match[1]) * 60 + int(match[2])
