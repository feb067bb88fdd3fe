"""Component bytes in S3-compatible object storage: ``s3://bucket/prefix``.

Keys are content addresses, ``<prefix>/blobs/<aa>/<sha256>`` (``blobs/<aa>/<sha256>`` when
the prefix is empty), built only from validated hex digests. Policy:

- ``put`` is write-once: ``PutObject`` with ``If-None-Match: *``. A 412 means the key already
  holds bytes, which are the same content (the key is their sha256), so it is success. The
  request also carries ``x-amz-checksum-sha256`` = the digest, so the server refuses bytes that
  are not the content of their address (corrupted in transit) instead of storing them.
  One ``PutObject`` (no multipart): components are at most a few hundred MiB, under S3's
  5 GiB single-part limit.
- ``get`` returns the stored bytes as they are; the caller (``registry.loader``) verifies the
  sha256 on every read, so a corrupt object is refused there, never served.
- ``purge``/``delete`` removes EVERY version of the key (and its delete markers) when the bucket
  is or was versioned, so a forget leaves nothing behind; unversioned buckets list a single
  ``null`` version, deleted the same way. Listed keys are matched exactly, never by prefix.
- Every boto3/botocore failure becomes ``StorageError`` naming the endpoint, bucket, key and
  operation, and what to fix (credentials, bucket, endpoint, CA bundle).

Configuration follows KServe's conventions: boto3 itself reads ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (us-east-1 when unset)
and ``AWS_CA_BUNDLE``. Addressing is path-style (``endpoint/bucket/key``), which every
S3-compatible server accepts. Timeouts are short and retries few (``AWS_MAX_ATTEMPTS`` and
``AWS_RETRY_MODE`` override them), so a dead endpoint fails in seconds. A boto3 client is
thread-safe: one per store.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from registry.errors import StorageError
from registry.validate import DIGEST_PATTERN

T = TypeVar("T")

BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PREFIX_SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,255}")
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 10.0  # per socket read (a stalled server), not per object
MAX_ATTEMPTS = 3  # in all: the first try and two retries
CONFLICT_RETRIES = 3  # a concurrent conditional write of the same key (409) is retried
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                              "InvalidToken", "ExpiredToken", "403"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` → (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"{url!r} is not an S3 URL: use s3://bucket[/prefix]")
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError(f"{url!r}: an S3 URL is s3://bucket[/prefix], with no user, port, "
                         "query or fragment (the endpoint comes from AWS_ENDPOINT_URL)")
    bucket = parts.netloc
    if not BUCKET_PATTERN.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{url!r}: bucket {bucket!r} is invalid: use 3-63 characters from "
                         "[a-z0-9.-], starting and ending with a letter or digit")
    prefix = parts.path.strip("/")
    segments = prefix.split("/") if prefix else []
    for segment in segments:
        if not PREFIX_SEGMENT_PATTERN.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"{url!r}: prefix segment {segment!r} is invalid: use "
                             "[A-Za-z0-9_.-] between single slashes, no '.' or '..'")
    return bucket, prefix


def _retry_settings() -> dict[str, Any]:
    """Few, fast retries unless the operator set AWS_MAX_ATTEMPTS / AWS_RETRY_MODE."""
    if "AWS_MAX_ATTEMPTS" in os.environ or "AWS_RETRY_MODE" in os.environ:
        return {}
    return {"retries": {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS}}


def client_config() -> Config:
    """Path-style addressing, short timeouts, few retries."""
    return Config(s3={"addressing_style": "path"}, connect_timeout=CONNECT_TIMEOUT_S,
                  read_timeout=READ_TIMEOUT_S, **_retry_settings())


# ``ping`` answers readiness probes (a few seconds of timeout): one try, 1 s + 2 s at most,
# so a stalled endpoint is reported in time instead of after the data path's 3 × 10 s.
PROBE_CONFIG = Config(s3={"addressing_style": "path"}, connect_timeout=1.0, read_timeout=2.0,
                      retries={"mode": "standard", "total_max_attempts": 1})


def open_s3_blobs(url: str) -> S3BlobStore:
    """The store for ``s3://bucket[/prefix]``, configured from the ``AWS_*`` environment.

    Raises ValueError on a malformed URL or AWS_ENDPOINT_URL; opens no connection (``ping``
    checks the bucket).
    """
    bucket, prefix = parse_s3_url(url)
    try:
        session = boto3.session.Session()
        client = session.client("s3", config=client_config())
        probe = session.client("s3", config=PROBE_CONFIG)
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise ValueError(f"cannot configure the S3 client for {url}: {exc}; AWS_ENDPOINT_URL "
                         "must be http(s)://host[:port]") from exc
    except BotoCoreError as exc:
        raise StorageError(f"cannot configure the S3 client for {url}: {exc}; check "
                           "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION and AWS_CA_BUNDLE") from exc
    return S3BlobStore(client, bucket, prefix, probe_client=probe)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _sha256_header(digest: str) -> str:
    """The digest as S3's ``x-amz-checksum-sha256`` wants it: base64 of the raw 32 bytes."""
    return base64.b64encode(bytes.fromhex(digest)).decode("ascii")


class S3BlobStore:
    """A ``BlobStore`` over one bucket and key prefix of an S3-compatible object store."""

    kind = "s3"

    def __init__(self, client: Any, bucket: str, prefix: str = "", *,
                 probe_client: Any = None) -> None:
        self._client = client
        self._probe = probe_client if probe_client is not None else client  # for ``ping``
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._root = f"{self.prefix}/blobs/" if self.prefix else "blobs/"
        self.endpoint = str(client.meta.endpoint_url)

    def describe(self) -> str:
        """``s3://bucket/prefix`` (no endpoint or credentials)."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, digest: str) -> str:
        if not isinstance(digest, str) or not DIGEST_PATTERN.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return f"{self._root}{digest[:2]}/{digest}"

    # -- errors ------------------------------------------------------------------------------

    def _where(self, operation: str, key: str | None) -> str:
        target = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        return f"S3 {operation} of {target} at {self.endpoint}"

    def _missing_bucket(self) -> str:
        return (f"bucket {self.bucket} does not exist; create it or fix the bucket in "
                "TMC_BLOB_URL")

    def _storage_error(self, exc: Exception, operation: str, key: str | None,
                       client: Any = None) -> StorageError:
        """What failed where, and what to fix; ``client`` (default: the data client) is the
        one that made the call, whose read timeout a stall is reported with."""
        where = self._where(operation, key)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"{where} failed: no S3 credentials; set AWS_ACCESS_KEY_ID "
                                "and AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, SSLError):
            return StorageError(f"{where} failed: TLS error ({exc}); set AWS_CA_BUNDLE to the "
                                "CA certificate that signed the endpoint's certificate")
        if isinstance(exc, ReadTimeoutError):
            timeout = (client or self._client).meta.config.read_timeout
            return StorageError(f"{where} failed: the endpoint accepted the connection but did "
                                f"not answer within {timeout} s, on every try; check that the "
                                "object store is healthy")
        if isinstance(exc, ConnectionError):
            return StorageError(f"{where} failed: the endpoint is unreachable ({exc}); check "
                                "AWS_ENDPOINT_URL and that the object store is running")
        if isinstance(exc, ClientError):
            return StorageError(f"{where} failed: {self._client_error_reason(exc)}")
        return StorageError(f"{where} failed: {exc}")

    def _client_error_reason(self, exc: ClientError) -> str:
        code = _error_code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        if code in CREDENTIAL_CODES:
            return (f"the credentials were refused ({code}: {message}); check "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and that identity's permissions "
                    f"on bucket {self.bucket}")
        if code in MISSING_BUCKET_CODES:
            return self._missing_bucket()
        if code == "BadDigest":
            return ("the server refused the bytes: they do not match their sha256 "
                    "(corrupted in transit); retry")
        return f"{code or 'error'}: {message or exc}"

    def _call(self, operation: str, key: str | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (BotoCoreError, ClientError) as exc:
            raise self._storage_error(exc, operation, key) from exc

    def _unless_missing(self, operation: str, key: str | None, fn: Callable[[], T],
                        client: Any = None) -> T | None:
        """``fn()``, or None when S3 answers that the key (HEAD of a bucket: the bucket) is
        not there; any other failure is a StorageError, as in ``_call``."""
        try:
            return fn()
        except ClientError as exc:
            if _error_code(exc) in MISSING_KEY_CODES:
                return None
            raise self._storage_error(exc, operation, key, client) from exc
        except BotoCoreError as exc:
            raise self._storage_error(exc, operation, key, client) from exc

    # -- BlobStore ---------------------------------------------------------------------------

    def put(self, digest: str, data: bytes) -> None:
        """Write once; bytes already at the key are the same content, so a 412 is success."""
        key = self.key(digest)
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                        IfNoneMatch="*", ChecksumSHA256=_sha256_header(digest))
                return
            except ClientError as exc:
                code = _error_code(exc)
                if code in ("PreconditionFailed", "412"):
                    return
                if code in ("ConditionalRequestConflict", "409") and attempt < CONFLICT_RETRIES:
                    time.sleep(0.1 * (attempt + 1))  # another writer of the same key
                    continue
                raise self._storage_error(exc, "put", key) from exc
            except BotoCoreError as exc:
                raise self._storage_error(exc, "put", key) from exc

    def get(self, digest: str) -> bytes | None:
        """The stored bytes as they are (the loader verifies them), or None if absent."""
        key = self.key(digest)

        def read() -> bytes:  # the body is read inside: a stalled read is a StorageError too
            data: bytes = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            return data  # no copy: a blob can be 100s of MiB

        return self._unless_missing("get", key, read)

    def exists(self, digest: str) -> bool:
        key = self.key(digest)
        return self._unless_missing("head", key, lambda: self._client.head_object(
            Bucket=self.bucket, Key=key)) is not None

    def delete(self, digest: str) -> None:
        self.purge(digest)

    def purge(self, digest: str) -> int:
        """Delete every version and delete marker of the key; how many entries it removed.

        Lists again after deleting, so a version that landed meanwhile is removed too; fails
        with StorageError if versions are still left after a few rounds.
        """
        key = self.key(digest)
        removed = 0
        for _ in range(3):
            versions = self._versions(key)
            if not versions:
                return removed
            for version_id in versions:
                self._delete_version(key, version_id)
            removed += len(versions)
        raise StorageError(f"{self._where('delete', key)}: versions keep appearing; another "
                           "writer is putting this key")

    def _delete_version(self, key: str, version_id: str) -> None:
        self._call("delete-version", key, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=key, VersionId=version_id))

    def _versions(self, key: str) -> list[str]:
        """The version ids of exactly ``key`` (objects and delete markers), every page."""
        pages = self._client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=key)

        def collect() -> list[str]:
            found: list[str] = []
            for page in pages:
                for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    if entry.get("Key") == key:
                        found.append(str(entry.get("VersionId") or "null"))
            return found

        return self._call("list-versions", key, collect)

    def digests(self) -> Iterator[str]:
        """Every stored digest in its right shard folder, in key order."""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._root)
        keys = self._call("list", self._root, lambda: [
            str(obj["Key"]) for page in pages for obj in page.get("Contents", [])])
        for key in keys:
            shard, _, digest = key[len(self._root):].partition("/")
            if DIGEST_PATTERN.fullmatch(digest) and digest[:2] == shard:
                yield digest

    def discard_partial(self) -> None:
        """Abort incomplete multipart uploads under our keys (``put`` never starts one; another
        tool might have), so their parts stop taking space."""
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self._root)
        uploads = self._call("list-uploads", self._root, lambda: [
            (str(u["Key"]), str(u["UploadId"])) for page in pages
            for u in page.get("Uploads", [])])
        for key, upload_id in uploads:
            self._abort_upload(key, upload_id)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        self._call("abort-upload", key, lambda: self._client.abort_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id))

    def ping(self) -> None:
        """Raise StorageError unless the bucket answers with these credentials."""
        answer = self._unless_missing("head", None, lambda: self._probe.head_bucket(
            Bucket=self.bucket), self._probe)
        if answer is None:  # HEAD answers a bare 404 (NoSuchBucket is mapped like any call)
            raise StorageError(f"{self._where('head', None)} failed: {self._missing_bucket()}")

    def close(self) -> None:
        self._client.close()
        if self._probe is not self._client:
            self._probe.close()
