"""The BlobStore contract over every store (files, Redis, S3), then what only S3 must do.

The S3 store runs against a real SeaweedFS (``weed mini``, tests/conftest_s3.py) and is
checked through a raw boto3 client that bypasses it: every version of every key is listed and
read, so a forget that leaves a version, a delete marker or the bytes anywhere fails here.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from botocore.config import Config

from loopback.ports import free_port
from registry import Registry
from registry.errors import StorageError
from registry.file_blobs import FileBlobStore
from registry.ports import BlobStore
from registry.redis_backend import RedisBlobStore
from registry.redis_tx import Keys
from registry.s3_blobs import S3BlobStore, client_config, open_s3_blobs, parse_s3_url
from registry.sqlite_index import SqliteIndex
from tests.conftest_s3 import S3Server
from tests.registry.support import FP, MAX_BYTES, REGION, make_component

BAD_DIGESTS = ["", "abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65, "../" + "0" * 61,
               "0" * 32 + "/" + "0" * 31]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- stores ------------------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, with the AWS_* environment pointing at it for this test."""
    s3_server.apply_env(monkeypatch)
    return s3_server


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    """One plain bucket for the module: SeaweedFS gives each bucket volumes of its own."""
    return s3_server.make_bucket()


@pytest.fixture(scope="module")
def versioned_bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket(versioned=True)


def fresh_url(bucket: str) -> str:
    """``s3://bucket/<a prefix no other test uses>``."""
    return f"s3://{bucket}/tmc/{secrets.token_hex(6)}"


@pytest.fixture
def s3_store(s3_env: S3Server, bucket: str) -> Iterator[S3BlobStore]:
    """A store on a fresh prefix, opened the way the service opens it (URL + environment)."""
    store = open_s3_blobs(fresh_url(bucket))
    yield store
    store.close()


def _redis_store(url: str) -> Iterator[RedisBlobStore]:
    client = redis.Redis.from_url(url)
    prefix = f"tmc-test-{secrets.token_hex(4)}:"
    try:
        yield RedisBlobStore(client, Keys(prefix))
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("s3", marks=pytest.mark.s3)])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "file":
        yield FileBlobStore(tmp_path / "blobs")
    elif request.param == "redis":
        yield from _redis_store(request.getfixturevalue("redis_server"))
    else:
        yield request.getfixturevalue("s3_store")


# -- the contract, over every store ------------------------------------------------------------


def test_round_trip_of_real_component_bytes(blob_store: BlobStore, seed: int) -> None:
    data = make_component(seed).data
    blob_store.put(sha(data), data)
    assert blob_store.get(sha(data)) == data
    assert blob_store.exists(sha(data))


def test_put_is_idempotent(blob_store: BlobStore, seed: int) -> None:
    data = make_component(seed).data
    blob_store.put(sha(data), data)
    blob_store.put(sha(data), data)
    assert blob_store.get(sha(data)) == data
    assert list(blob_store.digests()) == [sha(data)]


def test_missing_digest_reads_as_none(blob_store: BlobStore) -> None:
    assert blob_store.get("0" * 64) is None
    assert not blob_store.exists("0" * 64)
    blob_store.delete("0" * 64)  # deleting what is not there is fine


def test_delete_removes_the_bytes(blob_store: BlobStore, seed: int) -> None:
    kept, gone = make_component(seed).data, make_component(seed + 1).data
    blob_store.put(sha(kept), kept)
    blob_store.put(sha(gone), gone)
    blob_store.delete(sha(gone))
    assert blob_store.get(sha(gone)) is None
    assert not blob_store.exists(sha(gone))
    assert list(blob_store.digests()) == [sha(kept)]
    assert blob_store.get(sha(kept)) == kept


def test_digests_lists_exactly_what_was_put(blob_store: BlobStore, seed: int) -> None:
    blobs = [make_component(seed + i).data for i in range(5)]
    for data in blobs:
        blob_store.put(sha(data), data)
    assert sorted(blob_store.digests()) == sorted(sha(d) for d in blobs)


def test_large_blob_round_trip(blob_store: BlobStore) -> None:
    data = os.urandom(9 * 1024 * 1024 + 7)  # several of weed's 4 MiB chunks, odd length
    blob_store.put(sha(data), data)
    assert blob_store.get(sha(data)) == data


def test_concurrent_puts_of_the_same_bytes_all_succeed(blob_store: BlobStore) -> None:
    data = os.urandom(1024 * 1024)
    errors: list[Exception] = []

    def put() -> None:
        try:
            blob_store.put(sha(data), data)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert blob_store.get(sha(data)) == data
    assert list(blob_store.digests()) == [sha(data)]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_invalid_digest_is_refused_before_any_io(blob_store: BlobStore, bad: str) -> None:
    for call in (lambda: blob_store.put(bad, b"x"), lambda: blob_store.get(bad),
                 lambda: blob_store.delete(bad), lambda: blob_store.exists(bad)):
        with pytest.raises(ValueError, match="not a sha256 hex digest"):
            call()
    assert list(blob_store.digests()) == []


def test_discard_partial_keeps_whole_blobs(blob_store: BlobStore, seed: int) -> None:
    data = make_component(seed).data
    blob_store.put(sha(data), data)
    blob_store.discard_partial()
    assert blob_store.get(sha(data)) == data


# -- S3 only -----------------------------------------------------------------------------------


def _versions_of(raw: Any, bucket: str, key: str) -> tuple[list[str], list[str]]:
    """(object version ids, delete marker ids) of exactly ``key``, every page."""
    versions: list[str] = []
    markers: list[str] = []
    for page in raw.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        versions += [v["VersionId"] for v in page.get("Versions", []) if v["Key"] == key]
        markers += [m["VersionId"] for m in page.get("DeleteMarkers", []) if m["Key"] == key]
    return versions, markers


def _every_version_body(raw: Any, bucket: str) -> list[bytes]:
    """The bytes of every version of every key in the bucket."""
    bodies = []
    for page in raw.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in page.get("Versions", []):
            obj = raw.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
            bodies.append(obj["Body"].read())
    return bodies


@pytest.mark.s3
def test_versioned_bucket_delete_leaves_no_version(s3_env: S3Server, versioned_bucket: str,
                                                    seed: int) -> None:
    bucket = versioned_bucket
    store, raw = open_s3_blobs(fresh_url(bucket)), s3_env.client()
    made = make_component(seed)
    digest, key = sha(made.data), store.key(sha(made.data))
    store.put(digest, made.data)
    store.put(digest, made.data)  # refused by If-None-Match: no second version
    raw.put_object(Bucket=bucket, Key=key, Body=made.data)  # a second version, behind our back
    raw.delete_object(Bucket=bucket, Key=key)  # and a delete marker on top
    assert _versions_of(raw, bucket, key)[0] and _versions_of(raw, bucket, key)[1]
    neighbour = f"{key}.neighbour"  # shares the key as a prefix: must survive
    raw.put_object(Bucket=bucket, Key=neighbour, Body=b"not ours")

    assert store.purge(digest) == 3  # two object versions and one delete marker

    assert _versions_of(raw, bucket, key) == ([], [])
    assert not any(made.tensor_pattern in body or made.provenance_pattern in body
                   for body in _every_version_body(raw, bucket))
    assert raw.get_object(Bucket=bucket, Key=neighbour)["Body"].read() == b"not ours"
    store.close()
    raw.close()


@pytest.mark.s3
def test_concurrent_puts_make_one_version(s3_env: S3Server, versioned_bucket: str) -> None:
    bucket = versioned_bucket
    store, raw = open_s3_blobs(fresh_url(bucket)), s3_env.client()
    data = os.urandom(2 * 1024 * 1024)
    threads = [threading.Thread(target=store.put, args=(sha(data), data)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_versions_of(raw, bucket, store.key(sha(data)))[0]) == 1
    assert store.get(sha(data)) == data
    store.close()
    raw.close()


@pytest.mark.s3
def test_put_is_write_once(s3_env: S3Server, s3_store: S3BlobStore, seed: int) -> None:
    first, other = make_component(seed).data, make_component(seed + 1).data
    digest = sha(first)
    s3_store.put(digest, first)
    raw = s3_env.client()
    with pytest.raises(raw.exceptions.ClientError, match="PreconditionFailed"):
        raw.put_object(Bucket=s3_store.bucket, Key=s3_store.key(digest), Body=other,
                       IfNoneMatch="*")
    with pytest.raises(StorageError, match="do not match their sha256"):
        s3_store.put(sha(other), first)  # bytes that are not the content of their address
    assert s3_store.get(digest) == first
    assert not s3_store.exists(sha(other))
    raw.close()


@pytest.mark.s3
def test_corrupt_object_is_returned_as_stored(s3_env: S3Server, s3_store: S3BlobStore,
                                              seed: int) -> None:
    data = make_component(seed).data
    s3_store.put(sha(data), data)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    raw = s3_env.client()
    raw.put_object(Bucket=s3_store.bucket, Key=s3_store.key(sha(data)), Body=bytes(corrupt))
    assert s3_store.get(sha(data)) == bytes(corrupt)  # the store does not judge; the loader does
    raw.close()


@pytest.mark.s3
def test_loader_refuses_a_corrupt_s3_object(s3_env: S3Server, bucket: str, tmp_path: Path,
                                            seed: int) -> None:
    store = open_s3_blobs(fresh_url(bucket))
    reg = Registry(SqliteIndex(tmp_path / "registry"), store, base_fingerprint=FP,
                   region=REGION, max_component_bytes=MAX_BYTES, backend="sqlite+s3")
    data = make_component(seed).data
    info = reg.add("adapter", data)
    assert reg.load_bytes(info.digest) == data
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2] ^= 0x01
    raw = s3_env.client()
    raw.put_object(Bucket=store.bucket, Key=store.key(info.digest), Body=bytes(corrupt))
    with pytest.raises(StorageError, match="corrupt"):
        reg.load_bytes(info.digest)
    reg.close()
    raw.close()


@pytest.mark.s3
def test_digests_ignore_keys_that_are_not_content_addresses(s3_env: S3Server,
                                                            seed: int) -> None:
    bucket = s3_env.make_bucket()
    store, raw = open_s3_blobs(f"s3://{bucket}/a"), s3_env.client()
    data = make_component(seed).data
    store.put(sha(data), data)
    d = sha(b"other")
    for key in (f"a/blobs/zz/{d}", f"a/blobs/{d[:2]}/{d}.tmp", f"a/blobs/{d[:2]}/nothex",
                f"a/blobs/{d}", f"b/blobs/{d[:2]}/{d}", f"ab/blobs/{d[:2]}/{d}",
                f"blobs/{d[:2]}/{d}"):
        raw.put_object(Bucket=bucket, Key=key, Body=b"other")
    assert list(store.digests()) == [sha(data)]
    assert list(open_s3_blobs(f"s3://{bucket}").digests()) == [d]  # the empty prefix
    store.close()
    raw.close()


def test_keys_are_content_addresses_under_the_prefix() -> None:
    d = "ab" + "0" * 62
    assert open_s3_blobs("s3://bkt/models/tmc/").key(d) == f"models/tmc/blobs/ab/{d}"
    assert open_s3_blobs("s3://bkt").key(d) == f"blobs/ab/{d}"
    assert open_s3_blobs("s3://bkt/models").describe() == "s3://bkt/models"


@pytest.mark.s3
def test_discard_partial_aborts_multipart_uploads(s3_env: S3Server,
                                                  s3_store: S3BlobStore) -> None:
    raw = s3_env.client()
    key = s3_store.key("cd" * 32)
    raw.create_multipart_upload(Bucket=s3_store.bucket, Key=key)
    assert raw.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads")
    s3_store.discard_partial()
    assert not raw.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads")
    raw.close()


@pytest.mark.s3
def test_ping_accepts_a_reachable_bucket(s3_store: S3BlobStore) -> None:
    s3_store.ping()


@pytest.mark.s3
def test_wrong_credentials_are_a_clear_storage_error(s3_env: S3Server, bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_s3_blobs(f"s3://{bucket}")
    for call in (store.ping, lambda: store.get("0" * 64), lambda: store.put(sha(b"x"), b"x"),
                 lambda: list(store.digests())):
        with pytest.raises(StorageError, match="credentials were refused") as info:
            call()
        assert s3_env.endpoint in str(info.value) and bucket in str(info.value)
        assert "AWS_SECRET_ACCESS_KEY" in str(info.value)
    store.close()


@pytest.mark.s3
def test_missing_credentials_are_a_clear_storage_error(
        s3_env: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_s3_blobs(fresh_url(bucket))
    with pytest.raises(StorageError, match="no S3 credentials; set AWS_ACCESS_KEY_ID"):
        store.ping()
    store.close()


@pytest.mark.s3
def test_missing_bucket_is_a_clear_storage_error(s3_env: S3Server) -> None:
    store = open_s3_blobs("s3://tmc-no-such-bucket")
    for call in (store.ping, lambda: store.put(sha(b"x"), b"x")):
        with pytest.raises(StorageError, match="tmc-no-such-bucket does not exist"):
            call()
    store.close()


def test_unreachable_endpoint_is_a_storage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "key"),
                        ("AWS_SECRET_ACCESS_KEY", "secret")):
        monkeypatch.setenv(name, value)
    store = open_s3_blobs("s3://bucket/prefix")
    for call in (store.ping, lambda: store.get("0" * 64), lambda: store.put(sha(b"x"), b"x"),
                 lambda: store.delete("0" * 64), lambda: list(store.digests())):
        with pytest.raises(StorageError, match="unreachable") as info:
            call()
        assert endpoint in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)
    with pytest.raises(ValueError, match="not a sha256"):  # validation first: no request
        store.get("../x")
    store.close()


def test_a_stalled_endpoint_is_a_storage_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)  # accepts connections, never answers
        endpoint = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        config = client_config().merge(Config(read_timeout=0.2,
                                              retries={"total_max_attempts": 2}))
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="a", aws_secret_access_key="b", config=config)
        probe = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id="a", aws_secret_access_key="b",
                             config=config.merge(Config(read_timeout=0.3,
                                                        retries={"total_max_attempts": 1})))
        store = S3BlobStore(client, "bucket", probe_client=probe)
        with pytest.raises(StorageError, match="did not answer within 0.2 s") as info:
            store.get("0" * 64)
        assert endpoint in str(info.value)
        with pytest.raises(StorageError, match="did not answer within 0.3 s"):
            store.ping()  # the probe client's timeout, not the data path's
        store.close()


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://Upper", "s3://ab",
                                 "s3://bucket_name", "s3://-bucket", "s3://bucket-",
                                 "s3://a..b", "s3://user@bucket", "s3://bucket:9000",
                                 "s3://bucket/a//b", "s3://bucket/a/../b", "s3://bucket/a b",
                                 "s3://bucket?x=1", "file:///tmp", "bucket/prefix"])
def test_bad_s3_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket|bucket|prefix segment"):
        parse_s3_url(url)


def test_a_malformed_endpoint_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    with pytest.raises(ValueError, match="AWS_ENDPOINT_URL must be http"):
        open_s3_blobs("s3://bucket")


def test_s3_urls_parse() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/") == ("bucket", "")
    assert parse_s3_url("s3://my.bucket-1/models/tmc/") == ("my.bucket-1", "models/tmc")
