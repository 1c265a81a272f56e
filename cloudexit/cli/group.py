"""The `cloudexit` command group, its shared options, and the one place library errors become
messages and exit codes (`CloudexitGroup.invoke`); `--traceback` shows the stack instead.

The commands live in the other modules of `cloudexit.cli` (the only package that imports
click and tqdm), one per verb, each a thin layer over `cloudexit.app` and the library.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from typing import Any, Callable

import click

from cloudexit import __version__
from cloudexit.core.config import PacsConfig, SourceConfig
from cloudexit.core.errors import CloudexitError, FileSystemError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CloudexitGroup(click.Group):
    """Maps every error to one line (`Error: ...` and a hint on stderr) and its exit code; with
    --json, to `{"error", "hint", "exit"}` on stdout instead."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        finally:
            # CPython (3.11) notes, process-wide, a KeyboardInterrupt that ended an exec() of a
            # string (dataclass and namedtuple creation, while a module is imported lazily),
            # even one caught later; `python -m` then ends the process by SIGINT whatever exit
            # code was chosen (130 here). Evaluating a string clears the note; an interrupt
            # that escapes still ends by SIGINT (runpy notes it again).
            exec("None")

    def invoke(self, ctx: click.Context) -> Any:
        words = [*getattr(ctx, "_protected_args", []), *ctx.args]
        as_json = "--json" in words[:words.index("--")] if "--" in words else "--json" in words
        try:
            try:
                return super().invoke(ctx)
            except sqlite3.Error as exc:  # met outside the State's own methods
                from pathlib import Path

                from cloudexit.state.file import translate

                error = translate(exc, Path(ctx.meta.get("db_path") or "cloudexit.db"))
                if error is None:
                    raise
                raise error from exc
            except RuntimeError as exc:  # Python 3.11 wraps a Ctrl-C met in a class's
                if isinstance(exc.__cause__, KeyboardInterrupt):  # __set_name__ (a lazy import)
                    raise exc.__cause__ from None
                raise
        except CloudexitError as exc:
            if ctx.meta.get("traceback"):
                raise
            _fail(ctx, as_json, exc.message, exc.hint, exc.exit_code)
        except OSError as exc:  # a path, permission or disk problem the library did not name
            if ctx.meta.get("traceback"):
                raise
            err = FileSystemError.from_os_error(exc)
            _fail(ctx, as_json, err.message, err.hint, err.exit_code)
        except click.ClickException as exc:
            if not as_json:
                raise
            _fail(ctx, as_json, exc.format_message(), "see --help", exc.exit_code)
        except KeyboardInterrupt:
            if ctx.meta.get("traceback"):
                raise
            if not as_json:
                click.echo("\nInterrupted. Everything committed so far is kept; "
                           "run the same command again to continue.", err=True)
                ctx.exit(EXIT_INTERRUPTED)
            _fail(ctx, as_json, "interrupted", "everything committed so far is kept; run the "
                  "same command again to continue", EXIT_INTERRUPTED)


def _fail(ctx: click.Context, as_json: bool, message: str, hint: str | None, code: int) -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "hint": hint, "exit": code}, ensure_ascii=False))
    else:
        click.secho(f"Error: {message}" + (f"\n  hint: {hint}" if hint else ""), fg="red", err=True)
    ctx.exit(code)


# Shown under each command's --help; `\b` keeps click from re-wrapping the lines.
EXAMPLES: dict[str, list[str]] = {
    "inventory": ["cloudexit inventory s3://hospital-pacs/archive/ --endpoint-url "
                  "https://oss-cn-hangzhou.aliyuncs.com --db pacs-exit.db",
                  "cloudexit inventory s3://hospital-pacs/ --db pacs-exit.db --since last   "
                  "# a later round, dated folders only"],
    "status": ["cloudexit status --db pacs-exit.db", "cloudexit status --db pacs-exit.db --json"],
    "plan": ["cloudexit plan --db pacs-exit.db --bandwidth 200Mbit/s --out plan.html",
             'cloudexit plan --db pacs-exit.db --bandwidth 200Mbit/s --schedule "Mon-Fri 07:30,0 19:00,off"',
             "cloudexit plan --db pacs-exit.db --measure --provider aliyun-oss"],
    "migrate": ["cloudexit migrate --db pacs-exit.db --to /srv/pacs-archive",
                'cloudexit migrate --db pacs-exit.db --to /srv/pacs-archive --bwlimit "Mon-Fri 07:30,0 19:00,off"',
                "cloudexit migrate --db pacs-exit.db --resume   # after Ctrl-C, a reboot, a cut link"],
    "verify": ["cloudexit verify --db pacs-exit.db --deep",
               "cloudexit verify --db pacs-exit.db --to dicom://ORTHANC@pacs.local:4242 --sample 20"],
    "audit": ["cloudexit audit --db pacs-exit.db --out audit/ --lang zh",
              "cloudexit audit verify audit/"],
    "audit_verify": ["cloudexit audit verify audit/", "cloudexit audit verify audit/ --db pacs-exit.db"],
    "run_playbook": ["cloudexit run playbooks/branch-hospital-pacs.yaml --dry-run",
                     "cloudexit run playbooks/aws-s3-exit.yaml --ack exit-approval",
                     "cloudexit run playbooks/branch-hospital-pacs.yaml --confirm TOKEN"],
    "decommission": ["cloudexit decommission --db pacs-exit.db   # dry run: prints a token",
                     "cloudexit decommission --db pacs-exit.db --execute --confirm TOKEN"],
    "demo": ["cloudexit demo", "cloudexit demo --size tiny --workdir /tmp/cloudexit-demo"],
}


def examples(command: str) -> str:
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[command])


def _set_traceback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["traceback"] = ctx.meta.get("traceback") or value
    return value


def note_db(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    ctx.meta["db_path"] = value  # for errors met on the DB outside the library's own handling
    return value


def db_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--db", "db_path", envvar="CLOUDEXIT_DB", default="cloudexit.db",
                        show_default=True, type=click.Path(dir_okay=False), callback=note_db,
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


class Number(click.FloatRange):
    """A number in a range, and a number: click's FloatRange lets "nan" through (no comparison
    with NaN is true), and a NaN timeout makes a PACS that is up look as if it did not answer."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


# PACS timeouts (seconds): option, PacsConfig field, what it bounds.
PACS_TIMEOUTS = (
    ("--pacs-connect-timeout", "connect_timeout", "TCP connect to a PACS (C-STORE and STOW-RS)"),
    ("--acse-timeout", "acse_timeout", "C-STORE: the PACS's answer to an association request"),
    ("--dimse-timeout", "dimse_timeout", "C-STORE: the PACS's answer to a small object (a larger one "
                                         f"gets 1 s more per {PacsConfig.min_rate / 2**20:g} MiB); a PACS "
                                         "that does not answer in time is paused, probed, and gets the "
                                         "object again once it is back"),
    ("--network-timeout", "network_timeout", "C-STORE: silence from the PACS that aborts its association"),
    ("--http-timeout", "http_timeout", "STOW-RS: the answer to a small request (larger: as --dimse-timeout)"),
)


def pacs_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The PACS timeouts, handed to the command as one `pacs_timeouts`: the PacsConfig fields
    given (not the defaults, so that `migrate --resume` keeps the ones its run recorded)."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(f"pacs_{name}") for _, name, _ in PACS_TIMEOUTS}
        kwargs["pacs_timeouts"] = {k: v for k, v in given.items() if v is not None}
        return f(*args, **kwargs)

    for option, name, what in reversed(PACS_TIMEOUTS):
        command = click.option(option, f"pacs_{name}", type=Number(0.1, 86400), default=None,
                               help=f"Seconds to wait: {what} (default {getattr(PacsConfig, name):g}).")(command)
    return command


@click.group(cls=CloudexitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudexit")
@click.option("--traceback", is_flag=True, expose_value=False, callback=_set_traceback,
              is_eager=True, help="Show the full stack on errors.")
def main() -> None:
    """Move a hospital's PACS out of cloud object storage, verified, and prove it.

    Start with `cloudexit demo` to see the whole job on an embedded S3 server, or
    `cloudexit inventory s3://BUCKET/PREFIX --endpoint-url URL` on your own bucket.
    """


def warn_patient_key(state: Any) -> None:
    """One line when patients cannot be matched (the key file is missing or not this DB's)."""
    warning = state.patient_key().warning()
    if warning:
        click.secho(f"Warning: {warning}", fg="yellow", err=True)
