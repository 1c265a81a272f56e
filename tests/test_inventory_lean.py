"""The lean ListObjectsV2 parser: the regex path and the ElementTree path read pages alike."""

from __future__ import annotations

from urllib.parse import quote_plus
from xml.sax.saxutils import escape

from cloudexit.s3.lean import parse_page, parse_page_tree

KEYS = ["a/b.dcm", "ctl\x01char.dcm", "a+b c&d<e>\"f'.dcm", "影像/张三 study/1.dcm", "100%.dcm",
        "C:/Windows/x.dcm"]


def _page(encoded: bool, namespace: bool = True, token: str | None = "a/2&x") -> bytes:
    enc = (lambda k: quote_plus(k, safe="/")) if encoded else (lambda k: k)
    ns = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"' if namespace else ""
    parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult{ns}><Name>b</Name><Prefix/>']
    if token:
        parts.append(f"<NextContinuationToken>{escape(token)}</NextContinuationToken>")
    parts.append(f"<KeyCount>9</KeyCount><IsTruncated>{'true' if token else 'false'}</IsTruncated>")
    for i, key in enumerate(KEYS if encoded else [k for k in KEYS if k.isprintable()]):
        parts.append(f"<Contents><Key>{escape(enc(key))}</Key><LastModified>2026-11-26T0{i}:00:00.000Z"
                     f"</LastModified><ETag>&quot;etag{i}&quot;</ETag><Size>{i * 100}</Size><Owner><ID>o"
                     f"</ID></Owner>" + ("<StorageClass>GLACIER</StorageClass>" if i == 2 else "")
                     + "</Contents>")
    for prefix in ("a/", "影像/", "x&y/"):
        parts.append(f"<CommonPrefixes><Prefix>{escape(enc(prefix))}</Prefix></CommonPrefixes>")
    if encoded:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def test_regex_and_tree_parsers_agree() -> None:
    for body in (_page(True), _page(False), _page(True, namespace=False), _page(True, token=None)):
        assert parse_page(body) == parse_page_tree(body)
    page = parse_page(_page(True))
    assert [o.key for o in page.objects] == KEYS
    assert page.objects[2].storage_class == "GLACIER" and page.objects[1].etag == "etag1"
    assert page.prefixes == ["a/", "影像/", "x&y/"]
    assert page.truncated and page.next_token == "a/2&x"


def test_irregular_xml_goes_to_elementtree() -> None:
    body = _page(True).replace(b"<Key>a/b.dcm</Key>", b"<Key><![CDATA[a/b.dcm]]></Key>")
    assert parse_page(body).objects[0].key == "a/b.dcm"
