"""ImageNet folders -> WebDataset shards: discover -> plan -> write (tar + index per shard) -> manifest.

    sources  = discover(src, split=..., labels_csv=...)       every regular, non-hidden file, with its WNID
    classes  = resolve_classes(...)                           ImageFolder order: sorted WNIDs (or --classes)
    plan     = plan_shards(sources, seed=..., ...)            global shuffle, then cut into shards
    results  = write_shards(plan[job_index::num_jobs], ...)   each shard written atomically, in parallel
    manifest = write_manifest(out, split)                     once every planned shard is on disk

The plan depends only on the sources, the seed and the options that shape the output, so J jobs (or machines)
that each write `plan[job_index::num_jobs]` produce exactly the shards one job would, and a rerun after a
crash skips every shard whose record and sha256 still match.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import Manager
from pathlib import Path

from tqdm import tqdm

from shards.atomic import atomic_write
from shards.cpus import usable_cpus
from shards.images import RejectedImage, prepare_image
from shards.schema import (
    IMAGE_EXT,
    LABEL_ENCODING,
    LABEL_EXT,
    META_EXT,
    TAR_BLOCK,
    Manifest,
    ShardRecord,
    _check_wnids,
    check_split_name,
    encode_label,
    index_name,
    manifest_name,
    read_class_list,
    read_class_names,
    sample_key,
    shard_name,
)
from shards.tarshard import ShardWriter, sha256_file

DEFAULT_SHARD_BYTES = 512 * 10**6  # bytes; DALI and webdataset both read 256 MB - 1 GB shards efficiently
PARTS_DIR = ".parts"  # per-shard records; what `merge` builds the manifest from
_MAX_KEY_CHARS = 80  # ustar names hold 100 bytes: key + "-NNN" + ".json" must fit


def tool_version() -> str:
    try:
        return version("saturate")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class SourceFile:
    """One discovered file: where it is, which class it belongs to, and the key it will have in the shard."""

    rel: str  # posix path relative to SRC; what the manifest and the .json member record
    wnid: str | None  # None for a file that cannot be labelled (rejected at discovery)
    size: int  # bytes
    key: str = ""


@dataclass(frozen=True)
class ShardPlan:
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
    check: str  # "header" (fast) or "decode" (decode every image while packing)


@dataclass
class ShardResult:
    index: int
    plan_digest: str
    record: dict | None  # ShardRecord fields; None when every source of the shard was rejected
    converted: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    rejected: list[dict] = field(default_factory=list)  # [{"path", "reason"}]


# --- discover ---------------------------------------------------------------------------------------------
def discover(src: Path, *, labels_csv: Path | None = None) -> tuple[list[SourceFile], list[dict]]:
    """Every regular, non-hidden file under `src`, labelled by its class folder or by `labels_csv`.

    Returns (labelled sources sorted by path, rejected-at-discovery records). Raises for a missing or empty
    source, or (flat layout) a file absent from the CSV / a CSV row without a file.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    files = sorted(_walk(src))
    if not files:
        raise ValueError(f"source folder {src} holds no files (empty split?)")
    if labels_csv is not None:
        return _label_from_csv(src, files, labels_csv), []
    sources, rejected = [], []
    for rel, size in files:
        if "/" not in rel:
            rejected.append({"path": rel, "reason": "not inside a class folder"})
        else:
            sources.append(SourceFile(rel, rel.split("/", 1)[0], size))
    if not sources:
        raise ValueError(f"{src} has no class folders with files (expected SRC/<wnid>/<image>, or pass --labels)")
    return sources, rejected


def _walk(root: Path):
    """(posix relative path, size) of regular files, skipping hidden files and folders; follows links like
    torchvision's ImageFolder does."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                yield Path(path).relative_to(root).as_posix(), os.path.getsize(path)


def _image_id(path: str) -> str:
    """Kaggle's ImageId for a file: its name up to the first dot (`ILSVRC2012_val_00000001`)."""
    return Path(path).name.split(".")[0]


def _label_from_csv(src: Path, files: list[tuple[str, int]], labels_csv: Path) -> list[SourceFile]:
    """Flat layout: Kaggle `LOC_val_solution.csv` (ImageId,PredictionString) or plain `file,wnid` rows."""
    if not labels_csv.is_file():
        raise FileNotFoundError(f"--labels file {labels_csv} does not exist")
    by_stem: dict[str, str] = {}
    with open(labels_csv, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or (lineno == 1 and row[0].strip() in ("ImageId", "file", "path", "filename")):
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{labels_csv}:{lineno}: expected 'file,wnid', got {row}")
            by_stem[_image_id(row[0].strip())] = row[1].split()[0]
    sources = []
    for rel, size in files:
        stem = _image_id(rel)
        if stem not in by_stem:
            raise ValueError(f"{src / rel} is absent from {labels_csv}; add its label or move it out of {src}")
        sources.append(SourceFile(rel, by_stem.pop(stem), size))
    if by_stem:
        missing = sorted(by_stem)[:5]
        raise ValueError(f"{labels_csv} lists {len(by_stem)} images not found under {src}, e.g. {missing}")
    return sources


def resolve_classes(
    sources: Sequence[SourceFile], *, classes_file: Path | None, names_file: Path | None
) -> list[dict]:
    """Class list in index order: torchvision ImageFolder's sorted WNIDs, or exactly `classes_file`'s list."""
    present = sorted({s.wnid for s in sources})
    if classes_file is not None:
        wnids = read_class_list(classes_file)
        unknown = sorted(set(present) - set(wnids))
        if unknown:
            raise ValueError(f"class {unknown[0]} (of {len(unknown)} unknown) is not in --classes {classes_file}")
    else:
        wnids = present
        _check_wnids(wnids, "class folders")
    names = read_class_names(names_file) if names_file is not None else {}
    if names_file is None and classes_file is not None and classes_file.suffix == ".json":
        # val converted with train's manifest keeps train's human-readable names too
        names = {c["wnid"]: c["name"] for c in Manifest.from_json(classes_file.read_text(), classes_file).classes}
    return [{"index": i, "wnid": w, "name": names.get(w)} for i, w in enumerate(wnids)]


# --- plan -------------------------------------------------------------------------------------------------
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
        keyed.append(SourceFile(s.rel, s.wnid, s.size, key))
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


def plan_digest(shard: ShardPlan, options: WriteOptions, classes: list[dict]) -> str:
    """Identifies what a shard must contain; a rerun rewrites any shard whose digest changed."""
    body = json.dumps(
        [asdict(options), classes, [(s.rel, s.size, s.key, s.wnid) for s in shard.sources], tool_version()]
    )
    return hashlib.sha256(body.encode()).hexdigest()


# --- write ------------------------------------------------------------------------------------------------
def write_shard(
    shard: ShardPlan, *, src: Path, out: Path, options: WriteOptions, label_of: dict[str, int],
    strict: bool, digest: str, progress_queue=None,
) -> ShardResult:
    """Pack one shard atomically and record it under OUT/.parts; every source is packed or rejected."""
    split = options.split
    writer = ShardWriter(out / shard_name(split, shard.index), out / index_name(split, shard.index))
    result = ShardResult(shard.index, digest, None)
    pending = 0
    try:
        for source in shard.sources:
            prepared = _read_and_prepare(source, src, options)
            if isinstance(prepared, RejectedImage):
                if strict:
                    raise ValueError(f"{src / source.rel}: {prepared} (--strict)") from None
                result.rejected.append({"path": source.rel, "reason": str(prepared)})
            else:
                jpeg, reason = prepared
                label = label_of[source.wnid]
                meta = {"path": source.rel, "wnid": source.wnid, "label": label, "converted": reason}
                writer.add_sample(source.key, [
                    (IMAGE_EXT, jpeg),
                    (LABEL_EXT, encode_label(label)),
                    (META_EXT, json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
                ])
                if reason:
                    result.converted.append({"path": source.rel, "reason": reason})
            pending += 1
            if progress_queue is not None and pending == 32:
                progress_queue.put((pending, 0))
                pending = 0
        if not writer.samples:
            writer.abort()
        else:
            size, sha = writer.commit()
            result.record = asdict(ShardRecord(
                shard_name(split, shard.index), index_name(split, shard.index), len(writer.samples), size, sha
            ))
    except BaseException:
        writer.abort()
        raise
    if progress_queue is not None:
        progress_queue.put((pending, result.record["bytes"] if result.record else 0))
    atomic_write(_part_path(out, split, shard.index), json.dumps(asdict(result), sort_keys=True))
    return result


def _read_and_prepare(source: SourceFile, src: Path, options: WriteOptions) -> tuple[bytes, str | None] | RejectedImage:
    """The packed bytes and conversion reason for one source, or the rejection (returned, not raised, so the
    writer decides what a rejection means: a manifest entry, or the end of a --strict run)."""
    try:
        fd = os.open(os.path.join(src, source.rel), os.O_RDONLY)
        try:  # one exact-size read: no BufferedReader copy, and malloc reuses the freed buffers of earlier files
            data = os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return prepare_image(data, max_size=options.max_size, quality=options.quality,
                             full_decode=options.check == "decode")
    except RejectedImage as err:
        return err


def _part_path(out: Path, split: str, index: int) -> Path:
    return out / PARTS_DIR / f"{split}-{index:06d}.json"


def _plan_path(out: Path, split: str) -> Path:
    return out / PARTS_DIR / f"{split}.plan.json"


def is_complete(out: Path, split: str, index: int, digest: str) -> bool:
    """A shard is skipped on rerun only if its record matches the plan and the tar's sha256 matches the record."""
    part = _part_path(out, split, index)
    if not part.is_file():
        return False
    result = json.loads(part.read_text())
    if result["plan_digest"] != digest:
        return False
    record = result["record"]
    if record is None:
        return True
    tar, idx = out / record["name"], out / record["index"]
    if not (tar.is_file() and idx.is_file()) or tar.stat().st_size != record["bytes"]:
        return False
    return sha256_file(tar) == record["sha256"]


def write_shards(
    shards: Sequence[ShardPlan], digests: dict[int, str], *, src: Path, out: Path, options: WriteOptions,
    label_of: dict[str, int], strict: bool, workers: int, progress: bool,
) -> dict:
    """Write shards in parallel, one process per shard, with one progress bar in images/s and MB/s."""
    todo = [s for s in shards if not is_complete(out, options.split, s.index, digests[s.index])]
    skipped = len(shards) - len(todo)
    total = sum(len(s.sources) for s in todo)
    kwargs = dict(src=src, out=out, options=options, label_of=label_of, strict=strict)
    start = time.perf_counter()
    written = 0  # bytes
    bar = tqdm(total=total, unit="img", unit_scale=True, disable=not progress, desc=f"{options.split} shards")
    if workers <= 1 or len(todo) <= 1:
        for shard in todo:
            result = write_shard(shard, digest=digests[shard.index], **kwargs)
            written += result.record["bytes"] if result.record else 0
            bar.update(len(shard.sources))
            bar.set_postfix_str(f"{written / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s")
    else:
        with Manager() as manager, ProcessPoolExecutor(max_workers=workers) as pool:
            queue = manager.Queue()
            pending = {
                pool.submit(write_shard, s, digest=digests[s.index], progress_queue=queue, **kwargs)
                for s in todo
            }
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # re-raises a worker's error (e.g. --strict) with its message
                while not queue.empty():
                    images, nbytes = queue.get()
                    bar.update(images)
                    written += nbytes
                bar.set_postfix_str(f"{written / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s")
    bar.close()
    return {"shards_written": len(todo), "shards_skipped": skipped, "images": total, "bytes": written,
            "seconds": time.perf_counter() - start}


# --- manifest ---------------------------------------------------------------------------------------------
def write_manifest(out: Path, split: str) -> Manifest | None:
    """Build `<split>.manifest.json` from the plan and the per-shard records; None while shards are missing."""
    plan_file = _plan_path(out, split)
    if not plan_file.is_file():
        raise FileNotFoundError(f"{plan_file} not found: run `saturate shards convert` for {split} into {out} first")
    plan = json.loads(plan_file.read_text())
    results = []
    for index, digest in enumerate(plan["digests"]):
        part = _part_path(out, split, index)
        if not part.is_file():
            return None
        result = json.loads(part.read_text())
        if result["plan_digest"] != digest:
            raise ValueError(f"{part} was written for another plan (other source or options); rerun convert")
        results.append(result)
    records = [ShardRecord(**r["record"]) for r in results if r["record"] is not None]
    rejected = sorted(plan["discovery_rejected"] + [x for r in results for x in r["rejected"]],
                      key=lambda x: x["path"])
    num_samples = sum(r.num_samples for r in records)
    manifest = Manifest(
        split=split, num_samples=num_samples, discovered=plan["discovered"],
        converted=sum(len(r["converted"]) for r in results), rejected=rejected, classes=plan["classes"],
        label_encoding=dict(LABEL_ENCODING), shards=records, seed=plan["options"]["seed"],
        options=plan["options"], tool_version=plan["tool_version"],
    )
    if manifest.discovered != num_samples + len(rejected):
        raise RuntimeError(f"{split}: discovered {manifest.discovered} != packed {num_samples} + rejected "
                           f"{len(rejected)}; a shard record is inconsistent, rerun convert")
    atomic_write(out / manifest_name(split), manifest.to_json())
    return manifest


def parse_size(text: str) -> int:
    """'512MB' -> 512_000_000 bytes (decimal units; KiB/MiB/GiB binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        value = int(float(number) * units[stripped[len(number):]])
    except (KeyError, ValueError):
        raise ValueError(f"--shard-size {text!r}: expected bytes such as 512MB or 1GB") from None
    if value < 1:
        raise ValueError(f"--shard-size {text!r} must be positive")
    return value


def convert(
    src: str | os.PathLike, out: str | os.PathLike, *, split: str,
    labels_csv: str | os.PathLike | None = None, classes_file: str | os.PathLike | None = None,
    names_file: str | os.PathLike | None = None, shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    samples_per_shard: int | None = None, seed: int = 0, workers: int | None = None, num_jobs: int = 1,
    job_index: int = 0, max_size: int | None = None, quality: int = 90, check: str = "header",
    strict: bool = False, progress: bool = True,
) -> Manifest | None:
    """Convert one split; returns the manifest, or None when other jobs' shards are still missing.

    `classes_file` pins the class list (a WNID list, LOC_synset_mapping.txt, or a manifest JSON); without it a
    non-train split reuses `OUT/train.manifest.json`'s classes when that exists, so val gets train's indices.
    """
    src, out = Path(src), Path(out)
    check_split_name(split)
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index {job_index} must be in [0, --num-jobs {num_jobs})")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {samples_per_shard} must be >= 1")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality} must be in 1..100")
    if check not in ("header", "decode"):
        raise ValueError(f"--check {check!r} must be 'header' or 'decode'")
    if classes_file is None and split != "train" and (out / manifest_name("train")).is_file():
        classes_file = out / manifest_name("train")
        if progress:
            print(f"{split}: using class indices from {classes_file}")
    options = WriteOptions(split, seed, None if samples_per_shard else shard_bytes, samples_per_shard,
                           max_size, quality, check)

    sources, discovery_rejected = discover(src, labels_csv=Path(labels_csv) if labels_csv else None)
    classes = resolve_classes(sources, classes_file=Path(classes_file) if classes_file else None,
                              names_file=Path(names_file) if names_file else None)
    plan = plan_shards(sources, options)
    digests = {s.index: plan_digest(s, options, classes) for s in plan}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(_plan_path(out, split), json.dumps({
        "digests": [digests[s.index] for s in plan], "discovered": len(sources) + len(discovery_rejected),
        "discovery_rejected": discovery_rejected, "classes": classes, "options": asdict(options),
        "tool_version": tool_version(),
    }, sort_keys=True))

    mine = plan[job_index::num_jobs]
    stats = write_shards(
        mine, digests, src=src, out=out, options=options, label_of={c["wnid"]: c["index"] for c in classes},
        strict=strict, workers=workers or usable_cpus(), progress=progress,
    )
    manifest = write_manifest(out, split)
    if progress:
        _print_summary(split, stats, manifest, job_index, num_jobs, len(mine))
    return manifest


def _print_summary(split, stats, manifest, job_index, num_jobs, planned) -> None:
    secs = max(stats["seconds"], 1e-9)
    print(f"{split}: job {job_index + 1}/{num_jobs} wrote {stats['shards_written']} of {planned} shards "
          f"({stats['shards_skipped']} already complete), {stats['images']} images in {secs:.1f} s "
          f"= {stats['images'] / secs:.0f} img/s, {stats['bytes'] / 1e6 / secs:.0f} MB/s")
    if manifest is None:
        print(f"{split}: other jobs' shards are still missing; the last job (or `saturate shards merge`) "
              "writes the manifest")
    else:
        print(f"{split}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
              f"{manifest.converted} converted, {len(manifest.rejected)} rejected of {manifest.discovered} "
              f"discovered, {manifest.num_classes} classes")
        for item in manifest.rejected[:10]:
            print(f"  rejected {item['path']}: {item['reason']}")
        if len(manifest.rejected) > 10:
            print(f"  ... {len(manifest.rejected) - 10} more in {manifest_name(split)}")
