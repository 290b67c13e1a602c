"""``s3://`` addresses parsed strictly, and S3 answers mapped to the project's errors, on a
stubbed boto3 client (no network; the real store is in tests/integration/test_s3store.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from migrator.backup.s3store import S3Store, make_client, parse_url, valid_bucket
from migrator.core.errors import (
    AuthenticationFailed,
    BackupError,
    CorruptBackup,
    InvalidInput,
    NetworkError,
    NotFound,
)

SECRET = "s3cr3t-VALUE-never-shown"


def test_good_urls() -> None:
    assert parse_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_url("s3://my-bucket/") == ("my-bucket", "")
    assert parse_url("s3://my.bucket.01/backups") == ("my.bucket.01", "backups")
    assert parse_url("s3://bkt/site-a/hosts_1/") == ("bkt", "site-a/hosts_1")


@pytest.mark.parametrize("bad", [
    "s3:/bkt/x", "S3://bkt/x", "s3://", "s3:///x", "http://bkt/x", "bkt/x",
    "s3://user@bkt/x", "s3://user:pw@bkt/x", "s3://bkt:9000/x", "s3://bkt/x?versionId=1",
    "s3://bkt/x#frag", "s3://bkt/../x", "s3://bkt/a/../../x", "s3://bkt/./x",
    "s3://bkt//x", "s3://bkt/a//b", "s3://bkt/%2e%2e/x", "s3://bkt/a b", "s3://bkt/a\\b",
    "s3://bkt/a\nb", "s3://bkt/a\x00b", "s3://bkt/caf\u00e9", "s3://bkt/" + "a/" * 300,
    "s3://bkt/.hidden/../x", "s3://bkt/x/..",
])
def test_hostile_urls_are_refused_with_a_hint(bad: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_url(bad)
    assert e.value.hint and "s3://" in e.value.hint


@pytest.mark.parametrize("bucket", [
    "ab", "a" * 64, "Bucket", "-bkt", "bkt-", "b..kt", "b.-kt", "192.168.1.1", "bkt_x",
    "xn--bkt", "sthree-bkt", "bkt-s3alias", "bkt--ol-s3",
])
def test_bucket_rules(bucket: str) -> None:
    assert not valid_bucket(bucket)
    with pytest.raises(InvalidInput):
        parse_url(f"s3://{bucket}/x")


def test_valid_buckets() -> None:
    for b in ("abc", "a" * 63, "my-bkt.2026", "0bucket9"):
        assert valid_bucket(b), b


@pytest.fixture
def stubbed() -> Iterator[tuple[S3Store, Stubber]]:
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="AKTEST", aws_secret_access_key=SECRET)
    with Stubber(client) as stub:
        yield S3Store("bkt", "pre/fix", client), stub
        stub.assert_no_pending_responses()


class _Counted(io.BytesIO):
    """A body that counts what was read of it."""

    count = 0

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        self.count += len(data)
        return data


def _body(data: bytes, length: int | None = None) -> dict[str, Any]:
    n = len(data) if length is None else length
    return {"Body": StreamingBody(io.BytesIO(data), n), "ContentLength": n}


def test_get_within_the_limit_and_the_keys_under_the_prefix(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    stub.add_response("get_object", _body(b"hello"), {"Bucket": "bkt", "Key": "pre/fix/data/ab"})
    assert store.get("data/ab", 5) == b"hello"
    assert store.url == "s3://bkt/pre/fix"


def test_oversized_object_is_refused_by_its_length(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    stub.add_response("get_object", _body(b"x" * 100))
    with pytest.raises(CorruptBackup, match="100 bytes"):
        store.get("config", 99)


def test_a_lying_length_reads_at_most_limit_plus_one(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    raw = _Counted(b"y" * (10 << 20))
    stub.add_response("get_object", {"Body": StreamingBody(raw, 3), "ContentLength": 3})
    with pytest.raises(CorruptBackup):
        store.get("config", 1000)
    assert raw.count <= 1001  # never read on to the end


def test_a_short_body_is_a_network_error(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b"abc"), 3),
                                     "ContentLength": 10})
    with pytest.raises(NetworkError) as e:
        store.get("config", 1000)
    assert e.value.retryable


@pytest.mark.parametrize(("code", "status", "cls"), [
    ("NoSuchBucket", 404, NotFound), ("NoSuchKey", 404, NotFound),
    ("AccessDenied", 403, AuthenticationFailed),
    ("SignatureDoesNotMatch", 403, AuthenticationFailed),
    ("InvalidAccessKeyId", 403, AuthenticationFailed),
    ("SlowDown", 503, NetworkError), ("InternalError", 500, NetworkError),
    ("InvalidRequest", 400, BackupError),
])
def test_errors_are_mapped_with_hints_and_no_secret(stubbed, code: str, status: int,  # type: ignore[no-untyped-def]
                                                    cls: type) -> None:
    store, stub = stubbed
    stub.add_client_error("get_object", service_error_code=code, http_status_code=status,
                          service_message=f"details {code}")
    with pytest.raises(cls) as e:
        store.get("index/x", 10)
    err = e.value
    assert SECRET not in err.message and SECRET not in (err.hint or "")
    if cls is AuthenticationFailed:
        assert "AWS_SECRET_ACCESS_KEY" in err.hint and "AWS_ENDPOINT_URL" in err.hint
    if code == "NoSuchBucket":
        assert "create it" in err.hint and "bkt" in err.message
    if cls is NetworkError:
        assert err.retryable


def test_exists_tells_a_missing_bucket_from_a_missing_key(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stub.add_response("head_bucket", {})
    assert store.exists("data/ab") is False
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
    assert store.exists("data/cd") is False  # the bucket was seen: asked once
    other = S3Store("gone", "", store.client)
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stub.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
    with pytest.raises(NotFound, match="bucket gone"):
        other.exists("config")


def test_list_pages_and_skips_foreign_keys(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    stub.add_response("list_objects_v2", {
        "IsTruncated": True, "NextContinuationToken": "t1",
        "Contents": [{"Key": "pre/fix/data/a1"}, {"Key": "pre/fix/data/../../etc"},
                     {"Key": "elsewhere/data/x"}]},
        {"Bucket": "bkt", "Prefix": "pre/fix/data/"})
    stub.add_response("list_objects_v2", {"IsTruncated": False,
                                          "Contents": [{"Key": "pre/fix/data/a2"}]},
                      {"Bucket": "bkt", "Prefix": "pre/fix/data/", "ContinuationToken": "t1"})
    assert list(store.list("data/")) == ["data/a1", "data/a2"]


def test_delete_of_a_missing_key_is_quiet_but_not_of_a_missing_bucket(stubbed) -> None:  # type: ignore[no-untyped-def]
    store, stub = stubbed
    stub.add_client_error("delete_object", service_error_code="NoSuchKey",
                          http_status_code=404)
    store.delete("data/ab")
    stub.add_client_error("delete_object", service_error_code="NoSuchBucket",
                          http_status_code=404)
    with pytest.raises(NotFound):
        store.delete("data/ab")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "", "a/./b", "x" * 600, "a b"])
def test_bad_keys_never_reach_the_client(stubbed, key: str) -> None:  # type: ignore[no-untyped-def]
    store, _stub = stubbed  # no response queued: any call would fail the stubber
    for op in (lambda: store.put(key, b""), lambda: store.get(key, 1),
               lambda: store.exists(key), lambda: store.delete(key)):
        with pytest.raises(InvalidInput):
            op()
    with pytest.raises(InvalidInput):
        list(store.list("../"))


def test_client_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    client = make_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:8333"
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.config.max_pool_connections >= 16
    assert client.meta.config.retries["mode"] == "standard"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert make_client().meta.config.retries.get("total_max_attempts") in (None, 1)
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(InvalidInput) as e:
        make_client()
    assert "AWS_PROFILE" in e.value.hint


def test_transport_checksums_only_when_required_unless_the_operator_says(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every object is authenticated by the repository: botocore's CRC32 on each PUT and
    GET is left out by default (CPU, and stores that refuse its headers); a variable or a
    profile that says otherwise wins."""
    names = ("request_checksum_calculation", "response_checksum_validation")
    for name in names:
        monkeypatch.delenv(f"AWS_{name.upper()}", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    conf = make_client().meta.config
    assert [getattr(conf, n) for n in names] == ["when_required", "when_required"]
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")
    conf = make_client().meta.config
    assert [getattr(conf, n) for n in names] == ["when_required", "when_supported"]
    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION")
    cfg = tmp_path / "config"
    cfg.write_text("[default]\nrequest_checksum_calculation = when_supported\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(cfg))
    conf = make_client().meta.config
    assert [getattr(conf, n) for n in names] == ["when_supported", "when_required"]
