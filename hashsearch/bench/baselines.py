"""Unsupervised hash codes from the same F7 features, for the paper's comparison table.

  lsh  sign of random projections (faiss IndexLSH, orthonormalised random
       directions), each bit thresholded at its median on the training set so
       bits are balanced: F7 is post-ReLU and non-negative, and zero thresholds
       on uncentred data would give nearly constant bits.
  itq  iterative quantisation as Gong & Lazebnik define it (fit_itq): centre,
       PCA to `bits` dimensions, then the rotation that minimises the
       quantisation loss; bit = (x - mean) W R >= 0.  Written here in numpy
       because faiss's ITQTransform (1.15.1) updates the rotation with one
       SVD factor transposed, so its loss does not fall monotonically
       (docs/faiss-itq-repro.py).

Both return packed codes in hashsearch's layout (hashsearch.codes); faiss
IndexLSH packs LSB first, which is that layout, so its codes are used as is.
Fitting uses the database (training) features only; queries are encoded with
the fitted model, so fit once and encode both sides with the same encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from ..codes import check_bits, pack_codes
from ..errors import HashsearchError
from ..config import BASELINES, EncodeConfig
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


# Gong & Lazebnik's setting: they run 50 iterations in their experiments rather than to convergence.
ITQ_ITERATIONS = 50


@dataclass(frozen=True)
class ITQ:
    """A fitted ITQ model: bit = (x - mean) . projection . rotation >= 0.

    mean        float64 [D], the training features' mean
    projection  float32 [D, bits], the PCA basis W (orthonormal columns, largest variance first)
    rotation    float64 [bits, bits], the orthogonal R
    losses      float64 [iterations + 1], the quantisation loss ||B - V R||^2_F of the
                training set, V = (x - mean) W, B = sign(V R): for the initial rotation,
                then after each update; it never increases
    """
    mean: np.ndarray
    projection: np.ndarray
    rotation: np.ndarray
    losses: np.ndarray

    def project(self, feats: np.ndarray) -> np.ndarray:
        """(x - mean) W R, float64 [n, bits], computed as x (W R) - mean (W R): a block is not copied to centre it."""
        wr = (self.projection @ self.rotation).astype(np.float32)
        return np.ascontiguousarray(feats, np.float32) @ wr - self.mean @ wr

    def encode(self, feats: np.ndarray) -> np.ndarray:
        """Packed codes uint8 [n, ceil(bits/8)] of float features [n, D]."""
        return pack_codes(self.project(feats) >= 0)


def fit_itq(train_feats: np.ndarray, bits: int, seed: int = 0, iterations: int = ITQ_ITERATIONS) -> ITQ:
    """ITQ as in Gong & Lazebnik, "Iterative quantization: a Procrustean approach to learning binary
    codes", CVPR 2011 (and TPAMI 2013, with Gordo and Perronnin).

    The features are centred and projected on their top `bits` principal directions, V = (x - mean) W,
    and (B, R) minimise the quantisation loss

        Q(B, R) = ||B - V R||^2_F,   B in {-1, +1}^(n x bits),  R orthogonal,

    by alternation from a random orthogonal R (the QR factor of a Gaussian matrix drawn from `seed`):
      fix R, update B:  B = sign(V R)                                           (+1 where V R = 0)
      fix B, update R:  the orthogonal Procrustes solution: with B^T V = U_B S U_A^T (SVD),
                        R = U_A U_B^T (the authors' MATLAB: [UB,S,UA] = svd(B'*V); R = UA*UB').
    Each step minimises Q over its variable with the other fixed, so Q never increases (ITQ.losses).

    Features are centred, not L2-normalised: the paper centres the data before PCA and nothing
    more, and the thresholds at 0 assume zero-mean projections.  faiss's ITQTransform normalises
    each centred vector to unit length as well, which changes the PCA it fits and moves the
    training mean off zero; it is a variant, not the paper's method.
    """
    bits = check_bits(bits)
    x = np.ascontiguousarray(train_feats, np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise HashsearchError(f"need a [n >= 2, D] training matrix, got shape {x.shape}")
    d = x.shape[1]
    if bits > d:
        raise HashsearchError(f"itq needs bits <= feature dimension, got {bits} > {d}")
    # PCA: eigenvectors of the covariance, no eigenvalue weighting (eigen_power 0), no random rotation.
    # faiss centres internally; its A holds the components as rows.
    pca = faiss.PCAMatrix(d, bits, 0.0, False)
    pca.train(x)
    projection = np.ascontiguousarray(faiss.vector_to_array(pca.A).reshape(bits, d).T)
    mean = x.mean(0, dtype=np.float64)
    v = (x @ projection).astype(np.float64) - mean @ projection

    gauss = np.random.default_rng(seed).standard_normal((bits, bits))
    q, r = np.linalg.qr(gauss)
    rotation = q * np.where(np.diag(r) < 0, -1.0, 1.0)     # signs fixed so R is uniform over the orthogonal group
    b, loss = _quantise(v, rotation)
    losses = [loss]
    for _ in range(int(iterations)):
        u_b, _, u_a_t = np.linalg.svd(b.T @ v)
        rotation = u_a_t.T @ u_b.T
        b, loss = _quantise(v, rotation)
        losses.append(loss)
    return ITQ(mean, projection, rotation, np.array(losses))


def _quantise(v: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, float]:
    """B = sign(V R) and the loss ||B - V R||^2_F."""
    z = v @ rotation
    b = np.where(z >= 0, 1.0, -1.0)
    return b, float(np.square(b - z).sum())


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
        for first, block in src.iter_feature_blocks(block_rows):
            index = np.arange(first, first + len(block))
            todo = rows_to_write(index, resume)
            index, block = index[todo], block[todo]
            if not len(index):
                continue
            codes = encoder(np.asarray(block, np.float32))
            writer.add(codes, block, ids[index], labels[index], src.paths(index), source_end=int(index[-1]) + 1,
                       capacity_hint=src.n - int(index[0]), source_index=index)
        writer.finish(src.n)
    return Collection.open(out_root)
