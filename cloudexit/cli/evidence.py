"""`cloudexit link-report` and `cloudexit serve`: the link evidence as files, and the live page."""

from __future__ import annotations

import errno
import json
import time
from datetime import datetime

import click

from cloudexit.cli import EXAMPLES, _examples, db_option, main, output_options
from cloudexit.core.errors import UsageError

EXAMPLES["link-report"] = ["cloudexit link-report --db pacs-exit.db --out link/ --lang zh",
                           "cloudexit link-report --db pacs-exit.db --out link/ --since 7d",
                           "cloudexit link-report --db pacs-exit.db --out link/ --since 2026-03-01 --until 2026-03-08"]
EXAMPLES["serve"] = ["cloudexit serve --db pacs-exit.db",
                     "cloudexit serve --db pacs-exit.db --host 0.0.0.0 --port 8080 --token \"$(openssl rand -hex 16)\""]


def parse_moment(text: str | None, option: str) -> float | None:
    """`2026-03-01`, `2026-03-01T08:00` (local time unless an offset is given) or `7d` (ago)."""
    if text is None:
        return None
    from cloudexit.core.units import parse_duration

    try:
        try:
            ts = datetime.fromisoformat(text).timestamp()  # naive: the local time of this computer
        except ValueError:
            ts = time.time() - parse_duration(text).total_seconds()
        datetime.fromtimestamp(ts).astimezone()  # the report shows it: a year 1 or 600,000 years ago cannot be
    except (UsageError, ValueError, OverflowError, OSError):
        raise UsageError(f"cannot read {option} {text!r}",
                         hint="give a date (2026-03-01), a time (2026-03-01T08:00) or a span back from now (7d, 12h)") from None
    return ts


@main.command("link-report", epilog=_examples("link-report"))
@db_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for link.html, link.json, link-series.csv, link-outages.csv and link-plan-windows.csv.")
@click.option("--since", default=None, metavar="WHEN", help="Start of the window: a date, a time, or 7d (ago).")
@click.option("--until", default=None, metavar="WHEN", help="End of the window (default: the last record).")
@click.option("--lang", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Language of link.html.")
@output_options
def link_report(db_path: str, out: str, since: str | None, until: str | None, lang: str,
                as_json: bool, quiet: bool) -> None:
    """What migrate and inventory saw of the link: outages, errors, throughput against the plan.

    For a meeting with the cloud provider, the PACS vendor and the network provider: every
    outage with its duration and cause, error rates by hour of day, the worst hours, and a
    plain-language summary. Self-contained HTML (no network needed to open it), JSON and CSV.
    """
    from cloudexit.report.link_i18n import words
    from cloudexit.report.linkreport import FILES, summary_lines, write_link_report
    from cloudexit.state.db import open_readable

    start, end = parse_moment(since, "--since"), parse_moment(until, "--until")
    if start is not None and end is not None and end <= start:
        raise UsageError("--until is not after --since", hint="swap them, or leave --until out")
    with open_readable(db_path, untouched=True) as state:  # evidence: read, never migrated
        facts = write_link_report(state.conn, out, start, end, lang)
    if as_json:
        click.echo(json.dumps({"out": out, "files": list(FILES), "summary": facts["summary"],
                               "totals": facts["totals"], "outages": facts["outages"]}, indent=2, default=str))
    elif not quiet:
        for line in summary_lines(facts, words(lang)):
            click.echo(line)
        click.echo(f"Written: {', '.join(FILES)} in {out}")


@main.command("serve", epilog=_examples("serve"))
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs a token (given or generated).")
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: a free one, printed).")
@click.option("--token", envvar="CLOUDEXIT_SERVE_TOKEN", default=None,
              help="The token every request must carry (env CLOUDEXIT_SERVE_TOKEN); default: a generated one, printed.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the page's address.")
def serve(db_path: str, host: str, port: int, token: str | None, quiet: bool) -> None:
    """A live, read-only page of the migration for a browser (zh and en).

    Progress, rate and time left against the plan, the link over the last hour and day, what
    the run waits for, outages, exceptions and deliveries; it updates by itself while migrate
    runs in another process. The DB is opened read-only; no patient data is on the page.
    """
    from cloudexit.report.server import LiveServer, is_loopback, new_token
    from cloudexit.state.db import State

    if token is not None and len(token) < 16:
        raise UsageError("--token is too short (at least 16 characters)",
                         hint="for example: --token \"$(openssl rand -hex 16)\"")
    generated = token is None
    token = token or new_token()
    with State(db_path, readonly=True) as state:
        try:
            server = LiveServer(state, host, port, token)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is in use", hint="pick another --port, or --port 0") from exc
            raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror or exc}",
                             hint="give an address of this computer (or 127.0.0.1) and a free port") from exc
        with server:
            if not quiet and not is_loopback(host):
                click.echo(f"Listening on {host} (not only this computer): every request needs the token.")
            if not quiet and generated:
                click.echo("Token (generated; it is in the address below): " + token)
            click.echo(server.url("en"))
            if not quiet:
                click.echo(server.url("zh"))
                click.echo("Ctrl-C stops the page (the migration is not affected).")
            try:
                server.serve_forever(poll_interval=0.2)
            except KeyboardInterrupt:
                if not quiet:
                    click.echo("\nStopped.", err=True)
