"""`cloudexit verify`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from cloudexit.cli.group import EXIT_PARTIAL, db_option, examples, main, output_options, pacs_options
from cloudexit.cli.progress import PhaseBar
from cloudexit.core.config import PacsConfig
from cloudexit.core.errors import UsageError


@main.command(epilog=examples("verify"))
@db_option
@click.option("--to", "dests", multiple=True, metavar="DEST",
              help="A destination to verify: a folder, dicom://AET@HOST:PORT or dicomweb+https://HOST/PATH; "
                   "repeatable (default: every destination of the migration).")
@click.option("--deep", is_flag=True,
              help="Re-read every archived file and re-check its SHA-256 (reads everything again).")
@click.option("--sample", default=0, show_default=True, type=click.IntRange(0, 100_000),
              help="Fetch N instances back from a PACS (C-GET / WADO-RS) and compare them with the archive.")
@click.option("--seed", type=int, help="Random seed of --sample (recorded; default: random).")
@click.option("--calling-aet", envvar="CLOUDEXIT_CALLING_AET", default="CLOUDEXIT", show_default=True,
              help="Our AE title towards a dicom:// PACS (env CLOUDEXIT_CALLING_AET).")
@pacs_options
@output_options
def verify(db_path: str, dests: tuple[str, ...], deep: bool, sample: int, seed: int | None,
           calling_aet: str, pacs_timeouts: dict[str, float], as_json: bool, quiet: bool) -> None:
    """Re-check what landed against the inventory: files, hashes, PACS counts.

    A folder: every recorded file present with its size (and SHA-256 with --deep), no extra
    files, instances per study. A PACS: C-FIND or QIDO-RS counts per study and series, missing and
    extra instances; --sample compares instances fetched back with the archived copies. Results
    are stored in the state DB for the audit. Exit 0: all verified; 3: differences found.
    """
    from cloudexit.state.db import open_readable
    from cloudexit.stores import QueryRefused
    from cloudexit.app import open_target
    from cloudexit.verify import check_sample, destinations, dicomweb_twin, verify as run_verify

    reports = []
    with open_readable(db_path, scratch=True) as state:
        recorded = state.scratch_of is None
        targets = list(dests) or destinations(state)
        if not targets:
            raise UsageError("nothing to verify: no migration has delivered anywhere yet",
                             hint="run `cloudexit migrate --to DEST` first, or pass --to")
        check_sample(targets, sample)
        for dest in targets:  # a DICOMweb URL appended below (C-FIND refused) is verified too
            store = open_target(dest, calling_aet, PacsConfig(**pacs_timeouts))
            bar = PhaseBar(quiet or as_json, "verify")
            try:
                reports.append(run_verify(state, store, deep=deep, sample=sample, seed=seed, progress=bar))
            except QueryRefused as exc:
                twin = dicomweb_twin(state, store.id, targets)
                if twin is None:
                    raise
                click.echo(f"{store.id}: {exc.message}; verifying through its DICOMweb URL "
                           f"{twin} (QIDO-RS) instead. Hint: {exc.hint}", err=True)
                if twin not in targets:
                    targets.append(twin)
            finally:
                bar.close()
                store.close()
    if as_json:
        click.echo(json.dumps({"verified": all(r.passed for r in reports), "recorded": recorded,
                               "destinations": [r.to_dict() for r in reports]}, indent=2, default=str))
    elif not quiet:
        for r in reports:
            print_verify(r)
    if not recorded:
        click.echo(f"Note: {db_path} is read-only: these results were NOT recorded in it (the audit "
                   "will not show them); run verify on a writable DB to record them.", err=True)
    if not all(r.passed for r in reports):
        sys.exit(EXIT_PARTIAL)


def print_verify(r: Any) -> None:
    c = r.counts
    ok = sum(1 for s in r.studies if s.status == "ok")
    lines = [f"{r.dest}: {'verified' if r.passed else 'DIFFERENCES FOUND'} (verify run {r.run_id})",
             f"  studies {ok}/{len(r.studies)} match; instances {c.get('found_instances', 0)} "
             f"of {c.get('expected_instances', 0)} expected"]
    if r.kind == "filesystem":
        lines.append(f"  files {c.get('files_ok', 0)}/{c.get('files_checked', 0)} ok"
                     + (f", {c.get('files_rehashed', 0)} re-hashed" if r.options.get("deep") else ""))
    if r.samples:
        same = sum(1 for s in r.samples if s.result in ("identical", "equivalent"))
        lines.append(f"  samples {same}/{len(r.samples)} identical or equivalent")
    lines += [f"  {f.text()}" for f in r.findings[:20]]
    if len(r.findings) > 20:
        lines.append(f"  ... {len(r.findings) - 20} more (cloudexit verify --json, or table verify_findings)")
    for s in r.samples:
        if s.result not in ("identical", "equivalent"):
            changed = ", ".join(f"{d['keyword']} {d['change']}" for d in s.differences[:8])
            lines.append(f"  sample {s.sop_uid}: {s.result}; pixel data {s.pixel or '-'}"
                         + (f"; transfer syntax {s.transfer_syntax}" if s.transfer_syntax else "")
                         + (f"; {changed}" if changed else "") + (f"; {s.detail}" if s.detail else ""))
    click.echo("\n".join(lines))
