"""Link evidence in the state DB: the per-minute table, its roll-up into hours, outages, the
classification of errors, and the figures the link report draws from them (pure SQLite)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

from cloudexit.report.linkfacts import link_facts
from cloudexit.state.db import SCHEMA_VERSION, State
from cloudexit.state.linkseries import (
    HOUR,
    KEEP_MINUTES_S,
    LinkRecorder,
    classify,
    roll_up,
    seen,
)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_errors_are_classified_as_the_link_report_names_them() -> None:
    assert classify("unreachable", "cannot reach h:1: ConnectionRefusedError: [Errno 111] Connection refused") == "refused"
    assert classify("unreachable", "connection lost before an answer: RemoteDisconnected: Remote end closed") == "reset"
    assert classify("cut", "body cut after 5 of 9 bytes: TimeoutError: timed out") == "timeout"
    assert classify("unreachable", "cannot reach x: gaierror: [Errno -2] Name or service not known") == "dns"
    assert classify("tls", "the certificate of x is not trusted (self-signed)") == "tls"
    assert classify("transient", "GET 'P123456/DOE^JANE.dcm': HTTP 503 SlowDown: Please reduce") == "5xx"
    assert classify("gone", "GET 'a': no longer at the source (deleted)") is None  # not the link
    # What the many-at-once loop met before it handed an object to the threads.
    assert classify("multiget", "answer 'HTTP/1.1 503 Service Unavailable'") == "5xx"
    assert classify("multiget", "answer 'HTTP/1.1 404 Not Found'") is None
    assert classify("multiget", "connect: Connection refused") == "refused"
    assert classify("multiget", "no answer in time (read)") == "timeout"
    assert classify("multiget", "answer larger than expected") is None
    # What is kept never carries the key (keys can name patients).
    assert seen("GET 'P123456/DOE^JANE.dcm': HTTP 503 SlowDown: x") == "HTTP 503 SlowDown"
    assert "DOE" not in (seen("GET 'DOE^JANE': connection lost: ConnectionResetError: [Errno 104] reset") or "")


def test_minutes_outage_and_roll_up(tmp_path: Path) -> None:
    state = State(tmp_path / "x.db", create=True)
    assert state.schema_version() == SCHEMA_VERSION >= 11
    t0 = 1_700_000_000 - 1_700_000_000 % HOUR
    clock = Clock(t0)
    rec = LinkRecorder("migrate", run_id=None, clock=clock)
    ok = SimpleNamespace(outcome="verified", local=False, ttfb=0.03, faults=[("transient", "HTTP 503 SlowDown")])
    with state.transaction() as tx:
        rec.busy(4, 2_000_000)
        clock.t += 30
        rec.traffic(6_000_000, get=10)
        rec.result(ok)
        rec.busy(4, 2_000_000)
        rec.flush(tx)
    clock.t += 40  # next minute: the link goes down
    bad = SimpleNamespace(outcome="failed", local=False, ttfb=None,
                          faults=[("unreachable", "cannot reach h: ConnectionRefusedError: refused")] * 3)
    with state.transaction() as tx:
        rec.result(bad)
        rec.down(tx, None, "cannot reach h: ConnectionRefusedError: refused")
        clock.t += 12
        rec.busy(4, 2_000_000)
        assert rec.up(tx) == 12
        rec.flush(tx)
    rows = state.query("SELECT * FROM link_series ORDER BY ts")
    assert [r["ts"] - t0 for r in rows] == [0, 60]
    assert rows[0]["bytes"] == 6_000_000 and rows[0]["err_5xx"] == 1 and rows[0]["ttfb_1"] == 1
    assert rows[0]["conn_seconds"] == 120 and rows[0]["bwlimit"] == 2_000_000
    assert rows[1]["err_refused"] == 3 and rows[1]["down_seconds"] == 12 and rows[1]["conn_seconds"] == 4 * 40
    outage = state.query("SELECT * FROM link_outages")[0]
    assert (outage["cause"], outage["ended"] - outage["started"]) == ("refused", 12)
    facts = link_facts(state.conn, now=clock.t)
    assert facts["summary"]["outages"] == 1 and facts["summary"]["main_cause"] == "refused"
    assert facts["totals"]["errors"]["refused"] == 3 and facts["totals"]["ttfb_p50_ms"] == 50
    assert facts["outages"][0]["seconds"] == 12

    # 31 days later the minutes become one hour row, sums and the highest limit kept.
    with state.transaction() as tx:
        removed = roll_up(tx, t0 + KEEP_MINUTES_S + 2 * HOUR)
    assert removed == 2
    hour = state.query("SELECT * FROM link_series")
    assert len(hour) == 1 and hour[0]["span"] == HOUR and hour[0]["ts"] == t0
    assert hour[0]["bytes"] == 6_000_000 and hour[0]["err_refused"] == 3 and hour[0]["bwlimit"] == 2_000_000
    assert link_facts(state.conn)["totals"]["bytes"] == 6_000_000
    state.close()


def version_10_db(path: Path) -> Path:
    """A state DB as cloudexit wrote it before the link tables (schema 10)."""
    from cloudexit.state.db import APP_ID
    from cloudexit.state.schema import MIGRATIONS as _MIGRATIONS

    conn = sqlite3.connect(path)
    for version in range(1, 11):
        for statement in _MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version=10")
    conn.execute(f"PRAGMA application_id={APP_ID}")
    conn.commit()
    conn.close()
    return path


def test_a_version_10_db_gains_the_link_tables(tmp_path: Path) -> None:
    path = version_10_db(tmp_path / "old.db")
    with State(path) as state:
        assert state.schema_version() == SCHEMA_VERSION
        assert state.query("SELECT count(*) AS n FROM link_series")[0]["n"] == 0
        assert state.query("SELECT count(*) AS n FROM link_outages")[0]["n"] == 0


def test_serve_on_a_db_of_another_schema_says_so_in_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cloudexit.cli import main

    path = version_10_db(tmp_path / "old.db")
    r = CliRunner().invoke(main, ["serve", "--db", str(path)], catch_exceptions=False)
    assert r.exit_code != 0 and "another version of cloudexit (schema 10" in r.output, r.output


def test_link_report_reads_a_db_of_an_older_schema_without_migrating_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cloudexit.cli import main

    path = version_10_db(tmp_path / "old.db")
    before = path.read_bytes()
    r = CliRunner().invoke(main, ["link-report", "--db", str(path), "--out", str(tmp_path / "l"), "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "l" / "link.json").exists()
    # Evidence is read, never rewritten: same bytes, same schema, no key file beside it.
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l", "old.db"]


def test_the_link_words_say_the_same_in_en_and_zh() -> None:
    """Both languages have every key, with the same {placeholders} (a zh line that drops
    {since} would show the link down with no time; one that misspells it shows '{sinse}')."""
    import re

    from cloudexit.report.link_i18n import TEXT

    assert set(TEXT["en"]) == set(TEXT["zh"])
    slots = {lang: {k: sorted(re.findall(r"\{(\w+)\}", v)) for k, v in TEXT[lang].items()} for lang in TEXT}
    assert slots["en"] == slots["zh"]


def test_flush_rolls_up_old_minutes_at_most_once_an_hour(tmp_path: Path) -> None:
    """The roll-up runs from `flush` (the engine's commits) on the recorder's clock: at its first
    flush, then once an hour, so a commit pays for it rarely and for about an hour of minutes."""
    state = State(tmp_path / "x.db", create=True)
    t0 = 1_700_000_000 - 1_700_000_000 % HOUR
    old = LinkRecorder("migrate", clock=Clock(t0))
    old.traffic(1000, get=1)
    with state.transaction() as tx:
        old.flush(tx)
    clock = Clock(t0 + KEEP_MINUTES_S + HOUR + 5)
    rec = LinkRecorder("migrate", clock=clock)
    spans = lambda: [(r["ts"], r["span"]) for r in state.query("SELECT ts, span FROM link_series ORDER BY ts, span")]  # noqa: E731
    with state.transaction() as tx:
        rec.flush(tx)  # the first flush rolls up
    assert spans() == [(t0, HOUR)]
    late = t0 + 60  # an old minute written after that roll-up: waits for the next one
    with state.transaction() as tx:
        tx.execute("INSERT INTO link_series(ts, span, source, bytes) VALUES (?, 60, 'migrate', 5)", (late,))
        clock.t += HOUR - 10
        rec.flush(tx)
    assert spans() == [(t0, HOUR), (late, 60)]
    with state.transaction() as tx:
        clock.t += 20
        rec.flush(tx)
    assert spans() == [(t0, HOUR)]
    assert state.query("SELECT bytes FROM link_series")[0]["bytes"] == 1005
    state.close()
