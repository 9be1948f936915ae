"""Where shards live: a local folder or an S3 prefix, behind the few operations the product needs.

    store = open_store("shards/")                  # LocalStore: a folder
    store = open_store("s3://bucket/imagenet")     # S3Store: every name is a key under that prefix
    store.read_text("train.manifest.json"); store.sizes(); store.url("train-000000.tar")

Everything that takes a shard folder (manifests, loaders, `verify`, the converter's output, the profiler's
corpus description) goes through `open_store`, so a URL works wherever a folder does and no function branches
on the scheme. Names are relative to the store (`train-000000.tar`, `.parts/train.plan.json`); `url(name)` is
what a reader is handed: a `Path` for a folder (unchanged from before), an `s3://` URL that DALI's reader
opens itself for S3.

Client: boto3, the AWS SDK for Python. It reads the same standard configuration chain as the AWS C++ SDK inside
DALI's reader (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE and
~/.aws/config), so one set of variables configures both; its s3transfer layer does parallel multipart uploads;
and its errors carry the store's own code (NoSuchBucket, AccessDenied, InvalidAccessKeyId). fsspec/s3fs would
add an async layer and a cache over the same botocore without adding anything the converter or loaders need.
Credentials are never arguments here and are never logged.

Bounded time, one rule for every request (a shard's GET and each resumed ranged GET of a broken stream, a
listing, a HEAD, a small object, an upload's part): at most A tries (AWS_MAX_ATTEMPTS or `max_attempts` in the
AWS profile, else REQUEST_ATTEMPTS = 3, the first included, as AWS counts), each given CONNECT_TIMEOUT (5 s)
to connect and a read timeout without a byte (READ_TIMEOUT, 20 s, for GETs and uploads; CONTROL_READ_TIMEOUT,
10 s, for listings, HEADs, puts and deletes), with a wait between tries (RETRY_BACKOFF x 2^i, at most 20 s).
A store that stops answering therefore fails a request, with one line naming the URL, within

    A x (CONNECT_TIMEOUT + read timeout) + waits  =  3 x (5 + 20) + 1.5 = 76.5 s for a GET, 46.5 s otherwise

(`RequestRule.bound`, `S3Store.time_bound`; for a GET streamed front to back, counted from the last byte it
received). A frozen server (SIGSTOP) still accepts connections, so there the tries end after about A x read
timeout. botocore repeats listings, HEADs, puts and upload parts itself (AWS_RETRY_MODE / `retry_mode` chooses
its mode; its waits are shorter, but when the store answers "slow down" they can reach 20 s each); a GET is one
try per request, repeated by `_ObjectStream`, which resumes from the byte reached. The timeouts are constants
here: botocore reads no connect or read timeout from the AWS configuration (AWS_DEFAULTS_MODE's connect timeout
aside, which these override). A stop request (shards.process.request_stop, the trainer's SIGTERM) ends a GET's
retries, before the next try or during the wait, with StopRequested; it never cuts a read that is being
answered. In the main thread, inside shards.process.stop_interrupts(), it also ends the try in progress.

`gs://` is refused: DALI 2.4's wheel lists GCS reading, but it could not be run here (no GCS server can be run
locally and the wheel honours no emulator endpoint), so there is no code path for it; see the README.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shards.local_store import STREAM_BUFFER, LocalStore, Store, sha256_file
from shards.process import check_stop, pause
from shards.request_log import count_requests, count_retry

#: The bounded-time rule (module docstring): every request gets at most `attempts` tries (AWS_MAX_ATTEMPTS or the
#: profile's max_attempts, else REQUEST_ATTEMPTS; the first try included, as AWS counts), each given
#: CONNECT_TIMEOUT to connect and a read timeout without a byte, with a wait between two tries.
REQUEST_ATTEMPTS = 3  # AWS's own default in standard mode
CONNECT_TIMEOUT = 5  # seconds
READ_TIMEOUT = 20  # seconds without a byte: GETs of objects (shards, indexes, manifests) and uploads
#: Listings, HEADs, small puts and deletes answer in milliseconds on a working store: an endpoint that takes the
#: connection and never answers (a wrong port, a proxy, a frozen server) fails them sooner.
CONTROL_READ_TIMEOUT = 10  # seconds
RETRY_BACKOFF = 0.5  # seconds before a GET's second try, doubling after (botocore's own waits are shorter)
MAX_BACKOFF = 20.0  # seconds, the longest wait between two tries (botocore's cap as well)
#: Uploads: objects above MULTIPART_BYTES go up in MULTIPART_BYTES parts, UPLOAD_THREADS parts at once.
MULTIPART_BYTES = 64 * 2**20  # bytes
UPLOAD_THREADS = 4
#: Error codes a try is repeated for, beside HTTP 429/5xx and connection failures (what botocore's standard
#: retry mode repeats for S3)
TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
                             "Throttling", "ThrottlingException", "RequestLimitExceeded", "BandwidthLimitExceeded",
                             "TooManyRequestsException"})


@dataclass(frozen=True)
class RequestRule:
    """How many tries a request gets in this process, and botocore's retry mode, read from the standard AWS
    configuration (`request_rule`)."""

    attempts: int  # tries per request, the first included
    retry_mode: str  # botocore's, for the requests it repeats itself (listings, HEADs, puts, uploads)

    def bound(self, read_timeout: float) -> float:
        """Seconds after which a request to a store that stopped answering has failed, at most: every try waits
        CONNECT_TIMEOUT to connect and `read_timeout` for a byte, plus the waits between tries (for a GET
        streamed front to back: counted from the last byte it received)."""
        waits = sum(min(RETRY_BACKOFF * 2**i, MAX_BACKOFF) for i in range(self.attempts - 1))
        return self.attempts * (CONNECT_TIMEOUT + read_timeout) + waits


def request_rule(session: Any = None) -> RequestRule:
    """The rule from the standard AWS configuration, as botocore reads it: AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, or
    `max_attempts` / `retry_mode` of the profile in ~/.aws/config (AWS_PROFILE); else REQUEST_ATTEMPTS tries in
    standard mode. botocore reads no connect or read timeout from there (AWS_DEFAULTS_MODE's connect timeout
    aside), so those are this module's constants."""
    if session is None:
        import botocore.session

        session = botocore.session.get_session()
    attempts = session.get_config_variable("max_attempts")
    mode = session.get_config_variable("retry_mode") or "standard"
    return RequestRule(max(1, int(REQUEST_ATTEMPTS if attempts is None else attempts)), str(mode))


class StoreError(OSError):
    """The object store refused a request or could not be reached; the message names the URL and the store's
    reason (NoSuchBucket, AccessDenied, InvalidAccessKeyId, endpoint unreachable) in one line."""


def is_store_url(location: str | os.PathLike) -> bool:
    """True for `scheme://...` locations (object stores); False for folder paths."""
    return isinstance(location, str) and "://" in location


def open_store(location: str | os.PathLike) -> Store:
    """The store for a shard folder or an `s3://bucket/prefix` URL (errors name the location)."""
    if isinstance(location, Store):
        return location
    if not is_store_url(location):
        return LocalStore(location)
    scheme, _, rest = str(location).partition("://")
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"{location}: expected s3://BUCKET/PREFIX")
        prefix = prefix.strip("/")
        # boto3 writes such keys as given, but DALI's reader parses the URL it is handed: it cuts a key at '#'
        # or '?' and folds '//' into '/', so it would look for other objects than the converter wrote
        odd = next((part for part in ("#", "?", "//") if part in prefix), None)
        if odd is not None:
            raise ValueError(f"{location}: {odd!r} in the key prefix cannot be read back by DALI's S3 reader; "
                             "use letters, digits and - _ . / in PREFIX")
        return S3Store(bucket, prefix)
    if scheme == "gs":
        raise ValueError(f"{location}: gs:// is not supported (DALI's GCS reader could not be run and tested "
                         "here); use s3://BUCKET/PREFIX, see the README's 'Many nodes' section")
    raise ValueError(f"{location}: unknown storage scheme {scheme!r}; use a folder path or s3://BUCKET/PREFIX")




class S3Store(Store):
    """Objects under `s3://bucket/prefix/`. Its boto3 clients are made in each process on first use (a client must
    not cross a fork, and DataLoader workers and converter processes are forks) and dropped when pickled."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix
        self._clients: dict[tuple[float, int], Any] = {}  # (read timeout in seconds, tries) -> client
        self._session: Any = None  # this process's boto3 session
        self._rule = RequestRule(REQUEST_ATTEMPTS, "standard")  # replaced by the configuration's, per process
        self._client_pid = -1

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_clients": {}, "_session": None, "_client_pid": -1}

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _boto3(self) -> Any:
        """This process's boto3 session, shared by its clients, and the rule read from the same configuration."""
        if self._client_pid != os.getpid():
            import boto3
            import botocore.session

            core = botocore.session.get_session()  # the AWS configuration, read once
            self._clients, self._client_pid = {}, os.getpid()
            self._session, self._rule = boto3.session.Session(botocore_session=core), request_rule(core)
        return self._session

    @property
    def rule(self) -> RequestRule:
        """The tries and retry mode of this process's requests (`request_rule`)."""
        self._boto3()
        return self._rule

    def _client_with(self, read_timeout: float, attempts: int | None = None) -> Any:
        """This process's client for requests with `read_timeout` and `attempts` tries (None: the rule's)."""
        rule = self.rule
        attempts = rule.attempts if attempts is None else attempts
        if (read_timeout, attempts) not in self._clients:
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": attempts, "mode": rule.retry_mode},
                            connect_timeout=CONNECT_TIMEOUT, read_timeout=read_timeout)
            client = count_requests(self._boto3().client("s3", config=config))  # every try counted (request_log)
            self._clients[(read_timeout, attempts)] = client
        return self._clients[(read_timeout, attempts)]

    @property
    def client(self) -> Any:
        """For uploads (READ_TIMEOUT; botocore repeats a failed part)."""
        return self._client_with(READ_TIMEOUT)

    @property
    def reader(self) -> Any:
        """For GETs (READ_TIMEOUT), one try each: _ObjectStream repeats them itself, resuming from the byte reached."""
        return self._client_with(READ_TIMEOUT, 1)

    @property
    def control(self) -> Any:
        """For listings, HEADs, deletes and small puts (CONTROL_READ_TIMEOUT)."""
        return self._client_with(CONTROL_READ_TIMEOUT)

    def time_bound(self, *, data: bool = True) -> float:
        """Seconds within which a request to this store fails when the store stops answering (the module
        docstring's rule): a GET's (`data`), else a listing's, HEAD's, small put's or delete's."""
        return self.rule.bound(READ_TIMEOUT if data else CONTROL_READ_TIMEOUT)

    def _call(self, name: str | None, request: Callable[[], Any], *, data: bool = False) -> Any:
        """Run one boto3 request (botocore repeats it as the rule says); its exceptions become one-line errors
        that name the URL (see `failure`)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return request()
        except (ClientError, BotoCoreError) as err:
            raise self.failure(name, err, data=data) from None

    def failure(self, name: str | None, err: Exception, *, data: bool = False) -> OSError:
        """FileNotFoundError for a missing object, else a StoreError with the store's code and message; a store
        that did not answer (a timeout, no connection) also gets the tries and the bound they were given."""
        from botocore.exceptions import ClientError, NoCredentialsError

        url = self.url(name) if name is not None else str(self)
        if isinstance(err, ClientError):
            error = err.response.get("Error", {})
            code, message = str(error.get("Code", "?")), error.get("Message") or str(err)
            if code in ("404", "NoSuchKey", "NotFound") and name is not None:
                return FileNotFoundError(f"{url}: no such object")
            if code == "NoSuchBucket" or (code == "404" and name is None):
                return StoreError(f"{url}: NoSuchBucket (bucket {self.bucket!r} does not exist)")
            return StoreError(f"{url}: {code} ({message})")
        if isinstance(err, NoCredentialsError):
            return StoreError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "or AWS_PROFILE")
        unanswered = f" ({self.no_answer(data=data)})" if transient(err) else ""
        return StoreError(f"{url}: {_without_userinfo(str(err))}{unanswered}")

    def no_answer(self, *, data: bool) -> str:
        """What an error of a request that got no answer adds: its tries and the bound they had."""
        rule = self.rule
        bound = rule.bound(READ_TIMEOUT if data else CONTROL_READ_TIMEOUT)
        tries = "1 try" if rule.attempts == 1 else f"{rule.attempts} tries"
        return f"{tries} within the store's bound of {bound:.0f} s; AWS_MAX_ATTEMPTS sets the tries"

    def check(self) -> None:
        # one listing page of the prefix's top level: proves bucket, credentials and endpoint in one request (no
        # MaxKeys=1: s3rver, a local test server, fails on truncated listings)
        self._call(None, lambda: self.control.list_objects_v2(Bucket=self.bucket, Prefix=self.key(""), Delimiter="/"))

    def prepare(self) -> None:
        self.check()

    def sizes(self, folder: str = "") -> dict[str, int]:
        start = self.key(f"{folder}/" if folder else "")
        found: dict[str, int] = {}
        pages = self.control.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start, Delimiter="/")
        for page in self._call(None, lambda: list(pages)):
            for item in page.get("Contents", []):
                found[item["Key"][len(start):]] = int(item["Size"])
        return found

    def _head(self, name: str) -> dict | None:
        try:
            return self._call(name, lambda: self.control.head_object(Bucket=self.bucket, Key=self.key(name)))
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        head = self._head(name)
        return None if head is None else int(head["ContentLength"])

    def read_bytes(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        extra = {}
        if offset or length is not None:
            extra["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
        stream = _ObjectStream(self, name, extra)
        return stream.read()

    def open(self, name: str) -> BinaryIO:
        return io.BufferedReader(_ObjectStream(self, name, {}), buffer_size=STREAM_BUFFER)

    def open_range(self, name: str, offset: int, length: int) -> BinaryIO:
        span = _ObjectStream(self, name, {"Range": f"bytes={offset}-{offset + length - 1}"})
        return io.BufferedReader(span, buffer_size=STREAM_BUFFER)

    def sha256(self, name: str) -> str | None:
        head = self._head(name)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def put_bytes(self, name: str, data: str | bytes) -> None:
        body = data.encode("utf-8") if isinstance(data, str) else data
        self._call(name, lambda: self.control.put_object(Bucket=self.bucket, Key=self.key(name), Body=body))

    def put_file(self, path: Path, name: str, *, sha256: str | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                max_concurrency=UPLOAD_THREADS)
        extra = {"Metadata": {"sha256": sha256}} if sha256 else None
        self._call(name, lambda: self.client.upload_file(str(path), self.bucket, self.key(name),
                                                          ExtraArgs=extra, Config=config), data=True)

    def delete(self, name: str) -> None:
        self._call(name, lambda: self.control.delete_object(Bucket=self.bucket, Key=self.key(name)))


def _without_userinfo(text: str) -> str:
    """`text` with the `user:password@` of any URL in it masked: botocore quotes the endpoint URL it could not
    reach, and an AWS_ENDPOINT_URL that carries credentials would put them in logs."""
    return re.sub(r"(://)[^/@\s\"']+@", r"\1***@", text)


def transient(err: BaseException) -> bool:
    """Whether a try that failed with `err` is worth repeating: no connection, a timeout, a response cut short,
    HTTP 429 or 5xx, a throttling or transient S3 code (what botocore's standard retry mode repeats)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError

    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in (429, 500, 502, 503, 504) or err.response.get("Error", {}).get("Code") in TRANSIENT_CODES
    dropped = (ConnectionError, HTTPClientError, IncompleteReadError, HTTPError, OSError)
    return isinstance(err, dropped) and not isinstance(err, (StoreError, FileNotFoundError))


class _ObjectStream(io.RawIOBase):
    """An S3 object read front to back, by GETs of one try each (`S3Store.reader`) that this stream repeats
    itself under the store's rule: a read that breaks or stalls is resumed with a ranged GET from the byte
    reached; after `attempts` tries in a row without a byte, a StoreError names the URL, the byte and the cause.
    So a store that drops connections neither hangs a reader nor ends an object early, and one that stops
    answering fails the read within `RequestRule.bound` of the last byte. A stop request ends the retries."""

    def __init__(self, store: S3Store, name: str, extra: dict) -> None:
        super().__init__()
        self.store, self.name = store, name
        first, _, last = extra.get("Range", "bytes=0-")[len("bytes="):].partition("-")
        self._position, self._end = int(first), (int(last) + 1 if last else None)  # bytes; end exclusive
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def _open_body(self) -> None:
        if self._end is not None and self._position >= self._end:
            self._body = io.BytesIO(b"")
            return
        span = f"bytes={self._position}-" + ("" if self._end is None else str(self._end - 1))
        response = self.store.reader.get_object(Bucket=self.store.bucket, Key=self.store.key(self.name),
                                                **({"Range": span} if self._position or self._end else {}))
        if self._end is None:
            self._end = self._position + int(response["ContentLength"])
        self._body = response["Body"]

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as ConnectionFailed

        view = memoryview(buffer).cast("B")
        url, attempts = self.store.url(self.name), self.store.rule.attempts
        failed = 0  # tries in a row that ended without a byte: the count starts again with each byte received
        while True:
            try:
                if self._body is None:
                    self._open_body()
                data = self._body.read(len(view))
                if not data and self._end is not None and self._position < self._end:
                    raise ConnectionFailed(error=f"the response ended at byte {self._position} of {self._end}")
                break
            except Exception as err:  # (a stop request is no Exception: it passes)
                self._body = None
                if not transient(err):  # the store answered (no such object, access denied), or no credentials
                    if isinstance(err, ClientError) or type(err).__module__.startswith("botocore"):
                        raise self.store.failure(self.name, err, data=True) from None
                    raise
                failed += 1
                if failed >= attempts:
                    tries = f"{failed} attempt{'s' * (failed != 1)}"
                    raise StoreError(f"{url}: reading stopped at byte {self._position} after {tries} "
                                     f"({_without_userinfo(str(err))}; {self.store.no_answer(data=True)})") from None
                check_stop(url)  # a stop request ends the retries (never a read that is being answered)
                count_retry()
                # exponential back-off with jitter (half of it random): many workers throttled at once by a store
                # answering 503 Slow Down come back spread out, not together; never longer than the rule's wait
                pause(random.uniform(0.5, 1.0) * min(RETRY_BACKOFF * 2 ** (failed - 1), MAX_BACKOFF), url)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if self._body is not None and hasattr(self._body, "close"):
            self._body.close()
        self._body = None
        super().close()


__all__ = ["LocalStore", "RequestRule", "S3Store", "Store", "StoreError", "is_store_url", "open_store",
           "request_rule", "sha256_file", "transient"]
