"""One generation of a collection's index, as a search reads it: the coarse index's files and metadata,
checked before use, and the base, delta and tombstones of engine/index.py's design."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..codes import MAX_BITS, code_bytes
from ..config import FEATURES_IN_RAM_MB
from ..errors import HashsearchError
from ..fileio import open_regular
from ..shards import Collection, RowReader
from ..shards.layout import INDEX_DIR, INDEX_META
from ..shards.manifest import check_file_entry, read_named_file
from . import coarse as coarse_mod
from .cells import FIT_ROWS_PER_CELL, cells_for, fit_cells
from .neighbours import (ENCODE_BLOCK_ROWS, NeighbourProjection, fit_projection, float32_from_npy, float32_npy,
                         sample_rows)
from .sketch import Sketch, build_sketch

_REBUILD = "rebuild it with `hashsearch build-index`"


class _Bad(Exception):
    pass


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Bad(what)


def check_index_meta(meta, where, shards: int | None = None) -> dict:
    """An index's metadata, every field checked before use; `shards`: how many the collection has."""
    try:
        check_file_entry(meta, "the coarse index")
        _need(isinstance(meta["coarse"], dict) and meta["coarse"].get("kind") in coarse_mod.KINDS, "coarse kind")
        _need(isinstance(meta["ntotal"], int) and meta["ntotal"] >= 0, "ntotal")
        _need(isinstance(meta["bits"], int) and not isinstance(meta["bits"], bool), "bits")
        _need(isinstance(meta["base_shards"], list) and all(isinstance(s, str) for s in meta["base_shards"]),
              "base_shards")
        _need(shards is None or len(meta["base_shards"]) <= shards, "more base shards than the collection has")
        if meta.get("rows_file") is not None:
            check_file_entry({"file": meta["rows_file"], "sha256": meta.get("rows_sha256")}, "the index rows")
        if meta.get("neighbour_bits"):
            _need(isinstance(meta["neighbour_bits"], int) and meta["neighbour_bits"] % 8 == 0 and
                  0 < meta["neighbour_bits"] <= MAX_BITS, "neighbour_bits")
            _need(isinstance(meta["neighbour_coarse"], dict) and
                  meta["neighbour_coarse"].get("kind") in coarse_mod.KINDS, "neighbour coarse kind")
            for name in ("neighbour", "projection"):
                check_file_entry({"file": meta[f"{name}_file"], "sha256": meta.get(f"{name}_sha256")},
                                 f"the index's {name} file")
            if meta.get("cells") is not None:     # indexes built before cells have none
                _need(isinstance(meta["cells"], int) and not isinstance(meta["cells"], bool) and
                      meta["cells"] > 0, "cells")
                check_file_entry({"file": meta["cells_file"], "sha256": meta.get("cells_sha256")},
                                 "the index's cells file")
        if meta.get("tuned") is not None:
            tuned = meta["tuned"]
            _need(meta.get("cells") is not None and isinstance(tuned, dict) and all(
                isinstance(tuned.get(key), int) and not isinstance(tuned[key], bool) and tuned[key] >= 0
                for key in ("neighbour_pool", "neighbour_cells")), "tuned")
    except Exception as exc:  # noqa: BLE001 - any malformed field means the same thing
        raise HashsearchError(f"unreadable index metadata in {where} ({str(exc) or type(exc).__name__}); "
                              f"{_REBUILD}") from None
    return meta


def read_index_meta(index_dir) -> dict | None:
    """The metadata of an index directory outside a collection, or None where there is none."""
    path = Path(index_dir) / INDEX_META
    if not path.exists():
        return None
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            meta = json.loads(f.read(1 << 26))
    except (OSError, ValueError) as exc:
        raise HashsearchError(f"unreadable index metadata {path} ({exc}); {_REBUILD}") from None
    return check_index_meta(meta, path)


def write_index_files(coll: Collection, kind: str, txn, *, neighbour_bits: int = 0, neighbour_kind: str = "flat",
                      projection: NeighbourProjection | None = None, kept_cells: KeptCells | None = None,
                      **params) -> dict:
    """Build the coarse index over `coll`'s live rows and write its files through `txn` (a storage
    Transaction, or an OutsideDirectory for `build-index --out`); its metadata.  `neighbour_bits`: the
    length of the neighbour codes (engine/neighbours.py), 0 for none, indexed by a `neighbour_kind` index;
    `projection`: the one to keep (collection_projection), or None to fit one to the live rows;
    `kept_cells`: the cells and tuned sources to keep with it (collection_cells), or None to fit new cells,
    whose sources Index.build then measures."""
    start = time.perf_counter()
    live = coll.live_rows()
    coarse = coarse_mod.build_coarse(coll.codes()[live], coll.bits, kind, **params)
    meta = {"coarse": coarse_mod.describe(coarse), "ntotal": int(coarse.ntotal), "bits": coll.bits,
            "base_shards": [s.sha256 for s in coll.shards], "generation": coll.generation}
    meta["file"] = txn.file_name(INDEX_DIR, "coarse", ".faissindex")
    meta["sha256"] = txn.write(meta["file"], _serialise(coarse, coll))
    meta["rows_file"] = None
    if len(coll.deleted_rows):      # positions of the index are not rows: record which rows they are
        meta["rows_file"] = txn.file_name(INDEX_DIR, "rows", ".bin")
        meta["rows_sha256"] = txn.write(meta["rows_file"], live.astype(np.int64).tobytes())
    if neighbour_bits:
        if projection is None or projection.bits != neighbour_bits:
            projection, kept_cells = fit_projection(coll.features(sample_rows(live)), neighbour_bits), None
        meta.update(_write_neighbours(coll, live, neighbour_kind, projection, txn))
        meta.update(_write_cells(coll, live, projection, kept_cells, txn))
    meta["build_seconds"] = round(time.perf_counter() - start, 3)
    return meta


def _serialise(coarse, coll: Collection) -> bytes:
    try:
        return faiss.serialize_index_binary(coarse).tobytes()
    except RuntimeError as exc:
        raise HashsearchError(f"cannot serialise the index of {coll.root}: {exc}") from None


def _write_neighbours(coll: Collection, live: np.ndarray, kind: str, projection: NeighbourProjection, txn) -> dict:
    """Index the live rows' neighbour codes, and write the index and the projection."""
    bits = projection.bits
    codes = np.empty((coll.n, bits // 8), np.uint8)
    for first, block in coll.iter_feature_blocks(ENCODE_BLOCK_ROWS):
        codes[first:first + len(block)] = projection.encode(block)
    # Keys of a hash index as wide as keeps it exact to a few bits: neighbour codes are long, and narrow
    # keys of codes that cluster fill a few huge buckets that every query then scans.  A multihash index
    # takes about five slices of at most 32 bits: on bench's 1M synthetic rows, 128-bit codes in 8 slices of
    # 16 bits held 0.9965 of the exact top 10 in a pool of 32 at 0.031 ms a lookup, in 5 of 24 bits 0.995 at
    # 0.009 ms, in 4 of 32 bits 0.980 at 0.006 ms.
    widest = {"hash": min(32, bits // 8), "multihash": min(32, bits // 5 // 8 * 8)}
    hash_bits = max(coarse_mod.default_hash_bits(bits, len(live), kind), widest[kind]) if kind != "flat" else None
    coarse = coarse_mod.build_coarse(codes[live], bits, kind, hash_bits=hash_bits)
    entry = {"neighbour_bits": bits, "neighbour_coarse": coarse_mod.describe(coarse),
             "neighbour_file": txn.file_name(INDEX_DIR, "neighbours", ".faissindex"),
             "projection_file": txn.file_name(INDEX_DIR, "projection", ".npy")}
    entry["neighbour_sha256"] = txn.write(entry["neighbour_file"], _serialise(coarse, coll))
    entry["projection_sha256"] = txn.write(entry["projection_file"], projection.to_bytes())
    return entry


@dataclass(frozen=True)
class KeptCells:
    """The cells of a collection's index, and the sources build-index measured for them (None where the
    collection was too small to measure), which later builds and compact keep with the projection."""
    centres: np.ndarray
    tuned: dict | None
    sha256: str | None = None       # of their file: a build that wrote the same one kept them


def _write_cells(coll: Collection, live: np.ndarray, projection: NeighbourProjection, kept: KeptCells | None,
                 txn) -> dict:
    """The cells' entry of the index metadata, their centres kept (with the projection they were fitted in) or
    fitted to the projected live rows (none where there are none: compact after every item was deleted)."""
    if kept is None:
        if not len(live):
            return {}
        cells = cells_for(len(live))
        sample = projection.project(coll.features(sample_rows(live, cells * FIT_ROWS_PER_CELL)))
        kept = KeptCells(fit_cells(sample, cells), None)
    entry = {"cells": len(kept.centres), "cells_file": txn.file_name(INDEX_DIR, "cells", ".npy")}
    entry["cells_sha256"] = txn.write(entry["cells_file"], float32_npy(kept.centres))
    if kept.tuned is not None:      # Index.build measures them again with --retune
        entry["tuned"] = kept.tuned
    return entry


@dataclass
class Level:
    """One of the coarse level's two indexes over the same rows, in the same positions: H's codes, or
    the neighbour codes (with the projection that makes a query's from its F7)."""
    base: coarse_mod.Coarse
    delta: coarse_mod.Coarse | None
    projection: NeighbourProjection | None = None
    delta_codes: np.ndarray | None = None   # the neighbour codes of the delta's rows, which a refresh extends
    centres: np.ndarray | None = None       # the cells' centres in the projection (engine/cells.py), if any


@dataclass
class Generation:
    """Everything one search reads, for one generation: searches in flight keep theirs across a refresh."""
    collection: Collection
    meta: dict
    hamming: Level                  # H's codes: bcs, and hds's class-level pool
    neighbours: Level | None        # the neighbour codes: hds's neighbour pool; None in older indexes
    base_rows: np.ndarray | None    # index position -> row; None: position == row
    base_end: int                   # rows of the shards the base was built on
    deleted: np.ndarray | None      # bool [n], rows deleted and not yet compacted
    base_has_deleted: bool
    delta_deleted: int              # deleted rows among the delta's: its searches fetch that many more
    reader: RowReader
    codes: np.ndarray
    ids: np.ndarray
    sketch: Sketch | None = None    # the rerank's shortlist (engine/sketch.py), where F7 is in RAM

    def live_neighbour_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, codes): every live row, ascending, with its neighbour code, as the index holds them."""
        if self.neighbours is None:
            raise HashsearchError(f"the index of {self.collection.root} has no neighbour codes (it was built "
                                  f"before them, or with --neighbour-bits 0); {_REBUILD}")
        level = self.neighbours
        rows = self.base_rows if self.base_rows is not None else np.arange(level.base.ntotal, dtype=np.int64)
        codes = level.base.stored_codes()
        if codes is None:       # a hash index keeps its codes in buckets: make them again from F7
            codes = level.projection.encode(self.collection.features(rows)) if len(rows) else \
                np.zeros((0, level.projection.bits // 8), np.uint8)
        if level.delta_codes is not None:
            rows = np.concatenate([rows, np.arange(self.base_end, self.collection.n, dtype=np.int64)])
            codes = np.concatenate([codes, level.delta_codes])
        if self.deleted is not None:
            alive = ~self.deleted[rows]
            rows, codes = rows[alive], codes[alive]
        return rows, codes

    @property
    def exact_base(self) -> bool:
        """The base alone answers: positions are rows, nothing deleted in it, nothing added."""
        return self.base_rows is None and self.hamming.delta is None and not self.base_has_deleted


def _index_meta(coll: Collection, index_dir: Path | None) -> tuple[dict, Path]:
    if index_dir is None:
        meta, base_dir = coll.manifest.get("index"), coll.root
        if meta is None:
            raise HashsearchError(f"no index in {coll.root}; run `hashsearch build-index {coll.root}` first")
        meta = check_index_meta(meta, coll.root / "manifest.json", len(coll.shards))
    else:
        meta, base_dir = read_index_meta(index_dir), Path(index_dir)
        if meta is None:
            raise HashsearchError(f"no index in {index_dir}; run `hashsearch build-index {coll.root}` first")
    return meta, base_dir


def load_generation(coll: Collection, index_dir: Path | None, previous: Generation | None,
                    features_in_ram_mb: float = FEATURES_IN_RAM_MB, meta: dict | None = None) -> Generation:
    """The generation `coll` is at; `meta`: the metadata of an index just written into `index_dir` (or the
    collection) and not yet published, instead of the published one."""
    if meta is None:
        meta, base_dir = _index_meta(coll, index_dir)
    else:
        base_dir = coll.root if index_dir is None else Path(index_dir)
    shas = [s.sha256 for s in coll.shards]
    n_base = len(meta["base_shards"])
    if meta["bits"] != coll.bits or shas[:n_base] != meta["base_shards"]:
        raise HashsearchError(f"the index of {coll.root} was built for other shards; {_REBUILD}")
    base_end = int(coll.offsets[n_base])
    if previous is not None and previous.meta == meta:
        base, base_rows, nbase = previous.hamming.base, previous.base_rows, previous.neighbours
    else:
        base, base_rows = _read_base(meta, base_dir, base_end, coll)
        nbase = _read_neighbours(meta, base_dir, coll)
    codes = coll.codes()
    hamming = Level(base, base.like(codes[base_end:], coll.bits) if base_end < coll.n else None)
    neighbours = None
    if nbase is not None:
        delta, delta_codes = None, None
        if base_end < coll.n:       # rows added since build-index: their codes come from their F7
            delta_codes = _delta_neighbour_codes(coll, base_end, nbase.projection, previous)
            delta = nbase.base.like(delta_codes, nbase.projection.bits)
        neighbours = Level(nbase.base, delta, nbase.projection, delta_codes, nbase.centres)
    deleted = coll.deleted_mask() if len(coll.deleted_rows) else None
    if deleted is None:
        base_has_deleted = False
    elif base_rows is None:
        base_has_deleted = bool(deleted[:base_end].any())
    else:
        base_has_deleted = bool(deleted[base_rows].any())
    delta_deleted = 0 if deleted is None else int(np.count_nonzero(deleted[base_end:]))
    reader = feature_reader(coll, features_in_ram_mb)
    sketch = None
    if neighbours is not None:
        sketch = build_sketch(coll, reader, neighbours.projection, previous.sketch if previous else None,
                              neighbours.centres, deleted)
    return Generation(coll, meta, hamming, neighbours, base_rows, base_end, deleted, base_has_deleted,
                      delta_deleted, reader, codes, coll.ids(), sketch)


def feature_reader(coll: Collection, features_in_ram_mb: float = FEATURES_IN_RAM_MB) -> RowReader:
    """The rerank's reader of `coll`'s F7: from RAM where all of it fits in `features_in_ram_mb`."""
    size = coll.n * coll.feature_dim * coll.feature_dtype.itemsize
    return RowReader(coll, in_ram=size <= features_in_ram_mb * (1 << 20))


def _delta_neighbour_codes(coll: Collection, base_end: int, projection: NeighbourProjection,
                           previous: Generation | None) -> np.ndarray:
    """The neighbour codes of rows base_end.. of `coll`.  A refresh after an add encodes only the rows the
    previous generation lacked: reading every added row's F7 again at each refresh would grow with the delta."""
    known = None
    if previous is not None and previous.neighbours is not None and previous.neighbours.delta_codes is not None \
            and previous.base_end == base_end and previous.neighbours.projection is projection:
        before = [(s.name, s.sha256) for s in previous.collection.shards]
        if [(s.name, s.sha256) for s in coll.shards[:len(before)]] == before:   # its rows are still these rows
            known = previous.neighbours.delta_codes
    start = base_end + (0 if known is None else len(known))
    new = projection.encode(coll.features(np.arange(start, coll.n))) if start < coll.n else known[:0]
    return new if known is None else np.concatenate([known, new])


def partition_generation(part: Collection, meta: dict, features_in_ram_mb: float = FEATURES_IN_RAM_MB) -> Generation:
    """A partition's generation: an index of the kind and settings `meta` records, built in memory over
    the part's live rows (Collection.part), so it has neither delta nor tombstones to skip."""
    settings = {k: v for k, v in meta["coarse"].items() if k != "kind"}
    live = part.live_rows()
    codes = part.codes()
    base = coarse_mod.Coarse(coarse_mod.build_coarse(codes[live], part.bits, meta["coarse"]["kind"], **settings))
    neighbours = None
    if meta.get("neighbour_bits"):
        projection = _read_projection(meta, part.root, part)
        settings = {k: v for k, v in meta["neighbour_coarse"].items() if k != "kind"}
        nbase = coarse_mod.build_coarse(projection.encode(part.features(live)), projection.bits,
                                        meta["neighbour_coarse"]["kind"], **settings)
        neighbours = Level(coarse_mod.Coarse(nbase), None, projection)
    deleted = part.deleted_mask() if len(part.deleted_rows) else None
    return Generation(part, meta, Level(base, None), neighbours, None if deleted is None else live, part.n,
                      deleted, False, 0, feature_reader(part, features_in_ram_mb), codes, part.ids())


def collection_projection(coll: Collection) -> NeighbourProjection | None:
    """The neighbour projection of the collection's current index, which later builds keep, so that an index
    built after adds and deletes answers as the followed one does; None where it has none."""
    meta = coll.manifest.get("index")
    if not meta or not meta.get("neighbour_bits"):
        return None
    return _read_projection(check_index_meta(meta, coll.root / "manifest.json"), coll.root, coll)


def collection_cells(coll: Collection) -> KeptCells | None:
    """The cells of the collection's current index and their tuned sources, which later builds keep with its
    projection, for the same reason; None where it has none."""
    meta = coll.manifest.get("index")
    if not meta or not meta.get("neighbour_bits") or not meta.get("cells"):
        return None
    meta = check_index_meta(meta, coll.root / "manifest.json")
    return KeptCells(_read_cells(meta, coll.root), meta.get("tuned"), meta["cells_sha256"])


def _read_cells(meta: dict, base_dir: Path) -> np.ndarray:
    data = read_named_file(base_dir, {"file": meta["cells_file"], "sha256": meta["cells_sha256"]}, "cell centres",
                           _REBUILD)
    return float32_from_npy(data, (meta["cells"], meta["neighbour_bits"]), "cell centres")


def _read_projection(meta: dict, base_dir: Path, coll: Collection) -> NeighbourProjection:
    data = read_named_file(base_dir, {"file": meta["projection_file"], "sha256": meta["projection_sha256"]},
                           "neighbour projection", _REBUILD)
    return NeighbourProjection.from_bytes(data, coll.feature_dim, meta["neighbour_bits"])


def _read_neighbours(meta: dict, base_dir: Path, coll: Collection) -> Level | None:
    """The neighbour level's base index and projection, or None for an index built without them."""
    if not meta.get("neighbour_bits"):
        return None
    projection = _read_projection(meta, base_dir, coll)
    index = _deserialise(read_named_file(base_dir, {"file": meta["neighbour_file"],
                                                    "sha256": meta["neighbour_sha256"]}, "neighbour index",
                                         _REBUILD), base_dir)
    if index.ntotal != meta["ntotal"] or index.code_size != meta["neighbour_bits"] // 8:
        raise HashsearchError(f"the neighbour index of {coll.root} does not hold the {meta['ntotal']} codes it "
                              f"records; {_REBUILD}")
    centres = _read_cells(meta, base_dir) if meta.get("cells") is not None else None
    return Level(coarse_mod.Coarse(index), None, projection, None, centres)


def _deserialise(data: bytes, base_dir: Path):
    try:
        return faiss.deserialize_index_binary(np.frombuffer(data, np.uint8))
    except RuntimeError as exc:
        raise HashsearchError(f"cannot read coarse index in {base_dir}: {str(exc).splitlines()[0]}") from None


def _read_base(meta: dict, base_dir: Path, base_end: int, coll: Collection):
    index = _deserialise(read_named_file(base_dir, meta, "coarse index", _REBUILD), base_dir)
    if index.ntotal != meta["ntotal"] or index.code_size != code_bytes(coll.bits):
        raise HashsearchError(f"the coarse index of {coll.root} does not hold the {meta['ntotal']} codes it records; "
                              f"{_REBUILD}")
    base_rows = None
    if meta.get("rows_file"):
        raw = read_named_file(base_dir, {"file": meta["rows_file"], "sha256": meta["rows_sha256"]}, "index rows",
                              _REBUILD)
        base_rows = np.frombuffer(raw, np.int64) if len(raw) % 8 == 0 else None
        if base_rows is None or len(base_rows) != index.ntotal or (len(base_rows) and (
                base_rows[0] < 0 or base_rows[-1] >= base_end or np.any(np.diff(base_rows) <= 0))):
            raise HashsearchError(f"the index rows of {coll.root} are damaged; {_REBUILD}")
    elif index.ntotal != base_end:
        raise HashsearchError(f"the coarse index of {coll.root} holds {index.ntotal} codes for {base_end} rows; "
                              f"{_REBUILD}")
    return coarse_mod.Coarse(index), base_rows
