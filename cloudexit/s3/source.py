"""The object store: listing, ranged GET and HEAD over any S3 API (boto3).

All botocore exceptions are translated here into the errors of `cloudexit.core.errors`
(classified by `cloudexit.s3.errors`), with a message that names the endpoint and profile, so
the rest of the code never sees botocore.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlparse

from cloudexit.core.config import SourceConfig
from cloudexit.core.errors import (
    BucketNotFound,
    CredentialsError,
    CustomerKeyRequired,
    EndpointUnreachable,
    ObjectArchived,
    SourceError,
    TLSError,
    UsageError,
)
from cloudexit.s3.errors import ErrorKind, Failure, classify

# Storage classes whose objects must be restored before a GET (S3, OSS, COS, OBS names).
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE", "ARCHIVE", "COLDARCHIVE", "DEEPCOLDARCHIVE",
                             "COLD", "DEEP_COLD"})

# Provider checksum headers worth keeping: they let migrate verify without trusting the ETag.
CHECKSUM_HEADERS = (
    "x-amz-checksum-crc32", "x-amz-checksum-crc32c", "x-amz-checksum-crc64nvme",
    "x-amz-checksum-sha1", "x-amz-checksum-sha256", "x-amz-checksum-type",
    "x-oss-hash-crc64ecma", "x-cos-hash-crc64ecma", "x-obs-hash-crc64ecma",
)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UsageError(f"not an S3 URL: {url!r}", hint="write it as s3://BUCKET or s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.lstrip("/")


class ListedObject(NamedTuple):  # a tuple: a listing page makes a thousand (2x cheaper than a dataclass)
    key: str
    size: int
    etag: str
    last_modified: str
    storage_class: str


@dataclass(frozen=True)
class ListPage:
    objects: list[ListedObject]
    prefixes: list[str]
    truncated: bool
    next_token: str | None


@dataclass(frozen=True)
class RangeRead:
    data: bytes
    size: int  # the whole object's size, from Content-Range
    etag: str
    checksums: dict[str, str]


class ObjectGone(SourceError):
    """The object was deleted since it was listed."""


class ObjectChanged(SourceError):
    """The object's ETag no longer matches the one recorded (HTTP 412)."""


def check_endpoint(url: str | None) -> None:
    """Refuse an endpoint that is no http(s) URL with a host, before botocore does it with a
    ValueError (or takes it for a missing credential)."""
    if url is None:
        return
    try:
        parts = urlparse(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or IPv6 literal
        ok = False
    if not ok:
        raise UsageError(f"--endpoint-url {url!r} is not an http(s) URL of a host",
                         hint="write it as https://HOST or https://HOST:PORT "
                              "(e.g. https://s3.eu-central-1.amazonaws.com, http://127.0.0.1:8333)")


class Source:
    """One bucket (and prefix) on one endpoint."""

    def __init__(self, url: str, config: SourceConfig | None = None, credentials: Any = None) -> None:
        """`credentials`: `client.Credentials` the lean path signs with instead of the boto3
        chain's (a cluster worker given the coordinator's, `--cluster-credentials forward`)."""
        self.url = url
        self.credentials = credentials
        self.bucket, self.prefix = parse_s3_url(url)
        self.config = config or SourceConfig()
        check_endpoint(self.config.endpoint_url)
        self._local = threading.local()
        self._session: Any = None
        self._plain: Any = False  # s3/credentials.py's answer, once: Plain, or None for botocore

    # -- plumbing -------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """Endpoint and profile, for messages."""
        endpoint = self.config.endpoint_url or "the default AWS endpoint"
        profile = self.config.profile or "default credential chain"
        return f"{endpoint} (profile: {profile})"

    def client(self) -> Any:
        """A boto3 client per thread: clients are thread-safe, but one each avoids pool contention."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._new_client()
            self._local.client = client
        return client

    def plain(self) -> Any:
        """Static credentials, region and CA bundle when they are plainly given (environment, or
        ~/.aws/credentials), resolved as botocore would without importing it (start-up); None
        when only botocore's chain can tell (`s3/credentials.py` decides which)."""
        if self._plain is False:
            from cloudexit.s3.credentials import plain

            self._plain = plain(self.config.profile)
        return self._plain

    def session(self) -> Any:
        """The boto3 session (profile, region, the credential chain), made once. The lean path
        needs only this on a given endpoint: a client costs ~0.15 s of CPU more to create."""
        if self._session is None:
            import boto3
            from botocore.exceptions import ConfigParseError, ProfileNotFound

            try:
                self._session = boto3.Session(profile_name=self.config.profile,
                                              region_name=self.config.region)
            except ProfileNotFound as exc:
                raise CredentialsError(f"AWS profile not found: {self.config.profile}",
                                       hint="check ~/.aws/config or drop --profile") from exc
            except ConfigParseError as exc:  # ~/.aws/credentials or config is no INI file
                raise CredentialsError(f"{exc} (the AWS settings file is not in INI form)",
                                       hint="give each profile a [NAME] line and each setting a "
                                            "`key = value` line, or point AWS_SHARED_CREDENTIALS_FILE/"
                                            "AWS_CONFIG_FILE at a good file") from exc
            # Timestamps stay ISO text: botocore's dateutil parsing of every LastModified was
            # the largest cost of a listing page, and we store the text anyway.
            factory = self._session._session.get_component("response_parser_factory")
            factory.set_parser_defaults(timestamp_parser=str)
        return self._session

    def _new_client(self) -> Any:
        from botocore.config import Config

        session = self.session()
        cfg = Config(
            retries={"total_max_attempts": self.config.max_attempts, "mode": "standard"},
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
            max_pool_connections=self.config.max_pool_connections,
            s3={"addressing_style": "path"} if self.config.endpoint_url else {},
        )
        return session.client("s3", endpoint_url=self.config.endpoint_url,
                              region_name=self.config.region or None, config=cfg)

    def translate(self, exc: Exception, what: str) -> Exception:
        """A botocore exception as a cloudexit error with an actionable message."""
        failure = classify(exc, what)
        return exc if failure is None else self.error(failure, what)

    def error(self, failure: Failure, what: str) -> Exception:
        """The cloudexit error for a failure of a call about `what`, on any path to the store
        (boto3 or lean): one message per kind."""
        kind = failure.kind
        if kind == ErrorKind.GONE:
            if failure.code == "NoSuchBucket" or (failure.code == "404" and what.startswith("bucket")):
                return self.missing_bucket()
            return ObjectGone(f"{what}: not found")
        if kind == ErrorKind.CHANGED:
            return ObjectChanged(f"{what}: changed since it was listed")
        if kind == ErrorKind.UNREACHABLE:
            return self.unreachable(failure.detail)
        if kind == ErrorKind.TLS:
            return self.untrusted(failure.detail)
        if kind == ErrorKind.NO_CREDENTIALS:
            return self.no_credentials()
        if kind == ErrorKind.CREDENTIALS:
            return self.refused(what, failure.code)
        if kind == ErrorKind.DENIED:
            return self.denied(what)
        if kind == ErrorKind.ARCHIVED:
            return ObjectArchived(f"{what}: in an archive storage class, needs a restore")
        if kind == ErrorKind.SSE_C:
            return CustomerKeyRequired(f"{what}: encrypted with a customer-provided key (SSE-C); "
                                       "the store serves it only with that key")
        return SourceError(failure.detail)

    # The messages of the conditions every path to the store meets (boto3 and the lean one).
    def unreachable(self, detail: str) -> EndpointUnreachable:
        return EndpointUnreachable(
            f"cannot reach {self.where} after {self.config.max_attempts} attempts: {detail}",
            hint="check the network and --endpoint-url; the run can be resumed by running it again")

    def untrusted(self, detail: str) -> TLSError:
        return TLSError(
            f"TLS with {self.where} failed: {detail}",
            hint="if the endpoint uses a private CA, or the network inspects TLS, set AWS_CA_BUNDLE "
                 "to that CA's PEM file (as for the aws CLI); if the port does not speak TLS, "
                 "check http/https in --endpoint-url. Verification stays on: these are patient images")

    def refused(self, what: str, code: str | None) -> CredentialsError:
        return CredentialsError(f"{what}: the credentials were refused by {self.where} ({code})",
                                hint="check the access key and secret (or --profile) for this endpoint")

    def no_credentials(self) -> CredentialsError:
        return CredentialsError(f"no usable credentials for {self.where}",
                                hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or pass --profile")

    def missing_bucket(self) -> BucketNotFound:
        return BucketNotFound(f"bucket {self.bucket!r} does not exist at {self.where}",
                              hint="check the bucket name, --endpoint-url and --region")

    def denied(self, what: str) -> CredentialsError:
        return CredentialsError(f"{what}: access denied by {self.where}",
                                hint="these credentials lack s3:ListBucket/s3:GetObject on the bucket")

    def frozen_credentials(self) -> Any:
        """The current credentials (refreshed by botocore when temporary), for lean requests."""
        from cloudexit.s3.client import Credentials

        if self.credentials is not None:  # forwarded by a cluster coordinator
            return self.credentials
        plain = self.plain()
        if plain is not None:
            return plain.credentials
        creds = self.session().get_credentials()
        if creds is None:
            raise self.no_credentials()
        frozen = creds.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def lean_endpoint(self) -> tuple[Any, Any]:
        """(Endpoint, Credentials) for `transfer.S3Reader`, resolved as the boto3 client does:
        endpoint URL, region (with the bucket's real region on AWS), path style, proxies and TLS
        verification (always on, with the CA bundle boto3 uses: `ca_bundle`)."""
        import urllib.request

        from cloudexit.s3.client import Endpoint

        given = self.config.endpoint_url
        if given and "://" in given:
            # A given endpoint is used as it is: no client needed to resolve it (start-up).
            plain = self.plain()
            region = self.config.region or (plain.region if plain else self.session().region_name)
            url, region = given, region or "us-east-1"
        else:
            client = self.client()
            url, region = client.meta.endpoint_url, client.meta.region_name or "us-east-1"
        scheme, host = url.split("://", 1)[0], urlparse(url).hostname or ""
        aws = host.endswith(".amazonaws.com") and not self.config.endpoint_url
        if aws and self.config.region is None:
            # The bucket's own region (boto3 follows S3's redirects; a signed request must not).
            found = self.bucket_region()
            if found and found != region:
                region, url = found, f"https://s3.{found}.amazonaws.com"
        proxies = urllib.request.getproxies()
        proxy = proxies.get(scheme) if not urllib.request.proxy_bypass(host) else None
        path_style = not aws or "." in self.bucket or self.bucket.lower() != self.bucket
        # Plain HTTP has no certificate to check: botocore's CA lookup (urllib3) is not loaded.
        verify = self.ca_bundle() if scheme == "https" else True
        endpoint = Endpoint.from_url(url, self.bucket, region, path_style, verify=verify, proxy=proxy,
                                     connect_timeout=self.config.connect_timeout,
                                     read_timeout=self.config.read_timeout)
        return endpoint, self.frozen_credentials()

    def ca_bundle(self) -> str:
        """The CA bundle boto3 verifies this endpoint with, for our own TLS connections too:
        AWS_CA_BUNDLE or the profile's `ca_bundle`, else botocore's default (certifi's), so
        the lean path trusts exactly what boto3 trusts."""
        plain = self.plain()
        if plain is not None:
            from cloudexit.s3.credentials import default_ca_bundle

            return plain.ca_bundle or default_ca_bundle()
        from botocore.httpsession import get_cert_path

        configured = self.session()._session.get_config_variable("ca_bundle")
        return configured or get_cert_path(True)

    def bucket_region(self) -> str | None:
        """The region S3 says the bucket is in (None when it does not say)."""
        try:
            resp = self.client().head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - the answer's headers say it even on 301/403
            resp = getattr(exc, "response", {}) or {}
        headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return headers.get("x-amz-bucket-region")

    # -- operations -----------------------------------------------------------------------
    def check(self) -> None:
        """Fail early and clearly if the bucket cannot be listed with these credentials.

        One one-key page on the lean path (`LeanS3.check`): on a given endpoint no boto3 client
        is created for it (~0.15 s of CPU at every start of a command)."""
        from cloudexit.s3.lean import LeanS3

        lean = LeanS3(self)
        try:
            lean.check()
        finally:
            lean.close()

    def list_page(self, prefix: str, start_after: str | None = None, token: str | None = None,
                  delimiter: str | None = None, max_keys: int = 1000) -> ListPage:
        """One ListObjectsV2 page."""
        args: dict[str, Any] = {_BOTO_NAMES[k]: v for k, v in
                                list_query(prefix, start_after, token, delimiter, max_keys).items()}
        args.update(Bucket=self.bucket, MaxKeys=max_keys)
        try:
            resp = self.client().list_objects_v2(**args)
        except Exception as exc:
            raise self.translate(exc, f"bucket {self.bucket}: listing {prefix!r}") from exc
        objects = [
            ListedObject(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'),
                         iso(o["LastModified"]), o.get("StorageClass") or "STANDARD")
            for o in resp.get("Contents", ())
        ]
        prefixes = [p["Prefix"] for p in resp.get("CommonPrefixes", ())]
        return ListPage(objects, prefixes, bool(resp.get("IsTruncated")),
                        resp.get("NextContinuationToken"))

    def read_range(self, key: str, start: int, end: int, etag: str | None = None) -> RangeRead:
        """Bytes [start, end] of an object (inclusive, as HTTP Range), checked against `etag`."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{end}"}
        if etag:
            args["IfMatch"] = f'"{etag}"'
        try:
            resp = self.client().get_object(**args)
            data = resp["Body"].read()
        except Exception as exc:
            raise self.translate(exc, f"object {key!r}") from exc
        headers = resp["ResponseMetadata"]["HTTPHeaders"]
        total = total_size(headers.get("content-range"), len(data))
        checksums = {h: headers[h] for h in CHECKSUM_HEADERS if h in headers}
        return RangeRead(data, total, resp.get("ETag", "").strip('"'), checksums)

    def head(self, key: str) -> dict[str, Any]:
        try:
            return self.client().head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self.translate(exc, f"object {key!r}") from exc


_BOTO_NAMES = {"max-keys": "MaxKeys", "prefix": "Prefix", "delimiter": "Delimiter",
               "continuation-token": "ContinuationToken", "start-after": "StartAfter"}


def list_query(prefix: str, start_after: str | None, token: str | None, delimiter: str | None,
               max_keys: int) -> dict[str, str]:
    """ListObjectsV2 parameters by their query names (a token wins over StartAfter)."""
    query = {"max-keys": str(max_keys)}
    if prefix:
        query["prefix"] = prefix
    if token:
        query["continuation-token"] = token
    elif start_after:
        query["start-after"] = start_after
    if delimiter:
        query["delimiter"] = delimiter
    return query


def iso(value: Any) -> str:
    """A timestamp from botocore (ISO text here, a datetime elsewhere) as ISO text."""
    return value if isinstance(value, str) else value.isoformat()


def total_size(content_range: str | None, fallback: int) -> int:
    # "bytes 0-65535/1048576"
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return fallback


def iter_pages(source: Source, prefix: str, start_after: str | None = None) -> Iterator[ListPage]:
    """Every page of a flat listing from `start_after` on."""
    token = None
    while True:
        page = source.list_page(prefix, start_after=start_after, token=token)
        yield page
        if not page.truncated or not page.next_token:
            return
        token = page.next_token
