"""Iterative quantisation (Gong & Lazebnik): binary codes fitted to features without labels.

The `itq` baseline of `eval` (bench.baselines) and `train --unsupervised`
(encoders.train), which turns a fit into the latent layer H of an ordinary
checkpoint, both use it.  numpy and faiss only.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .codes import check_bits, pack_codes
from .errors import HashsearchError


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
