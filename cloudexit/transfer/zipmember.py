"""Fetch one member of a zipped study and place it as the instance it holds (worker side).

The member's bytes (its local header and data, where the inventory found them) come with one
ranged GET of the zip, If-Match on the zip's inventoried ETag, into the member's temp file; then
`zipped.extract_member` inflates them beside it (local header = directory entry, output capped
at the declared size, CRC-32 and size checked), the plain file gets the DICOM check against the
inventory (SOP, Study and Series Instance UIDs), and is placed like any instance. A member whose
bytes do not decode, or whose DICOM does not match, is quarantined as stored in the zip (its
compressed bytes, with its local header): nothing is lost, the zip stays in the bucket.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from cloudexit.dicom.zipped import ExtractError, Member, extract_member, file_crc

if TYPE_CHECKING:
    from cloudexit.transfer.fetch import Fetcher
    from cloudexit.transfer.tasks import Result, Task

CHECKS = ["if-match-etag", "zip-local-header", "zip-crc32", "zip-size"]
NOT_CHECKED = ("object MD5/ETag: a member of a zip is read by range, so the zip's whole-object "
               "checksum cannot be compared; the member's CRC-32 from the zip's directory is checked")


def fetch_member(fetcher: Fetcher, task: Task, result: Result) -> None:
    """Fetch, check and place one member (`task.member`). Raises FetchError like `_fetch`."""
    from cloudexit.s3.client import FetchError

    assert task.member is not None
    m = Member.from_json({k: v for k, v in task.member.items() if k != "container"})
    zip_key = task.member["container"]
    if _already_placed(fetcher, task, result, m):
        return
    if m.data is None:
        raise FetchError("permanent", f"zip member {m.name!r}: the inventory did not read its "
                         "local header (run inventory again)")
    first, last = m.offset, m.end - 1
    headers = {"if-match": f'"{task.etag}"', "range": f"bytes={first}-{last}"}
    resp = fetcher.reader.request("GET", zip_key, None, headers, result.counters)
    what = f"GET {zip_key!r} bytes {first}-{last} (zip member {m.name!r})"
    if resp.status != 206:
        if resp.status == 200:  # the Range was ignored: never take a whole zip for one member
            resp.close()
            fetcher.reader.close()
            raise FetchError("permanent", f"{what}: the endpoint ignored the Range header")
        raise fetcher.reader.fail(resp, what)
    expected = last - first + 1
    length = resp.getheader("content-length")
    if length is not None and int(length) != expected:
        resp.close()
        fetcher.reader.close()
        raise FetchError("transient", f"{what}: {length} bytes announced, {expected} expected")
    fd = fetcher.placer.open_temp(task.temp, truncate=True)
    try:
        # no object hasher: a range has no whole-object checksum (`_stream` skips a None one)
        fetcher._stream(resp, fd, None, bytearray(), expected, result.counters, task)
    finally:
        os.close(fd)
    plain = task.temp + ".plain"
    try:
        got = extract_member(task.temp, m, plain, fsync=fetcher.placer.fsync)
    except ExtractError as exc:
        _quarantine(fetcher, task, result, f"{exc} (the member's bytes as stored in the zip are kept)")
        return
    result.checks = list(CHECKS)
    problem = None
    if task.kind == "dicom":
        problem = fetcher._check_dicom(task, got.head, result, path=plain, size=got.size)
    if problem:
        os.unlink(plain)
        _quarantine(fetcher, task, result, f"{problem} (unzipped; the member's bytes as stored in "
                                            "the zip are kept)")
        return
    os.replace(plain, task.temp)
    result.sha256, result.md5 = got.sha256, None
    result.not_checked = [NOT_CHECKED]
    result.decoded = {"encoding": "zip", "raw_sha256": got.raw_sha256, "raw_size": expected,
                      "size": got.size}
    result.outcome = "quarantined" if task.kind == "unreadable" else "verified"
    _place(fetcher, task, result, task.final)


def _quarantine(fetcher: Fetcher, task: Task, result: Result, why: str) -> None:
    digest = hashlib.sha256()
    with open(task.temp, "rb") as fh:
        while chunk := fh.read(2**20):
            digest.update(chunk)
    result.sha256, result.md5, result.outcome, result.detail = digest.hexdigest(), None, "quarantined", why
    result.checks = ["if-match-etag"]
    size = os.path.getsize(task.temp)  # the file kept is the member as stored (verify checks it)
    result.decoded = {"encoding": "zip", "raw_sha256": result.sha256, "raw_size": size, "size": size}
    _place(fetcher, task, result, task.quarantine or fetcher._mismatch_path(task.key))


def _place(fetcher: Fetcher, task: Task, result: Result, target: str) -> None:
    fd = os.open(task.temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fetcher._place(task, result, fd, target)
    finally:
        os.close(fd)


def _already_placed(fetcher: Fetcher, task: Task, result: Result, m: Member) -> bool:
    """The instance is at its final path already (placed, then the run was killed before the
    engine committed it): accept it without a GET if its CRC-32, size and DICOM check out."""
    try:
        if os.path.getsize(task.final) != m.usize or file_crc(task.final) != (m.crc, m.usize):
            return False
    except OSError:
        return False
    result.checks = ["zip-crc32", "zip-size"]
    if task.kind == "dicom":
        with open(task.final, "rb") as fh:
            head = fh.read(65536)
        if fetcher._check_dicom(task, head, result, path=task.final, size=m.usize):
            return False
    digest = hashlib.sha256()
    with open(task.final, "rb") as fh:
        while chunk := fh.read(2**20):
            digest.update(chunk)
    result.outcome = "quarantined" if task.kind == "unreadable" else "verified"
    result.sha256, result.md5, result.not_checked = digest.hexdigest(), None, [NOT_CHECKED]
    result.decoded = {"encoding": "zip", "raw_sha256": None, "raw_size": m.end - m.offset if m.data else None,
                      "size": m.usize}
    result.path, result.local = task.final, True
    result.mtime_ns = os.stat(task.final, follow_symlinks=False).st_mtime_ns
    fetcher.placer.discard(task.temp)
    fetcher.placer.discard(task.temp + ".plain")  # a kill during extraction may have left it
    if fetcher.group_folder_sync:
        result.folder = os.path.dirname(task.final)
    else:
        fetcher.placer.sync_folders([os.path.dirname(task.final)])
    return True
