"""Streams rows into HDF5 shards, crash-safely.

Each shard is written under a temporary name and renamed into place only
once it is complete and checksummed; the manifest is then rewritten
atomically.  A run killed at any moment therefore leaves finished shards, a
manifest that lists exactly those, and at most one stray temporary file that
the next run deletes.  Shards record `source_end`, the index in the source
just past their last row, which is where a resumed run starts again.

Datasets are contiguous and uncompressed so that readers can memory-map the
features without copying (see collection.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from ..codes import code_bytes
from ..config import EncodeConfig
from ..errors import HashsearchError
from ..fileio import atomic_write, atomic_write_bytes, fsync_dir, open_regular
from .collection import Shard, reject_lines
from .layout import (GENERATION_DIRS, LOCK_FILE, MANIFEST, MINIATURE_SIDE, MINIATURES, MODEL_FILE, REJECTS, SHARD_DATASETS,
                     SHARD_DIR, shard_name)
from .lock import WriteLock
from .transaction import lock_finished
from .manifest import (FEATURE_DTYPES, FORMAT, VERSION, check_counters, file_sha256, next_shard_number, publish,
                       read_manifest, refuse_named, remove_unreferenced)

# Manifest keys that describe the collection's files and generations, which writers own;
# the others (model, source, class names, ...) describe its items.
WRITER_KEYS = frozenset({"format", "version", "complete", "generation", "bits", "feature_dim", "feature_dtype",
                         "shard_size", "items", "deleted", "rejected", "next_id", "next_shard", "shards",
                         "tombstones", "index", "added"})
# Keys that must match for a run to continue an existing collection.
IDENTITY_KEYS = ("bits", "feature_dim", "feature_dtype", "model_fingerprint", "source", "shard_size", "precision")
_COPY_BLOCK = 16384
# Datasets this large start on a page boundary, so that a 4096-d float16 row (8 KiB)
# spans 2 pages, not 3: a pread of it costs ~15% less (measured at 1M rows).
PAGE = 4096
_ALIGN_ABOVE = 64 * 1024


def _new_shard_file(path) -> h5py.File:
    return h5py.File(path, "w", libver="latest", alignment_threshold=_ALIGN_ABOVE, alignment_interval=PAGE)


def _reject_field(line: str, key: str, missing=float("inf")):
    """A field of a rejects.jsonl line; a line torn by a crash counts as not yet recorded."""
    try:
        return json.loads(line)[key]
    except (ValueError, KeyError, TypeError):
        return missing


def _next_id_of(root: Path, manifest: dict) -> int:
    """The first id never used; written before next_id existed, ids grew with the rows, so the last row's + 1."""
    if "next_id" in manifest:
        return manifest["next_id"]
    for entry in reversed(manifest["shards"]):
        if entry["rows"]:
            shard = Shard(root, entry, manifest)        # checked as a reader checks it, before a byte is read
            try:
                return int(shard.column("ids")[-1]) + 1
            finally:
                shard.close()
    return 0


def stored_path(path) -> str | bytes:
    """A path as the paths dataset stores it: UTF-8 text, or its raw bytes where the file system's name
    is not UTF-8 (os.fsencode's surrogateescape bytes), so such a name survives the round trip."""
    path = str(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape")


def _seal(partial: Path, final: Path) -> str:
    """Make a finished shard durable under its final name; its sha256.  Nothing names it until a manifest does."""
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    checksum = file_sha256(partial)
    os.replace(partial, final)
    fsync_dir(final.parent)
    return checksum


def copy_shard(src, keep: np.ndarray, root: Path, manifest: dict, number: int, source_end: int) -> dict:
    """Write shard `number` holding the rows `keep` (local, increasing) of shard `src`; its manifest entry.

    Used by compaction: the new file is complete, fsynced and checksummed
    before it gets its final name, and nothing names it until a manifest does
    (`manifest`, the current one, must not name it yet).
    """
    refuse_named(root, manifest, shard_name(number))
    final = root / shard_name(number)
    partial = final.with_name(f".{final.name}.partial")
    try:
        with _new_shard_file(partial) as dst:
            for name in SHARD_DATASETS + ((MINIATURES,) if MINIATURES in src.h5 else ()):
                ds = src.h5[name]
                out = dst.create_dataset(name, (len(keep),) + ds.shape[1:], ds.dtype)
                for a in range(0, len(keep), _COPY_BLOCK):
                    out[a:a + _COPY_BLOCK] = ds[keep[a:a + _COPY_BLOCK]]
        checksum = _seal(partial, final)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise HashsearchError(f"cannot write shard {final}: {exc}") from None
    return {"file": shard_name(number), "rows": int(len(keep)), "sha256": checksum, "source_end": int(source_end)}


class CollectionWriter:
    """Append rows to a collection directory; resumes an unfinished one.

    >>> w = CollectionWriter("coll", bits=48, feature_dim=256, meta={"source": "x"})
    >>> w.add(codes, features, ids, labels, paths, source_end=len(ids))
    >>> w.finish()

    It holds the collection's write lock from construction to finish() or
    abort(); a second writer fails at once (or, with wait=True, waits).  Ids
    must be strictly increasing across the whole collection.  Each finished
    shard is published as a new generation.
    """

    def __init__(self, root, *, bits: int, feature_dim: int, feature_dtype: str = "float16",
                 shard_size: int = EncodeConfig.shard_size, meta: dict | None = None, overwrite: bool = False,
                 wait: bool = False):
        if feature_dtype not in FEATURE_DTYPES:
            raise HashsearchError(f"feature dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        if shard_size <= 0:
            raise HashsearchError(f"shard size must be positive, got {shard_size}")
        self.root = Path(root)
        self.code_bytes = code_bytes(bits)
        self.feature_dim = int(feature_dim)
        self.feature_dtype = np.dtype(feature_dtype)
        self.shard_size = int(shard_size)
        self.manifest = {
            "format": FORMAT, "version": VERSION, "complete": False,
            "bits": int(bits), "feature_dim": int(feature_dim), "feature_dtype": feature_dtype,
            "shard_size": int(shard_size), **(meta or {}),
            "generation": 0, "items": 0, "deleted": 0, "rejected": 0, "next_id": 0, "next_shard": 0, "shards": [],
        }
        self._file = None
        self._rows = 0
        self._capacity = 0
        self._pending_rejects: list[dict] = []
        self._open_root(overwrite, wait)

    # -- opening -----------------------------------------------------------
    @classmethod
    def append(cls, root, *, wait: bool = False) -> "CollectionWriter":
        """A writer that adds new shards to the finished collection at `root` (hashsearch add)."""
        writer = cls.__new__(cls)
        writer.root = Path(root)
        writer.lock, writer.manifest = lock_finished(writer.root, wait=wait,
                                                     unfinished="finish its encode before adding to it")
        try:
            writer.manifest["next_id"] = _next_id_of(writer.root, writer.manifest)
            # A file an earlier add already rejected is tried again, but not recorded twice.
            writer._known_rejects = {_reject_field(line, "path") for line in reject_lines(writer.root)}
        except BaseException:
            writer.lock.release()
            raise
        m = writer.manifest
        writer.code_bytes, writer.feature_dim = code_bytes(m["bits"]), m["feature_dim"]
        writer.feature_dtype, writer.shard_size = np.dtype(m["feature_dtype"]), m.get("shard_size", EncodeConfig.shard_size)
        writer._file, writer._rows, writer._capacity, writer._pending_rejects = None, 0, 0, []
        return writer

    def _open_root(self, overwrite: bool, wait: bool) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HashsearchError(f"cannot create collection {self.root}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise HashsearchError(f"collection directory is not writable: {self.root}")
        self._refuse_foreign(overwrite)     # before the lock file, so a refused directory is left as it was
        self.lock = WriteLock(self.root, wait=wait)
        try:
            self._take_root(overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _take_root(self, overwrite: bool) -> None:
        if (self.root / MANIFEST).exists():
            old = read_manifest(self.root)
            if overwrite:
                self._remove_contents()
            else:
                # A key the old manifest lacks did not exist when it was written: not compared.
                mismatch = [k for k in IDENTITY_KEYS if k in old and old[k] != self.manifest.get(k)]
                if mismatch:
                    k = mismatch[0]
                    raise HashsearchError(
                        f"{self.root} already holds a collection with a different {k} "
                        f"({old.get(k)!r}, not {self.manifest.get(k)!r}); use --overwrite to replace it")
                check_counters(self.root, old)
                self.manifest = old
                if not old.get("complete"):
                    self._truncate_rejects(self.resume_from)
        else:
            self._refuse_foreign(overwrite)
        (self.root / SHARD_DIR).mkdir(exist_ok=True)
        remove_unreferenced(self.root, self.manifest)     # and a killed run's unfinished shard
        if not self.complete:
            publish(self.root, self.manifest)

    def _refuse_foreign(self, overwrite: bool) -> None:
        if overwrite or (self.root / MANIFEST).exists():
            return
        # What a writer creates before its first manifest (another writer may be at it right now).
        ours = (SHARD_DIR, LOCK_FILE)
        if any(p.name not in ours and not (p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp"))
               for p in self.root.iterdir()):
            raise HashsearchError(f"{self.root} exists and is not a hashsearch collection; choose an empty directory")

    def _remove_contents(self) -> None:
        for folder in GENERATION_DIRS:
            shutil.rmtree(self.root / folder, ignore_errors=True)
        for name in (MANIFEST, REJECTS):
            (self.root / name).unlink(missing_ok=True)

    def keep_model(self, model_path) -> None:
        """Store the checkpoint that encodes this collection as its MODEL_FILE, for `add` and image queries."""
        target = self.root / MODEL_FILE
        if target.exists() and os.path.samefile(model_path, target):
            return
        try:
            with os.fdopen(open_regular(model_path), "rb") as model:
                atomic_write(target, lambda f: shutil.copyfileobj(model, f))
        except OSError as exc:
            raise HashsearchError(f"cannot copy model {model_path} into {self.root}: {exc.strerror or exc}") from None

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def resume_from(self) -> int:
        """Source index at which writing continues: just past the last finished shard."""
        shards = self.manifest["shards"]
        return shards[-1]["source_end"] if shards else 0

    @property
    def rows_written(self) -> int:
        return self.manifest["items"] + self._rows

    # -- writing -------------------------------------------------------------
    def add(self, codes, features, ids, labels, paths, *, source_end: int, capacity_hint: int | None = None,
            source_index=None, miniatures=None) -> None:
        """Append rows; `source_end` is the source index just past the last of them.

        `source_index` gives each row's position in the source, where a shard that
        closes mid-batch resumes; by default the ids, which `encode` assigns that way.
        `miniatures` (uint8 [n, MINIATURE_SIDE ** 2], encoders.preprocess.miniatures) are stored for
        `duplicates`; a writer is given them with every batch or never (synthetic rows have none).
        """
        n = len(ids)
        if miniatures is not None:
            miniatures = np.asarray(miniatures)
            if miniatures.shape != (n, MINIATURE_SIDE ** 2) or miniatures.dtype != np.uint8:
                raise HashsearchError(f"miniatures must be uint8 [{n}, {MINIATURE_SIDE ** 2}], "
                                      f"got {miniatures.dtype} {list(miniatures.shape)}")
        if getattr(self, "_with_miniatures", None) not in (None, miniatures is not None):
            raise HashsearchError("a writer is given miniatures with every batch or with none")
        self._with_miniatures = miniatures is not None
        offset = 0
        while offset < n:
            if self._file is None:
                self._open_shard(capacity_hint)
            take = min(n - offset, self._capacity - self._rows)
            sl = slice(offset, offset + take)
            self._write(codes[sl], features[sl], ids[sl], labels[sl], paths[sl],
                        None if miniatures is None else miniatures[sl])
            offset += take
            if self._rows == self._capacity:
                # A shard that ends mid-batch resumes inside that batch, at its first unwritten row.
                end = source_end if offset == n else int((ids if source_index is None else source_index)[offset])
                self._close_shard(end)
        self._source_end = source_end

    def reject(self, index: int, path: str, reason: str) -> None:
        if str(path) in getattr(self, "_known_rejects", ()):
            return
        self._pending_rejects.append({"index": int(index), "path": str(path), "reason": str(reason)})

    def finish(self, source_end: int | None = None) -> dict:
        """Close the last shard, mark the collection complete and release the lock."""
        end = source_end if source_end is not None else getattr(self, "_source_end", self.resume_from)
        if self._file is not None:
            self._close_shard(end)              # publishes
        last_published = dict(self.manifest)
        if self._pending_rejects:
            self._flush_rejects()
        self.manifest["complete"] = True
        self.manifest["next_id"] = max(self.manifest.get("next_id", 0), self._next_id())
        if self.manifest != last_published or not self.manifest["shards"]:
            publish(self.root, self.manifest)   # a new generation only where something changed
        self.lock.release()
        return self.manifest

    def abort(self) -> None:
        """Drop the unfinished shard and release the lock; finished shards stay for a resume."""
        if self._file is not None:
            # The h5py file may already be unusable (a full disk mid-write): close it
            # defensively and delete the partial file by its own name, never through h5py.
            file, self._file = self._file, None
            try:
                file.close()
            except Exception:  # noqa: BLE001 - whatever HDF5 says, the partial file goes
                pass
            Path(self._partial).unlink(missing_ok=True)
        self.lock.release()

    def close(self) -> None:
        """Release the lock without finishing (an unfinished shard is dropped, finished ones stay)."""
        self.abort()

    def _next_id(self) -> int:
        return int(getattr(self, "_last_id", -1)) + 1

    def _open_shard(self, capacity_hint: int | None) -> None:
        self._number = number = next_shard_number(self.manifest)
        refuse_named(self.root, self.manifest, shard_name(number))
        self._final = self.root / shard_name(number)
        self._partial = self._final.with_name(f".{self._final.name}.partial")
        cap = self.shard_size if capacity_hint is None else max(1, min(self.shard_size, capacity_hint))
        try:
            f = _new_shard_file(self._partial)
            f.create_dataset("codes", (cap, self.code_bytes), np.uint8)
            f.create_dataset("features", (cap, self.feature_dim), self.feature_dtype)
            f.create_dataset("ids", (cap,), np.int64)
            f.create_dataset("labels", (cap,), np.int64)
            f.create_dataset("paths", (cap,), h5py.string_dtype("utf-8"))
            if self._with_miniatures:
                f.create_dataset(MINIATURES, (cap, MINIATURE_SIDE ** 2), np.uint8)
        except OSError as exc:
            raise HashsearchError(f"cannot write shard {self._partial}: {exc}") from None
        self._file, self._rows, self._capacity = f, 0, cap

    def _check_ids(self, ids: np.ndarray) -> None:
        """Ids only grow: a repeated id could never be told apart from its twin."""
        if not hasattr(self, "_last_id"):
            # An unfinished collection holds source indices as ids, all below where writing resumes.
            start = self.manifest.get("next_id", 0) if self.complete else self.resume_from
            self._last_id = start - 1
        if len(ids) and (ids[0] <= self._last_id or np.any(np.diff(ids) <= 0)):
            raise HashsearchError(f"ids must be unique and increasing: got {ids[:5].tolist()}... after id {self._last_id} "
                                  f"in {self.root}")

    def _write(self, codes, features, ids, labels, paths, miniatures=None) -> None:
        f, a, b = self._file, self._rows, self._rows + len(ids)
        ids = np.asarray(ids, np.int64)
        self._check_ids(ids)
        try:
            f["codes"][a:b] = np.asarray(codes, np.uint8)
            f["features"][a:b] = np.asarray(features, self.feature_dtype)
            f["ids"][a:b] = ids
            f["labels"][a:b] = np.asarray(labels, np.int64)
            f["paths"][a:b] = [stored_path(p) for p in paths]
            if miniatures is not None:
                f[MINIATURES][a:b] = miniatures
        except (OSError, ValueError, TypeError) as exc:
            self.abort()
            raise HashsearchError(f"cannot write shard {self._partial}: {exc}") from None
        self._rows = b
        if len(ids):
            self._last_id = int(ids[-1])

    def _close_shard(self, source_end: int) -> None:
        rows = self._rows
        try:
            if rows < self._capacity:
                self._trim(rows)
            else:
                self._file.close()
                self._file = None
            checksum = _seal(self._partial, self._final)
        except OSError as exc:
            self.abort()
            raise HashsearchError(f"cannot finish shard {self._final}: {exc}") from None
        self._flush_rejects(upto=source_end)
        self.manifest["shards"].append({
            "file": str(self._final.relative_to(self.root)), "rows": rows,
            "sha256": checksum, "source_end": int(source_end),
        })
        self.manifest["items"] = self.manifest.get("items", 0) + rows
        self.manifest["next_shard"] = self._number + 1
        self.manifest["next_id"] = max(self.manifest.get("next_id", 0), self._next_id())
        publish(self.root, self.manifest)
        self._rows = self._capacity = 0

    def _trim(self, rows: int) -> None:
        """Contiguous datasets cannot shrink: copy the written rows into an exact-size file."""
        src = self._file
        tmp = self._partial.with_name(self._partial.name + ".trim")
        with _new_shard_file(tmp) as dst:
            for name, ds in src.items():
                out = dst.create_dataset(name, (rows,) + ds.shape[1:], ds.dtype)
                for a in range(0, rows, _COPY_BLOCK):
                    b = min(rows, a + _COPY_BLOCK)
                    out[a:b] = ds[a:b]
        src.close()
        self._file = None
        os.replace(tmp, self._partial)

    def _flush_rejects(self, upto: int | None = None) -> None:
        """Record rejects that belong to finished shards (source index below `upto`)."""
        done = [r for r in self._pending_rejects if upto is None or r["index"] < upto]
        if not done:
            return
        try:
            with os.fdopen(open_regular(self.root / REJECTS, append=True, follow=False), "a", encoding="utf-8",
                           errors="surrogateescape") as f:
                for r in done:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise HashsearchError(f"cannot record rejected images in {REJECTS} of {self.root}: "
                                  f"{exc.strerror or exc}") from None
        self.manifest["rejected"] += len(done)
        self._pending_rejects = [r for r in self._pending_rejects if upto is not None and r["index"] >= upto]

    def _truncate_rejects(self, source_end: int) -> None:
        """Forget rejects recorded after the last finished shard: they will be met again."""
        lines = reject_lines(self.root)
        if not lines and not (self.root / REJECTS).exists():
            return
        kept = [line for line in lines if _reject_field(line, "index") < source_end]
        atomic_write_bytes(self.root / REJECTS, "".join(line + "\n" for line in kept).encode("utf-8"))
        self.manifest["rejected"] = len(kept)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


def rows_to_write(source_index, resume_from: int) -> slice:
    """The rows of a block, given by their source indices in increasing order, that a write resumed at
    `resume_from` (CollectionWriter.resume_from) still lacks.

    A resumed run reads again the block that holds resume_from; that block's
    rows before it are already in finished shards and must not be added twice.
    """
    return slice(int(np.searchsorted(np.asarray(source_index, np.int64), resume_from)), None)
