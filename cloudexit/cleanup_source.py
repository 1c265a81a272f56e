"""The object-store calls that decommissioning needs, beside `cloudexit.source`.

GetBucketVersioning, ListObjectVersions and DeleteObjects over the same `Source` (its boto3
client, retries and error translation), so `source.py` stays about reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .source import Source, iso, iter_pages

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
