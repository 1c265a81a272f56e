"""The object-store calls that decommissioning needs, beside `cloudexit.source`.

GetBucketVersioning, ListObjectVersions, DeleteObjects and the Object Lock reads
(GetObjectLockConfiguration, HEAD of a version) over the same `Source` (its boto3 client,
retries and error translation), so `source.py` stays about reading.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Iterator

from cloudexit.s3.errors import classify
from cloudexit.s3.source import Source, iso, iter_pages

MAX_BATCH = 1000  # DeleteObjects takes at most 1,000 keys per request (S3, OSS, COS, OBS)


@dataclass(frozen=True)
class Version:
    """One version of an object as the store lists it now (unversioned buckets: one per key)."""

    key: str
    version_id: str | None  # None: unversioned bucket
    etag: str | None  # None for a delete marker
    size: int
    last_modified: str
    is_latest: bool
    delete_marker: bool = False


@dataclass(frozen=True)
class BatchAnswer:
    """What DeleteObjects said for one request."""

    deleted: list[dict[str, Any]]  # the `Deleted` entries
    errors: list[dict[str, Any]]  # the `Errors` entries
    request_id: str | None


def versioning(source: Source) -> str:
    """`Enabled`, `Suspended` or `off` (versioning never enabled on the bucket)."""
    try:
        resp = source.client().get_bucket_versioning(Bucket=source.bucket)
    except Exception as exc:  # noqa: BLE001 - translated
        raise source.translate(exc, f"bucket {source.bucket}: GetBucketVersioning") from exc
    return str(resp.get("Status") or "off")


def list_current(source: Source) -> Iterator[Version]:
    """Every object under the source's prefix (ListObjectsV2)."""
    for page in iter_pages(source, source.prefix):
        for o in page.objects:
            yield Version(o.key, None, o.etag, o.size, o.last_modified, True)


def list_versions(source: Source) -> Iterator[Version]:
    """Every version and delete marker under the source's prefix (ListObjectVersions)."""
    args: dict[str, Any] = {"Bucket": source.bucket, "Prefix": source.prefix, "MaxKeys": 1000}
    while True:
        try:
            resp = source.client().list_object_versions(**args)
        except Exception as exc:  # noqa: BLE001
            raise source.translate(exc, f"bucket {source.bucket}: listing versions") from exc
        for v in resp.get("Versions") or ():
            yield Version(v["Key"], _version_id(v.get("VersionId")), (v.get("ETag") or "").strip('"'),
                          int(v.get("Size") or 0), iso(v["LastModified"]), bool(v.get("IsLatest")))
        for m in resp.get("DeleteMarkers") or ():
            yield Version(m["Key"], _version_id(m.get("VersionId")), None, 0, iso(m["LastModified"]),
                          bool(m.get("IsLatest")), delete_marker=True)
        if not resp.get("IsTruncated"):
            return
        args["KeyMarker"] = resp.get("NextKeyMarker")
        if resp.get("NextVersionIdMarker"):
            args["VersionIdMarker"] = resp["NextVersionIdMarker"]
        else:
            args.pop("VersionIdMarker", None)


def _version_id(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def list_all(source: Source, versioned: bool) -> Iterator[Version]:
    return list_versions(source) if versioned else list_current(source)


def delete_batch(source: Source, objects: list[dict[str, str]]) -> BatchAnswer:
    """One DeleteObjects request (not quiet: every key's answer comes back and is recorded).

    Each entry is `{"Key": k}` plus `VersionId` (delete that version) or `ETag` (delete only if
    the object still has this ETag: the store answers PreconditionFailed otherwise).
    """
    if not objects or len(objects) > MAX_BATCH:
        raise ValueError(f"a DeleteObjects batch holds 1 to {MAX_BATCH} objects, not {len(objects)}")
    try:
        resp = source.client().delete_objects(
            Bucket=source.bucket, Delete={"Objects": objects, "Quiet": False})
    except Exception as exc:  # noqa: BLE001
        raise source.translate(exc, f"bucket {source.bucket}: DeleteObjects") from exc
    meta = resp.get("ResponseMetadata", {})
    request_id = meta.get("RequestId") or meta.get("HTTPHeaders", {}).get("x-amz-request-id")
    return BatchAnswer(list(resp.get("Deleted") or ()), list(resp.get("Errors") or ()), request_id)


# -- Object Lock --------------------------------------------------------------------------------------
# Answers to GetObjectLockConfiguration that mean "this bucket has no lock" (stores without
# Object Lock answer one of the last two).
_NO_LOCK_CODES = frozenset({"ObjectLockConfigurationNotFoundError", "NotImplemented", "MethodNotAllowed"})
LOCK_READERS = 16  # HEADs in flight: one per version that would be deleted, only in locked buckets


def object_lock_enabled(source: Source) -> bool:
    """Whether the bucket has Object Lock on (then each version may be under retention or a
    legal hold). Without it no version can be locked, and no per-object call is needed."""
    what = f"bucket {source.bucket}: GetObjectLockConfiguration"
    try:
        resp = source.client().get_object_lock_configuration(Bucket=source.bucket)
    except Exception as exc:  # noqa: BLE001
        failure = classify(exc, what)
        if failure is not None and failure.code in _NO_LOCK_CODES:
            return False
        raise source.translate(exc, what) from exc
    return (resp.get("ObjectLockConfiguration") or {}).get("ObjectLockEnabled") == "Enabled"


def lock_reason(head: dict[str, Any], when: datetime | None = None) -> str | None:
    """Why a version cannot be deleted now, from its HEAD (the x-amz-object-lock-* headers),
    or None. GOVERNANCE counts too: cloudexit never bypasses a retention."""
    if head.get("ObjectLockLegalHoldStatus") == "ON":
        return "object lock: legal hold on (no end date: it stays until someone removes the hold)"
    until, mode = _moment(head.get("ObjectLockRetainUntilDate")), head.get("ObjectLockMode")
    if mode and until is None:  # a retention we cannot read: never guess it has ended
        return f"object lock: {mode} retention until {head.get('ObjectLockRetainUntilDate')!r} (unreadable date)"
    if mode and until is not None and until > (when or datetime.now(UTC)):
        stamp = until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"object lock: {mode} retention until {stamp}"
    return None


def _moment(value: Any) -> datetime | None:
    """A retain-until date as botocore gives it: text here (`Source` keeps timestamps as text),
    ISO 8601 from S3, an HTTP date from some stores."""
    if value is None or isinstance(value, datetime):
        return value
    from email.utils import parsedate_to_datetime

    text = str(value).strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_locks(source: Source, versions: Iterable[tuple[str, str | None]]) -> dict[tuple[str, str | None], str]:
    """The lock reason of each (key, version id) that is locked now, by HEAD of that version."""

    def one(kv: tuple[str, str | None]) -> str | None:
        key, version_id = kv
        args = {"Bucket": source.bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
        try:
            return lock_reason(source.client().head_object(**args))
        except Exception as exc:  # noqa: BLE001
            raise source.translate(exc, f"object {key!r}: reading its Object Lock (HEAD)") from exc

    wanted = list(versions)
    if not wanted:
        return {}
    with ThreadPoolExecutor(min(LOCK_READERS, len(wanted)), thread_name_prefix="cloudexit-lock") as pool:
        return {kv: why for kv, why in zip(wanted, pool.map(one, wanted)) if why}
