"""What a shard is: the one definition the converter, `verify` and every loader in `pipeline/` share.

Like FFCV's `Field` classes, this module owns member names and extensions, the label encoding, the name of every
file in a shard folder (shards, indexes, manifests, the converter's `.parts/` plans, records and claims,
`.partial` temporaries), the DALI index format and the manifest. Nothing outside it types an extension string, a
file name pattern or a label width.

A shard is an uncompressed GNU/ustar tar (no PAX headers: DALI's reader has failed on them) whose samples are
three consecutive members sharing a key::

    <key>.jpg    RGB baseline or progressive JPEG, the source bytes untouched when they already were RGB JPEG
    <key>.cls    the class index as zero-padded ASCII decimal, LABEL_WIDTH bytes, no newline ("000417")
    <key>.json   {"path": <source path relative to SRC>, "wnid": ..., "label": ..., "converted": ...}

The `.cls` width is fixed so that DALI can read the label as LABEL_WIDTH uint8 digits and turn it into an
integer with arithmetic on the device, without a Python callback; webdataset's standard decoder reads it
with `int()`, which ignores the leading zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from shards.images import DEFAULT_MAX_PIXELS
from shards.store import Store, open_store

SCHEMA_VERSION = 1

IMAGE_EXT = "jpg"
LABEL_EXT = "cls"
META_EXT = "json"
#: Member extensions of one sample, in the order they are written to the tar.
SAMPLE_EXTS: tuple[str, ...] = (IMAGE_EXT, LABEL_EXT, META_EXT)

#: Digits in a `.cls` member (zero-padded ASCII decimal); 6 digits hold ImageNet-21k's 21,841 classes.
LABEL_WIDTH = 6
LABEL_ENCODING = {"ext": LABEL_EXT, "format": "ascii-decimal-zero-padded", "width": LABEL_WIDTH}

#: File names in a shard folder (see shard_name and the functions after it).
SHARD_EXT = "tar"
INDEX_EXT = "idx"
MANIFEST_SUFFIX = ".manifest.json"
PARTS_DIR = ".parts"  # the converter's plans and per-shard records: what `merge` builds the manifest from
RECORD_EXT = "json"
PARTIAL_SUFFIX = ".partial"  # a file being written; renamed into place when whole
CLAIM_SUFFIX = ".claim"  # a running converter's claim on a split (shards.claim)

TAR_BLOCK = 512  # bytes
#: Version tag DALI's `wds2idx` writes on the first line of an index; our indexes are identical to its own.
INDEX_VERSION = "v1.2"

#: The usual split names; any name matching SPLIT_PATTERN works (test, minival, train_subset, ...).
SPLITS = ("train", "val")
SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
WNID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_HEAD_READS = 16  # index first lines read at once when a split is opened (requests, on an object store)


class ShardFormatError(ValueError):
    """A shard, index or manifest does not match this schema; the message names the file and the sample."""


def encode_label(label: int) -> bytes:
    """Class index -> `.cls` member bytes (zero-padded ASCII decimal, LABEL_WIDTH bytes)."""
    if not 0 <= label < 10**LABEL_WIDTH:
        raise ValueError(f"label {label} does not fit the {LABEL_WIDTH}-digit .{LABEL_EXT} encoding")
    return b"%0*d" % (LABEL_WIDTH, label)


def decode_label(raw: bytes) -> int:
    """`.cls` member bytes -> class index; rejects anything that is not exactly LABEL_WIDTH digits."""
    if len(raw) != LABEL_WIDTH or not raw.isdigit():
        raise ShardFormatError(f".{LABEL_EXT} member {raw[:16]!r} is not {LABEL_WIDTH} ASCII digits")
    return int(raw)


def check_split_name(split: str, flag: str = "--split") -> str:
    """A split name becomes part of file names (`<split>-000000.tar`, `<split>.manifest.json`): letters,
    digits and `_` only, so it can neither leave the shard folder nor make one split's files look like
    another's (`-` separates the split from the shard number)."""
    if not isinstance(split, str) or not SPLIT_PATTERN.match(split):
        raise ValueError(f"{flag} {split!r}: a split name is letters, digits and '_' (e.g. train, val, minival)")
    return split


def splits_in(shards_dir: str | os.PathLike) -> list[str]:
    """Every split with a manifest in `shards_dir` (a folder or a store URL): train and val first, then the
    others by name."""
    found = {name[: -len(MANIFEST_SUFFIX)] for name in open_store(shards_dir).sizes()
             if name.endswith(MANIFEST_SUFFIX)}
    return _split_order({s for s in found if SPLIT_PATTERN.match(s)})


def _split_order(splits: Iterable[str]) -> list[str]:
    """train and val first, then the others by name."""
    splits = set(splits)
    return [s for s in SPLITS if s in splits] + sorted(splits - set(SPLITS))


# --- file names in a shard folder ----------------------------------------------------------------------
def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`: `train-000000.tar`."""
    return f"{split}-{index:06d}.{SHARD_EXT}"


def index_name(split: str, index: int) -> str:
    """File name of the DALI index beside shard `index`: `train-000000.idx`."""
    return f"{split}-{index:06d}.{INDEX_EXT}"


def index_beside(tar: str) -> str | None:
    """The index file of the shard file `tar` (`train-000000.tar` -> `train-000000.idx`); None for a name that
    is not a shard's tar (a cache folder lists every file and keeps shards and indexes together)."""
    match = re.match(rf"^({SPLIT_PATTERN.pattern[1:-1]}-\d{{6}})\.{SHARD_EXT}$", tar)
    return f"{match.group(1)}.{INDEX_EXT}" if match else None


def manifest_name(split: str) -> str:
    """File name of a split's manifest: `train.manifest.json`."""
    return f"{split}{MANIFEST_SUFFIX}"


def record_name(split: str, index: int) -> str:
    """The converter's record of shard `index`, written once the shard is wholly in OUT: `.parts/train-000000.json`."""
    return f"{PARTS_DIR}/{split}-{index:06d}.{RECORD_EXT}"


def plan_name(split: str) -> str:
    """The converter's plan of a split (digests, classes, options), written before any shard:
    `.parts/train.plan.json`."""
    return f"{PARTS_DIR}/{split}.plan.{RECORD_EXT}"


def claim_name(split: str) -> str:
    """What a running converter's claim on `split` is named, before shards.claim tags it with its writer
    (`.parts/.train.claim.tmp-<host>-<pid>-<random>`): `.parts/train.claim`."""
    return f"{PARTS_DIR}/{split}{CLAIM_SUFFIX}"


def partial_name(name: str) -> str:
    """Where a file is written before it is renamed into place: `train-000000.tar.partial`."""
    return name + PARTIAL_SUFFIX


def unlisted_shard_files(names: Iterable[str], manifest: Manifest, *, partials: bool = False) -> list[str]:
    """The `<split>-NNNNNN.tar/.idx` files among `names` (a folder's or store's listing, `Store.sizes()`) that the
    manifest does not list, sorted; with `partials`, their `.partial` temporaries too."""
    listed = {name for r in manifest.shards for name in (r.name, r.index)}
    partial = f"({re.escape(PARTIAL_SUFFIX)})?" if partials else ""
    pattern = re.compile(rf"^{re.escape(manifest.split)}-\d{{6}}\.({SHARD_EXT}|{INDEX_EXT}){partial}$")
    return sorted(name for name in names if pattern.match(name) and name not in listed)


def splits_without_manifest(names: Iterable[str]) -> dict[str, list[str]]:
    """Split -> its shard files among `names` (a listing, `Store.sizes()`: `<split>-NNNNNN.tar/.idx` and their
    `.partial`s), sorted, for every split that has such files but no manifest there. The manifest is written
    last and a re-conversion with another plan removes it first, so these are an interrupted conversion's
    shards: no loader opens them, and `verify` must say so rather than approve the folder."""
    names = set(names)
    pattern = re.compile(rf"^([A-Za-z0-9_]+)-\d{{6}}\.({SHARD_EXT}|{INDEX_EXT})({re.escape(PARTIAL_SUFFIX)})?$")
    found: dict[str, list[str]] = {}
    for name in sorted(names):
        match = pattern.match(name)
        if match and manifest_name(match.group(1)) not in names:
            found.setdefault(match.group(1), []).append(name)
    return {split: found[split] for split in _split_order(found)}


def record_number(split: str, name: str) -> int | None:
    """The shard index of a record's file name in PARTS_DIR (`train-000003.json` -> 3); None for other files."""
    match = re.match(rf"^{re.escape(split)}-(\d{{6}})\.{RECORD_EXT}$", name)
    return int(match.group(1)) if match else None


# --- a sample's members in the tar -----------------------------------------------------------------------
def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """(key, ext) of a tar member: the base name split at its first dot, as webdataset and DALI's reader do."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def sample_key(source_name: str) -> str:
    """A safe sample key from a source file name: the stem, with anything but [A-Za-z0-9_-] replaced by `_`.

    Keys never hold `.` (webdataset and DALI split key and extension at the first dot), `/`, `..`, or control
    characters. Uniqueness across a split is the converter's job (it appends `-2`, `-3`, ... on collision).
    """
    stem = Path(source_name).name
    stem = stem.split(".")[0] if not stem.startswith(".") else stem.lstrip(".")
    key = _KEY_UNSAFE.sub("_", stem).strip("_") or "sample"
    return key


# --- the DALI index ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexedMember:
    """One tar member as DALI's index lists it: data offset and size in bytes."""

    ext: str
    offset: int  # bytes from the start of the tar to the member's data (header offset + 512)
    size: int  # bytes
    name: str


def format_index(samples: Sequence[Sequence[IndexedMember]]) -> str:
    """The text of a DALI webdataset index, byte-identical to what DALI's `wds2idx` writes for the same tar."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def parse_index(text: str, path: str | os.PathLike = "<index>") -> list[list[IndexedMember]]:
    """Parse a DALI index; raises ShardFormatError naming `path` and the line on any inconsistency."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardFormatError(f"{path}: first line must be '{INDEX_VERSION} <num_samples>', got {lines[:1]}")
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split(" ")
        if len(fields) % 4:
            raise ShardFormatError(f"{path}:{lineno}: expected groups of 'ext offset size name'")
        samples.append(
            [
                IndexedMember(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            ]
        )
    if len(samples) != int(head[1]):
        raise ShardFormatError(f"{path}: header says {head[1]} samples, found {len(samples)} lines")
    return samples


# --- the manifest ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """One shard as the manifest lists it."""

    name: str
    index: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """Everything a loader or a person needs to know about one converted split (`<split>.manifest.json`)."""

    split: str
    num_samples: int
    discovered: int
    converted: int
    rejected: list[dict]  # [{"path": ..., "reason": ...}], paths relative to the source
    classes: list[dict]  # [{"index": i, "wnid": ..., "name": ... or None, "num_samples": n}], in index order
    label_encoding: dict
    shards: list[ShardRecord]
    seed: int
    options: dict
    tool_version: str
    schema_version: int = SCHEMA_VERSION
    #: sha256 over the shard plan this manifest was written for; a conversion with another plan removes the
    #: manifest before it replaces any shard ("" in manifests written before it existed)
    plan_digest: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def max_pixels(self) -> int:
        """The pixel limit the split was converted with (manifests from before the option: the default), which
        `verify` and a loader's diagnosis check again."""
        return self.options.get("max_pixels", DEFAULT_MAX_PIXELS)

    @property
    def content_digest(self) -> str:
        """sha256 over every shard's name, sample count and sha256: the same for the same shards, whatever wrote
        the manifest. A loader's position in an epoch is only meaningful on the shards it was counted on."""
        body = json.dumps([[s.name, s.num_samples, s.sha256] for s in self.shards])
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def wnids(self) -> list[str]:
        return [c["wnid"] for c in self.classes]

    def to_json(self) -> str:
        """Deterministic JSON text: same manifest, same bytes."""
        body = dict(self.__dict__)
        body["shards"] = [s.__dict__ for s in self.shards]
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str | os.PathLike = "<manifest>") -> Manifest:
        try:
            body = json.loads(text)
            body["shards"] = [ShardRecord(**s) for s in body["shards"]]
            manifest = cls(**body)
        except (ValueError, TypeError, KeyError) as err:
            raise ShardFormatError(f"{path}: not a valid manifest ({err})") from err
        if manifest.schema_version != SCHEMA_VERSION:
            raise ShardFormatError(
                f"{path}: schema version {manifest.schema_version}, this code reads {SCHEMA_VERSION}; reconvert"
            )
        if manifest.label_encoding != LABEL_ENCODING:
            raise ShardFormatError(f"{path}: label encoding {manifest.label_encoding} != {LABEL_ENCODING}")
        return manifest


def load_manifest(shards_dir: str | os.PathLike, split: str) -> Manifest:
    """Read `<shards_dir>/<split>.manifest.json` (a folder or a store URL), with an error that says what to run
    when it is missing."""
    store = open_store(shards_dir)
    store.check()
    path = store.url(manifest_name(split))
    try:
        text = store.read_text(manifest_name(split))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(
            f"{path} not found: convert the {split} split first "
            f"(saturate shards convert SRC {store} --split {split})"
        ) from None
    return Manifest.from_json(text, path)


def shard_files(shards_dir: str | os.PathLike, manifest: Manifest) -> list[tuple[Path | str, Path | str]]:
    """(tar, idx) of every shard in the manifest as readers are given them (paths in a folder, URLs in a store),
    each checked cheaply against its record: the files exist and the tar has the recorded size (one listing
    of the folder or prefix), the index's first line has the recorded sample count (one short read per shard,
    several at once: on an object store each is a request). The full sha256 is `saturate shards verify`'s job.
    Errors name the file."""
    store = open_store(shards_dir)
    present = store.sizes()
    for record in manifest.shards:
        for name in (record.name, record.index):
            if name not in present:
                raise FileNotFoundError(f"{store.url(name)} listed in the {manifest.split} manifest is missing")
    with ThreadPoolExecutor(max_workers=_HEAD_READS) as pool:
        heads = list(pool.map(lambda r: _first_line(store, r.index), manifest.shards))
    for record, head in zip(manifest.shards, heads, strict=True):
        check_shard_record(record, tar_bytes=present[record.name], index_head=head, where=store.url(record.name),
                           split=manifest.split)
    return [(store.url(r.name), store.url(r.index)) for r in manifest.shards]


def check_shard_record(record: ShardRecord, *, tar_bytes: int, index_head: str, where: object, split: str) -> None:
    """The cheap consistency checks of one shard against its manifest record; ShardFormatError names it."""
    fix = ("the shard changed after the manifest was written (an interrupted re-conversion?); re-convert the "
           "split, or run `saturate shards verify` on it")
    if tar_bytes != record.bytes:
        raise ShardFormatError(f"{where}: {tar_bytes} bytes, the {split} manifest says {record.bytes}: {fix}")
    head = index_head.split()
    if len(head) != 2 or head[0] != INDEX_VERSION or head[1] != str(record.num_samples):
        raise ShardFormatError(f"{where}: its index starts {index_head.strip()[:40]!r}, the {split} manifest "
                               f"says {record.num_samples} samples: {fix}")


def _first_line(store: Store, name: str) -> str:
    return store.read_bytes(name, length=64).split(b"\n", 1)[0].decode("ascii", errors="replace")


def read_class_list(path: str | os.PathLike) -> list[str]:
    """WNIDs from a `--classes` file: a manifest JSON, or text with the WNID first on each line
    (a plain list, or `LOC_synset_mapping.txt`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--classes file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        return Manifest.from_json(text, path).wnids
    wnids = [line.split()[0] for line in text.splitlines() if line.strip()]
    _check_wnids(wnids, path)
    return wnids


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """WNID -> human-readable name from `LOC_synset_mapping.txt` (`n01440764 tench, Tinca tinca`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--names file {path} does not exist")
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip() or None
    return names


def _check_wnids(wnids: Iterable[str], source: object) -> None:
    seen = set()
    for wnid in wnids:
        if not WNID_PATTERN.match(wnid):
            raise ValueError(f"{source} {wnid!r}: a class id is a WNID-like name of letters, digits, '_' and '-' "
                             "(rename the folder, or give --labels)")
        if wnid in seen:
            raise ValueError(f"{source}: class {wnid} is listed twice")
        seen.add(wnid)
