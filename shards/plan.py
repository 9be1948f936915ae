"""The shard plan: every source gets a key and a place in one shard, decided before any shard is written.

    options = WriteOptions(split, seed, ...)      what shapes the bytes written; validated when made
    plan    = plan_shards(sources, options)       keys assigned, one global seeded shuffle, cut into shards
    digests = plan_digest(shard, options, ...)    what each shard must hold: a rerun skips a shard whose record
                                                  has the same digest, and rewrites it otherwise

The plan depends only on the sources, the seed and the options that shape the output, so J jobs (or machines)
that each write `plan[job_index::num_jobs]` produce exactly the shards one job would.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

from shards.images import CHECKS
from shards.schema import TAR_BLOCK, sample_key
from shards.sources import SourceFile

DEFAULT_SHARD_BYTES = 512 * 10**6  # bytes; DALI and webdataset both read 256 MB - 1 GB shards efficiently
_MAX_KEY_CHARS = 80  # ustar names hold 100 bytes: key + "-NNN" + ".json" must fit


def tool_version() -> str:
    """The converter's version, part of every digest: a shard written by another version is written again."""
    try:
        return version("saturate")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` of a split: its sources, in the order they are packed."""

    index: int
    sources: tuple[SourceFile, ...]


@dataclass(frozen=True)
class WriteOptions:
    """Options that change the bytes written; they are part of the plan digest and of the manifest."""

    split: str
    seed: int
    shard_bytes: int | None
    samples_per_shard: int | None
    max_size: int | None
    quality: int
    check: str  # "decode" (strict decode of every pass-through JPEG) or "header" (trust a well-formed header)
    max_pixels: int  # width x height above which an image is rejected (decompression bombs)

    def __post_init__(self) -> None:
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard {self.samples_per_shard} must be >= 1")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality {self.quality} must be in 1..100")
        if self.check not in CHECKS:
            raise ValueError(f"--check {self.check!r} must be one of {', '.join(CHECKS)}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"--max-size {self.max_size} must be >= 1 pixel")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels {self.max_pixels} must be >= 1")


def assign_keys(sources: Sequence[SourceFile]) -> list[SourceFile]:
    """Unique, safe keys from file names; collisions get `-2`, `-3`, ... in path order (deterministic)."""
    taken: set[str] = set()
    keyed = []
    for s in sources:
        base = sample_key(s.rel)[:_MAX_KEY_CHARS]
        key, n = base, 1
        while key in taken:
            n += 1
            key = f"{base}-{n}"
        taken.add(key)
        keyed.append(SourceFile(s.rel, s.wnid, s.size, key, s.mtime_ns))
    return keyed


def _sample_bytes(source: SourceFile) -> int:
    """Estimated bytes one sample takes in a tar: 3 headers, payloads rounded up to blocks."""
    blocks = -(-source.size // TAR_BLOCK) + 3 + 2  # image + headers + .cls and .json blocks
    return blocks * TAR_BLOCK


def plan_shards(sources: Sequence[SourceFile], options: WriteOptions) -> list[ShardPlan]:
    """Shuffle globally with the seed (DALI only shuffles inside a buffer), then cut by bytes or samples."""
    order = list(assign_keys(sorted(sources, key=lambda s: s.rel)))
    random.Random(options.seed).shuffle(order)
    shards: list[list[SourceFile]] = [[]]
    budget = 0
    for source in order:
        cost = _sample_bytes(source)
        full = (
            len(shards[-1]) >= options.samples_per_shard
            if options.samples_per_shard
            else budget + cost > options.shard_bytes
        )
        if full and shards[-1]:
            shards.append([])
            budget = 0
        shards[-1].append(source)
        budget += cost
    return [ShardPlan(i, tuple(s)) for i, s in enumerate(shards)]


def plan_digest(shard: ShardPlan, options: WriteOptions, classes: list[dict], *, mtimes: bool = True) -> str:
    """Identifies what a shard must contain; a rerun rewrites any shard whose digest changed. With `mtimes`
    (the per-shard digest that decides skipping) a source modified in place counts as changed; without (the
    split's digest in the manifest) the digest depends only on names, sizes, labels and options, so two
    copies of a source tree give byte-identical manifests."""
    files = [(s.rel, s.size, s.key, s.wnid, *([s.mtime_ns] if mtimes else [])) for s in shard.sources]
    body = json.dumps([asdict(options), classes, files, tool_version()])
    return hashlib.sha256(body.encode()).hexdigest()


def split_digest(plan: Sequence[ShardPlan], options: WriteOptions, classes: list[dict]) -> str:
    """The plan's digest as the manifest records it (`plan_digest`): its shards' digests without mtimes, so a
    conversion with another seed, source or option is told from a rerun of this one."""
    content = " ".join(plan_digest(s, options, classes, mtimes=False) for s in plan)
    return hashlib.sha256(content.encode()).hexdigest()


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """'512MB' -> 512_000_000 bytes (decimal units; KiB/MiB/GiB/TiB binary); errors name `flag`."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTIB")
    try:
        value = int(float(number) * units[stripped[len(number):]])
    except (KeyError, ValueError):
        raise ValueError(f"{flag} {text!r}: expected bytes such as 512MB or 1GB") from None
    if value < 1:
        raise ValueError(f"{flag} {text!r} must be positive")
    return value


def format_size(size: int, *, up: bool = False) -> str:
    """Bytes for people, in the decimal units parse_size reads back, to 3 significant digits: 1_400_000_000 ->
    '1.4GB'. `up` rounds up, for a smallest value that must still be enough when typed back."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= scale:
            decimals = max(0, 3 - len(str(size // scale)))
            value = (math.ceil if up else round)(size / scale * 10**decimals) / 10**decimals
            return f"{value:g}{unit}"
    return f"{size}B"
