"""Settings with documented defaults, one dataclass per concern."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceConfig:
    """Where the bucket is and how to talk to it."""

    endpoint_url: str | None = None  # None: AWS, or AWS_ENDPOINT_URL from the environment
    profile: str | None = None  # a named profile from ~/.aws; None: the default chain
    region: str | None = None
    max_attempts: int = 8  # per request, with exponential backoff and jitter (botocore "standard")
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 64


@dataclass(frozen=True)
class InventoryConfig:
    """How `inventory` lists and reads headers."""

    workers: int = 16  # threads reading DICOM headers
    list_workers: int = 8  # threads listing key ranges in parallel
    header_bytes: int = 64 * 1024  # first ranged GET; grown (doubled) when the header is longer
    max_header_bytes: int = 32 * 1024 * 1024  # give up growing past this
    key_pattern: str | None = None  # e.g. "{study}/{series}/{sop}.dcm": UIDs from keys, no reads
    pattern_sample: int = 20  # objects whose headers are read to check the key pattern
    commit_every: int = 1000  # rows per SQLite transaction
