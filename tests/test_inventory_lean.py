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


def test_field_orders_and_quote_spellings() -> None:
    """SeaweedFS writes Key, ETag, Size, StorageClass, LastModified and quotes as `&#34;`; S3
    writes Key, LastModified, ETag, ChecksumAlgorithm, Size and `&quot;`. A block that does not
    start with its Key, or lacks one, goes to ElementTree; every shape reads alike."""
    weed = ("<Contents><Key>{k}</Key><ETag>&#34;{e}&#34;</ETag><Size>{s}</Size>"
            "<StorageClass>STANDARD</StorageClass><LastModified>2026-12-03T13:57:43Z</LastModified>"
            "</Contents>")
    aws = ("<Contents><Key>{k}</Key><LastModified>2026-12-03T13:57:43.000Z</LastModified>"
           "<ETag>&quot;{e}&quot;</ETag><ChecksumAlgorithm>CRC64NVME</ChecksumAlgorithm>"
           "<Size>{s}</Size><StorageClass>GLACIER</StorageClass></Contents>")
    key_last = "<Contents><ETag>&quot;{e}&quot;</ETag><Size>{s}</Size><Key>{k}</Key></Contents>"
    odd_etag = "<Contents><Key>{k}</Key><ETag>&quot;a&amp;b&quot;</ETag><Size>{s}</Size></Contents>"
    no_key = "<Contents><ETag>&quot;{e}&quot;</ETag><Size>{s}</Size></Contents>"
    for block in (weed, aws, key_last, odd_etag):
        blocks = "".join(block.format(k=f"d/{i}.dcm", e=f"{i:032x}", s=i * 7) for i in range(5))
        body = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name>'
                f"<IsTruncated>false</IsTruncated>{blocks}</ListBucketResult>").encode()
        page = parse_page(body)
        assert page == parse_page_tree(body)
        assert [o.key for o in page.objects] == [f"d/{i}.dcm" for i in range(5)]
        assert [o.size for o in page.objects] == [i * 7 for i in range(5)]
        if block is odd_etag:
            assert page.objects[0].etag == "a&b"
        else:
            assert [o.etag for o in page.objects] == [f"{i:032x}" for i in range(5)]
    body = (f"<ListBucketResult>{weed.format(k='a', e='1', s=1)}{no_key.format(e='2', s=2)}"
            "</ListBucketResult>").encode()
    assert parse_page(body) == parse_page_tree(body)
    assert [o.key for o in parse_page(body).objects] == ["a", ""]


def test_pages_of_alike_blocks_are_read_a_block_at_a_time() -> None:
    """SeaweedFS's and S3's pages have every block alike: one match per block (`_blocks`); a
    page whose blocks differ is read a field at a time, and both read as ElementTree does."""
    from cloudexit.s3.lean import _blocks

    weed = ("<Contents><Key>{k}</Key><ETag>&#34;{e}&#34;</ETag><Size>{s}</Size>"
            "<StorageClass>STANDARD</StorageClass><LastModified>2026-12-03T13:57:43Z</LastModified>"
            "</Contents>")
    odd = "<Contents><Key>{k}</Key><ETag>&quot;{e}&quot;</ETag><Size>{s}</Size></Contents>"
    for shapes, alike in (([weed] * 4, True), ([weed, weed, odd, weed], False)):
        blocks = "".join(b.format(k=f"d/{i}%2B.dcm", e=f"{i:032x}", s=i) for i, b in enumerate(shapes))
        text = ('<ListBucketResult><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>'
                f"{blocks}</ListBucketResult>")
        assert (_blocks(text, True) is not None) == alike
        page = parse_page(text.encode())
        assert page == parse_page_tree(text.encode())
        assert [o.key for o in page.objects] == [f"d/{i}+.dcm" for i in range(4)]
        assert [o.etag for o in page.objects] == [f"{i:032x}" for i in range(4)]
