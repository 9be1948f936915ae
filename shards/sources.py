"""The source tree of one split: the files it holds, the class of each, and the class list in index order.

    sources, rejected, folders = discover(src, labels_csv=...)   every regular, non-hidden file, with its WNID
    check_hidden_class_folders(src)                              unless the class list is pinned
    classes = resolve_classes(sources, folders=folders, ...)     ImageFolder order: sorted WNIDs (or --classes)

Two layouts: ImageFolder's `SRC/<wnid>/<image>` (the class is the top folder) and a flat folder labelled by
Kaggle's `LOC_val_solution.csv` (or plain `file,wnid` rows). Links are followed as torchvision follows them,
each real folder read once; what cannot be packed (a dangling link, a FIFO, an unreadable file) is returned as
rejected with its reason, so the manifest can account for every file found.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shards.schema import Manifest, _check_wnids, read_class_list, read_class_names


@dataclass(frozen=True)
class SourceFile:
    """One discovered file: where it is, which class it belongs to, and the key it will have in the shard."""

    rel: str  # posix path relative to SRC; what the manifest and the .json member record
    wnid: str | None  # None for a file that cannot be labelled (rejected at discovery)
    size: int  # bytes
    key: str = ""
    #: last modification (ns): a file fixed in place (same name and size) makes its shard be written again
    mtime_ns: int = 0


# --- discover ---------------------------------------------------------------------------------------------
def discover(src: Path, *, labels_csv: Path | None = None) -> tuple[list[SourceFile], list[dict], list[str]]:
    """Every regular, non-hidden file under `src`, labelled by its class folder or by `labels_csv`.

    Returns (labelled sources sorted by path, rejected-at-discovery records, class folders). The class folders
    are torchvision's `find_classes` list (every non-hidden folder directly under `src`, empty ones included, so
    class indices match `ImageFolder(allow_empty=True)`); empty for the flat CSV layout. Raises for a missing or
    empty source, or (flat layout) a file absent from the CSV / a CSV row without a file.
    """
    if src.is_file():
        raise NotADirectoryError(f"source folder {src} is a file; give the folder that holds the split's class "
                                 "folders (or images, with --labels)")
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    files, rejected = _walk(src)
    if not files and not rejected:
        raise ValueError(f"source folder {src} holds no files (empty split?)")
    if labels_csv is not None:
        return _label_from_csv(src, files, labels_csv), rejected, []
    folders = sorted(e.name for e in os.scandir(src) if not e.name.startswith(".") and e.is_dir())
    sources = []
    for rel, size, mtime_ns in files:
        if "/" not in rel:
            rejected.append({"path": rel, "reason": "not inside a class folder"})
        else:
            sources.append(SourceFile(rel, rel.split("/", 1)[0], size, mtime_ns=mtime_ns))
    if not folders:
        raise ValueError(f"{src} has no class folders (expected SRC/<wnid>/<image>, or pass --labels)")
    return sources, sorted(rejected, key=lambda r: r["path"]), folders


def _walk(root: Path) -> tuple[list[tuple[str, int, int]], list[dict]]:
    """((posix relative path, size, mtime_ns) of regular files, rejected records), hidden files and folders
    skipped.

    Links are followed like torchvision's ImageFolder follows them, but every real folder is read once: a link
    to a folder of the tree itself or to one already read (`cls/up -> ..`, which would loop and pack the tree
    again under the wrong label), and a folder reached again inside a followed link (`c1/up -> ../..` reaches
    the tree from above), are listed as rejected instead, as are dangling links, links to themselves, folders
    and files that cannot be read, and anything that is not a regular file (FIFOs, sockets, devices).
    """
    def real(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def rel(path: str) -> str:
        return Path(path).relative_to(root).as_posix()

    rejected: list[dict] = []

    def unreadable(err: OSError) -> None:  # os.walk's onerror: a folder it cannot list
        rejected.append({"path": rel(err.filename), "reason": f"unreadable folder ({err.strerror})"})

    seen = {real(d) for d, _, _ in os.walk(root)}  # the tree's own folders (links not followed) are read once, here
    through_link = {str(root): False}  # folder -> reached through a followed link
    files: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        linked = through_link.pop(dirpath, True)
        followed = []
        for name in sorted(dirnames):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                continue
            is_link = os.path.islink(path)
            if is_link or linked:  # outside the tree's own walk: each real folder only once
                key = real(path)
                if key in seen:
                    what = f"link to a folder already read ({os.readlink(path)})" if is_link else (
                        "folder already read through another path")
                    rejected.append({"path": rel(path), "reason": f"{what}; each folder is read once"})
                    continue
                seen.add(key)
            through_link[path] = linked or is_link
            followed.append(name)
        dirnames[:] = followed
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError as err:  # dangling link (ENOENT), a link to itself or a loop of links (ELOOP)
                target = os.readlink(path) if os.path.islink(path) else "?"
                rejected.append({"path": rel(path), "reason": f"unusable link to {target} ({err.strerror})"})
                continue
            if not stat.S_ISREG(st.st_mode):
                rejected.append({"path": rel(path), "reason": "not a regular file"})
            elif not os.access(path, os.R_OK):
                rejected.append({"path": rel(path), "reason": "unreadable file (Permission denied)"})
            else:
                files.append((rel(path), st.st_size, st.st_mtime_ns))
    return sorted(files), rejected


def _image_id(path: str) -> str:
    """Kaggle's ImageId for a file: its name up to the first dot (`ILSVRC2012_val_00000001`)."""
    return Path(path).name.split(".")[0]


def _label_from_csv(src: Path, files: list[tuple[str, int, int]], labels_csv: Path) -> list[SourceFile]:
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
    for rel, size, mtime_ns in files:
        stem = _image_id(rel)
        if stem not in by_stem:
            raise ValueError(f"{src / rel} is absent from {labels_csv}; add its label or move it out of {src}")
        sources.append(SourceFile(rel, by_stem.pop(stem), size, mtime_ns=mtime_ns))
    if by_stem:
        missing = sorted(by_stem)[:5]
        raise ValueError(f"{labels_csv} lists {len(by_stem)} images not found under {src}, e.g. {missing}")
    return sources


def resolve_classes(
    sources: Sequence[SourceFile], *, folders: Sequence[str], classes_file: Path | None, names_file: Path | None,
    reference: Manifest | None = None, reference_path: object = None,
) -> list[dict]:
    """Class list in index order: torchvision ImageFolder's sorted class folders (empty ones included), or
    exactly `classes_file`'s list, or the `reference` manifest's (OUT's train manifest, read from OUT's store).
    `folders` is empty for the flat CSV layout: then the labels present."""
    present = sorted(set(folders) | {s.wnid for s in sources})
    if reference is not None:
        classes_file, wnids = reference_path, reference.wnids
    elif classes_file is not None:
        wnids = read_class_list(classes_file)
    if classes_file is not None:
        unknown = sorted({s.wnid for s in sources} - set(wnids))  # an empty folder outside the list holds nothing
        if unknown:
            raise ValueError(f"class {unknown[0]} (of {len(unknown)} unknown) is not in --classes {classes_file}")
    else:
        wnids = present
        _check_wnids(wnids, "class folder")
    names = read_class_names(names_file) if names_file is not None else {}
    if names_file is None and reference is not None:
        names = {c["wnid"]: c["name"] for c in reference.classes}  # val keeps train's human-readable names too
    elif names_file is None and classes_file is not None and classes_file.suffix == ".json":
        # val converted with train's manifest keeps train's human-readable names too
        names = {c["wnid"]: c["name"] for c in Manifest.from_json(classes_file.read_text(), classes_file).classes}
    return [{"index": i, "wnid": w, "name": names.get(w)} for i, w in enumerate(wnids)]


def check_hidden_class_folders(src: Path) -> None:
    """Refuse a hidden folder directly under `src` when the class list comes from the folders: torchvision's
    ImageFolder would make it a class (discover skips it) and shift every index after it."""
    hidden = sorted(e.name for e in os.scandir(src) if e.name.startswith(".") and e.is_dir())
    if hidden:
        raise ValueError(f"{src / hidden[0]} is a hidden folder: torchvision's ImageFolder would make it a class "
                         "and shift every index after it; remove it, or pin the classes with --classes")
