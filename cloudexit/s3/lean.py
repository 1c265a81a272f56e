"""The inventory's hot path to the store: ListObjectsV2 pages and ranged header GETs over
`http.client` keep-alive connections, signed by the standard-library SigV4 of `transfer.py`.

Why not boto3 here: botocore spent ~110 ms of CPU per 1000-key page (its XML parser, a second
parse of every 200 answer to look for an `<Error>` root, signing and event hooks) and ~4 ms per
ranged GET, which made the inventory 3x slower than s5cmd (docs/performance.md). Pages are parsed
once with ElementTree; keys are requested URL-encoded (`encoding-type=url`) and decoded here, so
keys with control characters survive XML. boto3 still resolves credentials, region and endpoint
(`Source.lean_endpoint`), and errors become the same `cloudexit.core.errors` as in `source.py`
(`Source.error`).
"""

from __future__ import annotations

import html
import http.client
import random
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote_plus

from cloudexit.s3.errors import ErrorKind, Failure
from cloudexit.s3.source import (
    CHECKSUM_HEADERS,
    ListedObject,
    ListPage,
    RangeRead,
    list_query,
    total_size,
)
from cloudexit.s3.client import Counters, Endpoint, FetchError, S3Reader

if TYPE_CHECKING:
    from cloudexit.s3.source import Source

T = TypeVar("T")
CREDENTIALS_EVERY = 300.0  # seconds between refreshes of temporary credentials from boto3


class LeanS3:
    """Listing and ranged reads of one source; thread-safe (a keep-alive connection per thread)."""

    def __init__(self, source: Source, endpoint: Endpoint | None = None) -> None:
        """`endpoint`: as resolved elsewhere (a cluster worker gets the coordinator's)."""
        self.source = source
        if endpoint is None:
            endpoint, credentials = source.lean_endpoint()
        else:
            credentials = source.frozen_credentials()
        self.reader = S3Reader(endpoint, credentials)
        self.counters = Counters()
        self._refreshed = time.monotonic()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.reader.close()

    def page(self, prefix: str, start_after: str | None = None, token: str | None = None,
             delimiter: str | None = None, max_keys: int = 1000) -> ListPage:
        """One page, retried on throttling, 5xx and lost connections like boto3's standard mode."""
        query = {"list-type": "2", "encoding-type": "url",
                 **list_query(prefix, start_after, token, delimiter, max_keys)}
        what = f"bucket {self.source.bucket}: listing {prefix!r}"
        return self._retried(lambda: self._list(query, what), what)

    def check(self) -> None:
        """`Source.check` on this path (a one-key page): fail early, with the same messages."""
        query = {"list-type": "2", "encoding-type": "url",
                 **list_query(self.source.prefix, None, None, None, 1)}
        what = f"bucket {self.source.bucket}"
        self._retried(lambda: self._list(query, what), what)

    def read_range(self, key: str, start: int, end: int, etag: str | None = None) -> RangeRead:
        """Bytes [start, end] of an object, checked against `etag` (If-Match), as
        `Source.read_range`."""
        headers = {"range": f"bytes={start}-{end}"}
        if etag:
            headers["if-match"] = f'"{etag}"'
        what = f"object {key!r}"
        return self._retried(lambda: self._get(key, headers, what), what)

    def head(self, key: str) -> dict[str, str]:
        """HEAD of an object (its current ETag, size, Last-Modified); lower-case headers."""
        what = f"object {key!r}"
        return self._retried(lambda: self.reader.head(key, self.counters), what)

    def _retried(self, call: Callable[[], T], what: str) -> T:
        """`call`, retried on throttling, 5xx and lost connections like boto3's standard mode."""
        attempts = self.source.config.max_attempts
        for attempt in range(1, attempts + 1):
            self._refresh_credentials()
            try:
                return call()
            except FetchError as exc:
                if exc.kind not in ("transient", "unreachable") or attempt == attempts:
                    raise self._translate(exc, what) from exc
            # Full jitter, as botocore's standard retry mode: base 1 s, at most 20 s.
            time.sleep(random.uniform(0, min(20.0, 2.0 ** (attempt - 1))))
        raise AssertionError("unreachable")

    def _get(self, key: str, headers: dict[str, str], what: str) -> RangeRead:
        resp = self.reader.request("GET", key, None, headers, self.counters)
        if resp.status not in (200, 206):
            raise self.reader.fail(resp, what)
        data = self._body(resp, what)
        found = {k.lower(): v for k, v in resp.getheaders()}
        checksums = {h: found[h] for h in CHECKSUM_HEADERS if h in found}
        return RangeRead(data, total_size(found.get("content-range"), len(data)),
                         found.get("etag", "").strip('"'), checksums)

    def _body(self, resp: Any, what: str) -> bytes:
        try:
            return resp.read()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.reader.close()
            raise FetchError("transient", f"{what}: answer cut short: {exc}") from exc

    def _list(self, query: dict[str, str], what: str) -> ListPage:
        resp = self.reader.request("GET", None, query, None, self.counters)
        if resp.status != 200:
            raise self.reader.fail(resp, what)
        body = self._body(resp, what)
        # S3 may answer 200 with an <Error> document (e.g. InternalError mid-response).
        if b"<Error>" in body[:200]:
            raise FetchError("transient", f"{what}: error in a 200 answer: {body[:300]!r}")
        try:
            return parse_page(body)
        except ET.ParseError as exc:
            raise FetchError("transient", f"{what}: unreadable answer: {exc}") from exc

    def _refresh_credentials(self) -> None:
        if time.monotonic() - self._refreshed < CREDENTIALS_EVERY:
            return
        with self._lock:
            if time.monotonic() - self._refreshed >= CREDENTIALS_EVERY:
                self.reader.set_credentials(self.source.frozen_credentials())
                self._refreshed = time.monotonic()

    def _translate(self, exc: FetchError, what: str) -> Exception:
        return self.source.error(Failure(ErrorKind(exc.kind), exc.detail, exc.status, exc.code), what)


_FIELD = re.compile(r"<(Key|Size|ETag|LastModified|StorageClass)>([^<]*)</")
_SLOT = {"Size": 1, "ETag": 2, "LastModified": 3, "StorageClass": 4}
_TOKEN = re.compile(r"<NextContinuationToken>([^<]*)</NextContinuationToken>")
_PREFIX = re.compile(r"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")
_QUOTES = ("&#34;", "&quot;")  # an ETag's quotes as Go's XML encoder and S3 write them
_ELEMENT = re.compile(r"<(\w+)>[^<]*</\1>")  # a text-only element: the fields of a Contents block
_BLOCK: dict[tuple[str, ...], re.Pattern[str]] = {}  # a Contents block of these fields, in order


def parse_page(body: bytes) -> ListPage:
    """A ListObjectsV2 answer (XML) as a `ListPage`, keys URL-decoded when the answer says so.

    S3's answers are flat and regular, so the objects are read by one regex pass over the page:
    a match per block when every block has the first one's fields in its order (`_blocks`), else
    a match per field, each object starting at its Key (`_fields`; 2-3x less CPU than building
    an ElementTree, and half that of a pass per object); anything irregular (CDATA, namespace prefixes,
    attributes, a block without a Key or not starting with it) is parsed by ElementTree instead.
    """
    text = body.decode("utf-8")
    if "<![CDATA[" in text or text.count("<CommonPrefixes") != text.count("<CommonPrefixes>"):
        return parse_page_tree(body)
    encoded = "<EncodingType>url</EncodingType>" in text
    objects = _blocks(text, encoded)
    if objects is None:
        objects = _fields(text, encoded)
    if objects is None:
        return parse_page_tree(body)
    # Markup cannot hide in keys or other text ('<' is always escaped there), so the top-level
    # elements can be looked for anywhere.
    prefixes = [_text(p, encoded) for p in _PREFIX.findall(text)]
    if text.count("<CommonPrefixes>") != len(prefixes):
        return parse_page_tree(body)
    truncated = "<IsTruncated>true</IsTruncated>" in text
    token = _TOKEN.search(text)
    return ListPage(objects, prefixes, truncated, _text(token.group(1), False) if token else None)


def _blocks(text: str, encoded: bool) -> list[ListedObject] | None:
    """The objects of a page whose blocks all hold the first block's elements, in its order (a
    store writes every block alike): one regex match per block, fields by position, 2x less CPU
    than a match per field. None: the page is not that regular (`_fields` reads it)."""
    start = text.find("<Contents>")
    order = tuple(_ELEMENT.findall(text, start + 10, text.find("</Contents>", start))) if start >= 0 else ()
    if len(order) < 2 or order[0] != "Key" or len(set(order)) != len(order):
        return None
    block = _BLOCK.get(order)
    if block is None:
        block = _BLOCK[order] = re.compile(
            "<Contents>" + "".join(rf"\s*<{t}>([^<]*)</{t}>" for t in order) + r"\s*</Contents>")
    found = block.findall(text)
    if len(found) != text.count("<Contents") or len(found) != text.count("<Contents>"):
        return None
    si, ei, mi, ci = (order.index(t) if t in order else -1
                      for t in ("Size", "ETag", "LastModified", "StorageClass"))
    objects = []
    for g in found:
        key = g[0]
        if "&" in key or (encoded and ("%" in key or "+" in key)):
            key = _text(key, encoded)
        etag = g[ei] if ei >= 0 else ""
        if "&" in etag:
            etag = _etag(etag)
        storage = g[ci] if ci >= 0 else ""
        objects.append(ListedObject(key, int(g[si] or 0) if si >= 0 else 0, etag.strip('"'),
                                    g[mi] if mi >= 0 else "",
                                    "STANDARD" if storage in ("STANDARD", "") else storage))
    return objects


def _fields(text: str, encoded: bool) -> list[ListedObject] | None:
    """The objects of a page by one match per field, each object starting at its Key (fields in
    any order); None: a field before the first Key, or a block without a Key."""
    objects = []
    row: list[str] | None = None
    for tag, value in _FIELD.findall(text):
        if tag == "Key":
            if row is not None:
                objects.append(_listed(row, encoded))
            row = [value, "0", "", "", "STANDARD"]
        elif row is None:
            return None  # a field before the first Key: not the usual order
        else:
            row[_SLOT[tag]] = value
    if row is not None:
        objects.append(_listed(row, encoded))
    # Every block must have given exactly one object (a block without a Key would have lent
    # its fields to the one before it).
    if text.count("<Contents") != len(objects) or text.count("<Contents>") != len(objects):
        return None
    return objects


def _listed(row: list[str], encoded: bool) -> ListedObject:
    key, size, etag, modified, storage = row
    if "&" in etag:
        etag = _etag(etag)
    return ListedObject(_text(key, encoded), int(size or 0), etag.strip('"'), modified,
                        "STANDARD" if storage in ("STANDARD", "") else storage)


def _etag(etag: str) -> str:
    """An ETag's XML text without its escaped quotes (then stripped of plain ones)."""
    for quote in _QUOTES:
        n = len(quote)
        if etag.startswith(quote) and etag.endswith(quote) and "&" not in etag[n:-n]:
            return etag[n:-n]  # the common case, without html.unescape
    return _text(etag, False)


def _text(value: str, url_encoded: bool) -> str:
    """XML text as it was meant: entities replaced, then URL decoding when asked for."""
    if "&" in value:
        value = html.unescape(value)
    if url_encoded and ("%" in value or "+" in value):
        value = unquote_plus(value)
    return value


def parse_page_tree(body: bytes) -> ListPage:
    """`parse_page` by ElementTree: slower, and indifferent to the shape of the XML."""
    root = ET.fromstring(body)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    contents, common, key_tag, prefix_tag = ns + "Contents", ns + "CommonPrefixes", ns + "Key", ns + "Prefix"
    fields = {ns + "Size": 1, ns + "ETag": 2, ns + "LastModified": 3, ns + "StorageClass": 4}
    encoded = root.findtext(ns + "EncodingType") == "url"
    decode = unquote_plus if encoded else str
    objects, prefixes = [], []
    for node in root:
        tag = node.tag
        if tag == contents:
            row = ["", "0", "", "", "STANDARD"]
            for child in node:
                if child.tag == key_tag:
                    row[0] = decode(child.text or "")
                else:
                    slot = fields.get(child.tag)
                    if slot is not None and child.text:
                        row[slot] = child.text
            objects.append(ListedObject(row[0], int(row[1]), row[2].strip('"'), row[3], row[4]))
        elif tag == common:
            prefixes.append(decode(node.findtext(prefix_tag) or ""))
    truncated = (root.findtext(ns + "IsTruncated") or "").lower() == "true"
    token = root.findtext(ns + "NextContinuationToken")
    return ListPage(objects, prefixes, truncated, token or None)
