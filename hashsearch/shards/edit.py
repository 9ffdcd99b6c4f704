"""Changing a finished collection: delete (tombstones) and the shard rewrite behind compact.

Shards never change once a generation names them, so a delete publishes a
new, immutable tombstone file (the sorted ids of every deleted item) and a
new generation naming it; searches skip those ids from then on.  Compaction
copies the shards that are mostly tombstones without their deleted rows
and retires the old files.  Ids never change.
"""
from __future__ import annotations

import io

import numpy as np

from ..config import CompactConfig
from ..errors import HashsearchError
from ..fileio import read_regular
from .collection import Collection
from .layout import TOMBSTONE_DIR
from .transaction import Transaction, transaction
from .manifest import next_shard_number
from .writer import copy_shard


def _with_tombstones(txn: Transaction, manifest: dict, ids: np.ndarray, rows_stored: int) -> dict:
    """`manifest` with its tombstones set to `ids` (sorted, unique), written as a new immutable file."""
    manifest = dict(manifest)
    if len(ids):
        name = txn.file_name(TOMBSTONE_DIR, "deleted", ".npy")
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(ids, np.int64), allow_pickle=False)
        manifest["tombstones"] = {"file": name, "count": int(len(ids)), "sha256": txn.write(name, buffer.getvalue())}
    else:
        manifest["tombstones"] = None
    manifest["deleted"] = int(len(ids))
    manifest["items"] = rows_stored - int(len(ids))
    return manifest


def delete_items(root, *, ids=(), paths=(), wait: bool = False) -> dict:
    """Delete items by id or by path; from the moment this returns no search returns them.

    An id or path that is not a live item of the collection is an error, and then nothing is deleted.
    """
    if not len(ids) and not len(paths):
        raise HashsearchError("give at least one id or path to delete")
    with transaction(root, wait=wait) as txn:
        coll = Collection.from_manifest(root, txn.manifest)
        try:
            rows = [coll.rows_for_ids(ids, live=True)] if len(ids) else []
            if len(paths):
                rows.append(coll.rows_for_paths(paths))
            doomed = coll.ids()[np.concatenate(rows)]
            old = coll.ids()[coll.deleted_rows]
            manifest = _with_tombstones(txn, txn.manifest, np.union1d(old, doomed), coll.n)
        finally:
            coll.close()
        return txn.publish(manifest)


# An ids file holds at most this much: 64 MiB is ~5 million ids, far past any one delete.
MAX_IDS_FILE_BYTES = 64 << 20


def read_ids_file(path) -> list[str]:
    """The whitespace-separated ids of a file; a FIFO, a device or an endless file is refused, never waited on."""
    try:
        data = read_regular(path, MAX_IDS_FILE_BYTES)
    except ValueError as exc:
        raise HashsearchError(f"ids file {path} is {exc}") from None
    except OSError as exc:
        raise HashsearchError(f"cannot read ids file {path}: {exc.strerror or exc}") from None
    return data.decode("utf-8", "replace").split()


def rewrite_shards(txn: Transaction, threshold: float = CompactConfig.threshold) -> tuple[dict, int]:
    """The manifest of a compacted generation (not yet published) and the number of shards rewritten.

    Every shard whose deleted share is above `threshold` is copied without its
    deleted rows (or dropped when none is left); the others are kept as they are.
    """
    CompactConfig(threshold=threshold)
    manifest = txn.manifest
    coll = Collection.from_manifest(txn.root, manifest)
    try:
        deleted = coll.deleted_mask()
        shards, kept_dead, number, rewritten = [], [], next_shard_number(manifest), 0
        for s, (shard, entry) in enumerate(zip(coll.shards, manifest["shards"])):
            dead = deleted[coll.offsets[s]:coll.offsets[s + 1]]
            if shard.rows == 0 or dead.mean() <= threshold or not dead.any():
                shards.append(entry)
                kept_dead.append(shard.column("ids")[dead])
                continue
            rewritten += 1
            keep = np.flatnonzero(~dead)
            if len(keep):
                shards.append(copy_shard(shard, keep, coll.root, manifest, number, entry.get("source_end", 0)))
                number += 1
        stored = sum(e["rows"] for e in shards)
        new = _with_tombstones(txn, {**manifest, "shards": shards, "next_shard": number},
                               np.concatenate(kept_dead) if kept_dead else np.zeros(0, np.int64), stored)
    finally:
        coll.close()
    return new, rewritten
