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
(config.FEATURES_IN_RAM_MB): it is made from those rows by the first search
that shortlists, and kept per shard, so a refresh after an add projects only
the new shard's rows.  It is never written to disk.
"""
from __future__ import annotations

import threading

import numpy as np

from ..shards import Collection, RowReader
from .neighbours import ENCODE_BLOCK_ROWS, NeighbourProjection

# Rows per result that the sketch hands to the exact rerank.  On CIFAR-10 (1,280-d F7, k 10, pools of 500
# and 800) 5 per result lost none of the exact top 10 and 3.2 lost 0.1 % of it; 6 leaves a margin.
SHORTLIST_PER_RESULT = 6
# Sketches are float16, half the RAM of float32; a collection whose rows project past this has no sketch.
FLOAT16_LIMIT = 60_000.0


class Sketch:
    """Every row's projection, float16 [rows, bits], one array per shard, projected on first use (usable):
    most indexes opened never search hds, and a collection's first search pays it once."""

    def __init__(self, collection: Collection, feats: list[np.ndarray], projection: NeighbourProjection,
                 known: dict[str, np.ndarray]):
        self.collection, self.projection, self._feats = collection, projection, feats
        # a shard's rows never change: its sha256 names them, and its projection carries over
        self.by_shard = {s.sha256: known[s.sha256] for s in collection.shards if s.sha256 in known}
        self.parts: list[np.ndarray] | None = None
        self._usable: bool | None = None
        self._lock = threading.Lock()

    @property
    def bits(self) -> int:
        return self.projection.bits

    def usable(self) -> bool:
        """Whether every row has its sketch (False where one would overflow float16), projecting the shards
        not yet projected on the first call."""
        if self._usable is None:
            with self._lock:
                if self._usable is None:
                    self._usable = self._project_missing()
        return self._usable

    def _project_missing(self) -> bool:
        for shard, feats in zip(self.collection.shards, self._feats):
            if shard.sha256 in self.by_shard:
                continue
            out = np.empty((len(feats), self.bits), np.float16)
            for a in range(0, len(feats), ENCODE_BLOCK_ROWS):
                block = self.projection.project(feats[a:a + ENCODE_BLOCK_ROWS])
                if len(block) and np.abs(block).max() > FLOAT16_LIMIT:
                    return False        # features this large would overflow: rerank the whole pool instead
                out[a:a + len(block)] = block
            self.by_shard[shard.sha256] = out
        self.parts = [self.by_shard[s.sha256] for s in self.collection.shards]
        return True

    def gather(self, rows: np.ndarray, buffer: np.ndarray) -> None:
        """The sketches of `rows` (valid, int64) into buffer[:len(rows)]; only once usable() is True."""
        self.collection.take_rows(self.parts, rows, buffer)


def build_sketch(collection: Collection, reader: RowReader, projection: NeighbourProjection,
                 previous: Sketch | None) -> Sketch | None:
    """The sketch of `collection` under `projection`, to be projected on first use, or None where its F7 is
    not in RAM.  Shards that `previous` (the generation before, same projection) projected are taken from it."""
    if reader.in_ram is None:
        return None
    known = previous.by_shard if previous is not None and previous.projection is projection else {}
    return Sketch(collection, reader.in_ram, projection, known)
