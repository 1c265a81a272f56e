"""Price catalogues: one data file per provider, every number with its source and date.

The shipped files live in ``cloudexit/plan/pricing/data/<provider>.json``; a hospital's contract
prices come in a price file of the same format (JSON, or YAML if preferred), described in
docs/pricing.md. Files are read with PyYAML's composer (JSON is YAML) so that every mapping
keeps its line number, and a missing field is reported with the field's path and the line of
the object it is missing from.

A price whose ``value`` is null is *unknown*: it counts as 0 in totals and the plan lists it,
so an incomplete total never passes for a complete one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from cloudexit.core.errors import UsageError

FORMAT = "cloudexit.prices/1"
# Tiers that every provider's storage classes map onto, from hot to cold.
CANONICAL_TIERS = (
    "standard",
    "infrequent",
    "archive_instant",
    "archive",
    "cold_archive",
    "deep_archive",
)
_HHMM = re.compile(r"^(\d{2}):(\d{2})$")
# libyaml's loader when present: 25x faster, and it keeps line marks too.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Fact:
    """A sourced number. ``value`` None means unknown (counted as 0, and reported)."""

    name: str  # where it sits in the file, e.g. "egress.tiers[0].price_per_gb"
    value: float | None
    source: str
    read_on: str
    verified: bool
    note: str = ""
    line: int = 0

    @property
    def known(self) -> bool:
        return self.value is not None

    def or_zero(self) -> float:
        return 0.0 if self.value is None else float(self.value)


@dataclass(frozen=True)
class Span:
    """A sourced range, e.g. restore hours or device days. None ends are unknown."""

    name: str
    min: float | None
    max: float | None
    source: str
    read_on: str
    verified: bool
    note: str = ""
    line: int = 0

    @property
    def known(self) -> bool:
        return self.min is not None and self.max is not None


@dataclass(frozen=True)
class Tier:
    """Egress price for the month's cumulative volume up to ``up_to_gb`` (None: no end)."""

    up_to_gb: float | None
    price: Fact


@dataclass(frozen=True)
class PriceBand:
    """A time-of-day egress price, e.g. Alibaba's idle hours 00:00-08:00 (provider's clock)."""

    start_minute: int
    end_minute: int  # exclusive; 1440 for midnight at the end
    price: Fact

    def covers(self, minute_of_day: int) -> bool:
        if self.start_minute <= self.end_minute:
            return self.start_minute <= minute_of_day < self.end_minute
        return minute_of_day >= self.start_minute or minute_of_day < self.end_minute


@dataclass(frozen=True)
class Egress:
    free_gb_per_month: Fact
    tiers: tuple[Tier, ...]
    time_of_day: tuple[PriceBand, ...] = ()


@dataclass(frozen=True)
class RestoreTier:
    name: str
    retrieval_per_gb: Fact
    requests_per_1000: Fact
    hours: Span


@dataclass(frozen=True)
class Restore:
    """How an archived class is brought back before it can be read."""

    default_tier: str
    tiers: dict[str, RestoreTier]
    restored_copy_days: Fact | None = None

    def default(self) -> RestoreTier:
        return self.tiers[self.default_tier]

    def fastest(self) -> RestoreTier:
        return min(self.tiers.values(), key=lambda t: _or_inf(t.hours.max))

    def cheapest(self) -> RestoreTier:
        # Unknown fees sort last; among equals the slowest tier is usually the cheap one.
        return min(
            self.tiers.values(),
            key=lambda t: (_or_inf(t.retrieval_per_gb.value), -(t.hours.max or 0.0)),
        )


@dataclass(frozen=True)
class StorageClass:
    name: str
    tier: str  # one of CANONICAL_TIERS
    aliases: tuple[str, ...] = ()
    retrieval_per_gb: Fact | None = None  # for classes read without a restore (IA, Glacier IR)
    min_billable_bytes: Fact | None = None
    restore: Restore | None = None

    @property
    def needs_restore(self) -> bool:
        return self.restore is not None


@dataclass(frozen=True)
class ExitProgram:
    name: str
    covers: str
    window_days: Fact
    conditions: str
    source: str
    read_on: str
    verified: bool


@dataclass(frozen=True)
class OfflineDevice:
    name: str
    note: str
    job_fee: Fact
    per_gb: Fact
    capacity_gb_per_job: Fact
    days: Span


@dataclass(frozen=True)
class ThroughputLimit:
    """Provider-side egress caps (Huawei OBS: per TB stored and per account)."""

    per_tb_stored_bytes_per_s: Fact
    account_bytes_per_s: Fact

    def cap(self, stored_bytes: float) -> float | None:
        caps = []
        if self.per_tb_stored_bytes_per_s.known:
            caps.append(self.per_tb_stored_bytes_per_s.or_zero() * max(stored_bytes, 1) / 1e12)
        if self.account_bytes_per_s.known:
            caps.append(self.account_bytes_per_s.or_zero())
        return min(caps) if caps else None


@dataclass
class Catalogue:
    """Everything the plan needs to price one provider in one region."""

    provider: str
    title: str
    currency: str
    region: str
    regions: tuple[str, ...]
    billing_timezone: str
    gb_bytes: Fact
    egress: Egress
    get_per_1000: Fact
    list_per_1000: Fact
    storage_classes: dict[str, StorageClass]
    exit_program: ExitProgram | None = None
    offline_device: OfflineDevice | None = None
    throughput_limit: ThroughputLimit | None = None
    restore_requests_per_second: Fact | None = None
    notes: tuple[str, ...] = ()
    source_file: str = ""
    facts: list[Fact | Span] = field(default_factory=list)

    def storage_class(self, name: str | None) -> StorageClass:
        """The class for a name as the bucket listing reports it (case-insensitive, aliases too)."""
        if not name:
            return next(c for c in self.storage_classes.values() if c.tier == "standard")
        wanted = name.lower()
        for cls in self.storage_classes.values():
            if wanted == cls.name.lower() or wanted in (a.lower() for a in cls.aliases):
                return cls
        known = ", ".join(_class_names(self))
        raise UsageError(
            f"storage class {name!r} is not in the {self.provider} price catalogue",
            hint=f"known classes: {known}; add it to a --price-file",
        )

    def unverified(self) -> list[Fact | Span]:
        """Facts shipped as not confirmed in a primary source."""
        return [f for f in self.facts if not f.verified]

    def unknown(self) -> list[Fact | Span]:
        return [f for f in self.facts if not f.known]

    def band_at(self, minute_of_day: int) -> PriceBand | None:
        for band in self.egress.time_of_day:
            if band.covers(minute_of_day):
                return band
        return None


def _class_names(catalogue: Catalogue) -> list[str]:
    names: dict[str, str] = {}
    for cls in catalogue.storage_classes.values():
        for name in (cls.name, *cls.aliases):
            names.setdefault(name.lower(), name)
    return list(names.values())


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


# --- loading -------------------------------------------------------------------------------


def known_providers() -> list[str]:
    """Providers with a shipped catalogue, e.g. ``["aliyun-oss", "aws-s3", ...]``."""
    data = resources.files("cloudexit.plan.pricing") / "data"
    return sorted(
        entry.name.rsplit(".", 1)[0]
        for entry in data.iterdir()
        if entry.name.endswith((".json", ".yaml"))
    )


def catalogue_text(provider: str) -> str:
    """The shipped file's text (a starting point for a hospital's price file)."""
    data = resources.files("cloudexit.plan.pricing") / "data"
    for suffix in (".json", ".yaml"):
        entry = data / f"{provider}{suffix}"
        if entry.is_file():
            return entry.read_text(encoding="utf-8")
    raise _unknown_provider(provider)


def load_catalogue(
    provider: str | None = None, region: str | None = None, price_file: str | Path | None = None
) -> Catalogue:
    """Load a provider's catalogue (or a price file) for one region.

    ``region`` None picks the catalogue's first region. A price file names its own provider;
    if ``provider`` is given too they must agree.
    """
    if price_file is not None:
        path = Path(price_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise UsageError(f"cannot read price file {str(path)!r}: {error.strerror}") from None
        catalogue = parse_catalogue(text, str(path))
        if provider is not None and provider != catalogue.provider:
            raise UsageError(
                f"price file {str(path)!r} is for {catalogue.provider!r}, not {provider!r}"
            )
    else:
        if provider is None:
            raise UsageError(f"no provider given; known providers: {', '.join(known_providers())}")
        if provider not in known_providers():
            raise _unknown_provider(provider)
        catalogue = parse_catalogue(catalogue_text(provider), f"{provider} catalogue")
    return _with_region(catalogue, region)


def _with_region(catalogue: Catalogue, region: str | None) -> Catalogue:
    if region is None:
        catalogue.region = catalogue.regions[0]
        return catalogue
    wanted = region.lower()
    for candidate in (wanted, wanted.removeprefix("oss-")):  # OSS endpoints say oss-cn-hangzhou
        if candidate in catalogue.regions:
            catalogue.region = candidate
            return catalogue
    raise UsageError(
        f"region {region!r} is not in the {catalogue.provider} price catalogue; "
        f"known regions: {', '.join(catalogue.regions)}",
        hint="or give your contract prices in a --price-file (docs/pricing.md)",
    )


def _unknown_provider(provider: str) -> UsageError:
    return UsageError(
        f"unknown provider {provider!r}; known providers: {', '.join(known_providers())}",
        hint="or give your contract prices in a --price-file (docs/pricing.md)",
    )


def parse_catalogue(text: str, name: str) -> Catalogue:
    """Parse and check a catalogue document; ``name`` is used in error messages."""
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as error:
        raise UsageError(f"{name}: not valid JSON or YAML: {error}") from None
    if node is None:
        raise UsageError(f"{name}: the file is empty")
    return _Reader(name).catalogue(_to_python(node))


# --- line-keeping documents ----------------------------------------------------------------


class _Map(dict):
    """A mapping that remembers the line it starts on (1-based)."""

    line = 0


class _List(list):
    line = 0


def _to_python(node: yaml.Node) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result = _Map()
        for key_node, value_node in node.value:
            result[str(_to_python(key_node))] = _to_python(value_node)
        result.line = line
        return result
    if isinstance(node, yaml.SequenceNode):
        items = _List(_to_python(item) for item in node.value)
        items.line = line
        return items
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    # Read scalars the JSON way: YAML 1.1 would leave "1e9" a string and "on" a bool.
    if node.style in ("'", '"'):
        return node.value
    text = node.value
    if text in ("null", "~", ""):
        return None
    if text in ("true", "True"):
        return True
    if text in ("false", "False"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class _Reader:
    """Turns a line-keeping document into a Catalogue, naming field and line on any fault."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.facts: list[Fact | Span] = []

    def fail(self, line: int, message: str) -> UsageError:
        return UsageError(
            f"{self.name}, line {line}: {message}", hint="see docs/pricing.md for the format"
        )

    def mapping(self, value: Any, path: str, line: int) -> _Map:
        if not isinstance(value, _Map):
            raise self.fail(line, f"field {path!r} must be an object")
        return value

    def get(self, parent: _Map, key: str, path: str) -> Any:
        if key not in parent:
            raise self.fail(parent.line, f"missing field {_join(path, key)!r}")
        return parent[key]

    def text(self, parent: _Map, key: str, path: str, optional: bool = False) -> str:
        if optional and parent.get(key) is None:
            return ""
        value = self.get(parent, key, path)
        if not isinstance(value, str) or not value:
            raise self.fail(parent.line, f"field {_join(path, key)!r} must be a non-empty string")
        return value

    def number(self, parent: _Map, key: str, path: str, nullable: bool) -> float | None:
        value = self.get(parent, key, path)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self.fail(
                parent.line, f"field {_join(path, key)!r} must be a number >= 0, not {value!r}"
            )
        return float(value)

    def provenance(self, node: _Map, path: str) -> tuple[str, str, bool, str]:
        verified = self.get(node, "verified", path)
        if not isinstance(verified, bool):
            raise self.fail(node.line, f"field {_join(path, 'verified')!r} must be true or false")
        read_on = self.get(node, "read_on", path)
        if not isinstance(read_on, str) or not re.match(r"^\d{4}(-\d{2}){0,2}$", read_on):
            raise self.fail(
                node.line, f"field {_join(path, 'read_on')!r} must be YYYY, YYYY-MM or YYYY-MM-DD"
            )
        source = self.text(node, "source", path)
        return source, read_on, verified, self.text(node, "note", path, optional=True)

    def fact(self, parent: _Map, key: str, path: str, optional: bool = False) -> Fact | None:
        if optional and parent.get(key) is None:
            return None
        full = _join(path, key)
        node = self.mapping(self.get(parent, key, path), full, parent.line)
        value = self.number(node, "value", full, nullable=True)
        source, read_on, verified, note = self.provenance(node, full)
        fact = Fact(full, value, source, read_on, verified, note, node.line)
        self.facts.append(fact)
        return fact

    def span(self, parent: _Map, key: str, path: str) -> Span:
        full = _join(path, key)
        node = self.mapping(self.get(parent, key, path), full, parent.line)
        low = self.number(node, "min", full, nullable=True)
        high = self.number(node, "max", full, nullable=True)
        if low is not None and high is not None and low > high:
            raise self.fail(node.line, f"field {full!r}: min is above max")
        source, read_on, verified, note = self.provenance(node, full)
        span = Span(full, low, high, source, read_on, verified, note, node.line)
        self.facts.append(span)
        return span

    def catalogue(self, doc: Any) -> Catalogue:
        root = self.mapping(doc, "(top level)", getattr(doc, "line", 1))
        file_format = self.text(root, "format", "")
        if file_format != FORMAT:
            raise self.fail(root.line, f"field 'format' must be {FORMAT!r}, not {file_format!r}")
        regions = self.get(root, "regions", "")
        if (
            not isinstance(regions, list)
            or not regions
            or not all(isinstance(r, str) for r in regions)
        ):
            raise self.fail(root.line, "field 'regions' must be a non-empty list of region names")
        requests = self.mapping(self.get(root, "requests", ""), "requests", root.line)
        gb_bytes = self.fact(root, "gb_bytes", "")
        if not gb_bytes.known or not gb_bytes.value:
            raise self.fail(gb_bytes.line, "field 'gb_bytes.value' must be a number above 0")
        return Catalogue(
            provider=self.text(root, "provider", ""),
            title=self.text(root, "title", "", optional=True) or self.text(root, "provider", ""),
            currency=self.text(root, "currency", ""),
            region=regions[0].lower(),
            regions=tuple(r.lower() for r in regions),
            billing_timezone=self.timezone(root),
            gb_bytes=gb_bytes,
            egress=self.egress(self.mapping(self.get(root, "egress", ""), "egress", root.line)),
            get_per_1000=self.fact(requests, "get_per_1000", "requests"),
            list_per_1000=self.fact(requests, "list_per_1000", "requests"),
            storage_classes=self.storage_classes(root),
            exit_program=self.exit_program(root),
            offline_device=self.offline_device(root),
            throughput_limit=self.throughput_limit(root),
            restore_requests_per_second=self.fact(
                root, "restore_requests_per_second", "", optional=True
            ),
            notes=tuple(str(n) for n in root.get("notes") or ()),
            source_file=self.name,
            facts=self.facts,
        )

    def timezone(self, root: _Map) -> str:
        name = self.text(root, "billing_timezone", "", optional=True) or "UTC"
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise self.fail(
                root.line, f"field 'billing_timezone': unknown timezone {name!r}"
            ) from None
        return name

    def egress(self, node: _Map) -> Egress:
        tiers_node = self.get(node, "tiers", "egress")
        if not isinstance(tiers_node, list) or not tiers_node:
            raise self.fail(node.line, "field 'egress.tiers' must be a non-empty list")
        tiers = []
        for index, item in enumerate(tiers_node):
            path = f"egress.tiers[{index}]"
            tier = self.mapping(item, path, tiers_node.line)
            tiers.append(
                Tier(
                    self.number(tier, "up_to_gb", path, nullable=True),
                    self.fact(tier, "price_per_gb", path),
                )
            )
        bounds = [t.up_to_gb for t in tiers]
        if bounds[-1] is not None or None in bounds[:-1] or bounds[:-1] != sorted(bounds[:-1]):
            raise self.fail(
                tiers_node.line, "egress tiers must rise, and only the last may have up_to_gb null"
            )
        bands = []
        for index, item in enumerate(node.get("time_of_day") or []):
            path = f"egress.time_of_day[{index}]"
            band = self.mapping(item, path, node.line)
            bands.append(
                PriceBand(
                    self.clock(band, "from", path),
                    self.clock(band, "to", path) or 1440,
                    self.fact(band, "price_per_gb", path),
                )
            )
        return Egress(self.fact(node, "free_gb_per_month", "egress"), tuple(tiers), tuple(bands))

    def clock(self, node: _Map, key: str, path: str) -> int:
        value = str(self.get(node, key, path))
        match = _HHMM.match(value)
        if not match or int(match[1]) > 24 or int(match[2]) > 59:
            raise self.fail(node.line, f"field {_join(path, key)!r} must be HH:MM, not {value!r}")
        return int(match[1]) * 60 + int(match[2])

    def storage_classes(self, root: _Map) -> dict[str, StorageClass]:
        node = self.mapping(self.get(root, "storage_classes", ""), "storage_classes", root.line)
        classes = {}
        for name, item in node.items():
            path = f"storage_classes.{name}"
            cls = self.mapping(item, path, node.line)
            tier = self.text(cls, "tier", path)
            if tier not in CANONICAL_TIERS:
                raise self.fail(
                    cls.line, f"field {path}.tier must be one of {', '.join(CANONICAL_TIERS)}"
                )
            restore = cls.get("restore")
            classes[name] = StorageClass(
                name=name,
                tier=tier,
                aliases=tuple(str(a) for a in cls.get("aliases") or ()),
                retrieval_per_gb=self.fact(cls, "retrieval_per_gb", path, optional=True),
                min_billable_bytes=self.fact(cls, "min_billable_bytes", path, optional=True),
                restore=None
                if restore is None
                else self.restore(
                    self.mapping(restore, f"{path}.restore", cls.line), f"{path}.restore"
                ),
            )
        if not any(c.tier == "standard" for c in classes.values()):
            raise self.fail(node.line, "storage_classes needs one class with tier 'standard'")
        return classes

    def restore(self, node: _Map, path: str) -> Restore:
        tiers_node = self.mapping(self.get(node, "tiers", path), f"{path}.tiers", node.line)
        tiers = {}
        for name, item in tiers_node.items():
            tier_path = f"{path}.tiers.{name}"
            tier = self.mapping(item, tier_path, tiers_node.line)
            tiers[name] = RestoreTier(
                name,
                self.fact(tier, "retrieval_per_gb", tier_path),
                self.fact(tier, "requests_per_1000", tier_path),
                self.span(tier, "hours", tier_path),
            )
        default = self.text(node, "default_tier", path)
        if default not in tiers:
            raise self.fail(node.line, f"field {path}.default_tier names no tier in {path}.tiers")
        return Restore(default, tiers, self.fact(node, "restored_copy_days", path, optional=True))

    def exit_program(self, root: _Map) -> ExitProgram | None:
        if root.get("exit_program") is None:
            return None
        node = self.mapping(root["exit_program"], "exit_program", root.line)
        source, read_on, verified, _ = self.provenance(node, "exit_program")
        return ExitProgram(
            name=self.text(node, "name", "exit_program"),
            covers=self.text(node, "covers", "exit_program"),
            window_days=self.fact(node, "window_days", "exit_program"),
            conditions=self.text(node, "conditions", "exit_program"),
            source=source,
            read_on=read_on,
            verified=verified,
        )

    def throughput_limit(self, root: _Map) -> ThroughputLimit | None:
        if root.get("throughput_limit") is None:
            return None
        path = "throughput_limit"
        node = self.mapping(root[path], path, root.line)
        return ThroughputLimit(
            self.fact(node, "per_tb_stored_bytes_per_s", path),
            self.fact(node, "account_bytes_per_s", path),
        )

    def offline_device(self, root: _Map) -> OfflineDevice | None:
        if root.get("offline_device") is None:
            return None
        path = "offline_device"
        node = self.mapping(root[path], path, root.line)
        return OfflineDevice(
            name=self.text(node, "name", path),
            note=self.text(node, "note", path, optional=True),
            job_fee=self.fact(node, "job_fee", path),
            per_gb=self.fact(node, "per_gb", path),
            capacity_gb_per_job=self.fact(node, "capacity_gb_per_job", path),
            days=self.span(node, "days", path),
        )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
