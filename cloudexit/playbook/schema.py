"""Playbooks: the YAML file read and checked against the schema (see cloudexit.playbook)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from cloudexit.core.errors import CloudexitError, PlaybookError, UsageError
from cloudexit.plan.pricing.catalogue import _LOADER, _List, _Map, _scalar
from cloudexit.s3.source import check_endpoint

FORMAT = 1
STEP_KINDS = ("inventory", "plan", "pilot", "migrate", "delta", "verify", "audit", "checkpoint",
              "decommission")
PACS_PREFIXES = ("dicom://", "dicomweb+http://", "dicomweb+https://")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# The library's messages name the command line's options (they are written for it); inside a
# playbook the same setting is one of its keys, and the message names that instead.
OPTION_KEYS = {"--endpoint-url": "source.endpoint", "--profile": "source.profile",
               "--region": "source.region", "--price-file": "pricing.price_file"}
_OPTION = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, OPTION_KEYS)) + r")(?![\w-])")

# -- schema -------------------------------------------------------------------------------------------
# field: (type, required, default). Types: str, int, bool, "strs" (a string or a list of strings),
# "str?" (a string or null), a tuple of allowed strings.
Spec = dict[str, tuple[Any, bool, Any]]
TOP: Spec = {
    "playbook": (int, True, None), "name": (str, True, None), "description": (str, False, ""),
    "db": (str, False, None), "source": (dict, True, None), "targets": ("strs", True, None),
    "pricing": (dict, False, None), "schedule": (dict, False, None),
    "verification": (dict, False, None), "pacs": (dict, False, None), "steps": (list, True, None),
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
# Seconds to wait for a PACS (core.config.PacsConfig; the CLI's --dimse-timeout and friends).
PACS: Spec = {name: ("num", False, None) for name in (
    "connect_timeout", "acse_timeout", "dimse_timeout", "network_timeout", "http_timeout")}
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
    timeouts: dict[str, Any] = field(default_factory=dict)  # the `pacs:` section: PACS timeouts given

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


def in_playbook_words(text: str) -> str:
    """`text` with the CLI options it names replaced by the playbook's keys."""
    return _OPTION.sub(lambda m: OPTION_KEYS[m.group(1)], text)


def name_keys(exc: CloudexitError, playbook: str) -> CloudexitError:
    """A library error met by a step, in the playbook's words (changed in place: its class, and
    so its exit code, stay); the hint then names the file that holds those keys."""
    message, hint = in_playbook_words(exc.message), in_playbook_words(exc.hint or "")
    if (message, hint) != (exc.message, exc.hint or ""):
        exc.args = (message,)
        exc.hint = f"{hint} (in {playbook})" if hint else f"set it in {playbook}"
    return exc


def _lines(doc: Any) -> dict[str, int]:
    return getattr(doc, "lines", {})


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, line: int | str, message: str, hint: str = "see docs/playbooks.md for the format") -> PlaybookError:
        at = f"line {line}" if isinstance(line, int) else line
        return PlaybookError(f"{self.where}, {at}: {message}", hint=hint)

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
        if kind == "num":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise self.fail(line, f"field {path!r} must be a number of seconds > 0, not {value!r}")
            return float(value)
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
    except UnicodeDecodeError as exc:
        raise PlaybookError(f"{file}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start]:#04x})",
                            hint="save the playbook as UTF-8 (a YAML file is text)") from None
    where = str(file)
    environ = dict(os.environ if env is None else env)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise _yaml_error(where, exc) from None
    if node is None:
        raise PlaybookError(f"{where}: the file is empty")
    doc = _walk(node, where, environ)
    for item in overrides:
        _override(doc, item, where)
    return _check(doc, file, hashlib.sha256(text.encode()).hexdigest())


# What usually causes each of the YAML parser's complaints (libyaml's words, and PyYAML's where
# they differ), as a hint: the first that matches.
_UNCLOSED = "close the bracket or quote the message says was opened there (items of [...] and {...} go between commas)"
_INDENT = ("check the indentation: the keys of one mapping start in the same column, the items of a "
           "list each with '- ' in the same column")
_QUOTE = "a value that starts with @, `, %, !, & or * needs quotes"
_YAML_HINTS = (
    ("tab", "indent with spaces, not tabs"),
    ("mapping values are not allowed", "a value that holds ': ' needs quotes (note: \"step 1: pilot\"), "
                                       "or a key is indented deeper than the keys beside it"),
    ("expected key", _INDENT), ("<block end>", _INDENT),
    ("expected ':'", "write each field as `key: value`, with a space after the colon"),
    ("end of stream", _UNCLOSED), ("<stream end>", _UNCLOSED), ("node content", _UNCLOSED),
    ("expected ','", _UNCLOSED),
    ("cannot start any token", _QUOTE), ("undefined alias", _QUOTE),
)


def _yaml_error(where: str, exc: yaml.YAMLError) -> PlaybookError:
    """PyYAML's several-line complaint as one line: file, line, column, what is wrong."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and (mark is None or (start.line, start.column) != (mark.line, mark.column)):
        problem += f" ({context} at line {start.line + 1}, column {start.column + 1})"
    hint = next((h for text, h in _YAML_HINTS if text in problem),
                "check that line and the one before it")
    return PlaybookError(f"{where}{at}: not valid YAML: {' '.join(problem.split())}",
                         hint=f"{hint}; see docs/playbooks.md for the format")


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
    try:  # said at once, with its line, not when the first step opens the bucket
        check_endpoint(source["endpoint"])
    except UsageError as exc:
        raise c.fail(_lines(doc["source"]).get("endpoint", 1), in_playbook_words(exc.message),
                     in_playbook_words(exc.hint or "")) from None
    sections = {name: c.fields(doc.get(name) or _Doc(), spec, name, lines.get(name, 1))
                for name, spec in (("pricing", PRICING), ("schedule", SCHEDULE), ("verification", VERIFICATION),
                                               ("pacs", PACS))}
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
                    source, targets, sections["pricing"], sections["schedule"], sections["verification"], steps,
                    sections["pacs"])


def _item_line(seq: Any, i: int, item: Any) -> int:
    return getattr(item, "line", 0) or getattr(seq, "line", 0) + i + 1
