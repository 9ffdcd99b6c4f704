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

Each value is kept in 4 bits (faiss's scalar quantizer, one range per
dimension), so a row is 128 bytes, and a query gathers a quarter of what
float16 would make it gather.  On the same collection (pool 600) the 4-bit
sketch kept recall@10 at 0.9655 against float16's 0.9656.

A sketch is built only where the collection's F7 is held in RAM
(config.FEATURES_IN_RAM_MB): it is made from those rows by the first search
that shortlists, and kept per shard, so a refresh after an add projects only
the new shard's rows, with the ranges fitted the first time.  It is never
written to disk.
"""
from __future__ import annotations

import threading

import faiss
import numpy as np

from ..shards import Collection, RowReader
from .cells import CellIndex
from .neighbours import ENCODE_BLOCK_ROWS, NeighbourProjection, sample_rows

# Rows per result that the sketch hands to the exact rerank.  On CIFAR-10 (1,280-d F7, k 10, pools of 500
# and 800) 5 per result lost none of the exact top 10 and 3.2 lost 0.1 % of it; 6 leaves a margin.
SHORTLIST_PER_RESULT = 6
# Rows the 4-bit ranges are fitted on: min and max per dimension settle long before this.
RANGE_SAMPLE_ROWS = 10_000
# Each range is widened by this share on both sides, for rows added later (faiss clamps values outside it);
# on CIFAR-10 (pool 600) a margin of 0.1 gave recall@10 0.9653, none 0.9656.
RANGE_MARGIN = 0.1
# Sketch distances are float32 sums of 256 squares: values past this could overflow them, and a collection
# whose rows project past it has no sketch (its whole pool is reranked).
VALUE_LIMIT = 1e15


def _quantizer(bits: int) -> faiss.IndexScalarQuantizer:
    index = faiss.IndexScalarQuantizer(bits, faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_L2)
    index.sq.rangestat, index.sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, RANGE_MARGIN
    return index


class Sketch:
    """Every row's projection, 4-bit codes uint8 [rows, bits/2], one array per shard, projected on first use
    (usable): most indexes opened never search hds, and a collection's first search pays it once.  Where the
    index has cell centres (engine/cells.py), the live rows are also put in their cells (`cells`)."""

    def __init__(self, collection: Collection, feats: list[np.ndarray], projection: NeighbourProjection,
                 previous: Sketch | None, centres: np.ndarray | None = None, deleted: np.ndarray | None = None):
        self.collection, self.projection, self._feats = collection, projection, feats
        self.centres, self._deleted = centres, deleted
        known, self.quantizer = previous.state() if previous is not None else ({}, None)
        # a shard's rows never change: its sha256 names them, and its codes carry over with the ranges
        self.by_shard = {s.sha256: known[s.sha256] for s in collection.shards if s.sha256 in known}
        if previous is not None and previous.centres is not centres:
            self.by_shard = {sha: (codes, None) for sha, (codes, _) in self.by_shard.items()}
        self.parts: list[np.ndarray] | None = None
        self.cells: CellIndex | None = None
        self._usable: bool | None = None
        self._lock = threading.Lock()

    @property
    def bits(self) -> int:
        return self.projection.bits

    def usable(self) -> bool:
        """Whether every row has its sketch (False where values would pass VALUE_LIMIT), projecting the shards
        not yet projected on the first call."""
        if self._usable is None:
            with self._lock:
                if self._usable is None:
                    self._usable = self._project_missing()
        return self._usable

    def state(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], faiss.IndexScalarQuantizer | None]:
        """({shard: (codes, cells or None)}, the ranges' quantizer) as they stand, never half-made by a
        projection in flight."""
        with self._lock:
            return dict(self.by_shard), self.quantizer

    def _project_missing(self) -> bool:
        if self.collection.n == 0:
            return False
        if self.quantizer is None:
            rows = sample_rows(np.arange(self.collection.n, dtype=np.int64), RANGE_SAMPLE_ROWS)
            sample = np.empty((len(rows), self.projection.feature_dim), self._feats[0].dtype)
            self.collection.take_rows(self._feats, rows, sample)
            sample = self.projection.project(sample)
            if not np.all(np.abs(sample) <= VALUE_LIMIT):
                return False        # rerank the whole pool instead
            self.quantizer = _quantizer(self.bits)
            self.quantizer.train(sample)
        cells = None if self.centres is None else CellIndex(self.centres, self.quantizer)
        for shard, feats in zip(self.collection.shards, self._feats):
            known = self.by_shard.get(shard.sha256)
            if known is not None and (cells is None or known[1] is not None):
                continue
            out = np.empty((len(feats), self.quantizer.code_size), np.uint8)
            where = None if cells is None else np.empty(len(feats), np.int64)
            for a in range(0, len(feats), ENCODE_BLOCK_ROWS):
                block = self.projection.project(feats[a:a + ENCODE_BLOCK_ROWS])
                if not np.all(np.abs(block) <= VALUE_LIMIT):
                    return False
                out[a:a + len(block)] = self.quantizer.sa_encode(block)
                if cells is not None:
                    where[a:a + len(block)] = cells.assign(block)
            self.by_shard[shard.sha256] = (out, where)
        self.parts = [self.by_shard[s.sha256][0] for s in self.collection.shards]
        if cells is not None:
            live = np.ones(self.collection.n, bool) if self._deleted is None else ~self._deleted
            rows = np.flatnonzero(live)
            cells.fill(rows, np.concatenate([self.by_shard[s.sha256][1] for s in self.collection.shards])[live],
                       np.concatenate(self.parts)[live])
            self.cells = cells
        return True

    def gather(self, rows: np.ndarray, buffer: np.ndarray) -> None:
        """The sketch codes of `rows` (valid, int64) into buffer[:len(rows)]; only once usable() is True."""
        self.collection.take_rows(self.parts, rows, buffer)

    def values(self, codes: np.ndarray) -> np.ndarray:
        """The projected values float32 [n, bits] that gathered codes stand for."""
        return self.quantizer.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))


def build_sketch(collection: Collection, reader: RowReader, projection: NeighbourProjection,
                 previous: Sketch | None, centres: np.ndarray | None = None,
                 deleted: np.ndarray | None = None) -> Sketch | None:
    """The sketch of `collection` under `projection`, to be projected on first use, or None where its F7 is
    not in RAM.  Shards that `previous` (the generation before, same projection) projected are taken from it,
    with its ranges, and with their cells under the same `centres`.  `deleted`: bool [n], the rows the
    cells leave out."""
    if reader.in_ram is None:
        return None
    same = previous is not None and previous.projection is projection and previous._usable is not False
    return Sketch(collection, reader.in_ram, projection, previous if same else None, centres, deleted)
