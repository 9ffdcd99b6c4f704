"""`hashsearch compact`: give back the space of deleted items, and fold the index's delta in.

Compaction rewrites shards, so the index's base (built on the old shards)
no longer fits: the same generation that names the new shards names a new
index, built here over the new live rows with the old one's kind and
parameters.  Readers switch to both at once.
"""
from __future__ import annotations

from ..config import CompactConfig
from ..shards import Collection, editing, publish, rewrite_shards
from ..shards.manifest import remove_unreferenced
from .index import INDEX_DIR, write_index_files


def compact(root, threshold: float = CompactConfig.threshold, *, wait: bool = False) -> dict:
    """Rewrite the shards whose deleted share is above `threshold`; returns what changed."""
    with editing(root, wait=wait) as manifest:
        new, rewritten = rewrite_shards(root, manifest, threshold)
        old_index = manifest.get("index")
        if old_index is not None:
            coll = Collection.from_manifest(root, new)
            params = {k: v for k, v in old_index["coarse"].items() if k != "kind"}
            try:
                new["index"] = write_index_files(coll, old_index["coarse"]["kind"], coll.root / INDEX_DIR,
                                                 f"{INDEX_DIR}/", f"{manifest.get('generation', 0) + 1:06d}", **params)
            finally:
                coll.close()
        publish(root, new)
        # The old shards' space comes back now; a reader that still has them open keeps reading them.
        remove_unreferenced(root, new)
    return {"rewritten": rewritten, "items": new["items"], "deleted": new["deleted"], "shards": len(new["shards"]),
            "generation": new["generation"]}
