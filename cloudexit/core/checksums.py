"""Everything an object's bytes must match, computed in one pass.

`ObjectHasher` is fed an object's bytes in order (from the network, or read back from the temp
file for large objects) and computes, in C via hashlib/zlib with large buffers:

* SHA-256 of the whole object (recorded in the state DB; `verify --deep` re-checks it),
* MD5: of the whole object when the ETag is a plain MD5, or of each part when the object was
  uploaded in parts, so the multipart ETag (MD5 of the part MD5s + "-N") can be recomputed,
* the provider checksums the object carries: `x-amz-checksum-crc32/crc32c/crc64nvme/sha1/sha256`
  (full-object or composite "-N"), and Alibaba OSS / Tencent COS / Huawei OBS `crc64ecma`.

`expectations()` turns the ETag and the provider headers into the list of checks that apply;
`worth_computing()` keeps what verification needs (a provider CRC only when no MD5-based ETag
can be checked; SHA-256 always); `ObjectHasher.verify()` says which passed and which failed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-(\d+)$")
_MASK64 = 0xFFFFFFFFFFFFFFFF


# -- CRC implementations: the fastest available, pure Python as the last resort -------------------
def _table_crc(poly_reflected: int, width: int) -> Callable[[bytes, int], int]:
    """A reflected table CRC in pure Python (slow; used only when no C implementation exists)."""
    mask = (1 << width) - 1
    table = []
    for byte in range(256):
        entry = byte
        for _ in range(8):
            entry = (entry >> 1) ^ poly_reflected if entry & 1 else entry >> 1
        table.append(entry)

    def crc(data: Any, value: int = 0) -> int:
        value ^= mask
        for b in bytes(data):
            value = table[(value ^ b) & 0xFF] ^ (value >> 8)
        return value ^ mask

    return crc


def _crc_function(name: str) -> tuple[Callable[[Any, int], int], str]:
    """(crc(data, previous) -> int, implementation name) for crc32c, crc64nvme, crc64ecma."""
    spec = {  # crcmod polynomial (with the top bit), reflected polynomial for the table fallback
        "crc32c": (0x11EDC6F41, 0x82F63B78, 32),
        "crc64nvme": (0x1AD93D23594C93659, 0x9A6C9329AC4BC9B5, 64),
        "crc64ecma": (0x142F0E1EBA9EA3693, 0xC96C5795D7870F42, 64),  # CRC-64/XZ, as OSS and COS
    }[name]
    if name == "crc32c":
        try:
            import crc32c as _crc32c  # type: ignore[import-not-found]

            return (lambda data, value=0: _crc32c.crc32c(data, value)), "crc32c"
        except ImportError:
            pass
    try:
        import crcmod  # crcmod-plus, a dependency; typed (py.typed)

        fn = crcmod.mkCrcFun(spec[0], initCrc=0, rev=True, xorOut=(1 << spec[2]) - 1)
        return (lambda data, value=0: fn(bytes(data) if isinstance(data, memoryview) else data,
                                         value)), "crcmod"
    except ImportError:
        return _table_crc(spec[1], spec[2]), "python"


class _Crc:
    """A hashlib-like wrapper (update/digest) over a CRC function."""

    def __init__(self, fn: Callable[[Any, int], int], width: int) -> None:
        self.fn, self.width, self.value = fn, width, 0

    def update(self, data: Any) -> None:
        self.value = self.fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self.width // 8, "big")


_CRC_CACHE: dict[str, tuple[Callable[[Any, int], int], str]] = {}


def _new(algorithm: str) -> Any:
    if algorithm in ("sha1", "sha256", "md5"):
        return hashlib.new(algorithm)
    if algorithm == "crc32":
        return _Crc(zlib.crc32, 32)
    if algorithm not in _CRC_CACHE:
        _CRC_CACHE[algorithm] = _crc_function(algorithm)
    return _Crc(_CRC_CACHE[algorithm][0], 32 if algorithm == "crc32c" else 64)


def crc_implementation(algorithm: str) -> str:
    """Which implementation computes `algorithm` here (for docs and the audit)."""
    if algorithm in ("crc32", "sha1", "sha256", "md5"):
        return "zlib" if algorithm == "crc32" else "hashlib"
    if algorithm not in _CRC_CACHE:
        _CRC_CACHE[algorithm] = _crc_function(algorithm)
    return _CRC_CACHE[algorithm][1]


# -- what to check ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expectation:
    """One check: `name` as recorded, `algorithm`, expected value, composite over parts or not."""

    name: str  # e.g. "md5", "etag-multipart", "x-amz-checksum-crc32c", "x-oss-hash-crc64ecma"
    algorithm: str  # md5 | sha1 | sha256 | crc32 | crc32c | crc64nvme | crc64ecma
    expected: str  # normalised: hex for md5, base64 for x-amz-checksum-*, decimal for crc64ecma
    per_part: bool = False  # composite: checksum of the part checksums (needs part boundaries)
    parts: int = 0  # number of parts, for composite values


def _amz_algorithm(header: str) -> str:
    return header.rsplit("-", 1)[1]


def expectations(etag: str | None, headers: dict[str, str], sse: str | None = None) -> list[Expectation]:
    """The checks an object's ETag and provider checksum headers allow.

    `sse` is the server-side-encryption header: with SSE-KMS or SSE-C the ETag is not an MD5 of
    the content, so it is not checked (provider checksums still are).
    """
    found: list[Expectation] = []
    etag = (etag or "").strip('"').lower()
    if sse not in ("aws:kms", "aws:kms:dsse", "customer"):
        multipart = MULTIPART_ETAG.match(etag)
        if multipart:
            found.append(Expectation("etag-multipart", "md5", etag, per_part=True,
                                     parts=int(multipart.group(2))))
        elif MD5_HEX.match(etag):
            found.append(Expectation("md5", "md5", etag))
    lower = {k.lower(): v.strip() for k, v in headers.items() if v}
    for header in ("x-amz-checksum-crc32", "x-amz-checksum-crc32c", "x-amz-checksum-crc64nvme",
                   "x-amz-checksum-sha1", "x-amz-checksum-sha256"):
        value = lower.get(header)
        if not value:
            continue
        if "-" in value:  # composite: base64(checksum of part checksums)-N
            b64, _, n = value.rpartition("-")
            if n.isdigit():
                found.append(Expectation(header, _amz_algorithm(header), b64, per_part=True,
                                         parts=int(n)))
            continue
        found.append(Expectation(header, _amz_algorithm(header), value))
    for header in ("x-oss-hash-crc64ecma", "x-cos-hash-crc64ecma", "x-obs-hash-crc64ecma"):
        value = lower.get(header)
        if value and value.isdigit():
            found.append(Expectation(header, "crc64ecma", value))
    return found


def worth_computing(checks: list[Expectation]) -> tuple[list[Expectation], list[Expectation]]:
    """(checks to compute, checks left out) under the rule "hash only what verification needs".

    When the ETag is an MD5 of the content (single-part) or of its parts (multipart), checking it
    proves the bytes are the ones S3 stored: a provider CRC32/CRC32C/CRC64/SHA-1 of the same
    bytes adds no assurance, and costs a pass over every byte. Those are computed only when no
    MD5-based ETag applies (SSE-KMS, SSE-C, an ETag of unknown form). A whole-object
    `x-amz-checksum-sha256` is always kept: SHA-256 is computed anyway (it is the archive's
    recorded fixity for `verify --deep` and the audit).
    """
    if not any(c.algorithm == "md5" for c in checks):
        return list(checks), []
    keep = [c for c in checks if c.algorithm == "md5" or (c.algorithm == "sha256" and not c.per_part)]
    return keep, [c for c in checks if c not in keep]


def part_bounds(size: int, part_sizes: list[int] | None = None, part_size: int | None = None) -> list[int]:
    """Start offsets of each part (plus `size` at the end) from explicit sizes or one part size."""
    if part_sizes:
        bounds = [0]
        for n in part_sizes:
            bounds.append(bounds[-1] + n)
        return bounds
    if not part_size:
        return [0, size]
    bounds = list(range(0, max(size, 1), part_size)) + [size]
    return bounds


# -- hashing ----------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (name, expected, got)

    @property
    def ok(self) -> bool:
        return not self.failed


class ObjectHasher:
    """Feed an object's bytes in order; get SHA-256, MD5 and every expected checksum."""

    def __init__(self, size: int, checks: list[Expectation], bounds: list[int] | None = None) -> None:
        self.size = size
        self.checks = checks
        self.offset = 0
        self.sha256 = hashlib.sha256()
        whole = {c.algorithm for c in checks if not c.per_part} - {"sha256"}
        self.whole = {alg: _new(alg) for alg in whole}
        self.per_part_algs = sorted({c.algorithm for c in checks if c.per_part})
        self.bounds = bounds or [0, size]
        self.part_index = 0
        self.part_digests: dict[str, list[bytes]] = {alg: [] for alg in self.per_part_algs}
        self.part_hashers = {alg: _new(alg) for alg in self.per_part_algs}
        # The fast path of the common case: whole-object md5 and sha256 only, no parts.
        self._simple = not self.per_part_algs
        self._parts_closed = False
        self._updates = [self.sha256.update] + [h.update for h in self.whole.values()]

    def update(self, data: Any) -> None:
        n = len(data)
        if not n:
            return
        if self._simple:
            for update in self._updates:
                update(data)
            self.offset += n
            return
        for update in self._updates:
            update(data)
        view = memoryview(data)
        last_index = len(self.bounds) - 2
        while len(view):
            last = self.part_index >= last_index
            take = len(view) if last else min(len(view), self.bounds[self.part_index + 1] - self.offset)
            piece = view[:take]
            for alg in self.per_part_algs:
                self.part_hashers[alg].update(piece)
            self.offset += take
            view = view[take:]
            if not last and self.offset >= self.bounds[self.part_index + 1]:
                self._close_part()

    def _close_part(self) -> None:
        for alg in self.per_part_algs:
            self.part_digests[alg].append(self.part_hashers[alg].digest())
            self.part_hashers[alg] = _new(alg)
        self.part_index += 1

    def _finish_parts(self) -> None:
        if self.per_part_algs and not self._parts_closed:
            self._parts_closed = True
            for alg in self.per_part_algs:
                self.part_digests[alg].append(self.part_hashers[alg].digest())

    def sha256_hex(self) -> str:
        return self.sha256.hexdigest()

    def md5_hex(self) -> str | None:
        h = self.whole.get("md5")
        return h.hexdigest() if h is not None else None

    def verify(self) -> CheckResult:
        """Compare against every expectation (call after the last byte)."""
        self._finish_parts()
        result = CheckResult()
        if self.offset != self.size:
            result.failed.append(("size", str(self.size), str(self.offset)))
        else:
            result.passed.append("size")
        for check in self.checks:
            got = self._value(check)
            if got is None:
                continue
            if got == check.expected:
                result.passed.append(check.name)
            else:
                result.failed.append((check.name, check.expected, got))
        return result

    def _value(self, check: Expectation) -> str | None:
        if check.per_part:
            digests = self.part_digests.get(check.algorithm, [])
            if len(digests) != check.parts:
                return f"{len(digests)} parts"
            outer = _new(check.algorithm)
            outer.update(b"".join(digests))
            if check.name == "etag-multipart":
                return f"{outer.digest().hex()}-{len(digests)}"
            return base64.b64encode(outer.digest()).decode()
        h = self.sha256 if check.algorithm == "sha256" else self.whole[check.algorithm]
        digest = h.digest()
        if check.algorithm == "md5" and check.name in ("md5",):
            return digest.hex()
        if check.algorithm == "crc64ecma":
            return str(int.from_bytes(digest, "big"))
        return base64.b64encode(digest).decode()
