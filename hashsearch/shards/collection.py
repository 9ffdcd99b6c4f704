"""Read side of a collection: codes in RAM, features memory-mapped.

Search needs every code (ceil(K/8) bytes a row: 16 MB for 1M rows at 128 bits)
but only the F7 rows of a few hundred candidates per query, so features are
never loaded whole.  Shards are written contiguous and uncompressed, which
lets each features dataset be mapped straight from its byte offset in the
HDF5 file; a shard written by another tool with chunking or compression
falls back to h5py reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..codes import code_bytes
from ..errors import HashsearchError
from .manifest import file_sha256, read_manifest
from .writer import REJECTS


class Collection:
    """An encoded image collection on disk.

    >>> coll = Collection.open("my-collection")
    >>> coll.n, coll.bits, coll.feature_dim
    >>> codes = coll.codes()                  # uint8 [n, ceil(bits/8)], in RAM
    >>> feats = coll.features([0, 5, 42])     # float32 [3, D], read from disk
    """

    def __init__(self, root, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.bits = int(manifest["bits"])
        self.feature_dim = int(manifest["feature_dim"])
        self.feature_dtype = np.dtype(manifest["feature_dtype"])
        self.shard_files = [self.root / s["file"] for s in manifest["shards"]]
        rows = [int(s["rows"]) for s in manifest["shards"]]
        # Row r of the collection is row r - offsets[s] of shard s.
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._h5: list[h5py.File | None] = [None] * len(rows)
        self._mapped: list[np.ndarray | None] = [None] * len(rows)
        self._ids = self._labels = self._codes = None

    @classmethod
    def open(cls, root, *, require_complete: bool = True, allow_empty: bool = False) -> "Collection":
        manifest = read_manifest(root)
        if require_complete and not manifest.get("complete"):
            raise HashsearchError(f"collection {root} is unfinished; run the same encode command again to resume it")
        coll = cls(root, manifest)
        for f in coll.shard_files:
            if not f.exists():
                raise HashsearchError(f"shard missing from collection {root}: {f.name}")
        if coll.n == 0 and not allow_empty:
            raise HashsearchError(f"collection {root} is empty")
        return coll

    def __len__(self) -> int:
        return self.n

    @property
    def rejected(self) -> int:
        return int(self.manifest.get("rejected", 0))

    @property
    def model_path(self) -> Path | None:
        path = self.root / "model.pt"
        return path if path.exists() else None

    # -- whole-column reads --------------------------------------------------
    def _column(self, name: str) -> np.ndarray:
        parts = [self._file(s)[name][...] for s in range(len(self.shard_files))]
        return np.concatenate(parts) if parts else np.zeros((0,), np.int64)

    def codes(self) -> np.ndarray:
        if self._codes is None:
            if self.n == 0:
                return np.zeros((0, code_bytes(self.bits)), np.uint8)
            self._codes = np.ascontiguousarray(self._column("codes"), dtype=np.uint8)
        return self._codes

    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = self._column("ids").astype(np.int64)
        return self._ids

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self._column("labels").astype(np.int64)
        return self._labels

    # -- row reads -------------------------------------------------------------
    def rows_for_ids(self, ids) -> np.ndarray:
        """Collection rows of the given ids; unknown ids raise."""
        all_ids = self.ids()
        order = np.argsort(all_ids, kind="stable")
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(all_ids, ids, sorter=order)
        pos = np.minimum(pos, len(order) - 1)
        rows = order[pos]
        missing = ids[all_ids[rows] != ids]
        if len(missing):
            raise HashsearchError(f"id {int(missing[0])} is not in collection {self.root}")
        return rows

    def _split(self, rows: np.ndarray):
        """Yield (shard, positions in `rows`, rows within that shard)."""
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise HashsearchError(f"row out of range for a collection of {self.n}")
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            yield int(s), where, rows[where] - self.offsets[s]

    def raw_features(self, rows) -> np.ndarray:
        """Feature rows in their stored dtype, in the order asked."""
        rows = np.asarray(rows, np.int64).ravel()
        out = np.empty((len(rows), self.feature_dim), self.feature_dtype)
        for s, where, local in self._split(rows):
            mapped = self.mapped_features(s)
            if mapped is not None:
                out[where] = mapped[local]
            else:
                # h5py fancy indexing needs strictly increasing indices: read each row once,
                # then expand (rows repeat, e.g. when several queries share candidates).
                unique, inverse = np.unique(local, return_inverse=True)
                out[where] = self._file(s)["features"][unique][inverse.reshape(-1)]
        return out

    def features(self, rows) -> np.ndarray:
        return self.raw_features(rows).astype(np.float32)

    def paths(self, rows) -> list[str]:
        rows = np.asarray(rows, np.int64).ravel()
        out = [""] * len(rows)
        for s, where, local in self._split(rows):
            ds = self._file(s)["paths"]
            for w, r in zip(where, local):
                value = ds[int(r)]
                out[w] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return out

    def iter_feature_blocks(self, block_rows: int = 65536):
        """Yield (first_row, float-typed block) over all features in order."""
        for s in range(len(self.shard_files)):
            mapped = self.mapped_features(s)
            ds = mapped if mapped is not None else self._file(s)["features"]
            rows = int(self.offsets[s + 1] - self.offsets[s])
            for a in range(0, rows, block_rows):
                b = min(rows, a + block_rows)
                yield int(self.offsets[s]) + a, ds[a:b]

    # -- files -------------------------------------------------------------------
    def _file(self, s: int) -> h5py.File:
        if self._h5[s] is None:
            path = self.shard_files[s]
            try:
                f = h5py.File(path, "r")
                shapes = {name: f[name].shape[0] for name in ("codes", "features", "ids", "labels", "paths")}
            except (OSError, KeyError) as exc:
                raise HashsearchError(f"cannot read shard {path}: {exc}") from None
            rows = int(self.offsets[s + 1] - self.offsets[s])
            if set(shapes.values()) != {rows}:
                f.close()
                raise HashsearchError(f"shard {path.name} does not hold the {rows} rows its manifest lists; "
                                      "run `hashsearch info --verify`")
            self._h5[s] = f
        return self._h5[s]

    def mapped_features(self, s: int) -> np.ndarray | None:
        """A zero-copy view of shard s's features, or None if its layout does not allow one."""
        if self._mapped[s] is None:
            ds = self._file(s)["features"]
            offset = ds.id.get_offset()
            if ds.chunks is not None or ds.compression is not None or offset is None:
                self._mapped[s] = False      # remembered: h5py reads this shard
            else:
                self._mapped[s] = np.memmap(self.shard_files[s], dtype=ds.dtype, mode="r",
                                            offset=offset, shape=ds.shape)
        return self._mapped[s] if self._mapped[s] is not False else None

    def verify(self) -> list[str]:
        """Shards whose bytes no longer match the manifest, as 'name: reason' lines."""
        problems = []
        for entry, path in zip(self.manifest["shards"], self.shard_files):
            if not path.exists():
                problems.append(f"{path.name}: missing")
            elif file_sha256(path) != entry["sha256"]:
                problems.append(f"{path.name}: checksum mismatch (truncated or altered)")
        return problems

    def rejects(self) -> list[dict]:
        path = self.root / REJECTS
        if not path.exists():
            return []
        rejects = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rejects.append(json.loads(line))
            except ValueError:   # a line torn by a crash; the resumed run writes it again
                continue
        return rejects

    def close(self) -> None:
        for f in self._h5:
            if f is not None:
                f.close()
        self._h5 = [None] * len(self._h5)
        self._mapped = [None] * len(self._mapped)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
