"""Unsupervised hash codes from the same F7 features, for the paper's comparison table.

  lsh  sign of random projections (faiss IndexLSH, orthonormalised random
       directions), each bit thresholded at its median on the training set so
       bits are balanced: F7 is post-ReLU and non-negative, and zero thresholds
       on uncentred data would give nearly constant bits.
  itq  iterative quantisation as Gong & Lazebnik define it (hashsearch.itq):
       centre, PCA to `bits` dimensions, then the rotation that minimises the
       quantisation loss; bit = (x - mean) W R >= 0.  Written in numpy
       because faiss's ITQTransform (1.15.1) updates the rotation with one
       SVD factor transposed, so its loss does not fall monotonically
       (docs/faiss-itq-repro.py).

Both return packed codes in hashsearch's layout (hashsearch.codes); faiss
IndexLSH packs LSB first, which is that layout, so its codes are used as is.
Fitting uses the database (training) features only; queries are encoded with
the fitted model, so fit once and encode both sides with the same encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from ..codes import check_bits
from ..errors import HashsearchError
from ..config import BASELINES, EncodeConfig
from ..itq import fit_itq
from ..shards import Collection, CollectionWriter
from ..shards.writer import WRITER_KEYS, rows_to_write

Encoder = Callable[[np.ndarray], np.ndarray]


def fit_baseline(method: str, train_feats: np.ndarray, bits: int, seed: int = 0) -> Encoder:
    """A function mapping float features [n, D] to packed codes uint8 [n, ceil(bits/8)]."""
    bits = check_bits(bits)
    x = np.ascontiguousarray(train_feats, np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise HashsearchError(f"need a [n >= 2, D] training matrix, got shape {x.shape}")
    d = x.shape[1]
    if method == "lsh":
        index = faiss.IndexLSH(d, bits, True, True)
        index.rrot.init(int(seed))      # the constructor seeds every IndexLSH alike
        index.train(x)
        return lambda f: index.sa_encode(np.ascontiguousarray(f, np.float32))
    if method == "itq":
        return fit_itq(x, bits, seed).encode
    raise HashsearchError(f"unknown baseline {method!r}; choose one of {', '.join(BASELINES)}")


def lsh_codes(train_feats: np.ndarray, feats: np.ndarray, bits: int, seed: int = 0) -> np.ndarray:
    return fit_baseline("lsh", train_feats, bits, seed)(feats)


def itq_codes(train_feats: np.ndarray, feats: np.ndarray, bits: int, seed: int = 0) -> np.ndarray:
    return fit_baseline("itq", train_feats, bits, seed)(feats)


def training_features(coll: Collection, max_rows: int = 50_000, seed: int = 0,
                      feats: np.ndarray | None = None) -> np.ndarray:
    """All features of `coll`, or a seeded sample of `max_rows` of them, float32.

    `feats`, all of coll's features already in RAM, is sampled instead of
    reading the collection again (and returned as is when no sample is needed).
    """
    if coll.n <= max_rows:
        return coll.features(np.arange(coll.n)) if feats is None else feats
    rows = np.sort(np.random.default_rng(seed).choice(coll.n, max_rows, replace=False))
    return coll.features(rows) if feats is None else feats[rows]


def write_baseline_collection(src: Collection, out_root, method: str, bits: int,
                              train_coll: Collection | None = None, *, seed: int = 0,
                              encoder: Encoder | None = None, overwrite: bool = False,
                              block_rows: int = 16384) -> Collection:
    """Copy `src` to `out_root` with its codes replaced by `method` codes.

    The model is fit on `train_coll` (default: `src` itself, i.e. pass the
    database when writing the query side), or pass a fitted `encoder` from
    fit_baseline to skip refitting.  Ids, labels, paths and features are
    copied unchanged, so `hashsearch eval` reads the result like any other.
    """
    if encoder is None:
        encoder = fit_baseline(method, training_features(train_coll or src, seed=seed), bits, seed)
    trained_on = str((train_coll or src).root)
    meta = {k: v for k, v in src.manifest.items() if k not in WRITER_KEYS}     # the rest describes the items
    meta["model_fingerprint"] = f"baseline:{method}:{bits}:seed={seed}:trained_on={trained_on}"
    meta["baseline"] = {"method": method, "bits": int(bits), "seed": int(seed), "trained_on": trained_on,
                        "source_collection": str(src.root)}
    ids, labels = src.ids(), src.labels()
    with CollectionWriter(Path(out_root), bits=bits, feature_dim=src.feature_dim,
                          feature_dtype=src.manifest["feature_dtype"],
                          shard_size=int(src.manifest.get("shard_size", EncodeConfig.shard_size)),
                          meta=meta, overwrite=overwrite) as writer:
        if writer.complete:
            raise HashsearchError(f"{out_root} already holds a finished collection; use overwrite to replace it")
        resume = writer.resume_from     # rows kept from an interrupted run
        miniatures = src.miniatures()   # the items' images are the source's, and so are their miniatures
        for first, block in src.iter_feature_blocks(block_rows):
            index = np.arange(first, first + len(block))
            todo = rows_to_write(index, resume)
            index, block = index[todo], block[todo]
            if not len(index):
                continue
            codes = encoder(np.asarray(block, np.float32))
            writer.add(codes, block, ids[index], labels[index], src.paths(index), source_end=int(index[-1]) + 1,
                       capacity_hint=src.n - int(index[0]), source_index=index,
                       miniatures=None if miniatures is None else miniatures[index])
        writer.finish(src.n)
    return Collection.open(out_root)
