"""`hashsearch encode`: SOURCE -> collection, streaming, resumable.

    reader  DataLoader workers decode and resize (dataset.py)
    mapper  the model, on the main thread (encoder.py)
    writer  a thread appending to HDF5 shards (shards.CollectionWriter)

The three overlap, so the pipeline runs at the model's speed, and memory is
bounded by the loader's prefetch and the writer queue, whatever N is.
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import HashsearchError
from ..fileio import atomic_write
from ..shards import CollectionWriter
from .dataset import make_loader
from .encoder import Encoder
from .sources import open_source

_QUEUE_DEPTH = 4
_DONE = object()


def encode_collection(model_path, source_spec: str, out, *, limit: int | None = None, batch_size: int = 256,
                      workers: int = 2, device: str = "auto", shard_size: int = 100_000,
                      feature_dtype: str = "float16", overwrite: bool = False, quiet: bool = False,
                      data_dir: str | None = None, precision: str = "auto", log=print) -> dict:
    if batch_size <= 0:
        raise HashsearchError(f"batch size must be positive, got {batch_size}")
    encoder = Encoder.from_checkpoint(model_path, device=device, precision=precision)
    source = open_source(source_spec, data_dir=data_dir, limit=limit)
    if len(source) == 0:
        raise HashsearchError(f"no images in {source_spec}")
    # class_names name the values of the stored label column, which come from the
    # SOURCE (a folder's subfolders, a list's labels), not from the model's training set.
    meta = {"model_fingerprint": encoder.fingerprint(), "source": source.fingerprint(),
            "source_spec": source.spec, "class_names": source.class_names,
            "backbone": encoder.config["backbone"], "input_size": encoder.input_size,
            # fp32, fp16 and bf16 give slightly different codes; one collection holds one kind.
            "precision": encoder.precision}
    writer = CollectionWriter(out, bits=encoder.bits, feature_dim=encoder.feature_dim,
                              feature_dtype=feature_dtype, shard_size=shard_size, meta=meta, overwrite=overwrite)
    if writer.complete:
        log(f"{out} is already complete ({writer.manifest['items']} items); nothing to do")
        return writer.manifest
    _copy_model(model_path, Path(out) / "model.pt")

    start = writer.resume_from
    if start and not quiet:
        log(f"resuming {out} at item {start} of {len(source)}")
    labels = source.labels()
    loader = make_loader(source, encoder.input_size, batch_size, workers, start=start,
                         pin_memory=encoder.device.type == "cuda")
    began = time.perf_counter()
    sink = _WriterThread(writer, source, labels, len(source))
    bar = tqdm(total=len(source) - start, unit="img", disable=quiet, smoothing=0.1, desc="encoding")
    try:
        for indices, pixels, good, rejects in loader:
            sink.check()
            good = np.asarray(good, np.int64)
            keep = good >= start                       # a resumed first batch repeats rows already written
            # Encode the whole aligned batch and drop rows afterwards: a batch of another
            # shape may take other kernels (cuDNN, GEMM blocking) and round differently,
            # and a resumed run must store exactly what an uninterrupted one would.
            codes, feats = encoder.encode_batch(pixels)
            if not keep.all():
                codes, feats = codes[keep], feats[keep]
            rejects = [(i, r) for i, r in rejects if i >= start]
            sink.put((codes, feats, good[keep], rejects, indices[-1] + 1))
            bar.update(sum(1 for i in indices if i >= start))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    manifest = writer.finish(len(source))
    seconds = time.perf_counter() - began
    done = len(source) - start
    if not quiet:
        log(f"encoded {manifest['items']} items into {out} ({done / max(seconds, 1e-9):.0f} img/s); "
            f"{manifest['rejected']} rejected" + (f", see {Path(out) / 'rejects.jsonl'}" if manifest["rejected"] else ""))
    return manifest


class _WriterThread:
    """Appends encoded batches to the collection while the model works on the next ones."""

    def __init__(self, writer: CollectionWriter, source, labels, total: int):
        self.writer, self.source, self.labels, self.total = writer, source, labels, total
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
                codes, feats, ids, rejects, source_end = item
                for i, reason in rejects:
                    self.writer.reject(i, self.source.path(i), reason)
                if len(ids):
                    self.writer.add(codes, feats, ids, self.labels[ids], [self.source.path(int(i)) for i in ids],
                                    source_end=source_end, capacity_hint=self.total - int(ids[0]))
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


def _copy_model(model_path, target: Path) -> None:
    if target.exists() and os.path.samefile(model_path, target):
        return
    with open(model_path, "rb") as model:
        atomic_write(target, lambda f: shutil.copyfileobj(model, f))
