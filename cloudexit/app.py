"""The application layer: what `cloudexit` does with the library, once, for every caller.

The command line (`cloudexit.cli`), playbooks (`cloudexit.playbook`) and the demo call these
functions and hold no orchestration of their own:

* `first_state`, `inventory`: a state DB that a failed first command does not leave behind,
  and an inventory round;
* `open_source`: the bucket a state DB inventoried, on its recorded endpoint and region unless
  told otherwise (the "endpoint fallback");
* `open_archive`, `open_targets`: the archive folder (the first `--to`) and the PACS (the others);
* `choose_run` and `migrate`: new run or resume, by one rule (below), then the run;
* `plan_config`, `make_plan`, `write_plan`: a plan at migrate's own settings, and its documents.

The resume rule, one for every caller (the command line and playbooks each had their own:
`migrate --to` refused to continue an unfinished run, a playbook continued it with its own
settings and started a second archive without asking):

1. `--resume` continues the last run: into its own archive, to its own PACS, with its recorded
   settings (settings given again override them). No run yet: refused.
2. A destination given (`--to DEST`, a playbook's targets) while the last run is unfinished
   (running, interrupted or stopped): the same archive continues that run, with the settings
   given over the recorded ones (so an unfinished archive never changes layout unless asked);
   another archive is refused (the engine says which run is unfinished and how to continue it).
3. Otherwise a new run. Into a folder other than the archive earlier runs filled (everything
   would be downloaded again) only when confirmed (`--yes`); playbooks are held to it too.

The library never prints: a note for the user is returned (`restore_note`) for the caller to show.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cloudexit.core.config import InventoryConfig, MigrateConfig, PacsConfig, SourceConfig
from cloudexit.core.errors import StateError, UsageError
from cloudexit.s3.source import Source
from cloudexit.state.db import State
from cloudexit.stores import Store
from cloudexit.stores.filesystem import FilesystemStore

UNFINISHED = ("running", "interrupted", "stopped")  # a run in one of these can be continued
PLAN_FORMATS = ("md", "html", "json")


# -- inventory -----------------------------------------------------------------------------------
@contextmanager
def first_state(db_path: str | os.PathLike[str]) -> Iterator[State]:
    """The state DB, created if need be; when the command fails before anything is recorded (a
    wrong bucket, no credentials), no empty DB is left behind, nor the patient key made for it."""
    from cloudexit.state import patientkey
    from cloudexit.state.db import discard_if_empty

    first = not os.path.exists(db_path)
    new_key = not patientkey.key_path(db_path).exists()
    try:
        with State(db_path, create=True) as state:
            yield state
    except BaseException:
        if first and discard_if_empty(db_path) and new_key:
            patientkey.key_path(db_path).unlink(missing_ok=True)
        raise


def inventory(state: State, source: Source, config: InventoryConfig | None = None,
              since: str | None = None, progress: Callable[[Any], None] | None = None,
              cluster: Any = None) -> Any:
    """One inventory round (`--since`: YYYY-MM-DD or "last"); its summary. `cluster`: a
    `cluster.headers.ClusterHeaders` to read the headers on (None: threads here)."""
    from cloudexit.inventory import Inventory, resolve_since

    return Inventory(state, source, config or InventoryConfig(), progress=progress,
                     since=resolve_since(state, since), cluster=cluster).run()


# -- sources and targets -----------------------------------------------------------------------
def open_source(state: State, given: SourceConfig | None = None) -> Source:
    """The bucket this state DB inventoried, on its recorded endpoint and region unless `given`
    names others ("aws" recorded: the AWS default chain)."""
    given = given or SourceConfig()
    url = state.meta("source_url")
    if url is None:
        raise StateError("this state DB has no inventory yet",
                         hint="run `cloudexit inventory s3://BUCKET` first")
    bound = state.meta("endpoint_url")
    return Source(url, SourceConfig(
        endpoint_url=given.endpoint_url or (None if bound in (None, "aws") else bound),
        profile=given.profile, region=given.region or state.meta("region"),
        max_attempts=given.max_attempts))


def open_archive(dest: str, layout: str = MigrateConfig.layout) -> FilesystemStore:
    """The archive folder a migration downloads into: the first `--to`, a folder."""
    from cloudexit.stores import open_store

    opened = open_store(dest)
    if not isinstance(opened, FilesystemStore):
        raise UsageError(f"--to {dest}: the first --to must be a folder (downloads land in the "
                         "archive before any PACS gets them)",
                         hint="e.g. --to /srv/pacs-archive --to dicom://PACS@pacs.example.org:104")
    return FilesystemStore(opened.root, layout=layout)


def open_target(dest: str, calling_aet: str | None = None, timeouts: PacsConfig | None = None) -> Store:
    """Any destination (a folder, a C-STORE or a STOW-RS PACS), e.g. to verify it."""
    from cloudexit.stores import open_store

    return open_store(dest, calling_aet=calling_aet, timeouts=timeouts)


def open_targets(urls: Sequence[str], calling_aet: str | None = None,
                 timeouts: PacsConfig | None = None) -> list[Store]:
    """The PACS a migration delivers to: every `--to` after the archive, none of them a folder."""
    targets = []
    for url in urls:
        target = open_target(url, calling_aet, timeouts)
        if isinstance(target, FilesystemStore):
            raise UsageError(f"--to {url}: one folder only (the first --to); the others must be a PACS",
                             hint="dicom://AET@HOST:PORT or dicomweb+https://HOST/PATH")
        targets.append(target)
    return targets


# -- migrate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunChoice:
    """What `migrate` will do: continue a run or start one, where, to which PACS, how."""

    resume: bool
    archive: FilesystemStore
    pacs: list[str]
    config: MigrateConfig
    run: Any = None  # the run continued (a row of migration_runs), if any


def choose_run(state: State, dests: Sequence[str] = (), resume: bool = False,
               settings: dict[str, Any] | None = None, confirmed: bool = False,
               pacs: dict[str, Any] | None = None) -> RunChoice:
    """New run or resume, by the rule in this module's docstring. `settings`: MigrateConfig
    fields the caller was given, `pacs`: PacsConfig fields (the PACS timeouts); None values:
    not given. A run continued keeps what it recorded of both unless given again."""
    choice = _choose_run(state, dests, resume, settings, confirmed)
    timeouts = {k: v for k, v in (pacs or {}).items() if v is not None}
    if not timeouts:
        return choice
    return replace(choice, config=replace(choice.config, pacs=replace(choice.config.pacs, **timeouts)))


def _choose_run(state: State, dests: Sequence[str], resume: bool, settings: dict[str, Any] | None,
                confirmed: bool) -> RunChoice:
    from cloudexit.engine.migrate import check_new_archive, config_from_run, last_run

    given = {k: v for k, v in (settings or {}).items() if v is not None}
    if dests and resume:
        raise UsageError("give either --to DEST (a new run) or --resume (the last run), not both")
    run = last_run(state)
    if resume:
        if run is None:
            raise UsageError("nothing to resume: no migration has started with this state DB",
                             hint="start one with: cloudexit migrate --to DEST")
        config = config_from_run(run, **given)
        archive = FilesystemStore(run["dest"][len("file://"):], layout=config.layout)
        return RunChoice(True, archive, list(json.loads(run["options"] or "{}").get("deliver") or []),
                         config, run)
    if not dests:
        raise UsageError("say where to: --to DEST starts a run, --resume continues the last one")
    probe = open_archive(dests[0])
    if run is not None and run["status"] in UNFINISHED and run["dest"] == probe.id:
        config = config_from_run(run, **given)
        return RunChoice(True, open_archive(dests[0], config.layout), list(dests[1:]), config, run)
    config = MigrateConfig(**given)
    archive = open_archive(dests[0], config.layout)
    check_new_archive(state, archive.id, confirmed)
    return RunChoice(False, archive, list(dests[1:]), config)


def restore_note(state: State, config: MigrateConfig) -> str | None:
    """A note to show before the run when the restore tier asked for cannot apply to all."""
    from cloudexit.engine.migrate import restore_tier_note

    return restore_tier_note(state, config.restore_tier)


def migrate(state: State, source: Source, choice: RunChoice, calling_aet: str | None = None,
            progress: Callable[[Any], None] | None = None, executor: Any = None) -> Any:
    """Run (or continue) the migration `choice` describes; its MigrationSummary. `executor`:
    where the fetch tasks run (None: worker processes here; cloudexit/cluster: a dask cluster)."""
    from cloudexit.engine.migrate import Migration

    deliver_to = open_targets(choice.pacs, calling_aet, choice.config.pacs)
    return Migration(state, source, choice.archive, choice.config, progress=progress,
                     resume=choice.resume, deliver_to=deliver_to, executor=executor).run()


# -- plan ------------------------------------------------------------------------------------------
def plan_config(state: State) -> MigrateConfig:
    """The settings the plan assumes: the last migration run's, else migrate's defaults, so
    the plan counts the GETs (one per object, one per range of a large one) migrate makes."""
    from cloudexit.engine.migrate import config_from_run, last_run

    run = last_run(state)
    return config_from_run(run) if run is not None else MigrateConfig()


@dataclass
class PlanRequest:
    """What a plan is asked for (the `plan` command's options, a playbook's `plan` step)."""

    provider: str | None = None
    region: str | None = None
    price_file: str | None = None
    bandwidth: float | None = None  # bytes/s
    measure: bool = False
    measure_seconds: float = 20.0
    measure_bytes: int = 256 * 2**20
    recalibrate: bool = False
    latency_s: float | None = None
    schedule: Any = None  # a Schedule
    concurrency: int | None = None
    start: datetime = field(default_factory=lambda: datetime.now().astimezone())
    offline_threshold: timedelta = timedelta(days=7)
    assume_bytes: int | None = None
    source: SourceConfig = field(default_factory=SourceConfig)  # for --measure


def measure_or_recall(state: State, request: PlanRequest, config: MigrateConfig,
                      progress: Callable[[int], None] | None = None) -> Any:
    """The link measurement the plan uses: a new one (--measure), one from the runs so far
    (--recalibrate), the last one stored, or None when the bandwidth is given."""
    from cloudexit.plan.measure import measure_link, recalibrated, stored_measurement

    if request.measure:
        if state.meta("source_url") is None:
            raise UsageError("the inventory is empty: nothing to measure",
                             hint="run `cloudexit inventory s3://BUCKET` first")
        source = open_source(state, request.source)
        return measure_link(state, source, config, seconds=request.measure_seconds,
                            max_bytes=request.measure_bytes, progress=progress)
    if request.recalibrate:
        return recalibrated(state)
    return None if request.bandwidth is not None else stored_measurement(state)


def make_plan(state: State, request: PlanRequest, measurement: Any = None) -> Any:
    """The plan (a `Plan`) at migrate's own settings (`plan_config`)."""
    from cloudexit.plan.build import build_plan, link_from

    config = plan_config(state)
    link = link_from(request.bandwidth, measurement, request.concurrency, request.latency_s, config)
    return build_plan(state, request.provider, request.region, request.price_file, link,
                      request.schedule, request.start, request.offline_threshold,
                      request.assume_bytes, config=config)


def plan_format(path: str | Path) -> str | None:
    """The document format a plan file's name asks for (md, html, json), None if unknown."""
    suffix = str(path).rsplit(".", 1)[-1].lower()
    return suffix if suffix in PLAN_FORMATS else None


def write_plan(plan: Any, path: str | Path, lang: str = "en") -> None:
    """Write a plan document (0600), its format by the name's ending (see `plan_format`)."""
    from cloudexit.core.files import write_private
    from cloudexit.plan import model as plan_model

    kind = plan_format(path)
    if kind == "md":
        text = plan_model.render_markdown(plan, lang)
    elif kind == "html":
        text = plan_model.render_html(plan, lang)
    elif kind == "json":
        text = json.dumps(plan.to_dict(), indent=2, default=str)
    else:
        raise UsageError(f"--out {path}: unknown format", hint="end the name in .md, .html or .json")
    write_private(path, text)

