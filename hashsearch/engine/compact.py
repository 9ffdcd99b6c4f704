"""`hashsearch compact`: give back the space of deleted items, and fold the index's delta in.

Compaction rewrites shards, so the index's base (built on the old shards)
no longer fits: the same generation that names the new shards names a new
index, built here over the new live rows with the old one's kind and
parameters.  Readers switch to both at once.
"""
from __future__ import annotations

from ..config import CompactConfig
from ..shards import Collection, rewrite_shards, transaction
from .generation import collection_cells, collection_projection, write_index_files


def compact(root, threshold: float = CompactConfig.threshold, *, wait: bool = False) -> dict:
    """Rewrite the shards whose deleted share is above `threshold`; returns what changed."""
    with transaction(root, wait=wait) as txn:
        new, rewritten = rewrite_shards(txn, threshold)
        old_index = txn.manifest.get("index")
        if old_index is not None:
            coll = Collection.from_manifest(root, new)
            params = {k: v for k, v in old_index["coarse"].items() if k != "kind"}
            neighbours = {"neighbour_bits": old_index.get("neighbour_bits", 0),
                          "neighbour_kind": (old_index.get("neighbour_coarse") or {}).get("kind", "flat"),
                          "projection": collection_projection(coll), "kept_cells": collection_cells(coll)}
            try:
                new["index"] = write_index_files(coll, old_index["coarse"]["kind"], txn, **neighbours, **params)
            finally:
                coll.close()
        new = txn.publish(new, reclaim=True)
    return {"rewritten": rewritten, "items": new["items"], "deleted": new["deleted"], "shards": len(new["shards"]),
            "generation": new["generation"]}
