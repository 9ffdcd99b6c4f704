"""One change to a finished collection, from the manifest it starts at to the generation it publishes.

Every writer that changes a finished collection (add, delete, compact,
build-index, the service's uploads) goes through a transaction:

    with transaction(root) as txn:
        name = txn.file_name(INDEX_DIR, "coarse", ".faissindex")
        sha256 = txn.write(name, data)
        txn.publish({**txn.manifest, "index": {...}})

It holds the collection's write lock throughout, hands out file names that
no earlier generation used, writes each file atomically, and publishing
writes the new manifest.  Files that no generation names any more, and
those of a transaction that never published, are removed when the next
writer starts (or at once, for compact).  Encoding a new collection
streams shards through CollectionWriter, which takes the same lock and
publishes the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import HashsearchError
from ..fileio import atomic_write_bytes, fsync_dir
from .layout import INDEX_META, generation_file
from .lock import WriteLock
from .manifest import (check_counters, collection_holding, inside, named_files, publish, read_manifest, refuse_named,
                       remove_unreferenced)

_GENERATION_NAME = re.compile(r"[a-z]+-\d{6}\.[a-z]+")


class Transaction:
    """A writer's hold on a finished collection: made by transaction(), valid inside its `with`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.published: dict | None = None

    @property
    def generation(self) -> int:
        """The generation this transaction publishes."""
        return int(self.manifest.get("generation", 0)) + 1

    def file_name(self, folder: str, stem: str, suffix: str) -> str:
        return generation_file(folder, stem, self.generation, suffix)

    def path(self, name: str) -> Path:
        return inside(self.root, name, "file")

    def write(self, name: str, data: bytes) -> str:
        """Write the collection file `name` (from file_name) atomically; its sha256."""
        refuse_named(self.root, self.manifest, name)
        _write_new(self.path(name), data)
        return hashlib.sha256(data).hexdigest()

    def publish(self, manifest: dict, *, reclaim: bool = False) -> dict:
        """Make `manifest` the next generation.  The files it no longer names are removed by the next
        writer, so a reader that pinned the previous generation has long opened them; `reclaim`
        (compact, whose point is the space) removes them now, and such a reader keeps its open files."""
        if self.published is not None:
            raise HashsearchError(f"a transaction on {self.root} publishes once")
        self.published = publish(self.root, manifest)
        if reclaim:
            remove_unreferenced(self.root, self.published)
        return self.published


def lock_finished(root: Path, *, wait: bool = False, unfinished: str = "run the same encode command again to "
                  "finish it") -> tuple[WriteLock, dict]:
    """The write lock of the finished collection at `root` and its manifest, what killed writers left
    removed: the start of every change to it.  `unfinished` ends the error for a collection still encoding."""
    read_manifest(root)         # a missing or foreign directory is named as such, before any lock file is made
    lock = WriteLock(root, wait=wait)
    try:
        manifest = read_manifest(root)
        if not manifest.get("complete"):
            raise HashsearchError(f"collection {root} is unfinished; {unfinished}")
        check_counters(root, manifest)
        remove_unreferenced(root, manifest)
    except BaseException:
        lock.release()
        raise
    return lock, manifest


@contextlib.contextmanager
def transaction(root, *, wait: bool = False):
    """Lock the finished collection at `root` for one change; yields its Transaction."""
    root = Path(root)
    lock, manifest = lock_finished(root, wait=wait)
    try:
        yield Transaction(root, manifest)
    finally:
        lock.release()


def store_file(root, folder: str, name: str, data: bytes) -> Path:
    """Keep `data` as `folder/name` in the collection at `root`, outside any generation (the service's
    uploaded images, named by their content): written once, atomically, never replaced.  No lock: no
    generation names these files, and two writers of one name write the same bytes."""
    if os.sep in name or name in ("", ".", ".."):
        raise HashsearchError(f"cannot store {name!r}: not a plain file name")
    path = inside(Path(root), f"{folder}/{name}", "file")
    if not path.exists():
        _write_new(path, data)
    return path


def _write_new(path: Path, data: bytes) -> None:
    """Write a collection file atomically, making its folder if this is the folder's first file."""
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise HashsearchError(f"cannot write {path}: {exc.strerror or exc}") from None
    atomic_write_bytes(path, data)


class OutsideDirectory:
    """A folder outside any collection holding one index and its metadata (`build-index --out`), written
    as a Transaction writes a collection's: the same file_name, write and publish."""

    def __init__(self, root, generation: int):
        self.root = Path(root)
        self.generation = generation
        # A collection's files are written by its own writers alone: an index written into one (its index/
        # folder, say) would replace or remove the files its generation names.
        holder = collection_holding(self.root)
        if holder is not None:
            raise HashsearchError(f"cannot write an index to {self.root}: it lies inside collection {holder}; "
                                  "choose a folder outside every collection")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HashsearchError(f"cannot create {self.root}: {exc.strerror or exc}") from None

    def file_name(self, folder: str, stem: str, suffix: str) -> str:
        return generation_file(".", stem, self.generation, suffix)[2:]      # the folder is the directory itself

    def write(self, name: str, data: bytes) -> str:
        atomic_write_bytes(self.root / name, data)
        return hashlib.sha256(data).hexdigest()

    def publish(self, meta: dict) -> dict:
        """Write `meta` as the directory's metadata, then remove the files of earlier builds."""
        atomic_write_bytes(self.root / INDEX_META, (json.dumps(meta, indent=2) + "\n").encode())
        keep = named_files(meta) | {INDEX_META}
        # Only names file_name made: the folder is the user's, and may hold anything else.
        stale = [p for p in self.root.iterdir() if p.is_file() and p.name not in keep and _GENERATION_NAME.match(p.name)]
        for path in stale:
            path.unlink()
        if stale:
            fsync_dir(self.root)
        return meta
