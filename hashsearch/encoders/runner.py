"""`hashsearch encode`: SOURCE -> collection, streaming, resumable.

    reader  DataLoader workers decode and resize (dataset.py)
    mapper  the model, on the main thread (encoder.py); or, with --ray, encoder
            actors that each run reader and model over chunks of SOURCE
            (distributed.encode), handing batches back in order
    writer  a thread appending to HDF5 shards (shards.CollectionWriter)

The three overlap, so the pipeline runs at the model's speed, and memory is
bounded by the loader's prefetch and the writer queue, whatever N is.  The
batches are the same whichever mapper makes them, so is the collection.
"""
from __future__ import annotations

import bisect
import queue
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..config import ADD_SKIPS, ANY_DEVICE_PRECISIONS, EncodeConfig
from ..errors import HashsearchError
from ..shards import MODEL_FILE, REJECTS, Collection, CollectionWriter
from ..shards.writer import rows_to_write
from .dataset import make_loader
from .encoder import Encoder
from .preprocess import miniatures
from .sources import open_source

_QUEUE_DEPTH = 4
_DONE = object()


class EncodedBatch(NamedTuple):
    """What the model hands the writer thread for one loader batch."""
    codes: np.ndarray           # uint8 [m, ceil(K/8)], the batch's good items only
    features: np.ndarray        # float32 [m, D]
    miniatures: np.ndarray      # uint8 [m, MINIATURE_SIDE ** 2], for duplicates (preprocess.miniatures)
    index: np.ndarray           # int64 [m], their positions in the SOURCE
    rejects: list               # [(source index, reason)] of the items that could not be decoded
    source_end: int             # the SOURCE index just past the batch

    @property
    def items(self) -> int:
        """Source items the batch accounts for, encoded or rejected."""
        return len(self.index) + len(self.rejects)


def describe_encoder(encoder: Encoder) -> dict:
    """What a collection records of the model that encoded it."""
    return {"model_fingerprint": encoder.fingerprint(), "bits": encoder.bits, "feature_dim": encoder.feature_dim,
            "backbone": encoder.config["backbone"], "input_size": encoder.input_size,
            # fp32, fp16 and bf16 give slightly different codes; one collection holds one kind.
            "precision": encoder.precision,
            # how its codes were learned: softmax on labels (the paper), or fitted without them
            "training": encoder.config.get("training", {"labels": True, "method": "softmax"})}


class LocalMapper:
    """The model in this process: encode's mapper without --ray."""

    def __init__(self, model_path, cfg: EncodeConfig):
        self.encoder = Encoder.from_checkpoint(model_path, device=cfg.device, precision=cfg.precision)
        self.cfg = cfg

    def describe(self) -> dict:
        return describe_encoder(self.encoder)

    def batches(self, source, indices, start: int = 0):
        return encoded_batches(self.encoder, source, indices, self.cfg, start)

    def close(self) -> None:
        pass


def encode_collection(model_path, source_spec: str, out, *, log=print, mapper=None, **options) -> dict:
    """`hashsearch encode`: SOURCE -> a new collection at `out` (or the rest of an unfinished one).

    `options` are EncodeConfig's fields (hashsearch.config), checked there.  `mapper` encodes the
    batches elsewhere (distributed.encode's RayMapper); by default the model runs here.
    """
    cfg = EncodeConfig(**options)
    source = open_source(source_spec, data_dir=cfg.data_dir, limit=cfg.limit)
    if len(source) == 0:
        raise HashsearchError(f"no images in {source_spec}")
    mapper = mapper or LocalMapper(model_path, cfg)
    try:
        return _encode_with(mapper, model_path, source, out, cfg, log)
    finally:
        mapper.close()


def _encode_with(mapper, model_path, source, out, cfg: EncodeConfig, log) -> dict:
    model = mapper.describe()
    # class_names name the values of the stored label column, which come from the
    # SOURCE (a folder's subfolders, a list's labels), not from the model's training set.
    meta = {"model_fingerprint": model["model_fingerprint"], "source": source.fingerprint(),
            "source_spec": source.spec, "class_names": source.class_names,
            **{key: model[key] for key in ("backbone", "input_size", "precision", "training")}}
    writer = CollectionWriter(out, bits=model["bits"], feature_dim=model["feature_dim"],
                              feature_dtype=cfg.feature_dtype, shard_size=cfg.shard_size, meta=meta,
                              overwrite=cfg.overwrite, wait=cfg.wait)
    if writer.complete:
        writer.close()
        log(f"{out} is already complete ({writer.manifest['items']} items); nothing to do")
        return writer.manifest
    start = writer.resume_from
    began = time.perf_counter()
    try:
        writer.keep_model(model_path)
        if start and not cfg.quiet:
            log(f"resuming {out} at item {start} of {len(source)}")
        _stream(mapper.batches(source, range(len(source)), start), len(source) - start, writer, source,
                source.labels(), cfg)
        manifest = writer.finish(len(source))
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - began
    done = len(source) - start
    if not cfg.quiet:
        log(f"encoded {manifest['items']} items into {out} ({done / max(seconds, 1e-9):.0f} img/s); "
            f"{manifest['rejected']} rejected" + (f", see {Path(out) / REJECTS}" if manifest["rejected"] else ""))
    return manifest


def add_to_collection(root, source_spec: str, *, log=print, encoder: Encoder | None = None, **options) -> dict:
    """`hashsearch add`: encode the new images of SOURCE with the collection's own model and append them.

    Items whose path the collection already holds, or that SOURCE repeats, are skipped, so running the
    same add again (after a kill, or on a folder that has grown) adds only what
    is new.  Every finished shard is published at once as a new generation.
    `options` are EncodeConfig's fields but ADD_SKIPS, which the collection fixes.
    `encoder`, one already loaded from the collection's model (a server's), saves loading it again.
    """
    fixed = [name for name in ADD_SKIPS if name in options]
    if fixed:
        raise HashsearchError(f"add takes {fixed[0]} from the collection; it cannot be set")
    cfg = EncodeConfig(**options)
    writer = CollectionWriter.append(root, wait=cfg.wait)
    try:
        manifest = writer.manifest
        model_path = Path(root) / MODEL_FILE
        if not model_path.exists():
            raise HashsearchError(f"collection {root} has no {MODEL_FILE} to encode new images with")
        # fp16 is a GPU's arithmetic; elsewhere a collection's images are encoded as it was.
        precision = manifest.get("precision") if manifest.get("precision") in ANY_DEVICE_PRECISIONS else "auto"
        encoder = encoder or Encoder.from_checkpoint(model_path, device=cfg.device, precision=precision,
                                                     expect_bits=manifest["bits"])
        if (encoder.feature_dim, encoder.bits) != (manifest["feature_dim"], manifest["bits"]):
            raise HashsearchError(f"{model_path} makes {encoder.bits}-bit codes of {encoder.feature_dim}-d features; "
                                  f"the collection holds {manifest['bits']}-bit codes of {manifest['feature_dim']}-d")
        source = open_source(source_spec, data_dir=cfg.data_dir, limit=cfg.limit)
        with Collection.open(root, allow_empty=True) as coll:
            present, first_id, before = coll.live_paths(), coll.next_id, coll.items
        new = _new_items(source, present)
        skipped = len(source) - len(new)
        labels = _labels_in(manifest, source)
        position = np.full(len(source), -1, np.int64)
        position[new] = np.arange(len(new))
        began = time.perf_counter()
        if new:
            _stream(encoded_batches(encoder, source, new, cfg), len(new), writer, source, labels, cfg,
                    id_of=lambda idx: first_id + position[idx])
        manifest = writer.finish(new[-1] + 1 if new else 0)
    except BaseException:
        writer.abort()
        raise
    added = manifest["items"] - before
    if not cfg.quiet:
        rate = len(new) / max(time.perf_counter() - began, 1e-9)
        log(f"added {added} items to {root} ({rate:.0f} img/s); {skipped} already present or repeated; "
            f"now {manifest['items']} items, generation {manifest['generation']}")
    return {"added": int(added), "skipped": skipped, "generation": manifest["generation"], "items": manifest["items"]}


def _new_items(source, present: set) -> list[int]:
    """Positions of SOURCE's items to add: those whose path the collection lacks, each path once.  A path
    names one item (`delete --path` deletes by it), so a repeat within SOURCE is skipped, as a path the
    collection already holds is, and counted with them."""
    new, taken = [], set()
    for i in range(len(source)):
        path = source.path(i)
        if path not in present and path not in taken:
            taken.add(path)
            new.append(i)
    return new


def _labels_in(manifest: dict, source) -> np.ndarray:
    """SOURCE's labels renumbered into the collection's class names (new names are appended to them)."""
    names = list(manifest.get("class_names") or [])
    labels = np.asarray(source.labels(), np.int64)
    if not source.class_names:
        return labels
    number = {}
    for i, name in enumerate(source.class_names):
        if name not in names:
            names.append(name)
        number[i] = names.index(name)
    manifest["class_names"] = names
    return np.array([number.get(int(label), -1) for label in labels], np.int64)


def encoded_batches(encoder: Encoder, source, indices, cfg: EncodeConfig, start: int = 0):
    """The reader and the model: an EncodedBatch for each batch of `indices` (a range or increasing list
    of SOURCE positions), batches aligned to cfg.batch_size from indices[0], from the one holding `start`,
    without the rows before `start` that a resumed run already wrote."""
    loader = make_loader(source, encoder.input_size, cfg.batch_size, cfg.workers, indices=indices,
                         start=bisect.bisect_left(indices, start), pin_memory=encoder.device.type == "cuda")
    for batch_indices, pixels, good, rejects in loader:
        good = np.asarray(good, np.int64)
        new = rows_to_write(good, start)          # a resumed first batch repeats rows already written
        # Encode the whole aligned batch and drop rows afterwards: a batch of another
        # shape may take other kernels (cuDNN, GEMM blocking) and round differently,
        # and a resumed run must store exactly what an uninterrupted one would.
        codes, feats = encoder.encode_batch(pixels)
        rejects = rejects[rows_to_write([i for i, _ in rejects], start)]
        yield EncodedBatch(codes[new], feats[new], miniatures(pixels[new]), good[new], rejects, batch_indices[-1] + 1)


def _stream(batches, total: int, writer: CollectionWriter, source, labels: np.ndarray, cfg: EncodeConfig, *,
            id_of=None) -> None:
    """Hand the mapper's batches to the writer thread; id_of maps source indices to the ids stored
    (by default the source index itself)."""
    sink = _WriterThread(writer, source, labels, len(source), id_of or (lambda idx: idx))
    bar = tqdm(total=total, unit="img", disable=cfg.quiet, smoothing=0.1, desc="encoding")
    try:
        for batch in batches:
            sink.check()
            sink.put(batch)
            bar.update(batch.items)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()


class _WriterThread:
    """Appends encoded batches to the collection while the model works on the next ones."""

    def __init__(self, writer: CollectionWriter, source, labels, total: int, id_of):
        self.writer, self.source, self.labels, self.total, self.id_of = writer, source, labels, total, id_of
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="hashsearch-writer", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while (item := self.queue.get()) is not _DONE:
                if self.stopping:
                    continue
                for i, reason in item.rejects:
                    self.writer.reject(i, self.source.path(i), reason)
                if len(item.index):
                    self.writer.add(item.codes, item.features, self.id_of(item.index), self.labels[item.index],
                                    [self.source.path(int(i)) for i in item.index], source_end=item.source_end,
                                    capacity_hint=self.total - int(item.index[0]), source_index=item.index,
                                    miniatures=item.miniatures)
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
            while self.queue.get() is not _DONE:
                pass

    def check(self):
        if self.error is not None:
            raise self.error

    def put(self, item):
        while True:
            self.check()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self):
        self.put(_DONE)
        self.thread.join()
        self.check()

    def abort(self):
        # The thread drops what is still queued, then exits; only then is the writer
        # touched from this thread, so the shard is never closed under a running write.
        self.stopping = True
        if self.thread.is_alive():
            self.queue.put(_DONE)
            self.thread.join()
        self.writer.abort()
