"""The operations every shard location offers (`Store`), and the folder that offers them (`LocalStore`).

`shards.store.open_store` picks the store for a location (a folder here; an `s3://` prefix is `shards.store`'s
S3Store); see that module for the whole picture. Names are relative to the store (`train-000000.tar`,
`.parts/train.plan.json`).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from shards.process import atomic_open, atomic_write

STREAM_BUFFER = 2**20  # bytes read ahead per streamed object, and copied at once


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a whole file, read in 4 MiB chunks (what the manifest records per shard)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()



class Store:
    """The operations on a shard location; names are relative to it (see the module docstring)."""

    #: The folder itself when the store is a local folder (writers write there, nothing is copied); else None.
    local_dir: Path | None = None

    def url(self, name: str) -> Path | str:
        """What a reader (DALI, webdataset, a person) is given for `name`."""
        raise NotImplementedError

    def resolved(self) -> str:
        """The location in full, for reports: an absolute folder path, or the URL."""
        return str(self)

    def check(self) -> None:
        """Raise FileNotFoundError / StoreError when the location itself cannot be read (no folder, no bucket,
        no access, no endpoint)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make the location ready for writing (create the folder; check the bucket)."""
        raise NotImplementedError

    def sizes(self, folder: str = "") -> dict[str, int]:
        """Bytes of every object directly in the location, or in its sub-folder `folder` (`.parts`), by name
        relative to that folder: one listing, so a loader checks every shard of a split without a request per
        shard. Empty for a sub-folder that does not exist."""
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """Bytes of `name`, None when it does not exist (a stat or one HEAD request)."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def read_bytes(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """`length` bytes of `name` from byte `offset` (all of it by default); FileNotFoundError when missing."""
        raise NotImplementedError

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def open(self, name: str) -> BinaryIO:
        """A sequential binary stream over `name` (what tarfile's stream mode and webdataset read)."""
        raise NotImplementedError

    def open_range(self, name: str, offset: int, length: int) -> BinaryIO:
        """A stream over `length` bytes of `name` from byte `offset` (one ranged GET on an object store)."""
        return io.BytesIO(self.read_bytes(name, offset=offset, length=length))

    def local_path(self, name: str) -> Path | None:
        """A local file holding `name` that may be read with file calls (pread, mmap), or None."""
        return None

    def hold(self, names: list[str]) -> Hold:
        """Keep `names` in a node-local cache (shards.cache) until released: what a reader may open."""
        return Hold()

    def want(self, names: list[str]) -> None:
        """The shards read next, soonest first: a cache fetches them in that order (others: ignored)."""

    def sha256(self, name: str) -> str | None:
        """Hex sha256 of `name`: hashed from the file (folder), or the value recorded when it was uploaded
        (S3 object metadata; hashing a remote object would mean downloading it). None when unknown."""
        raise NotImplementedError

    def put_bytes(self, name: str, data: str | bytes) -> None:
        """Write a small object whole (plans, shard records, manifests); readers never see it half written."""
        raise NotImplementedError

    def put_file(self, path: Path, name: str, *, sha256: str | None = None) -> None:
        """Copy a finished local file into the store as `name`, recording its sha256 when given."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove `name`; nothing happens when it is already gone."""
        raise NotImplementedError


class Hold:
    """What `Store.hold` returns; `release()` lets a cache evict the shards again (here: nothing held)."""

    def release(self) -> None:
        pass


class LocalStore(Store):
    """A folder on a local or shared file system: exactly the behaviour shard folders always had."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.local_dir = self.root
        if self.root.is_file():  # a tar given for its folder: said here, before a read or write deep inside fails
            raise NotADirectoryError(f"shard directory {self.root} is a file, not a folder")

    def __str__(self) -> str:
        return str(self.root)

    def url(self, name: str) -> Path:
        return self.root / name

    def resolved(self) -> str:
        return str(self.root.resolve())

    def check(self) -> None:
        if self.root.is_file():
            raise NotADirectoryError(f"shard directory {self.root} is a file, not a folder")
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard directory {self.root} does not exist")

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def sizes(self, folder: str = "") -> dict[str, int]:
        self.check()
        if not (self.root / folder).is_dir():
            return {}
        with os.scandir(self.root / folder) as entries:
            return {e.name: e.stat().st_size for e in entries if e.is_file()}

    def size(self, name: str) -> int | None:
        path = self.root / name
        return path.stat().st_size if path.is_file() else None

    def read_bytes(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def local_path(self, name: str) -> Path:
        return self.root / name

    def sha256(self, name: str) -> str | None:
        path = self.root / name
        return sha256_file(path) if path.is_file() else None

    def put_bytes(self, name: str, data: str | bytes) -> None:
        atomic_write(self.root / name, data)

    def put_file(self, path: Path, name: str, *, sha256: str | None = None) -> None:
        if Path(path).resolve() == (self.root / name).resolve():
            return  # already in place (the converter writes a folder's shards where they belong)
        with open(path, "rb") as source, atomic_open(self.root / name, "wb") as target:
            shutil.copyfileobj(source, target, STREAM_BUFFER)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


__all__ = ["STREAM_BUFFER", "Hold", "LocalStore", "Store", "sha256_file"]
