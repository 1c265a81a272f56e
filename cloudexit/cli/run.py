"""`cloudexit run PLAYBOOK.yaml` and `cloudexit demo`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cloudexit.cli.group import EXIT_INTERRUPTED, examples, main, output_options
from cloudexit.cli.status import print_summary


@main.command("run", epilog=examples("run_playbook"))
@click.argument("playbook_path", metavar="PLAYBOOK.yaml", type=click.Path(dir_okay=False))
@click.option("--db", "db_path", envvar="CLOUDEXIT_DB", type=click.Path(dir_okay=False),
              help="The migration's state database (env CLOUDEXIT_DB; default: the playbook's `db:`, "
                   "else ./cloudexit.db).")
@click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
              help="Override a playbook field, e.g. --set source.endpoint=http://127.0.0.1:8333; repeatable.")
@click.option("--from", "from_step", metavar="STEP", help="Start at this step (run it again even if done).")
@click.option("--until", metavar="STEP", help="Stop after this step.")
@click.option("--dry-run", is_flag=True, help="Print what each step would do; change nothing.")
@click.option("--ack", multiple=True, metavar="STEP", help="Pass a checkpoint step (recorded with your user name).")
@click.option("--confirm", "token", metavar="TOKEN",
              help="Let the decommission step delete: the token its dry run printed.")
@output_options
def run_playbook(playbook_path: str, db_path: str | None, overrides: tuple[str, ...], from_step: str | None,
                 until: str | None, dry_run: bool, ack: tuple[str, ...], token: str | None,
                 as_json: bool, quiet: bool) -> None:
    """Run a playbook's steps in order, resumably (see docs/playbooks.md).

    Each step's state is recorded in the state DB: run the same command again and it continues
    at the step in progress. `${VAR}` in the playbook comes from the environment. Gates (a pilot
    with mismatches, a delta above the cutover threshold, a checkpoint, the decommission token)
    stop the run with a message saying what to do.

    Exit 0: the steps ran; 3: a gate stopped the run; 1: a step failed.
    """
    from cloudexit.playbook import Runner, load

    book = load(playbook_path, overrides)
    db = db_path or (str(book.db) if book.db else "cloudexit.db")
    say = (lambda text: None) if (quiet or as_json) else click.echo
    runner = Runner(book, db, say=say, ack=ack, confirm=token)
    report = runner.run(from_step=from_step, until=until, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
        return
    if quiet:
        return
    if dry_run:
        click.echo(f"Playbook {book.name} on {db} (dry run: nothing changes)")
        for s in report.steps:
            state = "done" if s.status == "skipped" else s.result.get("status", "pending")
            verb = "skip" if s.status == "skipped" else "run "
            click.echo(f"  {verb} {s.name:<14} [{state}] {s.message}")
    elif report.message:
        click.echo(report.message)



@main.command(epilog=examples("demo"))
@click.option("--workdir", type=click.Path(file_okay=False), default="cloudexit-demo",
              show_default=True,
              help="Where the demo keeps its state DB, archive and reports (reset on each run).")
@click.option("--size", type=click.Choice(["tiny", "demo"]), default="demo", show_default=True,
              help="How big a synthetic PACS to make.")
@output_options
def demo(workdir: str | None, size: str, as_json: bool, quiet: bool) -> None:
    """Run the whole job on an embedded S3 server holding a synthetic PACS."""
    from cloudexit.demo import run_demo

    def say(text: str) -> None:
        if not quiet and not as_json:
            click.echo(text)

    def show(step: str, data: Any) -> None:
        if quiet or as_json:
            return
        if step == "inventory":
            print_summary(data)
        elif step == "plan":
            from cloudexit.plan.model import render_text
            click.echo(render_text(data))

    try:
        result = run_demo(workdir, size=size, say=say, show=show)
    except KeyboardInterrupt:
        # Not "run the same command again to continue": the demo resets its folder each run.
        click.echo(f"\nInterrupted. The demo starts afresh each time: `cloudexit demo` runs it again "
                   f"from the start (it resets {workdir or 'its folder'}).", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
