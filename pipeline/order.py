"""The order a train split is read in: which samples each global batch holds, epoch after epoch.

    stream  = epoch_stream(counts, seed=seed, epoch=e)        every sample of the split once, in reading order
    batches = rank_batches(stream, rank=r, world_size=W, batch_size=b)   rank r's micro-batches of epoch e
    plan    = SegmentPlan(batches, index, max_entries=...)    DALI reader entries, a few thousand per pipeline

`sample` (the default): every epoch, each shard's samples are put in a fresh random order and cut into chunks of
ORDER_CHUNK samples, and all the split's chunks are put in a fresh random order; the stream is the chunks one
after another. Global micro-batch m is stream[m*b*W : (m+1)*b*W] and rank r takes the r-th b of it. So the order
is a function of (seed, epoch) and the stream position only, never of the number of ranks, threads or the backend:
with the same global batch (b*W), the samples of every global batch are the same on 1, 2 or 512 processes, and a
position inside an epoch is one number (samples the whole job has consumed), which a resume on another process
count continues from exactly. The last len(stream) % (b*W) samples sit out the epoch (different ones each epoch).

Why chunks and not single samples: DALI's webdataset reader reads the samples an index file lists, in its order,
and the same tar may be listed many times, each time with its own index; so an order becomes a list of (tar, index
of a few of its samples) entries written before the reader is built, and the read path stays DALI's native one
(no Python callback, the same ranged reads from s3://). One entry per sample would mean a million index files
an epoch on one GPU; a chunk of 16 makes a sixteenth of that, and a batch still draws from dozens of shards. A
reader takes a bounded number of entries (about 32,000 make DALI 2.4's reader fail with "Too many open files"
whatever the open-file limit), so an epoch is read in segments of at most MAX_ENTRIES entries, each its own
pipeline, the next one built while the current one runs. The entries' index files are written to a private
temporary folder and deleted once the reader has parsed them.

`shard`: the order the loaders had before (DALI reshuffles the shard order every epoch, each rank reads a
contiguous share through a shuffle buffer; the `pytorch` backend does the same with webdataset): the cheapest
reads, kept for comparison. It depends on the number of ranks, so it resumes only on the same topology.
docs/data-order.md compares the two with an i.i.d. shuffle (tools/order_quality.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.base import LoaderOptionError, ShardReadError
from shards.local_store import Hold, Store
from shards.process import temporary_folder
from shards.schema import IMAGE_EXT, INDEX_VERSION, LABEL_EXT, Manifest, ShardFormatError, split_member_name

ORDERS: tuple[str, ...] = ("sample", "shard")
DEFAULT_ORDER = "sample"
#: Samples read together from one shard in `sample` order, unless `order_chunk` says otherwise (see the module
#: docstring and the README's "Data order": smaller mixes small per-GPU batches better, larger writes fewer
#: index files).
ORDER_CHUNK = 16
#: Reader entries per DALI pipeline in `sample` order: far below the ~32,000 at which DALI 2.4's reader fails.
MAX_ENTRIES = 4096
_ORDER_TAG = 0x5A7  # mixed into the order's seed so it never shares a stream with another use of `seed`
_INDEX_READS = 16  # index files read at once when a split's index is loaded (requests, on an object store)
ENTRY_FOLDER = "saturate-order"


def epoch_stream(counts: Sequence[int], *, seed: int, epoch: int, chunk: int = ORDER_CHUNK) -> np.ndarray:
    """Global sample numbers (a sample's position in the manifest's shards, in manifest order) of epoch `epoch`
    in `sample` order: int64, each sample once. Inside a chunk, samples keep their order in the shard, so a
    reader moves forward through each tar."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _ORDER_TAG])))
    shard = np.repeat(np.arange(len(counts)), counts)
    by_shard = np.lexsort((rng.random(total), shard))  # sample numbers, shard by shard, each shard shuffled
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    chunks = -(-counts // chunk)  # per shard
    chunk_of = (np.repeat(np.concatenate(([0], np.cumsum(chunks)[:-1])), counts)
                + (np.arange(total) - np.repeat(starts, counts)) // chunk)
    place = np.empty(int(chunks.sum()), dtype=np.int64)
    place[rng.permutation(len(place))] = np.arange(len(place))  # chunk -> its place in the epoch
    return by_shard[np.lexsort((by_shard, place[chunk_of]))]


def rank_batches(stream: np.ndarray, *, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """(micro-batches, batch_size) sample numbers rank `rank` reads: the r-th `batch_size` of each global
    micro-batch of batch_size * world_size consecutive stream samples; the tail that fills no global micro-batch
    is left out."""
    width = batch_size * world_size
    count = len(stream) // width
    return stream[: count * width].reshape(count, world_size, batch_size)[:, rank, :]


def check_order(order: str | None, *, train: bool, chunk: int | None = None) -> tuple[str | None, int | None]:
    """(order, chunk) a loader reads in: `order` or DEFAULT_ORDER, and for `sample` order `chunk` or ORDER_CHUNK
    (samples read together from one shard); None, None for val (every sample once, in manifest order).
    LoaderOptionError naming the keyword for an unknown order, a chunk below 1, or either asked where it does
    not apply."""
    if not train:
        for keyword, value in (("order", order), ("order_chunk", chunk)):
            if value is not None:
                raise LoaderOptionError(keyword, value, "val loaders read every sample once in manifest order; "
                                        "leave it unset")
        return None, None
    order = DEFAULT_ORDER if order is None else order
    if order not in ORDERS:
        raise LoaderOptionError("order", order, f"choose one of {', '.join(ORDERS)}")
    if order != "sample":
        if chunk is not None:
            raise LoaderOptionError("order_chunk", chunk, f"order={order!r} reads whole shards; the chunk applies "
                                    "to order='sample'")
        return order, None
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise LoaderOptionError("order_chunk", chunk, "must be an integer >= 1 (samples)")
    return order, ORDER_CHUNK if chunk is None else chunk


def sample_order_index(store: Store, manifest: Manifest, backend_options: dict) -> SplitIndex:
    """A train loader's start in `sample` order: its split's index (a damaged index is a ShardReadError naming
    it). `sample` order has no shuffle buffer (the order is the whole split's): a `shuffle_buffer` given for it
    would be ignored, so it is refused naming the keyword."""
    if "shuffle_buffer" in backend_options:
        raise LoaderOptionError("shuffle_buffer", backend_options["shuffle_buffer"], "order='sample' shuffles the "
                                "whole split and has no buffer; it applies to order='shard'")
    try:
        return SplitIndex(store, manifest)
    except ShardFormatError as err:
        raise ShardReadError(str(err)) from err


class SplitIndex:
    """Every shard's DALI index of one split, read once: the lines entries are made of, and each sample's
    member offsets (what the `pytorch` backend reads by). Kept as each index's bytes and its line offsets
    (about 110 bytes per sample: ~140 MB for ImageNet's 1.28 M), not as Python objects per sample."""

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.tars = [record.name for record in manifest.shards]
        self.counts = np.array([record.num_samples for record in manifest.shards], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.counts)[:-1]))
        with ThreadPoolExecutor(max_workers=_INDEX_READS) as pool:
            texts = list(pool.map(lambda r: store.read_bytes(r.index), manifest.shards))
        self._lines: list[bytes] = []
        self._offsets: list[np.ndarray] = []
        for record, text in zip(manifest.shards, texts, strict=True):
            head, _, body = text.partition(b"\n")
            ends = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == ord("\n")) + 1
            expected = [INDEX_VERSION.encode(), str(record.num_samples).encode()]
            if head.split() != expected or len(ends) != record.num_samples:
                raise ShardFormatError(f"{store.url(record.index)}: not the index of the {record.num_samples} samples "
                                       f"the {manifest.split} manifest lists; re-convert the split, or run "
                                       "`saturate shards verify` on it")
            self._lines.append(body)
            self._offsets.append(np.concatenate(([0], ends)))

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def nbytes(self) -> int:
        """Memory the index holds (bytes)."""
        return sum(map(len, self._lines)) + sum(offsets.nbytes for offsets in self._offsets)

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample within the shard) of global sample numbers."""
        shard = np.searchsorted(self.starts, samples, side="right") - 1
        return shard, samples - self.starts[shard]

    def line(self, shard: int, sample: int) -> bytes:
        offsets = self._offsets[shard]
        return self._lines[shard][offsets[sample]:offsets[sample + 1]]

    def index_text(self, shard: int, samples: Sequence[int]) -> bytes:
        """A DALI index listing `samples` of `shard`, in that order."""
        return (f"{INDEX_VERSION} {len(samples)}\n".encode()
                + b"".join(self.line(shard, int(j)) for j in samples))

    def members(self, shard: int, sample: int) -> tuple[str, dict[str, tuple[int, int]]]:
        """(sample key, ext -> (offset, size) in bytes) of one sample, from its index line."""
        fields = self.line(shard, sample).decode().split()
        spans = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
        return split_member_name(fields[3])[0], spans

    def read_span(self, shard: int, sample: int) -> tuple[str, int, int, dict[str, tuple[int, int]]]:
        """(key, first byte, bytes, ext -> (offset, size) relative to the first byte) covering the sample's image
        and label members: one read per sample."""
        key, spans = self.members(shard, sample)
        wanted = [spans[IMAGE_EXT], spans[LABEL_EXT]]
        first = min(offset for offset, _ in wanted)
        last = max(offset + size for offset, size in wanted)
        relative = {ext: (spans[ext][0] - first, spans[ext][1]) for ext in (IMAGE_EXT, LABEL_EXT)}
        return key, first, last - first, relative


class SampleReader:
    """The `pytorch` backend's read in `sample` order: one sample by its index offsets, image and label members
    in one read: a file read when the tar is a local file (a folder, or a shard cache's verified copy, held while
    it is open), one ranged GET on an object store otherwise. A bounded set of files is kept open."""

    OPEN_FILES = 32  # tars kept open per worker

    def __init__(self, store: Store, index: SplitIndex) -> None:
        self.store, self.index = store, index
        self._files: dict[int, tuple[int, Hold, str]] = {}  # shard -> (file descriptor, hold, path), oldest first

    def __call__(self, sample: int, position: int) -> dict:
        shard, within = self.index.locate(np.array([sample]))
        shard, within = int(shard[0]), int(within[0])
        name = self.index.tars[shard]
        key, first, length, members = self.index.read_span(shard, within)
        try:
            fd = self._file(shard, name)
            if fd is not None:
                data = os.pread(fd, length, first)
            else:
                data = self.store.read_bytes(name, offset=first, length=length)
        except (OSError, ValueError) as err:
            raise ShardReadError(f"{self._where(shard, name)}: sample {key} could not be read ({err})") from None
        if len(data) != length:
            raise ShardReadError(f"{self._where(shard, name)}: sample {key} ends at byte {first + len(data)}, its "
                                 f"index says {first + length}; the shard is truncated or was replaced, re-convert it")
        out = {"__url__": self._where(shard, name), "__key__": key, "__position__": position}
        out.update({ext: data[offset:offset + size] for ext, (offset, size) in members.items()})
        return out

    def _file(self, shard: int, name: str) -> int | None:
        """An open descriptor of the shard's local file; None when there is no local file (yet)."""
        if shard not in self._files:
            hold = self.store.hold([name])  # before looking: a cached copy then stays while it is open
            path = self.store.local_path(name)
            if path is None:
                hold.release()
                return None
            if len(self._files) >= self.OPEN_FILES:
                self._close(next(iter(self._files)))
            try:
                self._files[shard] = (os.open(path, os.O_RDONLY), hold, str(path))
            except OSError:
                hold.release()
                raise
        return self._files[shard][0]

    def _where(self, shard: int, name: str) -> str:
        """The tar's path (an open local file: asked of the store once, not per sample) or URL, for messages."""
        return self._files[shard][2] if shard in self._files else str(self.store.url(name))

    def _close(self, shard: int) -> None:
        fd, hold, _ = self._files.pop(shard)
        os.close(fd)
        hold.release()

    def close(self) -> None:
        for shard in list(self._files):
            self._close(shard)


@dataclass(frozen=True)
class Segment:
    """Consecutive micro-batches of a rank's epoch read by one DALI pipeline."""

    first_batch: int  # in the epoch
    batches: np.ndarray  # (micro-batches, batch_size) sample numbers
    entries: list[tuple[int, np.ndarray]]  # (shard, samples within it) in reading order

    @property
    def num_batches(self) -> int:
        return len(self.batches)


def entries_of(index: SplitIndex, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Runs of consecutive samples from one shard: one reader entry each."""
    shard, within = index.locate(samples)
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return [(int(s[0]), w) for s, w in zip(np.split(shard, cuts), np.split(within, cuts), strict=True)]


def segments(index: SplitIndex, batches: np.ndarray, *, first_batch: int = 0,
             max_entries: int | None = None) -> list[Segment]:
    """`batches[first_batch:]` cut at micro-batch boundaries into segments of at most `max_entries` (default
    MAX_ENTRIES) entries (a single micro-batch with more entries is a segment of its own)."""
    max_entries = MAX_ENTRIES if max_entries is None else max_entries
    out: list[Segment] = []
    start = first_batch
    while start < len(batches):
        shard, _ = index.locate(batches[start:].reshape(-1))
        run_starts = np.concatenate(([1], np.diff(shard) != 0)).reshape(len(batches) - start, -1).sum(axis=1)
        fits = int(np.searchsorted(np.cumsum(run_starts), max_entries, side="right"))
        end = start + max(1, fits)
        out.append(Segment(start, batches[start:end], entries_of(index, batches[start:end].reshape(-1))))
        start = end
    return out


def rank_segments(index: SplitIndex, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
                  chunk: int = ORDER_CHUNK, first_batch: int = 0) -> list[Segment]:
    """Rank `rank`'s segments of epoch `epoch` in `sample` order, from micro-batch `first_batch` on."""
    stream = epoch_stream(index.counts, seed=seed, epoch=epoch, chunk=chunk)
    batches = rank_batches(stream, rank=rank, world_size=world_size, batch_size=batch_size)
    return segments(index, batches, first_batch=first_batch)


def shards_read(index: SplitIndex, plan: Sequence[Segment]) -> list[str]:
    """The tars `plan`'s segments read, each once, in the order they are first read (what a shard cache is asked
    to fetch first)."""
    return list(dict.fromkeys(index.tars[shard] for segment in plan for shard, _ in segment.entries))


class EntryFolder:
    """A private temporary folder for the index files of the reader entries of one loader. Named after this
    host and process (shards.process), so a loader killed with kill -9 leaves a folder the next one removes."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        parent = parent if parent is not None else tempfile.gettempdir()
        try:
            self.path = temporary_folder(parent, ENTRY_FOLDER)
        except OSError as err:
            raise self._error(err, Path(parent)) from err
        self._written = 0

    @staticmethod
    def _error(err: OSError, where: Path) -> OSError:
        """A full or read-only temporary folder, said with its path and the variable that moves it (the bare
        `[Errno 28] No space left on device` names neither)."""
        return OSError(err.errno, f"cannot write the data reader's index files in {where} ({err.strerror}); free "
                                  "space there or point TMPDIR at a writable folder with room (a few MB)")

    def write(self, index: SplitIndex, entries: list[tuple[int, np.ndarray]],
              url: object) -> tuple[list[str], list[str], Path]:
        """(tar paths or URLs, index paths, the folder holding them) for DALI's reader; `url(name)` gives a tar's
        path or URL. Remove the folder once the reader is built: DALI parses the indexes when it is built."""
        self._written += 1
        folder = self.path / f"segment-{self._written}"
        tars, indexes = [], []
        try:
            folder.mkdir()
            for number, (shard, samples) in enumerate(entries):
                path = folder / f"{number}.idx"
                path.write_bytes(index.index_text(shard, samples))
                tars.append(str(url(index.tars[shard])))
                indexes.append(str(path))
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise self._error(err, self.path) from err
        return tars, indexes, folder

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
