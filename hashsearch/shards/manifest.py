"""manifest.json: what one generation of a collection holds, checked field by field.

A collection changes by generations.  Each writer (encode, add, delete,
compact, build-index) publishes a whole new manifest atomically, with
`generation` one higher; the shard, tombstone and index files it names are
never modified afterwards.  A reader that read one manifest therefore sees
one generation whole, whatever writers do next.

A manifest may come from anywhere (a download, a failing disk), so every
field is checked for type and range before it is used, and every file it
names must stay inside the collection.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..codes import MAX_BITS
from ..errors import HashsearchError
from ..fileio import atomic_write_bytes, fsync_dir, open_regular
from .layout import GENERATION_DIRS, MANIFEST, generation_of, shard_number

FORMAT = "hashsearch-collection"
# 2: generations, tombstones, next_id and the index named by the manifest.  Version 1 manifests read as generation 0.
VERSION = 2
FEATURE_DTYPES = ("float16", "float32")
MAX_FEATURE_DIM = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INT64_MAX = (1 << 63) - 1

__all__ = ["MANIFEST", "FORMAT", "VERSION", "FEATURE_DTYPES", "read_manifest", "write_manifest", "publish",
           "file_sha256", "disk_bytes", "inside", "check_file_entry", "referenced_files", "remove_unreferenced",
           "named_files", "read_named_file", "manifest_stamp", "next_shard_number", "check_counters", "refuse_named",
           "collection_holding"]


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    atomic_write_bytes(Path(root) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def manifest_stamp(root: str | os.PathLike) -> tuple:
    """A fingerprint of the published manifest that changes with every generation, for the price of a stat
    (publish replaces the file, so its inode changes even within one mtime tick)."""
    st = os.stat(Path(root) / MANIFEST)
    return st.st_mtime_ns, st.st_ino, st.st_size


def publish(root: str | os.PathLike, manifest: dict) -> dict:
    """Write `manifest` as the next generation (the caller holds the collection's lock)."""
    before = int(manifest.get("generation", 0))
    manifest["generation"] = before + 1
    _mark_additions(manifest, before)
    manifest["version"] = VERSION
    write_manifest(root, manifest)
    return manifest


def _mark_additions(manifest: dict, before: int) -> None:
    """Keep `added`: [generation, next_id after it] wherever next_id grew, so that `duplicates --since G`
    knows which ids came after generation G.  A new collection starts it at [0, 0]; one written before
    this record starts it at the first generation published since."""
    marks = manifest.get("added")
    if marks is None:
        marks = [[0, 0]] if before == 0 else []
    next_id = int(manifest.get("next_id", 0))
    if not marks or next_id > marks[-1][1]:
        marks = [*marks, [manifest["generation"], next_id]]
    manifest["added"] = marks


def first_id_after(manifest: dict, generation: int, root) -> int:
    """The first id of the items added after `generation` (ids grow with every addition)."""
    if generation >= int(manifest.get("generation", 0)):
        return int(manifest.get("next_id", 0))
    marks = [m for m in manifest.get("added") or [] if m[0] <= generation]
    if not marks:
        first = (manifest.get("added") or [[manifest.get("generation", 0)]])[0][0]
        raise HashsearchError(f"collection {root} records what each generation added only from generation "
                              f"{first} on; give a generation from {first} up")
    return int(marks[-1][1])


def inside(root: Path, name, what: str) -> Path:
    """The file `name` of the collection at `root`: a relative path that stays inside it once symlinks resolve."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name:
        raise HashsearchError(f"collection {root} names {what} {name!r}, which is not a relative path")
    path = root / name
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise HashsearchError(f"collection {root} names {what} {name!r}, which lies outside the collection")
    return path


def collection_holding(path: str | os.PathLike) -> Path | None:
    """The collection whose directory is `path` or one above it, if any (symlinks resolved)."""
    path = Path(os.path.realpath(path))
    for folder in (path, *path.parents):
        if _says_collection(folder / MANIFEST):
            return folder
    return None


def _says_collection(path: Path) -> bool:
    # The format tag alone: a damaged collection is still one, and another tool's manifest.json is not.
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            manifest = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise HashsearchError(f"collection not found: {root}")
    if not root.is_dir():
        raise HashsearchError(f"not a hashsearch collection (not a directory): {root}")
    if not path.exists():
        raise HashsearchError(f"not a hashsearch collection (no {MANIFEST}): {root}")
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            manifest = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError) as exc:
        raise HashsearchError(f"unreadable manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HashsearchError(f"{path} is not a hashsearch manifest")
    try:
        _check_manifest(manifest)
    except _Bad as exc:
        raise HashsearchError(f"damaged manifest {path}: {exc}") from None
    return manifest


class _Bad(Exception):
    pass


def _is_int(value, lo: int = 0, hi: int = _INT64_MAX) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise _Bad(message)


def check_file_entry(entry, what: str) -> None:
    """A {file, sha256, ...} entry naming an immutable file of the collection."""
    _need(isinstance(entry, dict), f"{what} is not an object")
    _need(isinstance(entry.get("file"), str) and entry["file"] != "", f"{what} has no file name")
    _need(isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"]) is not None,
          f"{what} has no valid sha256")


def _check_manifest(m: dict) -> None:
    _need(_is_int(m.get("version", 1), 1), f"version {m.get('version')!r} is not a positive integer")
    if m.get("version", 1) > VERSION:
        raise _Bad(f"format version {m['version']} is newer than this hashsearch reads ({VERSION})")
    for key in ("bits", "feature_dim", "feature_dtype", "shards"):
        _need(key in m, f"missing {key}")
    _need(_is_int(m["bits"], 1, MAX_BITS), f"bits {m['bits']!r} is not an integer from 1 to {MAX_BITS}")
    _need(_is_int(m["feature_dim"], 1, MAX_FEATURE_DIM),
          f"feature_dim {m['feature_dim']!r} is not an integer from 1 to {MAX_FEATURE_DIM}")
    _need(m["feature_dtype"] in FEATURE_DTYPES, f"feature_dtype {m['feature_dtype']!r} is not one of {FEATURE_DTYPES}")
    for key in ("generation", "items", "rejected", "deleted", "next_id", "next_shard", "shard_size"):
        _need(key not in m or _is_int(m[key]), f"{key} {m.get(key)!r} is not a non-negative integer")
    _need(isinstance(m.get("complete", False), bool), "complete is not true or false")
    added = m.get("added", [])
    _need(isinstance(added, list) and all(isinstance(a, list) and len(a) == 2 and _is_int(a[0]) and _is_int(a[1])
                                          for a in added), "added is not a list of [generation, id] pairs")
    names = m.get("class_names")
    _need(names is None or (isinstance(names, list) and all(isinstance(c, str) for c in names)),
          "class_names is not a list of names")
    shards = m["shards"]
    _need(isinstance(shards, list), "shards is not a list")
    seen = set()
    for s, entry in enumerate(shards):
        check_file_entry(entry, f"shard {s}")
        _need(_is_int(entry.get("rows")), f"shard {s} has rows {entry.get('rows')!r}, not a count")
        _need(_is_int(entry.get("source_end", 0)), f"shard {s} has a bad source_end")
        _need(entry["file"] not in seen, f"shard file {entry['file']} is listed twice")
        seen.add(entry["file"])
    stored = sum(entry["rows"] for entry in shards)
    tombstones = m.get("tombstones")
    if tombstones is not None:
        check_file_entry(tombstones, "tombstones")
        _need(_is_int(tombstones.get("count"), 1, stored), f"tombstones count {tombstones.get('count')!r} is not "
                                                            f"between 1 and the {stored} rows stored")
    # The counts a generation publishes must agree with its files: a dropped tombstone entry would revive items.
    deleted = tombstones["count"] if tombstones is not None else 0
    _need(m.get("deleted", deleted) == deleted, f"deleted is {m.get('deleted')!r}, but {deleted} tombstones are listed")
    if m.get("complete") and "items" in m:
        _need(m["items"] == stored - deleted, f"items is {m['items']}, but the shards hold {stored} rows, "
                                              f"{deleted} of them deleted")
    if m.get("index") is not None:
        _need(isinstance(m["index"], dict), "index is not an object")


# Folders whose files belong to generations; anything in them no generation names is garbage.
def named_files(entry: dict) -> set[str]:
    """The files a manifest entry names: its "file" and every "*_file" key (the index's rows, ...)."""
    return {value for key, value in entry.items()
            if (key == "file" or key.endswith("_file")) and isinstance(value, str)}


def referenced_files(manifest: dict) -> set[str]:
    names = {entry["file"] for entry in manifest["shards"]}
    for key in ("tombstones", "index"):
        if isinstance(manifest.get(key), dict):
            names |= named_files(manifest[key])
    return {os.path.normpath(n) for n in names}


def next_shard_number(manifest: dict) -> int:
    # Compaction retires shard numbers, so a new shard takes a number never used before.
    return max(manifest.get("next_shard", 0), len(manifest["shards"]))


def check_counters(root, manifest: dict) -> None:
    """A writer's refusal of a manifest whose counters are below what its own files show: the next shard
    number or generation would name a file it holds, and a writer would overwrite live data."""
    shards = [n for n in (shard_number(entry["file"]) for entry in manifest["shards"]) if n is not None]
    if shards and next_shard_number(manifest) <= max(shards):
        raise HashsearchError(f"damaged manifest {Path(root) / MANIFEST}: next_shard is "
                              f"{manifest.get('next_shard')!r}, but it names shard number {max(shards)}")
    generations = [g for g in map(generation_of, referenced_files(manifest)) if g is not None]
    if generations and manifest.get("generation", 0) < max(generations):
        raise HashsearchError(f"damaged manifest {Path(root) / MANIFEST}: generation is "
                              f"{manifest.get('generation', 0)}, but it names a file of generation {max(generations)}")


def refuse_named(root, manifest: dict, name: str) -> None:
    """A writer's last check before it creates `name`: never a file the current generation names."""
    if os.path.normpath(name) in referenced_files(manifest):
        raise HashsearchError(f"collection {root}: {name} is a file of its current generation and is never "
                              "written again; its manifest is damaged")


def read_named_file(root: Path, entry: dict, what: str, remedy: str) -> bytes:
    """The bytes of the file `entry` names inside `root`, checked against its sha256; `remedy` ends any error."""
    path = inside(root, entry["file"], what)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            data = f.read()
    except OSError as exc:
        raise HashsearchError(f"cannot read {what} {path}: {exc.strerror or exc}; {remedy}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise HashsearchError(f"{what} {path} does not match its checksum (altered or from elsewhere); {remedy}")
    return data


def remove_unreferenced(root: str | os.PathLike, manifest: dict) -> int:
    """Delete the files of earlier generations and the temporary files of killed writers.

    Run by a writer, under the lock, before it changes anything: files that the
    previous writer replaced stay for one whole writer cycle, so a reader that
    pinned the previous generation has long opened them (an open file stays
    readable after its name is removed).
    """
    root = Path(root)
    keep = referenced_files(manifest)
    removed = 0
    for folder in GENERATION_DIRS:
        base = root / folder
        if not base.is_dir() or base.is_symlink():
            continue
        for path in base.iterdir():
            if os.path.normpath(path.relative_to(root)) not in keep and (path.is_file() or path.is_symlink()):
                path.unlink()
                removed += 1
    for stale in root.glob(".*.tmp"):
        stale.unlink()
    if removed:
        fsync_dir(root)
    return removed
