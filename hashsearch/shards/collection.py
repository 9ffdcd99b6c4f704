"""Read side of a collection: one pinned generation, codes in RAM, features read by pread or held in RAM.

Search needs every code (ceil(K/8) bytes a row: 16 MB for 1M rows at 128 bits)
but only the F7 rows of a few hundred candidates per query.  So features are
loaded whole only where the index opening the collection asks for it (they fit
its budget, see config.FEATURES_IN_RAM_MB); otherwise RowReader reads single
rows and iter_feature_blocks streams them, both with pread straight from the
shard files.  Shards are written
contiguous and uncompressed, so each features dataset starts at a fixed
byte offset in its HDF5 file; a shard written by another tool with chunking
or compression falls back to h5py reads.

Opening a collection checks, before any read, that every file its manifest
names stays inside it, is a regular file, and holds datasets of the types,
widths and row counts the manifest lists, each stored in that file itself
(HDF5 metadata only): a collection from elsewhere can't make a reader read
outside it, hang on a FIFO, or return rows it misreads.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import reprlib
from pathlib import Path
from typing import NoReturn

import h5py
import numpy as np

from ..codes import code_bytes
from ..errors import HashsearchError
from ..fileio import NotRegularFile, open_regular, read_regular
from .layout import MINIATURE_SIDE, MINIATURES, MODEL_FILE, REJECTS
from .manifest import file_sha256, inside, read_manifest

_COLUMNS = {"codes": np.uint8, "ids": np.int64, "labels": np.int64, MINIATURES: np.uint8}
# Paths asked of a shard at once up to which each is read by itself (~20 us an h5py read); past it the shard's
# paths are read whole, once, and kept (hold_paths): a report naming 1M items took minutes row by row.
PATHS_READ_ROW_BY_ROW = 1000
# One pread of a shard's features read whole: large enough to cost one syscall per 64 MB.
_READ_BLOCK_BYTES = 1 << 26
_INT64_MAX = np.iinfo(np.int64).max
# HDF5 can keep a dataset's bytes in other files: external storage, virtual datasets, external links (and soft
# links, which lead anywhere in the file).  Those files may be a FIFO, a device, or anything outside the
# collection, read as its rows; so a shard's datasets must be hard-linked and store their data in the shard.
_OWN_LAYOUTS = (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED)


class _Vanished(Exception):
    """A file the manifest named is gone because a writer published a newer generation meanwhile."""


class NotAnItem(HashsearchError):
    """An id that is not a live item: never stored, or deleted (by another request a moment ago, say)."""


class GenerationGone(HashsearchError):
    """The generation asked for was replaced and its files removed: open the newest one instead."""


def _open_named(root: Path, name, what: str, generation: int) -> tuple[Path, int]:
    path = inside(root, name, what)
    try:
        return path, open_regular(path)
    except FileNotFoundError:
        if read_manifest(root).get("generation", 0) != generation:
            raise _Vanished() from None
        raise HashsearchError(f"{what} missing from collection {root}: {name}") from None
    except NotRegularFile as exc:
        raise HashsearchError(f"{what} {name} of collection {root} is refused: {exc}") from None
    except OSError as exc:
        raise HashsearchError(f"cannot read {what} {name} of collection {root}: {exc.strerror}") from None


def integers(values, what: str) -> np.ndarray:
    """`values`, ids or rows, as int64 [n]; any integer type will do, but a float (1.7 would be row 1), text,
    a bool or a number past 64 bits raises."""
    try:
        array = np.asarray(values)
    except (OverflowError, ValueError, TypeError):
        array = None
    if array is None or (array.size and (array.dtype.kind not in "iu" or array.max() > _INT64_MAX)):
        raise HashsearchError(f"{what} must be integers that fit in 64 bits, got {reprlib.repr(values)}")
    return array.astype(np.int64).ravel()


def decode_path(value) -> str:
    """A stored path as the str the file system gave (names that are not UTF-8 come back with surrogates)."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Shard:
    """One shard file, checked once and shared by every generation that names it (shards never change)."""

    def __init__(self, root: Path, entry: dict, manifest: dict):
        self.name, self.sha256, self.rows = entry["file"], entry["sha256"], int(entry["rows"])
        self._fd = self._h5 = None
        self.path, self._fd = _open_named(root, self.name, "shard", manifest.get("generation", 0))
        self._cache: dict[str, object] = {}   # columns, features held in RAM, the packed paths
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            self.close()
            raise HashsearchError(f"cannot read shard {self.name} of {root}: {exc}") from None
        try:
            self.features_offset = self._check(manifest)
        except HashsearchError:
            self.close()
            raise

    def _check(self, manifest: dict) -> int | None:
        expect = {"codes": ((self.rows, code_bytes(manifest["bits"])), np.dtype(np.uint8)),
                  "features": ((self.rows, manifest["feature_dim"]), np.dtype(manifest["feature_dtype"])),
                  "ids": ((self.rows,), np.dtype(np.int64)), "labels": ((self.rows,), np.dtype(np.int64)),
                  "paths": ((self.rows,), None)}
        # Optional: shards written before miniatures were stored have none.
        self.has_miniatures = MINIATURES in self.h5
        if self.has_miniatures:
            expect[MINIATURES] = ((self.rows, MINIATURE_SIDE ** 2), np.dtype(np.uint8))
        for name, (shape, dtype) in expect.items():
            ds = self._dataset(name)
            if ds.shape != shape:
                raise HashsearchError(f"shard {self.name}: {name} has shape {ds.shape}, but the manifest says {shape}")
            if dtype is not None and ds.dtype != dtype:
                raise HashsearchError(f"shard {self.name}: {name} is stored as {ds.dtype}, but the manifest says {dtype}")
            if dtype is None and h5py.check_string_dtype(ds.dtype) is None:
                raise HashsearchError(f"shard {self.name}: paths are stored as {ds.dtype}, not strings")
        ds = self.h5["features"]
        if ds.chunks is not None or ds.compression is not None:
            return None
        return ds.id.get_offset()

    def _dataset(self, name: str) -> h5py.Dataset:
        """The dataset `name`, refused unless its bytes lie in this file; only HDF5 metadata is read."""
        link = self.h5.get(name, getlink=True)     # the link itself: following an external one opens its file
        if link is not None and not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise HashsearchError(f"shard {self.name}: {name} is {kind}, not a dataset of the shard; refused")
        ds = self.h5.get(name) if link is not None else None
        if not isinstance(ds, h5py.Dataset):
            raise HashsearchError(f"shard {self.name} has no {name} dataset")
        plist = ds.id.get_create_plist()
        if plist.get_layout() not in _OWN_LAYOUTS or plist.get_external_count():
            raise HashsearchError(f"shard {self.name}: {name} keeps its data outside the shard file (external "
                                  "storage or a virtual dataset); refused")
        return ds

    def column(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.asarray(self.h5[name][...], dtype=_COLUMNS[name])
        return self._cache[name]

    def features_in_ram(self, load: bool) -> np.ndarray | None:
        """Every feature row of the shard, read once and kept (shards never change); None if not loaded
        yet and `load` is False."""
        if "features" not in self._cache and load:
            out = np.empty((self.rows, self.h5["features"].shape[1]), self.h5["features"].dtype)
            if self.features_offset is None:
                out[...] = self.h5["features"][...]
            else:
                view = memoryview(out.reshape(-1).view(np.uint8))
                for start in range(0, len(view), _READ_BLOCK_BYTES):
                    block = view[start:start + _READ_BLOCK_BYTES]
                    _pread_exact(self, block, self.features_offset + start)
            self._cache["features"] = out
        return self._cache.get("features")

    def paths(self, local) -> list[str]:
        if len(local) > PATHS_READ_ROW_BY_ROW:
            self.hold_paths()
        table = self._cache.get("paths")
        if table is not None:       # no h5py call: a service describes every result through here
            blob, starts = table
            return [blob[starts[r]:starts[r + 1]].decode("utf-8", "surrogateescape") for r in local.tolist()]
        ds = self.h5["paths"]
        return [decode_path(ds[int(r)]) for r in local]

    def hold_paths(self) -> None:
        """Read every stored path once into one packed table (a 1M-row shard's is ~60 MB), from which
        paths() then answers without touching the file."""
        if "paths" not in self._cache:
            encoded = [p.encode("utf-8", "surrogateescape") for p in self.all_paths()]
            starts = np.zeros(len(encoded) + 1, np.int64)
            np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=starts[1:])
            self._cache["paths"] = (b"".join(encoded), starts)

    def all_paths(self) -> list[str]:
        return [decode_path(v) for v in self.h5["paths"][...]] if self.rows else []

    # A closed shard (its collection, or an Index opened on it, was closed) says so, rather than
    # failing somewhere inside h5py or numpy; what it already holds in RAM is still answered.
    @property
    def h5(self) -> h5py.File:
        return self._h5 if self._h5 is not None else self._closed()

    @property
    def fd(self) -> int:
        return self._fd if self._fd is not None else self._closed()

    def _closed(self) -> NoReturn:
        raise HashsearchError(f"shard {self.name} is closed (its collection, or the index opened on it, was closed)")

    def close(self) -> None:
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


class Collection:
    """One generation of an encoded image collection on disk.

    >>> coll = Collection.open("my-collection")
    >>> coll.n, coll.items, coll.bits, coll.feature_dim   # rows stored, rows live
    >>> codes = coll.codes()                  # uint8 [n, ceil(bits/8)], in RAM
    >>> feats = coll.features([0, 5, 42])     # float32 [3, D], read from disk

    Rows are positions in the generation's shards; ids are stable across
    generations.  Deleted rows stay in their shards until `compact`, and
    `deleted_rows` lists them.
    """

    def __init__(self, root, manifest: dict, shards: list[Shard], deleted_ids: np.ndarray):
        self.root = Path(root)
        self.manifest = manifest
        self.generation = int(manifest.get("generation", 0))
        self.bits = int(manifest["bits"])
        self.feature_dim = int(manifest["feature_dim"])
        self.feature_dtype = np.dtype(manifest["feature_dtype"])
        self.shards = shards
        # Row r of the collection is row r - offsets[s] of shard s.
        self.offsets = np.concatenate([[0], np.cumsum([s.rows for s in shards])]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._ids = self._labels = self._codes = None
        self.deleted_rows = self.rows_for_ids(deleted_ids, what="deleted id") if len(deleted_ids) else \
            np.zeros(0, np.int64)
        self.items = self.n - len(self.deleted_rows)

    @classmethod
    def open(cls, root, *, require_complete: bool = True, allow_empty: bool = False,
             previous: "Collection | None" = None) -> "Collection":
        """The newest generation; `previous`, an open older one, lends the shards both name."""
        for _ in range(5):
            manifest = read_manifest(root)
            if require_complete and not manifest.get("complete"):
                raise HashsearchError(f"collection {root} is unfinished; run the same encode command again to resume it")
            try:
                coll = cls._open_generation(Path(root), manifest, previous)
                break
            except _Vanished:
                continue
        else:
            raise HashsearchError(f"collection {root} changed under every attempt to open it")
        if coll.items == 0 and not allow_empty:
            raise HashsearchError(f"collection {root} is empty")
        return coll

    @classmethod
    def from_manifest(cls, root, manifest: dict) -> "Collection":
        """The generation `manifest` describes, published or not (a writer about to publish it)."""
        return cls._open_generation(Path(root), manifest, None)

    @classmethod
    def part(cls, root, manifest: dict, first: int, end: int) -> "Collection":
        """Shards [first, end) of the generation `manifest` describes, as a collection of their rows alone:
        row 0 is their first row, ids and tombstones are the generation's own.  A partition of a
        distributed search opens only its shards, and no data is copied to make it."""
        if not 0 <= first < end <= len(manifest["shards"]):
            raise HashsearchError(f"shards {first}..{end} are not shards of collection {root}")
        part = dict(manifest, shards=manifest["shards"][first:end])
        shards = []
        try:
            for entry in part["shards"]:
                shards.append(Shard(Path(root), entry, manifest))
            deleted = _read_tombstones(Path(root), manifest)
        except BaseException as exc:
            for s in shards:
                s.close()
            if isinstance(exc, _Vanished):
                raise GenerationGone(f"generation {manifest.get('generation', 0)} of {root} was replaced by a "
                                     "newer one") from None
            raise
        coll = cls(root, part, shards, np.zeros(0, np.int64))
        if len(deleted) and coll.n:
            ids = coll.ids()
            mine = deleted[(deleted >= ids[0]) & (deleted <= ids[-1])]       # ids grow with rows
            coll.deleted_rows = coll.rows_for_ids(mine, what="deleted id")
            coll.items = coll.n - len(coll.deleted_rows)
        return coll

    @classmethod
    def _open_generation(cls, root: Path, manifest: dict, previous) -> "Collection":
        reuse = {(s.name, s.sha256): s for s in previous.shards} if previous is not None else {}
        shards = []
        try:
            for entry in manifest["shards"]:
                shards.append(reuse.get((entry["file"], entry["sha256"])) or Shard(root, entry, manifest))
        except BaseException:
            for s in shards:
                if (s.name, s.sha256) not in reuse:
                    s.close()
            raise
        return cls(root, manifest, shards, _read_tombstones(root, manifest))

    def __len__(self) -> int:
        return self.items

    @property
    def shard_files(self) -> list[Path]:
        return [s.path for s in self.shards]

    @property
    def rejected(self) -> int:
        return int(self.manifest.get("rejected", 0))

    @property
    def next_id(self) -> int:
        """The id the next added item gets: past every id this collection ever held."""
        stored = self.manifest.get("next_id")
        last = int(self.ids()[-1]) + 1 if self.n else 0
        return max(last, stored if stored is not None else 0)

    @property
    def model_path(self) -> Path | None:
        path = self.root / MODEL_FILE
        return path if path.exists() else None

    def deleted_mask(self) -> np.ndarray:
        mask = np.zeros(self.n, bool)
        mask[self.deleted_rows] = True
        return mask

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.deleted_mask()) if len(self.deleted_rows) else np.arange(self.n)

    # -- whole-column reads --------------------------------------------------
    def _column(self, name: str) -> np.ndarray:
        parts = [s.column(name) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros((0,), _COLUMNS[name])

    def codes(self) -> np.ndarray:
        if self._codes is None:
            if self.n == 0:
                return np.zeros((0, code_bytes(self.bits)), np.uint8)
            codes = np.ascontiguousarray(self._column("codes"))
            if self.bits % 8 and np.any(codes[:, -1] >> (self.bits % 8)):
                # Padding bits are always 0 (codes.py); set ones mean codes of another length.
                raise HashsearchError(f"collection {self.root} says {self.bits}-bit codes, but its codes set bits "
                                      f"past {self.bits}; it is damaged: run `hashsearch info --verify`")
            self._codes = codes
        return self._codes

    def ids(self) -> np.ndarray:
        """Every row's id, strictly increasing (writers assign them so), which makes lookups a binary search."""
        if self._ids is None:
            ids = self._column("ids")
            bad = np.flatnonzero(np.diff(ids) <= 0)
            if len(bad):
                raise HashsearchError(f"collection {self.root} has repeated or unordered ids (id {int(ids[bad[0] + 1])} "
                                      "at row {}); it is damaged: run `hashsearch info --verify`".format(bad[0] + 1))
            self._ids = ids
        return self._ids

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self._column("labels")
        return self._labels

    @property
    def has_miniatures(self) -> bool:
        """Whether any shard holds miniatures (read from the shards' metadata only)."""
        return self.n > 0 and any(s.has_miniatures for s in self.shards)

    def miniatures(self) -> np.ndarray | None:
        """Every row's miniature (uint8 [n, MINIATURE_SIDE ** 2], encoders.preprocess.miniatures), or None when
        no shard has them.  A shard written before they were stored, or by a writer that had no images, gives
        its rows flat (all-zero) ones, which duplicates never pairs."""
        if not self.has_miniatures:
            return None
        return np.concatenate([s.column(MINIATURES) if s.has_miniatures else
                               np.zeros((s.rows, MINIATURE_SIDE ** 2), np.uint8) for s in self.shards])

    # -- row reads -------------------------------------------------------------
    def rows_for_ids(self, ids, *, what: str = "id", live: bool = False) -> np.ndarray:
        """Collection rows of the given ids; an id not stored (or, with live=True, deleted) raises."""
        all_ids = self.ids()
        ids = integers(ids, "ids")
        rows = np.minimum(np.searchsorted(all_ids, ids), max(self.n - 1, 0))
        missing = ids[all_ids[rows] != ids] if self.n else ids
        if len(missing):
            raise NotAnItem(f"{what} {int(missing[0])} is not in collection {self.root}")
        if live and len(self.deleted_rows):
            gone = np.isin(rows, self.deleted_rows)
            if gone.any():
                raise NotAnItem(f"{what} {int(ids[gone][0])} was deleted from collection {self.root}")
        return rows

    def check_rows(self, rows: np.ndarray) -> None:
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise HashsearchError(f"row out of range for a collection of {self.n}")

    def _split(self, rows: np.ndarray):
        """Yield (shard number, positions in `rows`, rows within that shard)."""
        self.check_rows(rows)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            yield int(s), where, rows[where] - self.offsets[s]

    def take_rows(self, per_shard: list[np.ndarray], rows: np.ndarray, out: np.ndarray) -> None:
        """Rows `rows` (valid, int64) of arrays held one per shard, row-aligned with it, into out[:len(rows)]."""
        if len(per_shard) == 1:
            np.take(per_shard[0], rows, axis=0, out=out[:len(rows)])
            return
        for s, where, local in self._split(rows):
            out[where] = per_shard[s][local]

    def raw_features(self, rows) -> np.ndarray:
        """Feature rows in their stored dtype, in the order asked."""
        rows = integers(rows, "rows")
        out = np.empty((len(rows), self.feature_dim), self.feature_dtype)
        RowReader(self).read(rows, out)
        return out

    def features(self, rows) -> np.ndarray:
        return self.raw_features(rows).astype(np.float32)

    def paths(self, rows) -> list[str]:
        rows = integers(rows, "rows")
        out = [""] * len(rows)
        for s, where, local in self._split(rows):
            for w, path in zip(where, self.shards[s].paths(local)):
                out[w] = path
        return out

    def hold_paths(self) -> "Collection":
        """Keep every shard's paths in RAM, so that paths() never reads the files: what a long-running
        service wants (the command line reads the few paths it shows instead)."""
        for shard in self.shards:
            shard.hold_paths()
        return self

    def _live_row_of_path(self) -> dict[str, int]:
        paths = list(itertools.chain.from_iterable(s.all_paths() for s in self.shards))   # one read a shard
        for r in self.deleted_rows.tolist():
            paths[r] = None
        return {path: r for r, path in enumerate(paths) if path is not None}

    def live_paths(self) -> set[str]:
        return set(self._live_row_of_path())

    def rows_for_paths(self, paths) -> np.ndarray:
        """Rows of the live items stored under these paths; a path given relative to here matches the
        absolute one a folder SOURCE stores.  A path that is not a live item raises."""
        row_of = self._live_row_of_path()
        rows = []
        for path in map(str, paths):
            row = row_of.get(path, row_of.get(os.path.abspath(path)))
            if row is None:
                raise HashsearchError(f"path {path!r} is not an item of collection {self.root}")
            rows.append(row)
        return np.array(rows, np.int64)

    def iter_feature_blocks(self, block_rows: int = 8192):
        """Yield (first_row, block) over all features in their stored dtype; a block is valid until the next."""
        buffer = np.empty((block_rows, self.feature_dim), self.feature_dtype)
        for s, shard in enumerate(self.shards):
            for a in range(0, shard.rows, block_rows):
                m = min(shard.rows, a + block_rows) - a
                if shard.features_offset is None:       # chunked or compressed: h5py decodes it
                    buffer[:m] = shard.h5["features"][a:a + m]
                else:
                    _pread_exact(shard, memoryview(buffer[:m]).cast("B"), shard.features_offset + a * buffer[0].nbytes)
                yield int(self.offsets[s]) + a, buffer[:m]

    # -- checks ------------------------------------------------------------------
    def verify(self) -> list[str]:
        """What no longer matches the manifest, as 'name: reason' lines: checksums (every byte read), ids."""
        problems = []
        for shard in self.shards:
            if file_sha256(shard.path) != shard.sha256:
                problems.append(f"{shard.path.name}: checksum mismatch (truncated or altered)")
        for column, read in (("ids", self.ids), ("codes", self.codes)):
            try:
                read()
            except HashsearchError as exc:
                problems.append(f"{column}: {exc}")
        return problems

    def rejects(self) -> list[dict]:
        rejects = []
        for line in reject_lines(self.root):
            try:
                rejects.append(json.loads(line))
            except ValueError:   # a line torn by a crash; the resumed run writes it again
                continue
        return rejects

    def close(self) -> None:
        """Release the shard files, those shared with a generation opened with previous=self too."""
        for shard in self.shards:
            shard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# A rejected image is a line of about 200 bytes: this is a million of them, and stops an endless file.
MAX_REJECTS_BYTES = 256 << 20


def reject_lines(root: Path) -> list[str]:
    """The lines of the collection's REJECTS file (none if it has none).  Writers append to it, so it must be
    the collection's own regular file: a symlink, a FIFO or a device is refused, never followed or waited on."""
    path = root / REJECTS
    try:
        data = read_regular(path, MAX_REJECTS_BYTES, follow=False)
    except FileNotFoundError:
        return []
    except (NotRegularFile, ValueError) as exc:         # ValueError: larger than MAX_REJECTS_BYTES
        raise HashsearchError(f"{REJECTS} of collection {root} is refused: {exc}") from None
    except OSError as exc:
        raise HashsearchError(f"cannot read {REJECTS} of collection {root}: {exc.strerror or exc}") from None
    return data.decode("utf-8", "surrogateescape").splitlines()


def _read_tombstones(root: Path, manifest: dict) -> np.ndarray:
    entry = manifest.get("tombstones")
    if entry is None:
        return np.zeros(0, np.int64)
    path, fd = _open_named(root, entry["file"], "tombstone file", manifest.get("generation", 0))
    with os.fdopen(fd, "rb") as f:
        data = f.read(8 * entry["count"] + 4096)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise HashsearchError(f"tombstone file {entry['file']} of {root} does not match its checksum")
    try:
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise HashsearchError(f"unreadable tombstone file {entry['file']} of {root}: {exc}") from None
    if ids.dtype != np.int64 or ids.ndim != 1 or len(ids) != entry["count"] or np.any(np.diff(ids) <= 0):
        raise HashsearchError(f"tombstone file {entry['file']} of {root} is not the sorted id list its manifest describes")
    return ids


def _pread_exact(shard: Shard, view: memoryview, offset: int) -> None:
    if os.preadv(shard.fd, [view], offset) != len(view):
        raise HashsearchError(f"short read from shard {shard.path}: was it truncated?")


class RowReader:
    """Reads feature rows into a caller's buffer; shared by every thread of one search index.

    From RAM where the shards' features were read whole (`in_ram`, or already by another reader of
    the same shards): a row then costs a copy, ~0.1 us.  Otherwise by pread() from the page cache,
    ~1-2 us a row.  Why not a memory map: every row read through it maps ~40 KB of page cache into
    the process (the kernel maps pages around each fault), so a search process's RSS would grow
    towards the whole features file, and unmapping to bound it makes each later read a minor fault,
    twice the cost of a pread (~4 us against ~2 us a row, measured).  pread copies straight from the
    page cache into the rerank buffer and RSS stays flat; a truncated file is a short read, never
    the SIGBUS a map gives.
    """

    def __init__(self, collection: Collection, *, in_ram: bool = False):
        self.collection = collection
        self.offsets = collection.offsets
        self.row_bytes = collection.feature_dim * collection.feature_dtype.itemsize
        shards = collection.shards
        held = [s.features_in_ram(in_ram) for s in shards]
        self.in_ram = held if all(h is not None for h in held) else None
        self.contiguous = all(s.features_offset is not None for s in shards)
        if self.contiguous:
            self.fds = [s.fd for s in shards]
            self.fd_of_shard = np.array(self.fds, np.int64)
            self.start_of_shard = np.array([s.features_offset for s in shards], np.int64)

    def gather(self, rows: np.ndarray, out: list[list[memoryview]], buffer: np.ndarray) -> None:
        """Read the features of `rows` (valid, int64) into buffer[:len(rows)]; out[j] is [view of buffer row j]."""
        if self.in_ram is not None:
            self._copy(rows, buffer)
            return
        if not self.contiguous:
            self._read_h5(rows, buffer)
            return
        if len(self.fds) == 1:
            fds = itertools.repeat(self.fds[0])
            where = self.start_of_shard[0] + rows * self.row_bytes
        else:
            shard = np.searchsorted(self.offsets, rows, side="right") - 1
            fds = self.fd_of_shard[shard].tolist()
            where = self.start_of_shard[shard] + (rows - self.offsets[shard]) * self.row_bytes
        # map() keeps the per-row loop in C: the syscall is then most of a row's ~2 us.
        got = list(map(os.preadv, fds, out, where.tolist()))
        if got.count(self.row_bytes) != len(got):
            raise HashsearchError(f"short read from a shard of {self.collection.root}: was it truncated?")

    def _copy(self, rows: np.ndarray, buffer: np.ndarray) -> None:
        self.collection.take_rows(self.in_ram, rows, buffer)

    def read(self, rows: np.ndarray, buffer: np.ndarray) -> None:
        """Features of `rows` into buffer[:len(rows)] (any rows, in any order)."""
        if not len(rows):
            return
        self.collection.check_rows(rows)
        if self.in_ram is not None:
            self._copy(rows, buffer)
            return
        if not self.contiguous:
            self._read_h5(rows, buffer)
            return
        self.gather(rows, [[memoryview(row).cast("B")] for row in buffer[:len(rows)]], buffer)

    def _read_h5(self, rows: np.ndarray, buffer: np.ndarray) -> None:
        for s, where, local in self.collection._split(rows):
            # h5py fancy indexing needs strictly increasing indices: read each row once,
            # then expand (rows repeat, e.g. when several queries share candidates).
            unique, inverse = np.unique(local, return_inverse=True)
            buffer[where] = self.collection.shards[s].h5["features"][unique][inverse.reshape(-1)]
