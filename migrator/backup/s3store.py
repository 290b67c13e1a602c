"""An ``ObjectStore`` in an S3 bucket (``--repo s3://BUCKET/PREFIX``), through boto3.

Any S3-compatible store works: AWS S3, Ceph RGW, MinIO, SeaweedFS (the tests' cluster,
``testrigs/seaweed.py``). Nothing about the endpoint or the credentials is in this module or
in the URL: boto3 finds them the standard AWS way, so an operator configures this tool as
every other S3 client on the machine:

- ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the profile) for a store that is not AWS;
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``), or
  ``AWS_PROFILE`` naming a profile of ``~/.aws/config`` and ``~/.aws/credentials``, or an
  instance role;
- ``AWS_DEFAULT_REGION`` / ``AWS_REGION``; ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``
  (else: standard retries, 5 attempts);
- ``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION`` (else:
  ``when_required``, not botocore's ``when_supported``). Every object of a repository is
  authenticated by the repository itself (sealed, or hashed), so the CRC32 that botocore
  would add to each PUT and check on each GET protects nothing more; it costs ~10% of a
  small GET's CPU in this process, and some S3-compatible stores (older Ceph RGW, MinIO)
  refuse the checksum headers and trailers botocore 1.36+ sends by default.

The ``ObjectStore`` contract (``backup/objectstore.py``) holds as follows. A PUT is atomic
in S3 itself: a reader sees the old object, or the whole new one. ``get`` looks at the
object's length before reading its body and refuses one above the caller's limit, and reads
at most limit+1 bytes anyway, so a store that lies about the length still cannot make this
process read without bound. ``list`` pages through ListObjectsV2 (1000 keys a page) and
yields only keys the repository could have made. Every key passes ``check_key`` and lives
under the prefix, so nothing outside ``PREFIX/`` is ever named.

One boto3 client is made per store and shared by the repository's upload and download
threads: botocore's clients are thread-safe (its sessions are not), and the connection
pool is sized for them (``MAX_POOL``).

Errors become the project's own, each with a hint: a missing bucket or object ``NotFound``,
refused credentials ``AuthenticationFailed`` (the hint names the AWS_* variables), an
unreachable or failing endpoint ``NetworkError`` (marked retryable). No message carries a
secret: they are built here from the error code, the bucket and the key, and the store's own
text is capped. boto3 is imported here only, and only when a store is made: the CLI and the
agent load this module lazily.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from migrator.backup.objectstore import MAX_KEY, check_key, valid_key
from migrator.core.errors import (
    AuthenticationFailed,
    BackupError,
    CorruptBackup,
    InvalidInput,
    MigratorError,
    NetworkError,
    NotFound,
)

log = logging.getLogger(__name__)

SCHEME = "s3://"
#: connections per client: the repository's parallel uploads and downloads (16) and more
MAX_POOL = 32
DEFAULT_ATTEMPTS = 5
CONNECT_TIMEOUT = 10.0  # seconds; botocore's 60 would hide a dead endpoint for minutes
READ_TIMEOUT = 60.0
#: a prefix leaves room for the repository's keys within S3's 1024-byte key limit
MAX_PREFIX = 1024 - MAX_KEY - 1
READ_PIECE = 1 << 20

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RESERVED_BUCKET = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_END = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")

AUTH_CODES = frozenset({"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId",
                        "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
                        "AuthorizationHeaderMalformed", "InvalidSecurity", "AccountProblem"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
BUSY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                        "RequestTimeTooSkewed", "503", "500"})
AUTH_HINT = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile AWS_PROFILE "
             "names) and that they belong to the store at AWS_ENDPOINT_URL; the key needs "
             "read, write, list and delete on the bucket")
NET_HINT = ("check AWS_ENDPOINT_URL (unset: AWS itself) and that the store is up and "
            "reachable from here; the operation can be retried")
MAX_TEXT = 200  # characters of a store's own error message kept


def valid_bucket(name: str) -> bool:
    """S3's bucket naming rules (3-63 of ``a-z0-9.-``, letter or digit at both ends, no
    ``..``, not an IP address, none of AWS's reserved prefixes and suffixes)."""
    if not _BUCKET.fullmatch(name) or ".." in name or ".-" in name or "-." in name:
        return False
    if name.startswith(_RESERVED_BUCKET) or name.endswith(_RESERVED_BUCKET_END):
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return True
    return False


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PRE/FIX`` -> ("BUCKET", "PRE/FIX"); ``s3://BUCKET`` -> ("BUCKET", "").

    Strict: no user, password, port, query or fragment, no percent-escapes, a valid bucket
    name, and a prefix of the same segments as the repository's keys (so ``..``, ``//``,
    spaces or control characters never reach a key)."""
    bad = InvalidInput(f"bad repository address {url[:200]!r}",
                       "use s3://BUCKET or s3://BUCKET/PREFIX (PREFIX of letters, digits, "
                       "'.', '_', '-' segments separated by '/'); the endpoint and the "
                       "credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                       "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, never from the address")
    if not url.startswith(SCHEME) or not url.isascii() or not url.isprintable() \
            or any(c in url for c in "%\\?#@ "):
        raise bad
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise bad from e
    if parts.scheme != "s3" or port is not None or parts.username or parts.password \
            or parts.query or parts.fragment or ":" in parts.netloc:
        raise bad
    bucket = parts.netloc
    if not valid_bucket(bucket):
        raise InvalidInput(f"bad bucket name {bucket[:80]!r} in {url[:200]!r}",
                           "use s3://BUCKET/PREFIX; S3 bucket names are 3-63 lower-case "
                           "letters, digits, '.' and '-', starting and ending with a letter "
                           "or digit")
    path = parts.path
    prefix = path[1:] if path.startswith("/") else path
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    if prefix and (len(prefix) > MAX_PREFIX or not valid_key(prefix)):
        raise bad
    return bucket, prefix


def make_client() -> Any:
    """A boto3 S3 client configured the standard AWS way (see the module docstring)."""
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        core = botocore.session.get_session()
        retries: dict[str, Any] = {}
        # the operator's own retry settings (variables or profile) win over ours
        if core.get_config_variable("retry_mode", methods=("env", "config")) is None:
            retries["mode"] = "standard"
        if core.get_config_variable("max_attempts", methods=("env", "config")) is None:
            retries["total_max_attempts"] = DEFAULT_ATTEMPTS
        # the transport checksums only where S3 requires them (see the module docstring),
        # unless the operator chose otherwise
        # (asked of the variable and the profile: get_config_variable answers the default)
        profile = core.get_scoped_config()
        checksums = {name: "when_required" for name in
                     ("request_checksum_calculation", "response_checksum_validation")
                     if f"AWS_{name.upper()}" not in os.environ and name not in profile}
        config = Config(max_pool_connections=MAX_POOL, connect_timeout=CONNECT_TIMEOUT,
                        read_timeout=READ_TIMEOUT, retries=retries or None, **checksums)
        return boto3.session.Session(botocore_session=core).client("s3", config=config)
    except BotoCoreError as e:  # an unknown profile, a malformed config file...
        raise InvalidInput(f"cannot set up the S3 client: {_capped(str(e))}",
                           "check AWS_PROFILE, AWS_CONFIG_FILE and ~/.aws/config") from e
    except ValueError as e:  # botocore: "Invalid endpoint: ..."
        raise InvalidInput(f"cannot set up the S3 client: {_capped(str(e))}",
                           "AWS_ENDPOINT_URL must be a URL like http://host:port") from e


def _capped(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def _retryable(e: MigratorError) -> MigratorError:
    e.retryable = True
    return e


class S3Store:
    """Objects ``PREFIX/KEY`` in ``bucket``, through ``client`` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        if not valid_bucket(bucket):
            raise InvalidInput(f"bad bucket name {bucket[:80]!r}")
        prefix = prefix.strip("/")
        if prefix and (len(prefix) > MAX_PREFIX or not valid_key(prefix)):
            raise InvalidInput(f"bad object prefix {prefix[:200]!r}")
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.client = client
        self.url = f"{SCHEME}{bucket}" + (f"/{prefix}" if prefix else "")
        self._bucket_seen = False

    @classmethod
    def from_url(cls, url: str, client: Any | None = None) -> S3Store:
        bucket, prefix = parse_url(url)
        return cls(bucket, prefix, client if client is not None else make_client())

    def __str__(self) -> str:
        return self.url

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    # the contract ------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=bytes(data))
        except Exception as e:
            raise self._error(e, "put", key) from e
        self._bucket_seen = True

    def get(self, key: str, limit: int) -> bytes:
        name = self._name(key)
        if limit < 0:
            raise ValueError("negative limit")
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=name)
        except Exception as e:
            raise self._error(e, "get", key) from e
        body = reply["Body"]
        try:
            length = reply.get("ContentLength")
            if isinstance(length, int) and length > limit:
                raise self._too_big(key, f"{length} bytes", limit)
            data = self._read(body, limit + 1, key)
        finally:
            body.close()
        if len(data) > limit:
            raise self._too_big(key, f"more than {limit} bytes (it said {length})", limit)
        if isinstance(length, int) and len(data) != length:
            raise _retryable(NetworkError(f"{self.url}: object {key} ended after {len(data)} "
                                          f"of {length} bytes", NET_HINT))
        return data

    def _read(self, body: Any, most: int, key: str) -> bytes:
        """Up to ``most`` bytes of a response body (fewer only at its end)."""
        pieces: list[bytes] = []
        got = 0
        try:
            while got < most:
                piece = body.read(min(READ_PIECE, most - got))
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
        except Exception as e:
            raise self._error(e, "get", key) from e
        return b"".join(pieces)

    def _too_big(self, key: str, size: str, limit: int) -> CorruptBackup:
        return CorruptBackup(f"{self.url}: object {key} is {size}, more than the {limit} its "
                             "kind may have; it was not read",
                             "a damaged or planted object: `migrate backup verify --deep` "
                             "lists what it affects")

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=name)
        except Exception as e:
            err = self._error(e, "exists", key)
            if not isinstance(err, NotFound):
                raise err from e
            # HEAD has no body: a 404 is the same for a missing key and a missing bucket
            self._check_bucket()
            return False
        self._bucket_seen = True
        return True

    def _check_bucket(self) -> None:
        if self._bucket_seen:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            err = self._error(e, "check the bucket", None)
            if isinstance(err, NotFound):
                raise self._no_bucket() from e
            raise err from e
        self._bucket_seen = True

    def list(self, prefix: str) -> Iterator[str]:
        if prefix and not _valid_list_prefix(prefix):
            raise InvalidInput(f"invalid object key prefix {prefix!r}",
                               "keys are made by the repository: a bug or a hostile caller")
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                self._bucket_seen = True
                for obj in page.get("Contents") or ():
                    name = obj.get("Key")
                    if not isinstance(name, str) or not name.startswith(self.prefix):
                        continue
                    key = name[len(self.prefix):]
                    if valid_key(key):  # not the repository's: another tool's, or planted
                        yield key
                    else:
                        log.debug("%s: skipping foreign object %r", self.url, name[:200])
        except MigratorError:
            raise
        except Exception as e:
            raise self._error(e, "list", prefix or None) from e

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
        except Exception as e:
            err = self._error(e, "delete", key)
            if isinstance(err, NotFound) and _code(e) != "NoSuchBucket":
                return  # S3 deletes a missing key quietly; a store that does not is alike
            raise err from e

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    # errors --------------------------------------------------------------------------------
    def _no_bucket(self) -> NotFound:
        return NotFound(f"{self.url}: the bucket {self.bucket} does not exist",
                        "create it (e.g. `aws s3 mb s3://" + self.bucket + "`), or check "
                        "AWS_ENDPOINT_URL: another endpoint has other buckets")

    def _error(self, e: BaseException, op: str, key: str | None) -> MigratorError:
        """``e`` from boto3 as the project's error (nothing secret in the message)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            CredentialRetrievalError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
            ResponseStreamingError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        if isinstance(e, MigratorError):
            return e
        what = f"{self.url}: {op}" + (f" {key}" if key else "")
        if isinstance(e, ClientError):
            error = e.response.get("Error") or {}
            code = str(error.get("Code") or "")
            status = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            text = _capped(str(error.get("Message") or ""))
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in MISSING_KEY_CODES or status == 404:
                return NotFound(f"{what}: no such object", "the repository is missing an "
                                "object it names: `migrate backup verify` checks it")
            if code in AUTH_CODES or status in (401, 403):
                return AuthenticationFailed(f"{what}: the object store refused the "
                                            f"credentials ({code or status})", AUTH_HINT)
            if code in BUSY_CODES or (isinstance(status, int) and status >= 500):
                return _retryable(NetworkError(f"{what}: the object store failed "
                                               f"({code or status}: {text})", NET_HINT))
            return BackupError(f"{what}: the object store refused ({code or status}: {text})")
        if isinstance(e, (NoCredentialsError, PartialCredentialsError,
                          CredentialRetrievalError)):
            return AuthenticationFailed(f"{what}: no usable S3 credentials", AUTH_HINT)
        if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError,
                          ResponseStreamingError, OSError)):
            return _retryable(NetworkError(f"{what}: cannot reach the object store "
                                           f"({type(e).__name__})", NET_HINT))
        if isinstance(e, BotoCoreError):
            return BackupError(f"{what}: {_capped(str(e))}")
        return BackupError(f"{what}: {type(e).__name__}: {_capped(str(e))}")


def _code(e: BaseException) -> str:
    """The S3 error code of a boto3 ``ClientError`` ("" for anything else)."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return ""
    return str((response.get("Error") or {}).get("Code") or "")


def _valid_list_prefix(prefix: str) -> bool:
    """A list prefix: a key, or a key's beginning (``data/``, ``data/1``, ``index/ab``)."""
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if not body:
        return False
    head, _, last = body.rpartition("/")
    return (not head or valid_key(head)) and bool(re.fullmatch(r"[A-Za-z0-9._-]+", last)) \
        and last not in (".", "..")
