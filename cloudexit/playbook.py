"""Playbooks: the whole exit as a YAML file, run step by step, resumably (`cloudexit run`).

A playbook names the source bucket, the targets, prices and schedule, the verification policy
and the ordered steps (docs/playbooks.md). `load()` checks it against the schema and names the
unknown key, wrong type or missing field *and its line*; `${VAR}` / `${VAR:-default}` in any
string come from the environment, and `--set path=value` overrides a field (so a test, or a
rehearsal against a local S3 server, can point the same playbook elsewhere).

`Runner` executes the steps in order through the library (never the CLI) and records each
step's state in the `playbook_steps` table: run the playbook again and it continues at the
step in progress. Gates stop the run with a clear message (`GateNotMet`, exit 3): a pilot with
mismatches, a delta still larger than the cutover threshold, a verify with differences, a
checkpoint awaiting `--ack`, a decommission awaiting `--confirm TOKEN`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from cloudexit.state import patientkey
from cloudexit.core.errors import CloudexitError, GateNotMet, PlaybookError, StateError
from cloudexit.core.files import write_private
from cloudexit.plan.pricing.catalogue import _LOADER, _List, _Map, _scalar
from cloudexit.state.db import State, now

FORMAT = 1
STEP_KINDS = ("inventory", "plan", "pilot", "migrate", "delta", "verify", "audit", "checkpoint",
              "decommission")
PACS_PREFIXES = ("dicom://", "dicomweb+http://", "dicomweb+https://")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# -- schema -------------------------------------------------------------------------------------------
# field: (type, required, default). Types: str, int, bool, "strs" (a string or a list of strings),
# "str?" (a string or null), a tuple of allowed strings.
Spec = dict[str, tuple[Any, bool, Any]]
TOP: Spec = {
    "playbook": (int, True, None), "name": (str, True, None), "description": (str, False, ""),
    "db": (str, False, None), "source": (dict, True, None), "targets": ("strs", True, None),
    "pricing": (dict, False, None), "schedule": (dict, False, None),
    "verification": (dict, False, None), "steps": (list, True, None),
}
SOURCE: Spec = {
    "url": (str, True, None), "endpoint": ("str?", False, None), "provider": ("str?", False, None),
    "region": ("str?", False, None), "profile": ("str?", False, None),
    "key_pattern": ("str?", False, None), "retries": (int, False, 5),
}
PRICING: Spec = {
    "provider": ("str?", False, None), "region": ("str?", False, None),
    "price_file": ("str?", False, None), "bandwidth": ("str?", False, None),
    "concurrency": (int, False, 0), "offline_threshold": (str, False, "7d"),
}
SCHEDULE: Spec = {"bwlimit": ("str?", False, None), "note": (str, False, "")}
VERIFICATION: Spec = {
    "deep": (bool, False, False), "sample": (int, False, 0), "seed": (int, False, 0),
    "calling_aet": (str, False, "CLOUDEXIT"),
}
_MIGRATE_OPTS: Spec = {
    "layout": (("uid", "keys"), False, None), "non_dicom": (("copy", "skip"), False, None),
    "order": (("newest", "oldest", "key"), False, None), "processes": (int, False, None),
    "threads": (int, False, None), "bwlimit": ("str?", False, None),
    "keep_containers": (bool, False, None),
}
STEPS: dict[str, Spec] = {
    "inventory": {"workers": (int, False, None), "header_bytes": (int, False, None)},
    "plan": {"out": ("strs", False, []), "bandwidth": ("str?", False, None)},
    "pilot": {"studies": (int, False, 3), "seed": (int, False, 0), "to": ("str?", False, None),
              "allow_quarantined": (bool, False, False), **_MIGRATE_OPTS},
    "migrate": dict(_MIGRATE_OPTS),
    "delta": {"cutover_below": (int, False, None), **_MIGRATE_OPTS},
    "verify": {"deep": (bool, False, None), "sample": (int, False, None), "seed": (int, False, None)},
    "audit": {"out": (str, True, None), "lang": (("en", "zh"), False, "en"),
              "include_phi": (bool, False, False)},
    "checkpoint": {"message": (str, True, None), "window_days": (int, False, None)},
    "decommission": {"all_versions": (bool, False, False), "manifest": ("str?", False, None),
                     "batch_size": (int, False, 1000)},
}


@dataclass
class Step:
    name: str
    kind: str
    options: dict[str, Any]
    line: int

    def opt(self, name: str) -> Any:
        return self.options.get(name)


@dataclass
class Playbook:
    name: str
    path: Path
    sha256: str
    description: str
    db: Path | None
    source: dict[str, Any]
    targets: list[str]
    pricing: dict[str, Any]
    schedule: dict[str, Any]
    verification: dict[str, Any]
    steps: list[Step]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise PlaybookError(f"{self.path}: no step named {name!r}",
                            hint=f"the steps are: {', '.join(s.name for s in self.steps)}")

    @property
    def folders(self) -> list[str]:
        return [t for t in self.targets if not t.startswith(PACS_PREFIXES)]

    @property
    def pacs(self) -> list[str]:
        return [t for t in self.targets if t.startswith(PACS_PREFIXES)]


class _Doc(_Map):
    """A mapping that remembers its line and the line of each of its keys."""

    lines: dict[str, int]


def _walk(node: yaml.Node, where: str, env: dict[str, str]) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result = _Doc()
        result.line, result.lines = line, {}
        for key_node, value_node in node.value:
            key = str(_scalar(key_node))
            if key in result:
                raise PlaybookError(f"{where}, line {key_node.start_mark.line + 1}: key {key!r} given twice")
            result[key] = _walk(value_node, where, env)
            result.lines[key] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        items = _List(_walk(item, where, env) for item in node.value)
        items.line = line
        return items
    value = _scalar(node)
    if isinstance(value, str) and "${" in value:
        value = _interpolate(value, env, f"{where}, line {line}")
        if node.style not in ("'", '"'):
            value = _scalar(yaml.ScalarNode("tag:yaml.org,2002:str", value))
    return value


def _interpolate(text: str, env: dict[str, str], where: str) -> str:
    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if env.get(name):
            return env[name]
        if default is not None:
            return default
        raise PlaybookError(f"{where}: environment variable {name} is not set",
                            hint=f"set it, or write ${{{name}:-default}} in the playbook")
    return _VAR.sub(one, text)


def _lines(doc: Any) -> dict[str, int]:
    return getattr(doc, "lines", {})


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, line: int | str, message: str) -> PlaybookError:
        at = f"line {line}" if isinstance(line, int) else line
        return PlaybookError(f"{self.where}, {at}: {message}", hint="see docs/playbooks.md for the format")

    def fields(self, doc: Any, spec: Spec, path: str, line: int | str) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail(line, f"{path or 'the playbook'} must be a mapping of fields, not {_kind(doc)}")
        lines = _lines(doc)
        for key in doc:
            if key not in spec:
                raise self.fail(lines.get(key, line), f"unknown key {_join(path, key)!r}; "
                                f"known here: {', '.join(spec)}")
        out: dict[str, Any] = {}
        for key, (kind, required, default) in spec.items():
            full = _join(path, key)
            if key not in doc or (doc[key] is None and kind != "str?"):
                if required:
                    raise self.fail(getattr(doc, "line", line), f"missing field {full!r}")
                out[key] = list(default) if isinstance(default, list) else default
                continue
            out[key] = self.typed(doc[key], kind, full, lines.get(key, line))
        return out

    def typed(self, value: Any, kind: Any, path: str, line: int | str) -> Any:
        if kind is dict:
            if not isinstance(value, dict):
                raise self.fail(line, f"field {path!r} must be a mapping, not {_kind(value)}")
            return value
        if kind is list:
            if not isinstance(value, list):
                raise self.fail(line, f"field {path!r} must be a list, not {_kind(value)}")
            return value
        if kind is bool:
            if not isinstance(value, bool):
                raise self.fail(line, f"field {path!r} must be true or false, not {value!r}")
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.fail(line, f"field {path!r} must be a whole number >= 0, not {value!r}")
            return value
        if kind in (str, "str?"):
            if value is None and kind == "str?":
                return None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value:
                raise self.fail(line, f"field {path!r} must be a non-empty string, not {_kind(value)}")
            return value
        if kind == "strs":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
                raise self.fail(line, f"field {path!r} must be a string or a list of strings")
            return list(items)
        if isinstance(kind, tuple):
            if value not in kind:
                raise self.fail(line, f"field {path!r} must be one of {', '.join(kind)}, not {value!r}")
            return value
        raise AssertionError(kind)


def _kind(value: Any) -> str:
    return {dict: "a mapping", _Doc: "a mapping", list: "a list", _List: "a list", str: "a string",
            bool: "true/false", int: "a number", float: "a number", type(None): "nothing"}.get(
        type(value), type(value).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load(path: str | os.PathLike[str], overrides: Iterable[str] = (),
         env: dict[str, str] | None = None) -> Playbook:
    """Read and check a playbook; `overrides` are `dotted.path=value` (the CLI's --set)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlaybookError(f"cannot read playbook {file}: {exc.strerror}") from exc
    where = str(file)
    environ = dict(os.environ if env is None else env)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise PlaybookError(f"{where}: not valid YAML: {exc}") from None
    if node is None:
        raise PlaybookError(f"{where}: the file is empty")
    doc = _walk(node, where, environ)
    for item in overrides:
        _override(doc, item, where)
    return _check(doc, file, hashlib.sha256(text.encode()).hexdigest())


def _override(doc: Any, item: str, where: str) -> None:
    path, sep, raw = item.partition("=")
    if not sep or not path:
        raise PlaybookError(f"--set {item!r}: write it as path=value, e.g. source.endpoint=http://127.0.0.1:8333")
    value = _scalar(yaml.ScalarNode("tag:yaml.org,2002:str", raw))
    parts = path.split(".")
    target = doc
    for i, part in enumerate(parts[:-1]):
        if isinstance(target, list) and part.isdigit() and int(part) < len(target):
            if isinstance(target[int(part)], str):  # `- pilot` becomes `- pilot: {}` to take options
                step = _Doc()
                step.line, step.lines = getattr(target, "line", 0), {}
                step[target[int(part)]] = None
                target[int(part)] = step
            target = target[int(part)]
        elif isinstance(target, dict):
            if part not in target or target[part] is None:
                target[part] = _Doc()
                target[part].line, target[part].lines = 0, {}
            target = target[part]
        else:
            raise PlaybookError(f"--set {item!r}: {'.'.join(parts[:i + 1])!r} is not a mapping in {where}")
    last = parts[-1]
    if isinstance(target, list) and last.isdigit() and int(last) < len(target):
        target[int(last)] = value
    elif isinstance(target, dict):
        target[last] = value
        if hasattr(target, "lines"):
            target.lines[last] = f"--set {path}"  # type: ignore[assignment]
    else:
        raise PlaybookError(f"--set {item!r}: cannot set {path!r}")


def _check(doc: Any, file: Path, sha: str) -> Playbook:
    c = _Checker(str(file))
    top = c.fields(doc, TOP, "", 1)
    lines = _lines(doc)
    if top["playbook"] != FORMAT:
        raise c.fail(lines.get("playbook", 1), f"field 'playbook' must be {FORMAT} (the format version), "
                     f"not {top['playbook']!r}")
    source = c.fields(doc["source"], SOURCE, "source", lines.get("source", 1))
    if not source["url"].startswith("s3://") or len(source["url"]) <= 5:
        raise c.fail(_lines(doc["source"]).get("url", 1), f"field 'source.url' must be s3://BUCKET[/PREFIX], "
                     f"not {source['url']!r}")
    sections = {name: c.fields(doc.get(name) or _Doc(), spec, name, lines.get(name, 1))
                for name, spec in (("pricing", PRICING), ("schedule", SCHEDULE), ("verification", VERIFICATION))}
    base = file.parent
    targets = [t if t.startswith(PACS_PREFIXES) or t.startswith("file://") else os.path.abspath(base / os.path.expanduser(t))
               for t in top["targets"]]
    if not targets:
        raise c.fail(lines.get("targets", 1), "field 'targets' must name at least one destination")
    steps: list[Step] = []
    raw_steps = doc["steps"]
    for i, item in enumerate(raw_steps):
        line = _item_line(raw_steps, i, item)
        if isinstance(item, str):
            kind, options, opt_line = item, _Doc(), line
            options.line, options.lines = line, {}
        elif isinstance(item, dict) and len(item) == 1:
            kind = next(iter(item))
            options = item[kind] if item[kind] is not None else _Doc()
            opt_line = _lines(item).get(kind, line)
            if not isinstance(options, dict):
                raise c.fail(opt_line, f"step {kind!r}: its options must be a mapping, not {_kind(options)}")
        else:
            raise c.fail(line, f"steps[{i}] must be a step name or `kind: {{options}}`, not {_kind(item)}")
        if kind not in STEPS:
            raise c.fail(opt_line, f"unknown step {kind!r}; known steps: {', '.join(STEP_KINDS)}")
        name = options.get("name", kind)
        spec = {"name": (str, False, kind), **STEPS[kind]}
        opts = c.fields(options, spec, f"steps.{kind}", opt_line)
        if any(s.name == name for s in steps):
            raise c.fail(opt_line, f"two steps named {name!r}: give one a `name:`")
        steps.append(Step(str(name), kind, opts, opt_line if isinstance(opt_line, int) else 0))
    if not steps:
        raise c.fail(lines.get("steps", 1), "field 'steps' must list at least one step")
    db = Path(top["db"]) if top["db"] else None
    return Playbook(top["name"], file, sha, top["description"], (base / db) if db and not db.is_absolute() else db,
                    source, targets, sections["pricing"], sections["schedule"], sections["verification"], steps)


def _item_line(seq: Any, i: int, item: Any) -> int:
    return getattr(item, "line", 0) or getattr(seq, "line", 0) + i + 1


# -- running ------------------------------------------------------------------------------------------
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

    def _migrate_config(self, step: Step) -> Any:
        from cloudexit.core.config import MigrateConfig

        o = step.options
        values = {k: o.get(k) for k in ("layout", "non_dicom", "order", "processes", "threads",
                                        "keep_containers")}
        values["bwlimit"] = o.get("bwlimit") or self.pb.schedule["bwlimit"]
        return MigrateConfig(**{k: v for k, v in values.items() if v is not None})

    def _migrate(self, state: State, step: Step, folder: str) -> dict[str, Any]:
        """One migrate pass into the archive (resuming an unfinished run); the engine delivers
        every verified DICOM object to the playbook's PACS targets in the same pass."""
        from cloudexit.engine.migrate import Migration, last_run
        from cloudexit.stores.filesystem import FilesystemStore
        from cloudexit.verify import open_destination

        config = self._migrate_config(step)
        store = FilesystemStore(Path(folder), layout=config.layout)
        run = last_run(state)
        resume = bool(run and run["dest"] == store.id and run["status"] in ("running", "interrupted", "stopped"))
        calling = self.pb.verification["calling_aet"]
        deliver_to = [open_destination(dest, calling_aet=calling) for dest in self.pb.pacs]
        summary = Migration(state, self._source(), store, config, resume=resume, deliver_to=deliver_to).run()
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
        from cloudexit.core.config import InventoryConfig
        from cloudexit.inventory import Inventory

        o = step.options
        values = {"workers": o["workers"], "header_bytes": o["header_bytes"],
                  "key_pattern": self.pb.source["key_pattern"]}
        summary = Inventory(state, self._source(),
                            InventoryConfig(**{k: v for k, v in values.items() if v is not None})).run()
        result = dict(summary.__dict__)
        result["failed"] = len(summary.failed)
        result["_message"] = (f"inventory round {summary.round}: {summary.new} new, {summary.changed} changed, "
                              f"{summary.deleted} deleted, {summary.unchanged} unchanged"
                              + (f"; {len(summary.failed)} unreadable for now" if summary.failed else ""))
        return result

    def _step_plan(self, state: State, step: Step) -> dict[str, Any]:
        from datetime import datetime

        from cloudexit.plan import model as plan_model
        from cloudexit.plan.build import build_plan, link_from
        from cloudexit.engine.schedule import parse_schedule
        from cloudexit.core.units import parse_duration, parse_rate

        p = self.pb.pricing
        bandwidth = step.opt("bandwidth") or p["bandwidth"]
        if not bandwidth:
            raise PlaybookError(f"{self.pb.path}, line {step.line}: the plan step needs pricing.bandwidth "
                                "(e.g. 100Mbit/s)")
        schedule = parse_schedule(self.pb.schedule["bwlimit"]) if self.pb.schedule["bwlimit"] else None
        link = link_from(parse_rate(bandwidth), None, p["concurrency"] or None)
        price_file = str(self.pb.path.parent / p["price_file"]) if p["price_file"] else None
        result = build_plan(state, p["provider"] or self.pb.source["provider"], p["region"] or self.pb.source["region"],
                            price_file, link, schedule, datetime.now().astimezone(),
                            parse_duration(p["offline_threshold"]))
        written = []
        for out in step.opt("out"):
            target = self._path(out)
            render = {"md": plan_model.render_markdown, "html": plan_model.render_html,
                      "json": lambda x: json.dumps(x.to_dict(), indent=2, default=str)}.get(target.suffix[1:].lower())
            if render is None:
                raise PlaybookError(f"{self.pb.path}, line {step.line}: plan out {out!r}: end the name in .md, .html or .json")
            write_private(target, render(result))
            written.append(str(target))
        return {"written": written, "_message": "plan made" + (f": {', '.join(written)}" if written else "")}

    def _pilot_dir(self, step: Step) -> Path:
        return self._path(step.opt("to") or "pilot-archive")

    def _step_pilot(self, state: State, step: Step) -> dict[str, Any]:
        """The real engine and verify on a sample of studies, in a pilot state DB and folder of their own."""
        from cloudexit.engine.migrate import Migration
        from cloudexit.stores.filesystem import FilesystemStore
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
            store = FilesystemStore(folder, layout=self._migrate_config(step).layout)
            summary = Migration(pilot, self._source(), store, self._migrate_config(step)).run()
            report = verify(pilot, store)
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
        from cloudexit.core.config import InventoryConfig
        from cloudexit.inventory import Inventory

        summary = Inventory(state, self._source(), InventoryConfig(key_pattern=self.pb.source["key_pattern"])).run()
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
        from cloudexit.verify import open_destination, verify

        v = self.pb.verification
        deep = v["deep"] if step.opt("deep") is None else step.opt("deep")
        sample = v["sample"] if step.opt("sample") is None else step.opt("sample")
        seed = v["seed"] if step.opt("seed") is None else step.opt("seed")
        out: dict[str, Any] = {}
        failed = []
        for dest in self.pb.targets:
            store = open_destination(dest, calling_aet=v["calling_aet"])
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
