"""The link to the source: where the lean client connects, whether the endpoint answers, and
the bandwidth timetable in force.

When every worker loses the endpoint (the policy says so: a streak of unanswered tasks while
nothing else got an answer), the run pauses dispatch and probes with growing intervals, then
carries on by itself. The bandwidth timetable (`--bwlimit`) can be changed while a run goes on
(`cloudexit migrate --bwlimit`, written into its run row): it is read again every tick.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import CloudexitError, CredentialsError
from cloudexit.engine.progress import MigrateProgress
from cloudexit.s3.source import Source
from cloudexit.state import transfers as sql
from cloudexit.state.db import State, now
from cloudexit.state.linkseries import LinkRecorder
from cloudexit.s3.client import Counters, Credentials, Endpoint, FetchError, S3Reader


def resolve_endpoint(source: Source, config: MigrateConfig, counters: Counters) -> tuple[Endpoint, Credentials]:
    """Where and as whom to GET: resolved from the boto3 session as the inventory does
    (`Source.lean_endpoint`), with this run's timeouts and receive buffer."""
    source.check()  # bucket reachable and listable with these credentials (clear errors)
    base, creds = source.lean_endpoint()
    endpoint = replace(base, connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
                       rcvbuf=256 * 1024 if config.bwlimit else 0)
    # One signed request with our own client: the right region, and signatures accepted.
    reader = S3Reader(endpoint, creds)
    try:
        resp = reader.request("GET", None, {"list-type": "2", "max-keys": "1"}, None, counters)
        body = resp.read()
        real_region = resp.getheader("x-amz-bucket-region")
        if resp.status in (301, 400) and real_region and real_region != endpoint.region:
            if endpoint.host.split(":")[0].endswith(".amazonaws.com"):
                moved = Endpoint.from_url(f"https://s3.{real_region}.amazonaws.com", endpoint.bucket,
                                          real_region, endpoint.path_style)
                endpoint = replace(endpoint, host=moved.host, port=moved.port, scheme=moved.scheme,
                                   region=real_region)
            else:
                endpoint = replace(endpoint, region=real_region)
        elif resp.status == 403:
            code = body.split(b"<Code>", 1)[-1].split(b"</Code>", 1)[0].decode(errors="replace")
            raise CredentialsError(f"the endpoint {source.where} refused our signed requests ({code})",
                                   hint="check the credentials and --region for this bucket")
    except CloudexitError:
        raise
    except Exception as exc:  # the FetchError of an unreachable endpoint (re-raised, translated)
        from cloudexit.core.errors import EndpointUnreachable

        if isinstance(exc, FetchError) and exc.kind == "tls":
            raise source.untrusted(exc.detail) from exc  # between boto3's check and ours
        raise EndpointUnreachable(f"cannot reach {source.where}: {exc}",
                                  hint="check the network; then run the command again") from exc
    finally:
        reader.close()
    return endpoint, creds


class LinkMonitor:
    """The endpoint's state as the engine sees it: answered lately, down since, next probe;
    and the bandwidth limit in force. Used on the engine's thread only."""

    def __init__(self, state: State, config: MigrateConfig, progress: MigrateProgress,
                 set_rate: Callable[[float | None], None], evidence: LinkRecorder | None = None) -> None:
        """`evidence`: the per-minute link series (state/linkseries.py) that outages go into."""
        self.state, self.config, self.progress = state, config, progress
        self.set_rate = set_rate
        self.evidence = evidence
        self.run_id = 0
        self.down_since: float | None = None  # time.time() the link was judged down
        self.last_ok = time.monotonic()
        self.streak = 0  # unanswered tasks in a row
        self.next_probe = 0.0
        self.probe_interval = 1.0
        self.reader: S3Reader | None = None
        self.schedule_text: str | None = config.bwlimit
        self.schedule: Any = None

    def open(self, endpoint: Endpoint, credentials: Credentials) -> None:
        """A reader for probes, with short timeouts (a probe must not hold the loop)."""
        self.reader = S3Reader(Endpoint(**{**asdict(endpoint), "connect_timeout": 5.0, "read_timeout": 10.0}),
                               credentials)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def use_timetable(self, text: str | None) -> None:
        """Check and take a timetable: the user's (at start), the run row's (a resumed run keeps
        its own unless one was given)."""
        if text:
            from cloudexit.engine.schedule import parse_schedule

            self.schedule = parse_schedule(text)
        self.schedule_text = text

    # -- up and down -------------------------------------------------------------------------------
    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def since_answer(self) -> float:
        return time.monotonic() - self.last_ok

    def answered(self) -> None:
        self.streak, self.last_ok = 0, time.monotonic()

    def down(self, tx: Any, detail: str | None, why: str | None = None) -> None:
        """Pause: dispatch stops, probes begin (once per outage)."""
        if self.down_since is not None:
            return
        self.down_since = time.time()
        self.probe_interval = 1.0
        self.next_probe = time.monotonic() + self.probe_interval
        since = now()
        self.progress.waiting_since, self.progress.waiting_why = since, why
        sql.set_waiting(tx, self.run_id, since)
        self.state.log("migrate.link_down", tx, run=self.run_id, detail=detail, why=why)
        if self.evidence is not None:
            self.evidence.down(tx, None, detail)  # link evidence: an outage opens

    def probe(self, counters: Counters) -> bool:
        """Whether the endpoint answers again (then the run goes on); else the next probe waits
        longer, up to `link_probe_max`."""
        assert self.reader is not None
        if self.reader.probe(counters):
            down_for = time.time() - (self.down_since or time.time())
            self.down_since = None
            self.progress.waiting_since = self.progress.waiting_why = None
            self.answered()
            with self.state.transaction() as tx:
                sql.set_waiting(tx, self.run_id, None, outage_over=True)
                self.state.log("migrate.link_up", tx, run=self.run_id, down_seconds=round(down_for, 1))
                if self.evidence is not None:
                    self.evidence.up(tx)  # link evidence: the outage closes
            return True
        self.probe_interval = min(self.probe_interval * 2, self.config.link_probe_max)
        self.next_probe = time.monotonic() + self.probe_interval * random.uniform(0.8, 1.2)
        return False

    # -- bandwidth -----------------------------------------------------------------------------------
    def apply_rate(self, force: bool = False) -> None:
        """The rate the timetable gives now (the run row's timetable, changed live or not)."""
        text = sql.bwlimit(self.state, self.run_id)
        if text != self.schedule_text:
            from cloudexit.engine.schedule import parse_schedule

            try:
                self.schedule = parse_schedule(text) if text else None
                self.schedule_text = text
            except CloudexitError:
                pass  # checked before it was written; keep the old timetable
        rate = self.schedule.rate_at(datetime.now()) if self.schedule is not None else None
        if force or rate != self.progress.rate_limit:
            self.set_rate(rate)
            self.progress.rate_limit = rate
