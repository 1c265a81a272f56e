"""The part sizes of a multipart object, asked of the source.

A multipart ETag (MD5 of the part MD5s) or a composite checksum can only be recomputed with the
exact part boundaries. S3 says a part's size in answer to `HEAD ?partNumber=N`. The common case
(every part but the last of one size) is guessed from part 1 alone; AWS allows parts of any
size from 5 MiB, though, so before bytes that fail such a check are called corrupt, every
part's size is asked and the check made again (`learn_part_sizes`). What was learned goes to
the state DB with the ETag it belongs to (`transfers.part_sizes`), so it is asked once.
"""

from __future__ import annotations

import json
from typing import Any

# Failures that are about the request, not about the endpoint's support for partNumber: the
# caller handles them as for any other request (retry, wait for the link, stop).
RAISE_KINDS = ("unreachable", "transient", "credentials", "tls", "changed", "gone")


def learn_part_sizes(reader: Any, key: str, size: int, parts: int, counters: Any) -> list[int] | None:
    """Each part's size from `HEAD ?partNumber=N` (N = 1..parts), or None if the endpoint does
    not tell them (no partNumber support: sizes that do not add up to the object)."""
    from cloudexit.s3.client import FetchError

    sizes: list[int] = []
    try:
        for number in range(1, parts + 1):
            # No If-Match: moto answers a part's HEAD with the part's own ETag, and 412 to the
            # object's. A size from another version cannot make wrong bytes pass: it only feeds
            # the hash that must still match the object's ETag.
            info = reader.head(key, counters, part_number=number)
            sizes.append(int(info.get("content-length", 0)))
    except FetchError as exc:
        if exc.kind in RAISE_KINDS:
            raise
        return None
    if sum(sizes) != size or not all(sizes):
        return None
    return sizes


def record_sizes(etag: str, sizes: list[int]) -> str:
    """The DB form: the sizes with the ETag of the version they belong to."""
    return json.dumps({"etag": etag, "sizes": sizes})


def recorded_sizes(text: str | None, etag: str, size: int) -> list[int] | None:
    """Sizes recorded for this version of the object (None if none, or another version's)."""
    if not text:
        return None
    try:
        value = json.loads(text)
        sizes = [int(n) for n in value["sizes"]]
    except (ValueError, KeyError, TypeError):
        return None
    if value.get("etag") != etag or sum(sizes) != size:
        return None
    return sizes
