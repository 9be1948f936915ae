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

`gs://` is refused: DALI 2.4's wheel lists GCS reading, but it could not be run here (no GCS server can be run
locally and the wheel honours no emulator endpoint), so there is no code path for it; see the README.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from shards.local_store import STREAM_BUFFER, LocalStore, Store, sha256_file

#: A streamed read that breaks (connection dropped, server gone) is resumed from the byte it reached, at most
#: this many times, waiting RETRY_BACKOFF * 2**attempt seconds between tries; then it fails naming the URL.
READ_RETRIES = 3
RETRY_BACKOFF = 0.5  # seconds
#: botocore's own retries per request (standard mode: throttling, 5xx, connection errors), and its timeouts.
REQUEST_ATTEMPTS = 3
CONNECT_TIMEOUT = 10  # seconds
READ_TIMEOUT = 60  # seconds without a byte before a data request (a shard's GET, an upload) counts as failed
#: Listings, HEADs and small objects answer in milliseconds on a working store: an endpoint that takes the
#: connection and never answers (a wrong port, a proxy) fails in REQUEST_ATTEMPTS + 1 tries of this, not of
#: READ_TIMEOUT (4 minutes before any message).
CONTROL_READ_TIMEOUT = 10  # seconds
#: Uploads: objects above MULTIPART_BYTES go up in MULTIPART_BYTES parts, UPLOAD_THREADS parts at once.
MULTIPART_BYTES = 64 * 2**20  # bytes
UPLOAD_THREADS = 4


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
    """Objects under `s3://bucket/prefix/`. One boto3 client per process, made on first use (a client must not
    cross a fork, and DataLoader workers and converter processes are forks), dropped when pickled."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix
        self._clients: dict[float, Any] = {}  # read timeout (seconds) -> client
        self._client_pid = -1

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "_clients": {}, "_client_pid": -1}

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _client_with(self, read_timeout: float) -> Any:
        if self._client_pid != os.getpid():
            self._clients, self._client_pid = {}, os.getpid()
        if read_timeout not in self._clients:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": REQUEST_ATTEMPTS, "mode": "standard"},
                            connect_timeout=CONNECT_TIMEOUT, read_timeout=read_timeout)
            self._clients[read_timeout] = boto3.session.Session().client("s3", config=config)
        return self._clients[read_timeout]

    @property
    def client(self) -> Any:
        """For data: shard GETs and uploads (READ_TIMEOUT)."""
        return self._client_with(READ_TIMEOUT)

    @property
    def control(self) -> Any:
        """For listings, HEADs, deletes and small objects (CONTROL_READ_TIMEOUT)."""
        return self._client_with(CONTROL_READ_TIMEOUT)

    def _call(self, name: str | None, request: Callable[[], Any]) -> Any:
        """Run one boto3 request; its exceptions become one-line errors that name the URL (see `failure`)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return request()
        except (ClientError, BotoCoreError) as err:
            raise self.failure(name, err) from None

    def failure(self, name: str | None, err: Exception) -> OSError:
        """FileNotFoundError for a missing object, else a StoreError with the store's code and message."""
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
        return StoreError(f"{url}: {_without_userinfo(str(err))}")

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
                                                          ExtraArgs=extra, Config=config))

    def delete(self, name: str) -> None:
        self._call(name, lambda: self.control.delete_object(Bucket=self.bucket, Key=self.key(name)))


def _without_userinfo(text: str) -> str:
    """`text` with the `user:password@` of any URL in it masked: botocore quotes the endpoint URL it could not
    reach, and an AWS_ENDPOINT_URL that carries credentials would put them in logs."""
    return re.sub(r"(://)[^/@\s\"']+@", r"\1***@", text)


class _ObjectStream(io.RawIOBase):
    """An S3 object read front to back. A read that breaks mid-object is resumed with a ranged GET from the
    byte reached, at most READ_RETRIES times with backoff, then a StoreError names the URL, the byte and the
    cause: a store that drops connections neither hangs a reader nor ends an object early."""

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
        response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(self.name),
                                                **({"Range": span} if self._position or self._end else {}))
        if self._end is None:
            self._end = self._position + int(response["ContentLength"])
        self._body = response["Body"]

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
        from botocore.exceptions import ConnectionError as ConnectionFailed
        from urllib3.exceptions import HTTPError

        dropped = (ConnectionFailed, HTTPClientError, IncompleteReadError, HTTPError, OSError)
        view = memoryview(buffer).cast("B")
        for attempt in range(READ_RETRIES + 1):
            try:
                if self._body is None:
                    self._open_body()
                data = self._body.read(len(view))
                if not data and self._end is not None and self._position < self._end:
                    raise ConnectionFailed(error=f"the response ended at byte {self._position} of {self._end}")
                break
            except dropped as err:
                self._body = None
                if attempt == READ_RETRIES:
                    raise StoreError(f"{self.store.url(self.name)}: reading stopped at byte {self._position} after "
                                     f"{READ_RETRIES + 1} attempts ({_without_userinfo(str(err))})") from None
                time.sleep(RETRY_BACKOFF * 2**attempt)
            except Exception as err:  # the store answered (no such object, access denied) or no credentials
                self._body = None
                if isinstance(err, ClientError) or type(err).__module__.startswith("botocore"):
                    raise self.store.failure(self.name, err) from None
                raise
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if self._body is not None and hasattr(self._body, "close"):
            self._body.close()
        self._body = None
        super().close()


__all__ = ["STREAM_BUFFER", "LocalStore", "S3Store", "Store", "StoreError", "is_store_url", "open_store",
           "sha256_file"]
