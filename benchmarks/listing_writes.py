"""The listing's writer alone: rows of 1000-key pages built and committed into a new state DB,
no S3 and no HTTP (CPU seconds of this process; docs/performance.md, target 5).

    python benchmarks/listing_writes.py --keys 50000 before defer batch after insert
    python benchmarks/listing_writes.py --keys 500000 before after

Keys of the uid layout (`common.instances`), `--key-pattern '{study}/{series}/{sop}.dcm'`.
Variants: `before` (rows as the writer built them before, one page per transaction, the study
and SOP indexes kept up to date), `defer` (those indexes built at the end), `batch` (4 pages per
transaction), `after` (both: what the inventory does), `insert` (`after` with a plain INSERT
instead of the upsert), `checkpoint` (`after` with `wal_autocheckpoint` 10000).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import KEY_PATTERN, instances

from cloudexit.core.paths import key_flags
from cloudexit.inventory import compile_key_pattern
from cloudexit.s3.source import ListedObject
from cloudexit.state import listed
from cloudexit.state.db import State

PATTERN = compile_key_pattern(KEY_PATTERN["uid"] or "")
STAMP = "2026-12-03T17:00:00+00:00"


def rows_before(objects: list[ListedObject]) -> list[tuple[Any, ...]]:
    """The rows as `Inventory._commit_page` built them before `state/listed.py`."""
    rows = []
    for o in objects:
        match = PATTERN.search(o.key)
        groups = match.groupdict() if match else None
        flags = key_flags(o.key)
        uids = (groups.get("study"), groups.get("series"), groups["sop"]) if groups else None
        rows.append((o.key, o.size, o.etag, o.last_modified, o.storage_class, 1,
                     "dicom" if uids else "pending", ",".join(flags) if flags else None, 1, 1,
                     STAMP, *(uids or (None, None, None)), "key-pattern" if uids else None))
    return rows


def rows_after(objects: list[ListedObject]) -> list[tuple[Any, ...]]:
    return listed.page_rows(objects, 1, STAMP, PATTERN)[0]


INSERT = listed.UPSERT[:listed.UPSERT.index("ON CONFLICT")]
VARIANTS = {  # pages per transaction, indexes at the end, rows, SQL, wal_autocheckpoint
    "before": (1, False, rows_before, listed.UPSERT, None),
    "defer": (1, True, rows_after, listed.UPSERT, None),
    "batch": (4, False, rows_after, listed.UPSERT, None),
    "after": (4, True, rows_after, listed.UPSERT, None),
    "insert": (4, True, rows_after, INSERT, None),
    "checkpoint": (4, True, rows_after, listed.UPSERT, 10000),
}


def run(name: str, pages: list[list[ListedObject]]) -> None:
    batch, defer, build_rows, sql, checkpoint = VARIANTS[name]
    work = Path(tempfile.mkdtemp(prefix="cloudexit-listing-writes-", dir="/var/tmp"))
    try:
        with State(work / "s.db", create=True) as state:
            if checkpoint:
                state.conn.execute(f"PRAGMA wal_autocheckpoint={checkpoint}")
            if defer:
                with state.transaction() as tx:
                    listed.defer_indexes(tx)
            t_rows = t_sql = t_index = 0.0
            started = time.monotonic()
            for i in range(0, len(pages), batch):
                c0 = time.process_time()
                rowsets = [build_rows(page) for page in pages[i:i + batch]]
                c1 = time.process_time()
                with state.transaction() as tx:
                    for rows in rowsets:
                        tx.executemany(sql, rows)
                t_rows, t_sql = t_rows + c1 - c0, t_sql + time.process_time() - c1
            if defer:
                c0 = time.process_time()
                with state.transaction() as tx:
                    listed.build_indexes(tx)
                t_index = time.process_time() - c0
            wall = time.monotonic() - started
        n = len(pages)
        print(f"{name:<10} rows {t_rows:6.2f} s ({1000 * t_rows / n:4.1f} ms/page)  "
              f"SQL {t_sql:6.2f} s ({1000 * t_sql / n:4.1f} ms/page)  index build {t_index:5.2f} s  "
              f"CPU {t_rows + t_sql + t_index:6.2f} s  wall {wall:6.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    args = ap.parse_args()
    objects = [ListedObject(i.key, 762, "0af5b520a90ada5dfe8c540ba6a7d4ec", "2026-12-03T13:57:43Z",
                            "STANDARD") for i in instances(args.keys, "uid")]
    pages = [objects[i:i + 1000] for i in range(0, len(objects), 1000)]
    print(f"{args.keys:,} keys, {len(pages)} pages")
    for name in args.variants:
        run(name, pages)


if __name__ == "__main__":
    main()
