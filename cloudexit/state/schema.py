"""The state DB's schema: every version's DDL, and the step that brings a DB to each version.

The one place the schema changes: add `_SCHEMA_Vn`, list it in `MIGRATIONS`, raise
`SCHEMA_VERSION`, and document it in docs/state-db.md. `State` (cloudexit/state/db.py) applies
the steps a DB lacks when it opens it.
"""

from __future__ import annotations

SCHEMA_VERSION = 13

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE objects (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    etag TEXT,
    last_modified TEXT,
    storage_class TEXT,
    checksums TEXT,                      -- JSON {header: value} from the provider
    status TEXT NOT NULL DEFAULT 'present',   -- present | deleted
    change TEXT NOT NULL DEFAULT 'new',       -- new | unchanged | changed | deleted
    change_round INTEGER,                -- inventory round that set `change`
    kind TEXT NOT NULL DEFAULT 'pending',     -- pending | dicom | other | unreadable
    reason TEXT,
    key_flags TEXT,                      -- why the key is unsafe as a path, comma separated
    study_uid TEXT, series_uid TEXT, sop_uid TEXT, sop_class_uid TEXT,
    modality TEXT, study_date TEXT, transfer_syntax TEXT, patient_hash TEXT,
    header_source TEXT,                  -- header | key-pattern
    header_bytes INTEGER NOT NULL DEFAULT 0,  -- bytes downloaded to classify this object
    first_seen_round INTEGER NOT NULL,
    last_seen_round INTEGER NOT NULL,
    updated_at TEXT
);
CREATE INDEX objects_pending ON objects(key) WHERE kind = 'pending';
CREATE INDEX objects_study ON objects(study_uid, series_uid);
CREATE INDEX objects_sop ON objects(sop_uid);
CREATE TABLE inventory_rounds (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,                -- running | complete | failed
    resumed INTEGER NOT NULL DEFAULT 0,  -- times this round was resumed after an interruption
    list_requests INTEGER NOT NULL DEFAULT 0,
    get_requests INTEGER NOT NULL DEFAULT 0,
    header_bytes INTEGER NOT NULL DEFAULT 0,
    key_pattern TEXT
);
CREATE TABLE list_tasks (
    id INTEGER PRIMARY KEY,
    round INTEGER NOT NULL,
    prefix TEXT NOT NULL,
    start_after TEXT,                    -- exclusive lower bound (S3 StartAfter)
    end_before TEXT,                     -- exclusive upper bound, NULL: to the end of prefix
    explore INTEGER NOT NULL DEFAULT 0,  -- 1: delimiter listing that plans the others
    last_key TEXT,                       -- resume point: last key committed
    done INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    keys INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT,                         -- JSON
    prev_hash TEXT NOT NULL,             -- hash of the previous event (64 zeros for the first)
    hash TEXT NOT NULL                   -- sha256(prev_hash, at, kind, detail): a hash chain
);
"""

# Version 2: migrate (runs, per-object transfers per destination, ranges of large objects,
# archive restores). See docs/state-db.md.
_SCHEMA_V2 = """
CREATE TABLE migration_runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,                -- running | complete | partial | interrupted | stopped
    dest TEXT NOT NULL,                  -- destination id (file:///srv/pacs-archive)
    options TEXT NOT NULL,               -- JSON: layout, order, non_dicom, restore tier...
    bwlimit TEXT,                        -- timetable in force, changed live by `migrate --bwlimit`
    resumed INTEGER NOT NULL DEFAULT 0,
    pid INTEGER, host TEXT, heartbeat_at TEXT,
    waiting_since TEXT,                  -- the endpoint has not answered since (NULL: link up)
    stop_reason TEXT,
    get_requests INTEGER NOT NULL DEFAULT 0,
    head_requests INTEGER NOT NULL DEFAULT 0,
    list_requests INTEGER NOT NULL DEFAULT 0,
    restore_requests INTEGER NOT NULL DEFAULT 0,
    bytes_downloaded INTEGER NOT NULL DEFAULT 0,   -- body bytes received, retries included
    bytes_verified INTEGER NOT NULL DEFAULT 0,
    objects_verified INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    link_outages INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE transfers (
    key TEXT NOT NULL,
    dest TEXT NOT NULL,
    seq INTEGER NOT NULL,                -- order of work
    state TEXT NOT NULL,                 -- queued | fetching | verified | duplicate | quarantined | failed | missing | skipped | restoring
    etag TEXT,                           -- the version this row is about
    size INTEGER,
    kind TEXT,
    path TEXT,                           -- relative to the destination
    sha256 TEXT,
    md5 TEXT,
    checks TEXT,                         -- checks passed, comma separated
    not_checked TEXT,                    -- checks that could not be made, and why
    reason TEXT,
    conflict_with TEXT,                  -- key holding the SOP Instance UID's canonical path
    attempts INTEGER NOT NULL DEFAULT 0,
    changes INTEGER NOT NULL DEFAULT 0,  -- times the source changed under us
    range_size INTEGER,                  -- large objects: bytes per ranged GET
    run_id INTEGER,
    started_at TEXT,
    verified_at TEXT,
    updated_at TEXT,
    PRIMARY KEY (key, dest)
);
CREATE INDEX transfers_work ON transfers(dest, state, seq);
CREATE UNIQUE INDEX transfers_path ON transfers(dest, path);
CREATE TABLE transfer_ranges (
    key TEXT NOT NULL,
    dest TEXT NOT NULL,
    etag TEXT NOT NULL,
    idx INTEGER NOT NULL,                -- range number (range_size bytes each) on disk and fsynced
    PRIMARY KEY (key, dest, etag, idx)
);
CREATE TABLE restores (
    key TEXT PRIMARY KEY,
    etag TEXT,
    storage_class TEXT,
    tier TEXT,
    days INTEGER,
    status TEXT NOT NULL,                -- requested | restored | failed
    requested_at TEXT,
    checked_at TEXT,
    restored_at TEXT,
    expiry TEXT,
    checks INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
"""

# Version 3: `cloudexit verify` (reconciliation runs, per-study counts, findings, PACS samples).
# See docs/verify.md.
_SCHEMA_V3 = """
CREATE TABLE verify_runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    dest TEXT NOT NULL,                  -- destination id (file:///..., dicom://AET@HOST:PORT, dicomweb+https://...)
    kind TEXT NOT NULL,                  -- filesystem | dicom | dicomweb
    options TEXT NOT NULL,               -- JSON: deep, sample, seed
    status TEXT NOT NULL,                -- running | passed | failed | error
    summary TEXT                         -- JSON: the report's counts
);
CREATE TABLE verify_studies (
    run_id INTEGER NOT NULL,
    study_uid TEXT NOT NULL,
    expected_instances INTEGER NOT NULL, -- distinct SOP Instance UIDs in the inventory
    found_instances INTEGER,             -- NULL: the destination has no such study
    expected_series INTEGER,
    found_series INTEGER,
    status TEXT NOT NULL,                -- ok | missing | mismatch
    PRIMARY KEY (run_id, study_uid)
);
CREATE TABLE verify_findings (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    level TEXT NOT NULL,                 -- object | file | study | series | instance
    problem TEXT NOT NULL,               -- missing | extra | size | sha256 | not-a-file | not-delivered | count
    key TEXT, path TEXT, study_uid TEXT, series_uid TEXT, sop_uid TEXT,
    expected TEXT, found TEXT,
    detail TEXT
);
CREATE INDEX verify_findings_run ON verify_findings(run_id, level);
CREATE TABLE verify_samples (
    run_id INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    key TEXT,                            -- the archived copy compared with
    result TEXT NOT NULL,                -- identical | equivalent | differs | not-compared
    pixel TEXT,                          -- same | differs | transcoded-same | transcoded-not-compared
    transfer_syntax TEXT,                -- archived -> PACS, when they differ
    differences TEXT,                    -- JSON list of {tag, keyword, change}, values only for non-identifying attributes
    PRIMARY KEY (run_id, sop_uid)
);
"""

# Version 4: migrate records the bytes of partial temp files it continued, and how far each
# range of a large object got (Range resume inside a range).
_SCHEMA_V4 = """
ALTER TABLE migration_runs ADD COLUMN bytes_resumed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE transfer_ranges ADD COLUMN bytes INTEGER
"""  # transfer_ranges.bytes: bytes of the range on disk and fsynced (NULL: the whole range)

# Version 5: playbooks (`cloudexit run`: one row per step and its state) and decommissioning
# (`cloudexit decommission`: dry runs and executions, and one row per deletion with the store's
# answer: the proof of deletion). See docs/state-db.md.
_SCHEMA_V5 = """
CREATE TABLE playbook_steps (
    playbook TEXT NOT NULL,              -- the playbook's name
    step TEXT NOT NULL,                  -- the step's name, unique in the playbook
    kind TEXT NOT NULL,                  -- inventory | plan | pilot | migrate | delta | verify | audit | checkpoint | decommission
    seq INTEGER NOT NULL,                -- position in the playbook
    status TEXT NOT NULL,                -- pending | running | done | gated | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    finished_at TEXT,
    message TEXT,                        -- why it stopped (gate not met, error), or what it did
    result TEXT,                         -- JSON: the step's figures
    playbook_sha256 TEXT,                -- the playbook text that last ran the step
    PRIMARY KEY (playbook, step)
);
CREATE TABLE decommission_runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    mode TEXT NOT NULL,                  -- dry-run | execute
    status TEXT NOT NULL,                -- running | planned | complete | partial | refused
    source TEXT NOT NULL,                -- s3://BUCKET/PREFIX
    endpoint TEXT,
    versioning TEXT,                     -- Enabled | Suspended | off (never enabled)
    all_versions INTEGER NOT NULL DEFAULT 0,
    destinations TEXT NOT NULL,          -- JSON list: every destination a copy had to be verified at
    manifest TEXT,                       -- path of the deletion manifest (CSV)
    manifest_sha256 TEXT,
    token TEXT,                          -- confirmation token (hash of the rows to delete)
    to_delete INTEGER NOT NULL DEFAULT 0,        -- versions (or keys) planned for deletion
    to_delete_bytes INTEGER NOT NULL DEFAULT 0,
    kept INTEGER NOT NULL DEFAULT 0,             -- versions (or keys) left in the bucket
    kept_bytes INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    batches INTEGER NOT NULL DEFAULT 0,
    summary TEXT                         -- JSON: counts by reason kept, delete markers left
);
CREATE TABLE deletions (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,             -- decommission_runs.id
    batch INTEGER NOT NULL,              -- DeleteObjects request number within the run
    key TEXT NOT NULL,
    version_id TEXT,                     -- version deleted (NULL: unversioned bucket, or a delete marker was placed)
    etag TEXT,                           -- ETag of the data deleted, as verified at every destination
    size INTEGER,
    sha256 TEXT,                         -- SHA-256 of the verified copy kept on premise
    kept_at TEXT,                        -- JSON list of the destinations that hold the verified copy
    outcome TEXT NOT NULL,               -- deleted | delete-marker | failed
    marker_version_id TEXT,              -- the delete marker the store created (versioned, without --all-versions)
    error_code TEXT,                     -- the store's error code when failed (PreconditionFailed: changed since verified)
    response TEXT NOT NULL,              -- JSON: the store's answer for this object (its Deleted or Errors entry)
    request_id TEXT,                     -- x-amz-request-id of the DeleteObjects request
    deleted_at TEXT NOT NULL,            -- UTC, when the store answered
    confirmed_at TEXT                    -- UTC, when a listing after the deletion no longer showed it
);
CREATE INDEX deletions_key ON deletions(key);
CREATE INDEX deletions_run ON deletions(run_id, batch)
"""

# Version 6: `inventory --since` (a round that skipped folders dated before a day records the
# day, and the folders it skipped as done tasks), and indexes that feed listing tasks from the
# table in batches instead of holding them all in memory.
_SCHEMA_V6 = """
ALTER TABLE inventory_rounds ADD COLUMN since TEXT;
ALTER TABLE list_tasks ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0;
CREATE INDEX list_tasks_open ON list_tasks(round, id) WHERE done = 0;
CREATE INDEX list_tasks_skipped ON list_tasks(round, prefix) WHERE skipped = 1
"""

# Version 7: the archive folder's guard. `meta.migration_id` names this migration in the marker
# file of the archive folder it claims (`.cloudexit-archive.json`); `transfers.mtime_ns` is the
# file's modification time right after placement, so `verify` catches a replaced file without
# re-hashing; `transfers.fold_path` is the path as a case-folding (or Unicode-normalising)
# destination compares names, so two keys that differ only in case are a collision, not one file;
# `meta.redact_key` keys the per-segment hashes of `audit --redact-keys`.
_SCHEMA_V7 = """
ALTER TABLE transfers ADD COLUMN mtime_ns INTEGER;
ALTER TABLE transfers ADD COLUMN fold_path TEXT;
CREATE INDEX transfers_fold ON transfers(dest, fold_path) WHERE fold_path IS NOT NULL;
INSERT OR IGNORE INTO meta(key, value) VALUES ('migration_id', lower(hex(randomblob(16))));
INSERT OR IGNORE INTO meta(key, value) VALUES ('redact_key', lower(hex(randomblob(32))))
"""
# Version 8: migrate records the part sizes it learned of multipart objects whose parts are of
# unequal sizes (so they are asked once), and the egress counters of its worker processes.
_SCHEMA_V8 = """
ALTER TABLE transfers ADD COLUMN part_sizes TEXT;
CREATE TABLE meters (
    name TEXT PRIMARY KEY,               -- a worker process's meter file, beside the DB (cloudexit/s3/meter.py)
    run_id INTEGER NOT NULL,             -- the migration run it counts for
    bytes INTEGER NOT NULL, gets INTEGER NOT NULL, heads INTEGER NOT NULL, lists INTEGER NOT NULL
)
"""  # transfers.part_sizes: JSON {"etag": ..., "sizes": [...]} (see cloudexit/s3/parts.py);
# meters: the last reading of each meter file, already added to its run's counters
# Version 9: each inventory round records its new/changed/deleted counts when it completes
# (`objects.change` only keeps an object's latest change, so the counts of older rounds cannot
# be rebuilt from it). Rounds completed before are filled from their `inventory.complete` event.
_SCHEMA_V9 = """
ALTER TABLE inventory_rounds ADD COLUMN new_objects INTEGER;
ALTER TABLE inventory_rounds ADD COLUMN changed_objects INTEGER;
ALTER TABLE inventory_rounds ADD COLUMN deleted_objects INTEGER;
UPDATE inventory_rounds SET
    new_objects = (SELECT json_extract(e.detail, '$.new') FROM events e WHERE e.kind = 'inventory.complete'
                   AND json_extract(e.detail, '$.round') = inventory_rounds.id ORDER BY e.id DESC LIMIT 1),
    changed_objects = (SELECT json_extract(e.detail, '$.changed') FROM events e WHERE e.kind = 'inventory.complete'
                       AND json_extract(e.detail, '$.round') = inventory_rounds.id ORDER BY e.id DESC LIMIT 1),
    deleted_objects = (SELECT json_extract(e.detail, '$.deleted') FROM events e WHERE e.kind = 'inventory.complete'
                       AND json_extract(e.detail, '$.round') = inventory_rounds.id ORDER BY e.id DESC LIMIT 1)
WHERE status = 'complete'
"""
# Version 10: objects a PACS wrote in an envelope (Orthanc's zlib attachments, gzip): the
# inventory records the envelope and the decoded size, and Orthanc's own metadata attachments;
# migrate records what it decoded: the raw object's SHA-256 beside the plain file's.
_SCHEMA_V10 = """
ALTER TABLE objects ADD COLUMN encoding TEXT;
ALTER TABLE objects ADD COLUMN plain_size INTEGER;
ALTER TABLE objects ADD COLUMN pacs_metadata TEXT;
ALTER TABLE transfers ADD COLUMN encoding TEXT;
ALTER TABLE transfers ADD COLUMN raw_sha256 TEXT;
ALTER TABLE transfers ADD COLUMN file_size INTEGER
"""

# Version 11: link evidence (cloudexit/state/linkseries.py): what migrate and inventory saw of
# the link, per minute (rolled up to hours after 30 days), and every outage with its cause.
_SCHEMA_V11 = """
CREATE TABLE link_series (
    ts INTEGER NOT NULL,                 -- start of the interval, Unix seconds (UTC)
    span INTEGER NOT NULL,               -- 60: a minute, 3600: an hour (minutes older than 30 days)
    source TEXT NOT NULL,                -- migrate | inventory
    bytes INTEGER NOT NULL DEFAULT 0, objects INTEGER NOT NULL DEFAULT 0,
    get_requests INTEGER NOT NULL DEFAULT 0, head_requests INTEGER NOT NULL DEFAULT 0,
    list_requests INTEGER NOT NULL DEFAULT 0,
    err_timeout INTEGER NOT NULL DEFAULT 0, err_reset INTEGER NOT NULL DEFAULT 0,
    err_5xx INTEGER NOT NULL DEFAULT 0, err_tls INTEGER NOT NULL DEFAULT 0,
    err_dns INTEGER NOT NULL DEFAULT 0, err_refused INTEGER NOT NULL DEFAULT 0,
    err_other INTEGER NOT NULL DEFAULT 0,
    ttfb_0 INTEGER NOT NULL DEFAULT 0, ttfb_1 INTEGER NOT NULL DEFAULT 0, ttfb_2 INTEGER NOT NULL DEFAULT 0,
    ttfb_3 INTEGER NOT NULL DEFAULT 0, ttfb_4 INTEGER NOT NULL DEFAULT 0, ttfb_5 INTEGER NOT NULL DEFAULT 0,
    ttfb_6 INTEGER NOT NULL DEFAULT 0, ttfb_7 INTEGER NOT NULL DEFAULT 0, ttfb_8 INTEGER NOT NULL DEFAULT 0,
    ttfb_9 INTEGER NOT NULL DEFAULT 0,
    conn_seconds REAL NOT NULL DEFAULT 0, -- connections busy x seconds (bytes / this: per connection)
    down_seconds REAL NOT NULL DEFAULT 0, -- of this interval spent in an outage
    bwlimit INTEGER,                     -- bytes/s in force (an hour: the highest), NULL: none
    PRIMARY KEY (ts, span, source)
);
CREATE TABLE link_outages (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,                -- migrate | inventory
    run_id INTEGER,                      -- migration_runs.id (migrate)
    started REAL NOT NULL,               -- Unix seconds: the first failed request of the outage
    ended REAL,                          -- Unix seconds: the first answer after it, NULL: not yet
    cause TEXT NOT NULL,                 -- refused | timeout | reset | dns | tls | 5xx | other
    detail TEXT                          -- the error as seen (exception and errno, never a key)
);
CREATE INDEX link_outages_started ON link_outages(started)
"""
# Version 12: zipped studies. Each file inside a zip archive is a row of `objects` of its own,
# keyed `<zip key>!/<member name>` (`container`: the zip's key; `member`: JSON of where its
# bytes lie in the zip, its sizes and CRC-32), so instances, verify, the audit and decommission
# count and check members like any object; the zip's own row keeps the bucket's view of it.
_SCHEMA_V12 = """
ALTER TABLE objects ADD COLUMN container TEXT;
ALTER TABLE objects ADD COLUMN member TEXT;
CREATE INDEX objects_container ON objects(container) WHERE container IS NOT NULL
"""

# Version 13: `migrate --cluster` records which dask worker fetched each object (NULL: this
# machine's worker processes), for `status --json` (workers) and the manifest.
_SCHEMA_V13 = """
ALTER TABLE transfers ADD COLUMN worker TEXT
"""

# Indexes of `objects` (schema v1's) that a first listing drops and builds when the round
# completes (cloudexit/state/listed.py): the same indexes at rest, so no schema version. Kept:
# the primary key (one row per key) and `objects_pending` (the header reads query it meanwhile).
DEFERRED_OBJECT_INDEXES: dict[str, str] = {
    "objects_study": "CREATE INDEX IF NOT EXISTS objects_study ON objects(study_uid, series_uid)",
    "objects_sop": "CREATE INDEX IF NOT EXISTS objects_sop ON objects(sop_uid)",
}

MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4,
                                5: _SCHEMA_V5, 6: _SCHEMA_V6, 7: _SCHEMA_V7,
                                8: _SCHEMA_V8, 9: _SCHEMA_V9, 10: _SCHEMA_V10,
                                11: _SCHEMA_V11, 12: _SCHEMA_V12, 13: _SCHEMA_V13}
