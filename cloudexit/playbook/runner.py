"""Playbooks: the steps run in order, each through `cloudexit.app` and the library, with each
step's state in the `playbook_steps` table (see cloudexit.playbook)."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cloudexit.core.errors import CloudexitError, GateNotMet, PlaybookError, StateError
from cloudexit.playbook.schema import PACS_PREFIXES, Playbook, Step, name_keys
from cloudexit.state import patientkey
from cloudexit.state.db import State, now


class _Gate(Exception):
    """Raised by a step: the step ran but its condition is not met; the run stops here."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


@dataclass
class StepReport:
    name: str
    kind: str
    status: str  # done | gated | failed | skipped (already done) | would-run (dry run)
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    playbook: str
    db: str
    steps: list[StepReport] = field(default_factory=list)
    stopped_at: str | None = None  # step name where a gate stopped the run
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"playbook": self.playbook, "db": self.db, "stopped_at": self.stopped_at,
                "message": self.message, "steps": [s.__dict__ for s in self.steps]}


class Runner:
    """Run a playbook's steps against one state DB."""

    def __init__(self, playbook: Playbook, db: str | os.PathLike[str], say: Callable[[str], None] = print,
                 ack: Iterable[str] = (), confirm: str | None = None) -> None:
        self.pb = playbook
        self.db = Path(db)
        self.say = say
        self.ack = set(ack)
        self.confirm = confirm
        for name in self.ack:
            if playbook.step(name).kind != "checkpoint":
                raise PlaybookError(f"--ack {name}: step {name!r} is not a checkpoint")

    # -- bookkeeping --------------------------------------------------------------------------------
    def statuses(self, state: State | None) -> dict[str, Any]:
        if state is None:
            return {}
        return {r["step"]: r for r in state.query("SELECT * FROM playbook_steps WHERE playbook = ?",
                                                  (self.pb.name,))}

    def _mark(self, state: State, step: Step, status: str, message: str = "",
              result: dict[str, Any] | None = None) -> None:
        seq = self.pb.steps.index(step)
        stamp = now()
        with state.transaction() as tx:
            tx.execute(
                "INSERT INTO playbook_steps(playbook, step, kind, seq, status, attempts, started_at, finished_at, "
                "message, result, playbook_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(playbook, step) DO UPDATE SET kind = excluded.kind, seq = excluded.seq, "
                "status = excluded.status, attempts = playbook_steps.attempts + excluded.attempts, "
                "started_at = coalesce(excluded.started_at, playbook_steps.started_at), "
                "finished_at = excluded.finished_at, message = excluded.message, "
                "result = coalesce(excluded.result, playbook_steps.result), "
                "playbook_sha256 = excluded.playbook_sha256",
                (self.pb.name, step.name, step.kind, seq, status, int(status == "running"),
                 stamp if status == "running" else None, None if status == "running" else stamp, message,
                 json.dumps(result, default=str) if result is not None else None, self.pb.sha256))
            state.log(f"playbook.step.{status}", tx, playbook=self.pb.name, step=step.name, step_kind=step.kind,
                      message=message or None, playbook_sha256=self.pb.sha256)

    # -- the run ------------------------------------------------------------------------------------
    def run(self, from_step: str | None = None, until: str | None = None, dry_run: bool = False) -> RunReport:
        steps = self.pb.steps
        start = steps.index(self.pb.step(from_step)) if from_step else None
        stop = steps.index(self.pb.step(until)) if until else len(steps) - 1
        if start is not None and start > stop:
            raise PlaybookError(f"--from {from_step} comes after --until {until}")
        report = RunReport(self.pb.name, str(self.db))
        state = None
        if self.db.exists():
            state = State(self.db)
        elif not dry_run:
            state = State(self.db, create=True)
        try:
            self._check_db(state)
            done = self.statuses(state)
            if start is None:  # continue at the first step not done
                start = next((i for i, s in enumerate(steps)
                              if (done.get(s.name) or {"status": None})["status"] != "done"), len(steps))
            for i, step in enumerate(steps):
                if i < start:
                    report.steps.append(StepReport(step.name, step.kind, "skipped", "done before"))
                    continue
                if i > stop:
                    break
                if dry_run:
                    row = done.get(step.name)
                    report.steps.append(StepReport(step.name, step.kind, "would-run", self.describe(step),
                                                   {"status": row["status"] if row else "pending"}))
                    continue
                assert state is not None
                self._mark(state, step, "running")
                self.say(f"== step {step.name} ({step.kind})")
                try:
                    result = getattr(self, f"_step_{step.kind}")(state, step)
                except _Gate as gate:
                    self._mark(state, step, "gated", str(gate), gate.result)
                    report.steps.append(StepReport(step.name, step.kind, "gated", str(gate), gate.result))
                    report.stopped_at, report.message = step.name, str(gate)
                    raise GateNotMet(f"step {step.name}: {gate}") from None
                except (CloudexitError, OSError) as exc:
                    if isinstance(exc, CloudexitError):  # e.g. "check --endpoint-url": the key here
                        name_keys(exc, str(self.pb.path))
                    self._mark(state, step, "failed", str(exc))
                    raise
                message = result.pop("_message", "")
                self._mark(state, step, "done", message, result)
                report.steps.append(StepReport(step.name, step.kind, "done", message, result))
                if message:
                    self.say(f"   {message}")
            if not dry_run and stop < len(steps) - 1 and until:
                report.message = f"stopped after step {until} (--until)"
            elif not dry_run and start >= len(steps):
                report.message = ("every step is done; run a step again with --from STEP "
                                  "(e.g. --from delta for another delta round)")
            return report
        finally:
            if state is not None:
                state.close()

    def _check_db(self, state: State | None) -> None:
        if state is None:
            return
        bound = state.meta("source_url")
        if bound is not None and bound != self.pb.source["url"]:
            raise StateError(f"{self.db} belongs to the migration of {bound}, not {self.pb.source['url']}",
                             hint="give this playbook its own --db (or `db:` in the playbook)")

    def describe(self, step: Step) -> str:
        pb, o = self.pb, step.options
        archive = pb.folders[0] if pb.folders else None
        if step.kind == "inventory":
            return f"list and classify {pb.source['url']} at {pb.source['endpoint'] or 'AWS'} into {self.db}"
        if step.kind == "plan":
            return (f"price the exit with the {pb.pricing['provider'] or 'guessed'} catalogue at "
                    f"{o['bandwidth'] or pb.pricing['bandwidth']}" + (f", write {', '.join(o['out'])}" if o["out"] else ""))
        if step.kind == "pilot":
            return (f"migrate {o['studies']} sample studies (seed {o['seed']}) into {self._pilot_dir(step)} "
                    "and verify them; gate: zero mismatches")
        if step.kind in ("migrate", "delta"):
            where = ", ".join(pb.targets)
            text = (f"download every inventoried object into {archive}" if step.kind == "migrate" else
                    "inventory again, then migrate only what is new or changed")
            gate = f"; gate: cutover when fewer than {o['cutover_below']} objects changed" if o.get("cutover_below") is not None else ""
            return f"{text} (targets {where}, bwlimit {o.get('bwlimit') or pb.schedule['bwlimit'] or 'none'}){gate}"
        if step.kind == "verify":
            return f"verify every target ({', '.join(pb.targets)}); gate: no differences"
        if step.kind == "audit":
            return f"write the audit into {self._path(o['out'])} ({o['lang']})"
        if step.kind == "checkpoint":
            return f"wait for `--ack {step.name}`: {o['message']}"
        return ("decommission dry run: manifest and confirmation token"
                + (" (--all-versions)" if o["all_versions"] else "") + "; deletes only with --confirm TOKEN")

    # -- helpers ------------------------------------------------------------------------------------
    def _path(self, text: str) -> Path:
        """A report's path: relative ones go beside the state DB."""
        p = Path(os.path.expanduser(text))
        return p if p.is_absolute() else Path(os.path.abspath(self.db.parent / p))

    def _source(self) -> Any:
        from cloudexit.core.config import SourceConfig
        from cloudexit.s3.source import Source

        s = self.pb.source
        return Source(s["url"], SourceConfig(endpoint_url=s["endpoint"], profile=s["profile"],
                                            region=s["region"], max_attempts=s["retries"]))

    def _archive(self) -> str:
        if len(self.pb.folders) > 1:
            raise PlaybookError(f"{self.pb.path}: one folder target only in this version (downloads land "
                                f"in one archive); found {', '.join(self.pb.folders)}")
        if not self.pb.folders:
            raise PlaybookError(f"{self.pb.path}: the migration needs a folder among the targets "
                                "(downloads land in the archive before any PACS gets them)")
        return self.pb.folders[0]

    def _settings(self, step: Step) -> dict[str, Any]:
        """The MigrateConfig fields a migrating step gives (None: not given)."""
        o = step.options
        values = {k: o.get(k) for k in ("layout", "non_dicom", "order", "processes", "threads",
                                        "keep_containers")}
        values["bwlimit"] = o.get("bwlimit") or self.pb.schedule["bwlimit"]
        return values

    def _timeouts(self) -> Any:
        from cloudexit.core.config import PacsConfig

        return PacsConfig(**{k: v for k, v in self.pb.timeouts.items() if v is not None})

    def _migrate(self, state: State, step: Step, folder: str) -> dict[str, Any]:
        """One migrate pass into the archive (new run or resume: `app.choose_run`'s rule); the
        engine delivers every verified DICOM object to the playbook's PACS targets in the same pass."""
        from cloudexit import app

        choice = app.choose_run(state, [folder, *self.pb.pacs], settings=self._settings(step),
                                pacs=self.pb.timeouts)
        summary = app.migrate(state, self._source(), choice, self.pb.verification["calling_aet"])
        out = {k: getattr(summary, k) for k in ("run", "verified", "quarantined", "duplicates", "failed",
                                                 "missing", "skipped", "unfinished", "bytes_verified",
                                                 "fetched_this_run")}
        if self.pb.pacs:
            out["pacs"] = summary.deliveries
            for dest, counts in summary.deliveries.items():
                state.log("playbook.delivered", playbook=self.pb.name, step=step.name, dest=dest, counts=counts)
        return out

    # -- steps --------------------------------------------------------------------------------------
    def _step_inventory(self, state: State, step: Step) -> dict[str, Any]:
        from cloudexit import app
        from cloudexit.core.config import InventoryConfig

        o = step.options
        values = {"workers": o["workers"], "header_bytes": o["header_bytes"],
                  "key_pattern": self.pb.source["key_pattern"]}
        summary = app.inventory(state, self._source(),
                                InventoryConfig(**{k: v for k, v in values.items() if v is not None}))
        result = dict(summary.__dict__)
        result["failed"] = len(summary.failed)
        result["_message"] = (f"inventory round {summary.round}: {summary.new} new, {summary.changed} changed, "
                              f"{summary.deleted} deleted, {summary.unchanged} unchanged"
                              + (f"; {len(summary.failed)} unreadable for now" if summary.failed else ""))
        return result

    def _step_plan(self, state: State, step: Step) -> dict[str, Any]:
        from cloudexit import app
        from cloudexit.core.units import parse_duration, parse_rate
        from cloudexit.engine.schedule import parse_schedule

        p = self.pb.pricing
        bandwidth = step.opt("bandwidth") or p["bandwidth"]
        if not bandwidth:
            raise PlaybookError(f"{self.pb.path}, line {step.line}: the plan step needs pricing.bandwidth "
                                "(e.g. 100Mbit/s)")
        targets = [self._path(out) for out in step.opt("out")]
        for out, target in zip(step.opt("out"), targets):
            if app.plan_format(target) is None:
                raise PlaybookError(f"{self.pb.path}, line {step.line}: plan out {out!r}: end the name in .md, .html or .json")
        request = app.PlanRequest(
            provider=p["provider"] or self.pb.source["provider"], region=p["region"] or self.pb.source["region"],
            price_file=str(self.pb.path.parent / p["price_file"]) if p["price_file"] else None,
            bandwidth=parse_rate(bandwidth), concurrency=p["concurrency"] or None,
            schedule=parse_schedule(self.pb.schedule["bwlimit"]) if self.pb.schedule["bwlimit"] else None,
            offline_threshold=parse_duration(p["offline_threshold"]))
        result = app.make_plan(state, request)
        for target in targets:
            app.write_plan(result, target)
        written = [str(t) for t in targets]
        return {"written": written, "_message": "plan made" + (f": {', '.join(written)}" if written else "")}

    def _pilot_dir(self, step: Step) -> Path:
        return self._path(step.opt("to") or "pilot-archive")

    def _step_pilot(self, state: State, step: Step) -> dict[str, Any]:
        """The real engine and verify on a sample of studies, in a pilot state DB and folder of their own."""
        from cloudexit import app
        from cloudexit.verify import verify

        o = step.options
        studies = [r[0] for r in state.query(
            "SELECT study_uid FROM objects WHERE status = 'present' AND kind = 'dicom' AND study_uid IS NOT NULL "
            "GROUP BY study_uid ORDER BY study_uid")]
        if not studies:
            raise _Gate("the inventory holds no DICOM study to pilot with")
        picked = sorted(random.Random(o["seed"]).sample(studies, min(o["studies"], len(studies))))
        pilot_db = self._path(f"{self.db.stem}.pilot.db")
        folder = self._pilot_dir(step)
        for stale in (pilot_db, Path(f"{pilot_db}-wal"), Path(f"{pilot_db}-shm")):
            stale.unlink(missing_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        marks = ",".join("?" * len(picked))
        rows = state.query(f"SELECT * FROM objects WHERE status = 'present' AND study_uid IN ({marks})", picked)
        pilot_key, key = patientkey.key_path(pilot_db), state.patient_key().key
        if pilot_key != state.key_path:  # the pilot hashes patients with the migration's key
            pilot_key.unlink(missing_ok=True)
            if key is not None:
                patientkey.write(pilot_key, key)
        with State(pilot_db, create=True) as pilot:
            pilot.set_meta(**{k: state.meta(k) for k in ("source_url", "endpoint_url", "region")})
            with pilot.transaction() as tx:
                tx.execute("INSERT INTO inventory_rounds(started_at, finished_at, status) VALUES (?, ?, 'complete')",
                           (now(), now()))
                if rows:
                    cols = rows[0].keys()
                    tx.executemany(f"INSERT INTO objects({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                   [tuple(r) for r in rows])
            choice = app.choose_run(pilot, [str(folder)], settings=self._settings(step))
            summary = app.migrate(pilot, self._source(), choice)
            report = verify(pilot, choice.archive)
        result = {"studies": picked, "objects": len(rows), "verified": summary.verified,
                  "quarantined": summary.quarantined, "failed": summary.failed, "missing": summary.missing,
                  "unfinished": summary.unfinished, "verify_passed": report.passed,
                  "findings": len(report.findings), "pilot_db": str(pilot_db), "archive": str(folder)}
        state.log("playbook.pilot", playbook=self.pb.name, **{k: v for k, v in result.items()})
        problems = summary.failed + summary.missing + summary.unfinished + len(report.findings) + (
            0 if o["allow_quarantined"] else summary.quarantined)
        if problems:
            raise _Gate(f"pilot of {len(picked)} studies is not clean: {summary.failed} failed, {summary.missing} "
                        f"missing, {summary.quarantined} quarantined, {len(report.findings)} verify findings "
                        f"(see `cloudexit status --db {pilot_db}`); fix the cause and run again"
                        + ("; quarantined objects (kept in the bucket, listed in the audit) stop the pilot "
                           "unless the step says `allow_quarantined: true`"
                           if summary.quarantined and not o["allow_quarantined"] else ""), result)
        result["_message"] = (f"pilot: {len(picked)} studies, {summary.verified} objects verified in {folder}, "
                              "zero mismatches")
        return result

    def _step_migrate(self, state: State, step: Step) -> dict[str, Any]:
        result = self._migrate(state, step, self._archive())
        self._gate_migration(result)
        result["_message"] = (f"migrate run {result['run']}: {result['verified']} verified"
                              + (f", {result['quarantined']} quarantined (kept in the bucket)" if result["quarantined"] else ""))
        return result

    def _gate_migration(self, result: dict[str, Any]) -> None:
        left = result["failed"] + result["missing"] + result["unfinished"]
        if left:
            raise _Gate(f"{result['failed']} failed, {result['missing']} missing, {result['unfinished']} unfinished "
                        "objects (see `cloudexit status`); run the playbook again to retry them", result)

    def _step_delta(self, state: State, step: Step) -> dict[str, Any]:
        from cloudexit import app
        from cloudexit.core.config import InventoryConfig

        summary = app.inventory(state, self._source(), InventoryConfig(key_pattern=self.pb.source["key_pattern"]))
        moved = self._migrate(state, step, self._archive())
        changes = summary.new + summary.changed
        result = {"round": summary.round, "new": summary.new, "changed": summary.changed,
                  "deleted": summary.deleted, "migrate": moved}
        state.log("delta.round", playbook=self.pb.name, round=summary.round, new=summary.new,
                  changed=summary.changed, deleted=summary.deleted, migrated=moved["fetched_this_run"])
        self._gate_migration(moved)
        threshold = step.opt("cutover_below")
        text = (f"delta round {summary.round}: {summary.new} new, {summary.changed} changed, "
                f"{summary.deleted} deleted; {moved['fetched_this_run']} objects moved")
        if threshold is not None and changes >= threshold:
            raise _Gate(f"{text}; still {changes} new or changed objects, not below the cutover threshold "
                        f"{threshold}: run the playbook again later (e.g. nightly) until it is", result)
        result["_message"] = text
        return result

    def _step_verify(self, state: State, step: Step) -> dict[str, Any]:
        from cloudexit.app import open_target
        from cloudexit.verify import verify

        v = self.pb.verification
        deep = v["deep"] if step.opt("deep") is None else step.opt("deep")
        sample = v["sample"] if step.opt("sample") is None else step.opt("sample")
        seed = v["seed"] if step.opt("seed") is None else step.opt("seed")
        out: dict[str, Any] = {}
        failed = []
        for dest in self.pb.targets:
            store = open_target(dest, v["calling_aet"], self._timeouts())
            try:
                pacs = dest.startswith(PACS_PREFIXES)
                report = verify(state, store, deep=deep and not pacs, sample=sample if pacs else 0, seed=seed)
            finally:
                store.close()
            out[dest] = {"run": report.run_id, "passed": report.passed, "findings": len(report.findings)}
            if not report.passed:
                failed.append(f"{dest} ({len(report.findings)} findings, verify run {report.run_id})")
        if failed:
            raise _Gate(f"verify found differences at {', '.join(failed)}: see `cloudexit verify --json` "
                        "or the audit; fix them and run again", out)
        out["_message"] = f"verified: {', '.join(self.pb.targets)}"
        return out

    def _step_audit(self, state: State, step: Step) -> dict[str, Any]:
        from cloudexit.report.audit import write_audit

        result = write_audit(state, self._path(step.opt("out")), lang=step.opt("lang"),
                             include_phi=step.opt("include_phi"), force=True)
        return {"out": str(result.out), "verdict": result.verdict.get("status"), "fingerprint": result.fingerprint,
                "_message": f"audit written to {result.out} ({result.verdict.get('status')})"}

    def _step_checkpoint(self, state: State, step: Step) -> dict[str, Any]:
        if step.name not in self.ack:
            raise _Gate(f"{step.opt('message')} -- when done, run again with --ack {step.name}")
        result: dict[str, Any] = {"acknowledged_at": now(), "by": _user()}
        if step.opt("window_days"):
            from datetime import datetime, timedelta, timezone

            ends = datetime.now(timezone.utc) + timedelta(days=step.opt("window_days"))
            result["window_ends"] = ends.isoformat(timespec="seconds")
            state.set_meta(exit_window_ends=result["window_ends"])
        result["_message"] = f"acknowledged by {result['by']}" + (
            f"; the window ends {result['window_ends']}" if "window_ends" in result else "")
        return result

    def _step_decommission(self, state: State, step: Step) -> dict[str, Any]:
        from cloudexit import decommission as dc

        o = step.options
        source = self._source()
        manifest = self._path(o["manifest"] or "decommission-manifest.csv")
        if self.confirm is None:
            p = dc.plan(state, source, self.pb.targets, o["all_versions"], manifest)
            for line in dc.summary_text(p):
                self.say(line)
            result = p.summary()
            if not p.to_delete:
                raise _Gate(f"nothing is safe to delete yet; manifest {manifest}", result)
            raise _Gate(f"dry run: {len(p.to_delete)} objects would be deleted, {result['kept']} kept; review "
                        f"{manifest}, then run again with --confirm {p.token}", result)
        done = dc.execute(state, source, self.confirm, self.pb.targets, o["all_versions"], manifest,
                          o["batch_size"])
        result = done.to_dict()
        if done.exit_code:
            raise _Gate(f"deleted {done.deleted} ({done.markers} delete markers), {len(done.failed)} failed, "
                        f"{result['plan']['kept']} object versions stay in the bucket: see {manifest}", result)
        result["_message"] = f"deleted {done.deleted} objects; the bucket holds nothing of this migration"
        return result


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"
