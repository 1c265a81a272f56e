"""`cloudexit audit` and `cloudexit audit verify`."""

from __future__ import annotations

import json
import sys

import click

from cloudexit.cli.group import (EXIT_ERROR, EXIT_PARTIAL, db_option, examples, main, note_db,
                                 output_options)
from cloudexit.core.errors import UsageError


@main.group(invoke_without_command=True, epilog=examples("audit"))
@click.option("--out", "out", type=click.Path(file_okay=False),
              help="The folder to write (created 0700; refused if it holds other files).")
@click.option("--lang", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Language of audit.html (zh: Chinese for the hospital's management).")
@click.option("--include-phi", is_flag=True,
              help="Add Patient ID and Name (read from the archived files) to the manifest and "
                   "exceptions; every page then says it holds patient identity.")
@click.option("--force", is_flag=True, help="Write into a folder that is not empty (replaces a previous audit).")
@click.option("--redact-keys", is_flag=True,
              help="Write manifest.csv with object keys and archive paths hashed per folder level "
                   "(keyed, not reversible from the manifest): for keys that embed patient names.")
@click.option("--sign", "sign_key", metavar="KEY", type=click.Path(dir_okay=False),
              help="Sign SHA256SUMS with this SSH key (ssh-keygen -Y sign; a key without passphrase, "
                   "or KEY.pub of a key in ssh-agent): SHA256SUMS.sig; the report names the signer.")
@db_option
@output_options
@click.pass_context
def audit(ctx: click.Context, out: str | None, lang: str, include_phi: bool, force: bool,
          redact_keys: bool, sign_key: str | None, db_path: str, as_json: bool, quiet: bool) -> None:
    """Write the migration audit: audit.html, audit.json, manifest.csv, events.jsonl, SHA256SUMS.

    The report management signs: complete or not and why, counts at the source and in each
    destination, charts, exceptions with remedies, how each object was verified, chain of
    custody, data residency, decommission readiness, sign-off. Check a written audit later
    with `cloudexit audit verify DIR`.

    Exit 0: the migration is complete; 3: the audit is written but the migration is not
    complete or has exceptions to review (the report says which).
    """
    if ctx.invoked_subcommand is not None:
        return
    if not out:
        raise UsageError("say where to write the audit: --out DIR",
                         hint="or check an audit written before: cloudexit audit verify DIR")
    from cloudexit.report.audit import open_state, write_audit
    from cloudexit.report.sign import signer_of

    if include_phi and redact_keys:
        raise UsageError("--redact-keys hides the names keys may hold; --include-phi adds patient names",
                         hint="choose one of them")
    signer = signer_of(sign_key) if sign_key else None  # a bad key stops before anything is written
    with open_state(db_path) as state:
        result = write_audit(state, out, lang=lang, include_phi=include_phi, force=force,
                             redact_keys=redact_keys, signer=signer)
        recorded = state.scratch_of is None
    status = result.verdict["status"]
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "verdict": result.verdict,
                               "fingerprint": result.fingerprint, "files": result.files,
                               "manifest_rows": result.manifest_rows, "events": result.events,
                               "signer": signer.facts() if signer else None},
                              indent=2, default=str))
    elif not quiet:
        # The verdict's one name (as in audit.json and the report), then what it means.
        meaning = {"complete": "nothing left to do", "complete_with_exceptions": "nothing left to do by "
                   "the tool; exceptions for a person to review", "incomplete": "the migration is NOT complete"}
        click.echo(f"Audit written to {result.out}/audit.html (verdict {status}: {meaning[status]}).")
        click.echo(f"  {result.manifest_rows} manifest rows, {result.events} events; fingerprint {result.fingerprint}")
        if signer:
            click.echo(f"  signed by {signer.identity}, key {signer.fingerprint} (SHA256SUMS.sig)")
            click.echo(f"  check it any time with: cloudexit audit verify {result.out} --signer {signer.key}"
                       + ("" if signer.key.endswith(".pub") else ".pub"))
        else:
            click.echo(f"  check it any time with: cloudexit audit verify {result.out}")
    if not recorded:
        click.echo(f"Note: {db_path} is read-only: this audit is NOT recorded in its event log, so "
                   f"`cloudexit audit verify {result.out} --db {db_path}` will say the DB has no "
                   "record of it.", err=True)
    if result.others:
        click.echo(f"Note: {len(result.others)} other file(s) in {result.out} are not part of the audit; "
                   "`cloudexit audit verify` reports them as added.", err=True)
    if status != "complete":
        sys.exit(EXIT_PARTIAL)


@audit.command("verify", epilog=examples("audit_verify"))
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None, callback=note_db,
              help="Also check the events against this state database and that it recorded this audit.")
@click.option("--signer", metavar="KEYFILE|allowed_signers", type=click.Path(dir_okay=False),
              help="Check SHA256SUMS.sig was made by this public key (or a key in this allowed_signers file).")
@output_options
def audit_verify(folder: str, db_path: str | None, signer: str | None, as_json: bool, quiet: bool) -> None:
    """Check a written audit: every file against SHA256SUMS, the event hash chain, the fingerprint,
    and with --signer the SSH signature of SHA256SUMS.

    Prints OK, or exactly which file was altered, added or removed and where the event chain
    breaks. Exit 0: intact; 1: tampered.
    """
    from cloudexit.report.audit import verify_audit

    report = verify_audit(folder, db_path, signer=signer)
    sig = report["signature"]
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif report["ok"]:
        if not quiet:
            chain = report["chain"]
            click.echo(f"OK: {len(report['files'])} files match SHA256SUMS; event chain intact "
                       f"({chain['events']} events, head {chain['head']}); fingerprint {report['fingerprint']}")
            if sig["ok"]:
                click.echo(f"OK: SHA256SUMS signed by {sig['identity']} (key {sig['fingerprint']})")
            elif sig["note"]:
                click.echo(f"Note: {sig['note']}")
    else:
        click.echo(f"TAMPERED: {folder}", err=True)
        for problem in report["problems"]:
            click.echo(f"  {problem}", err=True)
    if not report["ok"]:
        sys.exit(EXIT_ERROR)
