"""The rerank's shortlist: L2 in the neighbour projection's space, before exact L2 on F7.

The neighbour projection (engine/neighbours.py) is PCA followed by ITQ's
rotation, so its columns are orthonormal, and the L2 distance between two
projected rows is the part of their F7 distance that lies in the top principal
directions: it never exceeds the F7 distance and, on real features, ranks a
candidate pool almost as F7 does.  An hds query therefore ranks its pool by
this sketch (256 values a row) and reranks only the best few by exact L2 on F7
(512 to 4,096 values a row).  On CIFAR-10's 1,280-d efficientnet F7 with a pool
of 800, keeping the sketch's 50 best lost none of the exact top 10 (README,
"Faithful coarse search on real images").

A sketch is built only where the collection's F7 is held in RAM
(config.FEATURES_IN_RAM_MB): it is made from those rows when a generation is
opened, and kept per shard, so a refresh after an add projects only the new
shard's rows.  It is never written to disk.
"""
from __future__ import annotations

import numpy as np

from ..shards import Collection, RowReader
from .neighbours import ENCODE_BLOCK_ROWS, NeighbourProjection

# Rows per result that the sketch hands to the exact rerank.  On CIFAR-10 (1,280-d F7, k 10, pools of 500
# and 800) 5 per result lost none of the exact top 10 and 3.2 lost 0.1 % of it; 6 leaves a margin.
SHORTLIST_PER_RESULT = 6
# Sketches are float16, half the RAM of float32; a collection whose rows project past this has no sketch.
FLOAT16_LIMIT = 60_000.0


class Sketch:
    """Every row's projection, float16 [rows, bits], one array per shard."""

    def __init__(self, collection: Collection, projection: NeighbourProjection, by_shard: dict[str, np.ndarray]):
        self.collection, self.projection = collection, projection
        self.by_shard = by_shard
        self.parts = [by_shard[s.sha256] for s in collection.shards]

    @property
    def bits(self) -> int:
        return self.projection.bits

    def gather(self, rows: np.ndarray, buffer: np.ndarray) -> None:
        """The sketches of `rows` (valid, int64) into buffer[:len(rows)]."""
        self.collection.take_rows(self.parts, rows, buffer)


def build_sketch(collection: Collection, reader: RowReader, projection: NeighbourProjection,
                 previous: Sketch | None) -> Sketch | None:
    """The sketch of `collection` under `projection`, or None where its F7 is not in RAM (or too large for
    float16).  Shards that `previous` (the generation before, same projection) already projected are taken
    from it."""
    if reader.in_ram is None:
        return None
    known = previous.by_shard if previous is not None and previous.projection is projection else {}
    by_shard = {}
    for shard, feats in zip(collection.shards, reader.in_ram):
        if shard.sha256 in known:        # a shard's rows never change: its sha256 names them
            by_shard[shard.sha256] = known[shard.sha256]
            continue
        out = np.empty((len(feats), projection.bits), np.float16)
        for a in range(0, len(feats), ENCODE_BLOCK_ROWS):
            block = projection.project(feats[a:a + ENCODE_BLOCK_ROWS])
            if len(block) and np.abs(block).max() > FLOAT16_LIMIT:
                return None         # features this large would overflow: rerank the whole pool instead
            out[a:a + len(block)] = block
        by_shard[shard.sha256] = out
    return Sketch(collection, projection, by_shard)
