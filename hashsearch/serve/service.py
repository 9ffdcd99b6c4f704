"""The long-running side of hashsearch: one collection, its index and its model, loaded once.

The HTTP layer (app.py) only translates requests into these calls and their
HashsearchErrors into status codes.  Every call first makes sure it works on
the collection's newest generation (a stat of manifest.json, then
Index.refresh() when it changed), so changes made by this service or by
`hashsearch add/delete/compact` in another process show without a restart;
a request in flight keeps the generation it started on.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..config import SearchConfig, ServeConfig
from ..engine import Index
from ..errors import HashsearchError
from ..encoders.item_images import ItemImages
from ..retrieval import collection_info, describe_results, query_encoder, stored_query
from ..shards import UPLOAD_DIR, store_file
from ..shards.manifest import manifest_stamp

# Thumbnails kept in memory: 256 of ~5 KB each.
THUMBNAIL_CACHE = 256
THUMBNAIL_SIDE = 160
# GET /duplicates pages its groups: at most this many a page, and this many items of each shown (a burst of
# a thousand shots is one group, and one answer should stay small enough for the page to draw).
MAX_DUPLICATE_GROUPS_PAGE = 100
DUPLICATE_ITEMS_SHOWN = 50


class NotFound(HashsearchError):
    """An id that is not a live item, or an item without a stored image."""


class ReadOnly(HashsearchError):
    """A write to a collection this service may not change."""


class TooLarge(HashsearchError):
    """An upload over the service's byte limit."""


class MicroBatcher:
    """Encodes images one request at a time from the callers' side, in batches on the model's side.

    A caller hands one image and waits; a worker thread takes whatever has
    arrived within `wait_ms` (or `max_batch` images) and runs the model once for
    all of them, so concurrent uploads approach the encoder's batched throughput.
    """

    def __init__(self, encoder, wait_ms: float = 5.0, max_batch: int = 32):
        self.encoder, self.wait, self.max_batch = encoder, wait_ms / 1e3, max_batch
        # One model call at a time: two threads in torch at once fight over the same cores.
        self.model_lock = threading.Lock()
        self._pending: list[tuple[object, Future]] = []
        self._stopped = False
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="hashsearch-encoder", daemon=True)
        self._thread.start()

    def encode(self, image) -> tuple[np.ndarray, np.ndarray]:
        done: Future = Future()
        with self._ready:
            self._pending.append((image, done))
            self._ready.notify()
        return done.result()

    def stop(self) -> None:
        """End the worker thread (it drops the model) once the images already handed in are encoded."""
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._thread.join()
        self.encoder = None

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._stopped:
                    self._ready.wait()
                if not self._pending:
                    return
                deadline = time.monotonic() + self.wait
                while len(self._pending) < self.max_batch and time.monotonic() < deadline:
                    self._ready.wait(max(deadline - time.monotonic(), 0))
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                with self.model_lock:
                    codes, feats = self.encoder.encode([image for image, _ in batch])
                for j, (_, done) in enumerate(batch):
                    done.set_result((codes[j:j + 1], feats[j:j + 1]))
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                for _, done in batch:
                    done.set_exception(exc)


class SearchService:
    def __init__(self, root, *, max_upload_mb: float = ServeConfig.max_upload_mb, index=None):
        """`index`: one already open on `root` (a distributed ShardedIndex), which the caller closes."""
        self.root = Path(root)
        self.index = index if index is not None else Index.open(self.root)
        self._owns_index = index is None
        self.index.warm()       # in each worker as it starts, not in its first request
        self.max_upload_bytes = int(max_upload_mb * (1 << 20))
        self.writable = os.access(self.root, os.W_OK)
        self._manifest_stamp = manifest_stamp(self.root)
        self._refresh_lock = threading.Lock()
        # Loaded now, not at the first upload: the model is the bulk of the server's memory, and a
        # server's footprint should be known when it starts answering.
        # A collection without a model (one made by `bench`, say) is still searched by id; uploads are refused.
        has_model = self.index.collection.model_path is not None
        self._batcher = MicroBatcher(query_encoder(self.index.collection)) if has_model else None
        self._hold_result_columns()
        source = self.index.collection.manifest.get("source_spec")
        self._images = ItemImages(source)
        self._shown = ShownPaths(self.root, source)
        self._thumbnails: OrderedDict[int, bytes] = OrderedDict()
        self._thumbnails_lock = threading.Lock()
        self._duplicates: tuple[int, list] | None = None      # (generation, its groups)
        self._duplicates_lock = threading.Lock()

    def close(self) -> None:
        """Stop the model's thread, and close the index unless the caller gave it."""
        if self._batcher is not None:
            self._batcher.stop()
        if self._owns_index:
            self.index.close()

    # -- generations ------------------------------------------------------------------
    def current(self) -> Index:
        """The index on the newest generation; a stat when nothing changed."""
        stamp = manifest_stamp(self.root)
        if stamp != self._manifest_stamp:
            with self._refresh_lock:
                if stamp != self._manifest_stamp:
                    self.index.refresh()
                    self._hold_result_columns()
                    self._manifest_stamp = stamp
        return self.index

    def _hold_result_columns(self) -> None:
        # Results are described from RAM, read once per shard here rather than by the first request: a
        # per-row h5py read of each result's path cost more than the search itself.
        self.index.collection.hold_paths().labels()

    # -- searching --------------------------------------------------------------------
    def search_id(self, item_id: int, params: SearchConfig) -> dict:
        index = self.current()
        try:
            codes, feats = stored_query(index, [item_id])
        except HashsearchError as exc:
            raise NotFound(str(exc)) from None
        return self._search(index, f"id:{item_id}", codes, feats, params)

    def search_image(self, data: bytes, name: str, params: SearchConfig) -> dict:
        from ..encoders.images import ImageRejected, decode_image
        self._check_size(name, data)
        try:
            image = decode_image(data)
        except ImageRejected as exc:
            raise NotAnImage(f"{name or 'the upload'} is not a usable image: {exc}") from None
        index = self.current()
        codes, feats = self._model().encode(image)
        return self._search(index, name or "upload", codes, feats, params)

    def _search(self, index: Index, name: str, codes, feats, params: SearchConfig) -> dict:
        result = index.search(codes, feats, params)
        answer = describe_results(index, [name], result)[0]
        for hit in answer["results"]:
            hit["path"] = self._shown(hit["path"])
        return answer | {"generation": index.generation}

    # -- items ----------------------------------------------------------------------------
    def _live_row(self, item_id: int) -> tuple[Index, int]:
        """The index on the newest generation and the item's row in it; NotFound if it is not a live item."""
        index = self.current()
        try:
            return index, int(index.collection.rows_for_ids([item_id], live=True)[0])
        except HashsearchError as exc:
            raise NotFound(str(exc)) from None

    def item(self, item_id: int) -> dict:
        index, row = self._live_row(item_id)
        coll = index.collection
        names = coll.manifest.get("class_names") or []
        label = int(coll.labels()[row])
        return {"id": item_id, "path": self._shown(coll.paths([row])[0]), "code": index.codes[row].tobytes().hex(),
                "label": names[label] if 0 <= label < len(names) else label, "generation": index.generation}

    def thumbnail(self, item_id: int) -> bytes:
        """A JPEG of the item's image, made on first request and cached: from its file, its IDX file or
        its synthetic source, as encode read it."""
        index, row = self._live_row(item_id)    # a deleted id is 404 even while its thumbnail is cached
        path = index.collection.paths([row])[0]
        with self._thumbnails_lock:
            cached = self._thumbnails.get(item_id)
        if cached is not None:
            return cached
        from ..encoders.images import ImageRejected
        try:
            data = self._images.jpeg_thumbnail(path, THUMBNAIL_SIDE, quality=85)
        except ImageRejected as exc:
            raise NotFound(f"item {item_id} has no image to show: {exc}") from None
        with self._thumbnails_lock:
            self._thumbnails[item_id] = data
            while len(self._thumbnails) > THUMBNAIL_CACHE:
                self._thumbnails.popitem(last=False)
        return data

    def duplicates(self, offset: int, limit: int) -> dict:
        """One page of the collection's near-duplicate groups (Index.duplicates at its default thresholds),
        largest first, the centre first in each: groups `offset` to `offset + limit`, each showing at most
        DUPLICATE_ITEMS_SHOWN items, so that a large group cannot make a large answer.  The groups are found
        once per generation."""
        if not (0 <= offset < 1 << 31 and 1 <= limit <= MAX_DUPLICATE_GROUPS_PAGE):
            raise HashsearchError(f"offset must be from 0 and limit from 1 to {MAX_DUPLICATE_GROUPS_PAGE}, got "
                                  f"offset {offset} and limit {limit}")
        index = self.current()
        with self._duplicates_lock:
            if self._duplicates is None or self._duplicates[0] != index.generation:
                self._duplicates = (index.generation, index.duplicates().groups())
            groups = self._duplicates[1]
        coll, ids = index.collection, index.ids
        page = []
        for rows, dist in groups[offset:offset + limit]:
            shown = rows[:DUPLICATE_ITEMS_SHOWN]
            page.append({"size": len(rows), "items": [
                {"id": int(ids[r]), "path": self._shown(p), "distance": round(float(d), 4),
                 "thumbnail": f"/items/{int(ids[r])}/thumbnail"}
                for r, p, d in zip(shown.tolist(), coll.paths(shown), dist.tolist())]})
        return {"generation": index.generation, "groups_total": len(groups), "offset": offset, "groups": page}

    def info(self) -> dict:
        self.current()
        report = collection_info(self.root)
        return report | {"path": self.root.name, "source": self._shown(report["source"] or "")}

    def health(self) -> dict:
        index = self.current()
        return {"status": "ok", "generation": index.generation, "items": index.collection.items}

    # -- changing the collection ------------------------------------------------------------
    def add(self, uploads: list[tuple[str, bytes]]) -> dict:
        """Store the uploaded images in the collection's uploads/ folder and add them; their new ids, in order."""
        from ..encoders.images import ImageRejected, decode_image, image_suffix
        from ..encoders.runner import add_to_collection
        self._check_writable()
        if not uploads:
            raise HashsearchError("no image uploaded")
        paths = []
        for name, data in uploads:
            self._check_size(name, data)
            try:
                decode_image(data)
            except ImageRejected as exc:
                raise NotAnImage(f"{name or 'an upload'} is not a usable image: {exc}") from None
            # Named by content, under the extension of the format it holds: never one a client chose.
            stored = f"{hashlib.sha256(data).hexdigest()[:32]}{image_suffix(data)}"
            paths.append(str(store_file(self.root, UPLOAD_DIR, stored, data).resolve()))
        # The SOURCE `add` reads: a list of the stored files, which lives outside the collection.
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as listing:
            listing.write("".join(f"{p}\n" for p in paths))
            listing.flush()
            add_to_collection(self.root, listing.name, encoder=_Locked(self._model()), workers=0, quiet=True,
                              wait=True, log=lambda *_: None)
        index = self.current()
        rows = index.collection.rows_for_paths(paths)
        return {"ids": index.ids[rows].tolist(), "generation": index.generation}

    def delete(self, item_id: int) -> dict:
        """Delete a live item; an id that is not one is 404, also when a concurrent request deleted it first."""
        from ..shards import NotAnItem, delete_items
        self._check_writable()
        try:
            manifest = delete_items(self.root, ids=[item_id], wait=True)
        except NotAnItem as exc:
            raise NotFound(str(exc)) from None
        self.current()
        return {"deleted": item_id, "generation": manifest["generation"]}

    def _model(self) -> MicroBatcher:
        if self._batcher is None:
            raise NoModel(f"collection {self.root} has no model.pt: it is searched by id, and images cannot be "
                          "encoded for it")
        return self._batcher

    def _check_size(self, name: str, data: bytes) -> None:
        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"upload {name or ''} of {len(data)} bytes is over the {self.max_upload_bytes}-byte limit")

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnly(f"collection {self.root} is read-only here: searches work, changes are refused")


class _Locked:
    """The batcher's encoder for `add`, taking its model lock for each model call."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher

    def __getattr__(self, name):
        return getattr(self._batcher.encoder, name)

    def encode_batch(self, batch):
        with self._batcher.model_lock:
            return self._batcher.encoder.encode_batch(batch)


class ShownPaths:
    """A stored path as the service shows it to anyone: relative to the collection or to its source's root
    where it lies in one, else its file name.  Where the server keeps its files is nobody's business."""

    def __init__(self, root: Path, source_spec: str | None):
        roots = [root]
        spec = source_spec or ""
        folder, sep, split = spec.rpartition(":")
        if os.path.isdir(spec):
            roots.append(spec)
        elif os.path.isfile(spec):                  # a list file: its paths are relative to its folder
            roots.append(os.path.dirname(os.path.abspath(spec)))
        elif sep and os.path.isdir(folder):         # IDX files: DIR:train
            roots.append(folder)
        # Stored paths are absolute as given (encode) or resolved (uploads): both spellings of each root.
        spelled = {f(r) for r in roots for f in (os.path.abspath, os.path.realpath)}
        self.prefixes = sorted((r.rstrip(os.sep) + os.sep for r in spelled), key=len, reverse=True)

    def __call__(self, path: str) -> str:
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return path[len(prefix):]
        return os.path.basename(path) if os.sep in path else path


class NoModel(HashsearchError):
    """An upload to a collection that has no model to encode it."""


class NotAnImage(HashsearchError):
    """An upload that does not decode as an image."""
