"""The deletion rule: may an object (one version of it) leave the cloud? One table of conditions,
from which both forms are generated, so they cannot drift:

* SQL, for the audit (`decision_sql`: every object's decision as a column, in the manifest and
  the report's counts);
* Python, for `cloudexit decommission` (`decide`: per listed version, over rows it loads with
  `copy_columns`).

An object may go when, at every destination that applies to it (a PACS takes DICOM only), its
copy is good for this very ETag and the latest `cloudexit verify` of that destination ran after
the copy landed and found nothing wrong with it. Otherwise the first condition below that holds
says why it stays. Each copy (one transfer row) is matched against the COPY conditions in order;
over several destinations the object takes the first condition in table order any of its copies
met (so a failed copy outranks a copy waiting for a verify). `docs/architecture.md` says how to
add a condition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudexit.core.states import (
    CANONICAL,
    HELD,
    REVIEW,
    ObjectKind,
    ObjectStatus,
    StudyStatus,
    is_pacs,
    sql_in,
)
from cloudexit.core.states import (
    TransferState as T,
)


@dataclass(frozen=True)
class Copy:
    """What a condition looks at. `o`: the object's row (status, kind; None: not inventoried);
    `t`: its transfer row at one destination with the FACTS as columns (None: no row there);
    `run`: that destination's latest finished verify run (id, started_at) or None; `etag`: the
    version judged (the audit: the object's current ETag; decommission: the listed version's)."""

    o: Mapping[str, Any] | None
    t: Mapping[str, Any] | None = None
    run: Mapping[str, Any] | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Condition:
    """One reason to keep an object. `sql` is a predicate over `{o}` (its objects row) and `{t}`
    (its transfer row at one destination), where `{v}` is the judged ETag, `{vr}`/`{vs}` the verify run's id and start,
    and `{landed}`, `{canonical}`, `{found}`, `{study}` the FACTS; `py` says the same of a
    `Copy`. Conditions are tried in order; a condition may rely on the ones before it not
    holding (`stale` comes before the per-state ones, so they need not test the ETag)."""

    name: str  # the reason key: audit.json's decommission reason, REASONS below
    verdict: str  # keep | review | gone
    sql: str
    py: Callable[[Copy], bool]
    pacs_only: bool = False  # checked at PACS destinations only

    @property
    def label(self) -> str:
        return f"{self.verdict}: {self.name}"


def _t(c: Copy) -> Mapping[str, Any]:
    assert c.t is not None  # not_migrated, first among the copy conditions, matched None
    return c.t


def _state(*states: T) -> Callable[[Copy], bool]:
    return lambda c: _t(c)["state"] in states


# Facts about a copy the conditions read, as SQL over `{o}` and `{t}` ({vr}: the verify run's id).
# Decommission selects them as columns (copy_columns); the audit's SQL inlines them, where
# SQLite evaluates each only when its WHEN is reached. The finding sets are uncorrelated
# subqueries: SQLite builds each once per statement, then looks objects up in it.
_FINDING = "SELECT f.{} FROM verify_findings f WHERE f.run_id = {{vr}}"
FACTS = {
    "landed": "coalesce({t}.verified_at, {t}.updated_at, '')",
    "canonical": "coalesce((SELECT c.state FROM transfers c WHERE c.key = {t}.conflict_with "
                 "AND c.dest = {t}.dest), '')",
    "found": (f"({{o}}.key IN ({_FINDING.format('key')}) OR {{t}}.path IN ({_FINDING.format('path')}) "
              f"OR {{o}}.sop_uid IN ({_FINDING.format('sop_uid')}) "
              f"OR {{o}}.study_uid IN ({_FINDING.format('study_uid')} "
              "AND f.level IN ('study', 'series')))"),
    "study": "coalesce((SELECT s.status FROM verify_studies s WHERE s.run_id = {vr} "
             "AND s.study_uid = {o}.study_uid), '')",
}

# About the object, before any copy is looked at.
OBJECT_CONDITIONS: tuple[Condition, ...] = (
    Condition("not_inventoried", "keep", "{o}.key IS NULL", lambda c: c.o is None),
    Condition("deleted", "gone", f"{{o}}.status = '{ObjectStatus.DELETED}'",
              lambda c: c.o is not None and c.o["status"] == ObjectStatus.DELETED),
)
# About one copy, in order. The first (no row at a destination that applies) is checked over
# all destinations by counting rows in the several-destination SQL.
COPY_CONDITIONS: tuple[Condition, ...] = (
    Condition("not_migrated", "keep", "{t}.key IS NULL", lambda c: c.t is None),
    Condition("stale", "keep", f"{{t}}.state IN {sql_in(HELD)} AND {{t}}.etag IS NOT {{v}}",
              lambda c: _t(c)["state"] in HELD and _t(c)["etag"] != c.etag),
    Condition("failed", "keep", f"{{t}}.state = '{T.FAILED}'", _state(T.FAILED)),
    Condition("missing", "keep", f"{{t}}.state = '{T.MISSING}'", _state(T.MISSING)),
    Condition("skipped", "keep", f"{{t}}.state = '{T.SKIPPED}'", _state(T.SKIPPED)),
    Condition("unfinished", "keep", f"{{t}}.state NOT IN {sql_in(HELD | {T.FAILED, T.MISSING, T.SKIPPED})}",
              lambda c: _t(c)["state"] not in HELD | {T.FAILED, T.MISSING, T.SKIPPED}),
    Condition("quarantined", "review", f"{{t}}.state IN {sql_in(REVIEW)}", _state(*REVIEW)),
    # From here the copy is GOOD for this ETag: is it vouched for by the latest verify?
    Condition("duplicate_unverified", "keep",
              f"{{t}}.state = '{T.DUPLICATE}' AND {{canonical}} NOT IN {sql_in(CANONICAL)}",
              lambda c: _t(c)["state"] == T.DUPLICATE and _t(c)["canonical"] not in CANONICAL),
    Condition("no_verify", "keep", "{vr} IS NULL", lambda c: c.run is None),
    Condition("landed_after_verify", "keep", "{landed} > {vs}",
              lambda c: c.run is not None and c.run["started_at"] is not None
              and _t(c)["landed"] > c.run["started_at"]),
    Condition("verify_problem", "keep", "{found}", lambda c: bool(_t(c)["found"])),
    Condition("study_not_ok", "keep", f"{{study}} != '{StudyStatus.OK}'",
              lambda c: _t(c)["study"] != StudyStatus.OK, pacs_only=True),
)
SAFE = Condition("verified", "safe", "1", lambda c: True)
# Keep reasons under which a good copy is home all the same (it waits for a verify): the audit
# counts them done in its charts and delta rounds.
RECHECK_REASONS = tuple(c.name for c in COPY_CONDITIONS[[c.name for c in COPY_CONDITIONS].index("quarantined") + 1:])


def is_home(label: str) -> bool:
    """A decision ("verdict: reason") under which a copy of the object is at every destination."""
    verdict, _, reason = label.partition(": ")
    return verdict in ("safe", "review") or reason in RECHECK_REASONS


CONDITIONS = (*OBJECT_CONDITIONS, *COPY_CONDITIONS, SAFE)

# The decommission manifest's words for each reason ({dest}, {held}: the copy's ETag, {etag}:
# the version's, {state}, {detail}: " (transfer reason)", {other}: the note that the row is about
# another version, {run}: "(verify run N)").
REASONS = {
    "not_inventoried": "not inventoried: new since the last inventory (run inventory, migrate, verify)",
    "deleted": "deleted at the source: the last inventory found it gone, it is listed again now "
               "(run inventory, migrate, verify)",
    "not_migrated": "not migrated: not delivered to {dest}",
    "no_archive": "no archive: not DICOM, and no folder destination holds it",
    "stale": "other version: {dest} holds ETag {held}, this version ({etag}) was never migrated",
    "failed": "{state}: at {dest}{detail}{other}",
    "missing": "{state}: at {dest}{detail}{other}",
    "skipped": "{state}: at {dest}{detail}{other}",
    "unfinished": "{state}: at {dest}{detail}{other}",
    "quarantined": "{state}: at {dest}{detail}{other}",
    "duplicate_unverified": "duplicate: the copy it duplicates is not verified at {dest}",
    "no_verify": "not re-verified: no `cloudexit verify` of {dest} yet",
    "landed_after_verify": "not re-verified: landed at {dest} after its last verify {run}",
    "verify_problem": "verify found a problem: with the object, its file, SOP Instance UID or study "
                      "at {dest} {run}",
    "study_not_ok": "not re-verified: study not counted ok at {dest} {run}",
    "verified": "verified at every destination",
}


# -- the Python form -----------------------------------------------------------------------------
@dataclass
class Decision:
    condition: Condition
    dest: str | None = None  # the destination whose copy met it
    held: list[str] = field(default_factory=list)  # destinations whose copy is safe, in order
    sha256: str | None = None  # of the first safe copy

    @property
    def safe(self) -> bool:
        return self.condition.verdict == SAFE.verdict

    @property
    def label(self) -> str:
        return self.condition.label

    def reason(self, etag: str | None, t: Mapping[str, Any] | None = None,
               run: Mapping[str, Any] | None = None) -> str:
        """The manifest's words (`t`, `run`: the copy and verify run at `self.dest`)."""
        name = self.condition.name
        if name == "not_migrated" and self.dest is None:
            name = "no_archive"
        return REASONS[name].format(
            dest=self.dest, etag=etag, held=(t or {}).get("etag"), state=(t or {}).get("state"),
            detail=f" ({t['reason']})" if t and t.get("reason") else "",
            other=f"; that is ETag {t['etag']}, this version ({etag}) was never migrated"
            if t and t.get("etag") != etag else "",
            run=f"(verify run {run['id']})" if run else "")


def applies(dest: str, o: Mapping[str, Any]) -> bool:
    """A PACS keeps DICOM only; the archive folders must hold the rest."""
    return not is_pacs(dest) or o["kind"] == ObjectKind.DICOM


def classify(copy: Copy, pacs: bool) -> Condition:
    """The first copy condition `copy` meets, or SAFE."""
    for cond in COPY_CONDITIONS:
        if (pacs or not cond.pacs_only) and cond.py(copy):
            return cond
    return SAFE


def decide(o: Mapping[str, Any] | None, copies: Mapping[str, Mapping[str, Any] | None], dests: Sequence[str],
           runs: Mapping[str, Mapping[str, Any]], etag: str | None) -> Decision:
    """The rule for one version: `copies` maps each destination to its transfer row (with the
    FACTS as columns, see copy_columns) or None; `runs`: last_verify_runs."""
    for cond in OBJECT_CONDITIONS:
        if cond.py(Copy(o, etag=etag)):
            return Decision(cond)
    assert o is not None
    rank = {c.name: i for i, c in enumerate(CONDITIONS)}
    worst: Decision | None = None
    held: list[str] = []
    sha = None
    for d in (d for d in dests if applies(d, o)):
        t = copies.get(d)
        cond = classify(Copy(o, t, runs.get(d), etag), is_pacs(d))
        if cond is SAFE:
            held.append(d)
            sha = sha or (t or {}).get("sha256")
        elif worst is None or rank[cond.name] < rank[worst.condition.name]:
            worst = Decision(cond, d)
    if worst is None and not held:
        worst = Decision(COPY_CONDITIONS[0])  # not_migrated, at no destination: no archive
    out = worst or Decision(SAFE)
    out.held, out.sha256 = held, sha
    return out


# -- the SQL form --------------------------------------------------------------------------------
def _fill(cond: Condition, o: str, t: str, i: int | None) -> str:
    """`cond.sql` for the object alias `o`, the transfer alias `t` and the verify run parameters
    of destination `i` (None: no run)."""
    run = {"vr": f":vr{i}", "vs": f":vs{i}"} if i is not None else {"vr": "NULL", "vs": "NULL"}
    facts = {k: v.format(o=o, t=t, **run) for k, v in FACTS.items()}
    return cond.sql.format(o=o, t=t, v=f"{o}.etag", **run, **facts)


def _copy_case(o: str, t: str, i: int | None, pacs: bool, ranked: bool) -> str:
    """CASE over one copy: its condition's label (`ranked`: prefixed by its rank, two digits, so
    that min() over several copies picks the first in table order)."""
    whens = []
    for n, cond in enumerate((*COPY_CONDITIONS, SAFE)):
        label = f"{n:02d}{cond.label}" if ranked else cond.label
        if cond is SAFE:
            whens.append(f"ELSE '{label}'")
        elif pacs or not cond.pacs_only:
            whens.append(f"WHEN {_fill(cond, o, t, i)} THEN '{label}'")
    return "CASE " + " ".join(whens) + " END"


def _by_dest(dests: Sequence[str], o: str, t: str, ranked: bool) -> str:
    if len(dests) == 1:  # `t` is that destination's row or NULL (no row): no switch needed
        return _copy_case(o, t, 0, is_pacs(dests[0]), ranked)
    cases = " ".join(f"WHEN :vd{i} THEN {_copy_case(o, t, i, is_pacs(d), ranked)}" for i, d in enumerate(dests))
    return f"CASE {t}.dest {cases} ELSE {_copy_case(o, t, None, False, ranked)} END"


def params(dests: Sequence[str], runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The parameters of decision_sql and copy_columns."""
    out: dict[str, Any] = {"n": len(dests), "na": max(1, sum(not is_pacs(d) for d in dests))}
    for i, dest in enumerate(dests):
        run = runs.get(dest) or {}
        out.update({f"vd{i}": dest, f"vr{i}": run.get("id"), f"vs{i}": run.get("started_at")})
    return out


def expected_sql(o: str = "o") -> str:
    """How many destinations apply to object `o` (:n all, :na the archive folders, at least 1)."""
    return f"(CASE WHEN {o}.kind = '{ObjectKind.DICOM}' THEN :n ELSE :na END)"


def _objects(o: str) -> str:
    return " ".join(f"WHEN {_fill(c, o, 'NULL', None)} THEN '{c.label}'" for c in OBJECT_CONDITIONS)


def subquery_sql(dests: Sequence[str], o: str = "o", x: str = "x") -> str:
    """The decision of object `o` as one scalar subquery over its transfer rows `x`: the first
    condition any copy met (its label ranked by a two-digit prefix, for min()). Any number of
    destinations; usable inside another query (a condition about other objects, such as the
    members of a container, can ask for theirs)."""
    missing = COPY_CONDITIONS[0]
    return (f"(SELECT CASE {_objects(o)} WHEN count(*) < {expected_sql(o)} THEN '{missing.label}' "
            f"ELSE substr(min({_by_dest(dests, o, x, True)}), 3) END FROM transfers {x} WHERE {x}.key = {o}.key)")


def decision_sql(dests: Sequence[str]) -> tuple[str, str]:
    """(expression, FROM clause): each object's decision ("verdict: reason") as SQL.

    One destination: over `objects o LEFT JOIN transfers t`, one CASE per row, no subquery (the
    manifest and the facts of the usual migration stay fast). Several: over `objects o`, a
    subquery over its transfers `x`, the first condition any copy met."""
    if len(dests) == 1:
        return (f"(CASE {_objects('o')} ELSE {_by_dest(dests, 'o', 't', False)} END)",
                "objects o LEFT JOIN transfers t ON t.key = o.key")
    return subquery_sql(dests), "objects o"


def copy_columns(dests: Sequence[str], t: str = "t") -> str:
    """The FACTS of a transfer row `t` joined with its object `o`, as columns (for `decide`)."""
    cols = []
    for name, sql in FACTS.items():
        cases = " ".join(f"WHEN :vd{i} THEN {sql.format(o='o', t=t, vr=f':vr{i}')}" for i in range(len(dests)))
        cols.append(f"CASE {t}.dest {cases} END AS {name}")
    return ", ".join(cols)
