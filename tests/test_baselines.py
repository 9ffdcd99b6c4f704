"""ITQ as Gong & Lazebnik define it (hashsearch.itq.fit_itq).

Its codes' retrieval quality against LSH, the bits > D error and the writing of
baseline collections are tested in test_evaluate.py.
"""
import numpy as np
import pytest

from hashsearch.bench.baselines import fit_baseline
from hashsearch.itq import ITQ_ITERATIONS, fit_itq
from hashsearch.codes import unpack_codes


def clustered(n=3000, dim=64, classes=10, seed=0):
    """Post-ReLU-like features: Gaussian clusters around positive centres, clipped at 0."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.5, size=(classes, dim)) + 2
    labels = rng.integers(0, classes, n)
    return np.maximum(centres[labels] + rng.normal(size=(n, dim)), 0).astype(np.float32)


def planted(bits=8, dim=32, n=2000, seed=0):
    """Points near the corners of {-1, +1}^bits, rotated by a known orthogonal Q, embedded in `dim`
    dimensions by an orthonormal E and shifted: x = (corners + noise) Q E^T + offset + small noise.
    Centred and PCA-projected, x is the corners rotated by Q (in the basis E^T W), so ITQ's
    rotation should undo Q up to the order and signs of the axes."""
    rng = np.random.default_rng(seed)
    corners = rng.choice([-1.0, 1.0], (n, bits))
    q, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    e, _ = np.linalg.qr(rng.standard_normal((dim, bits)))
    x = ((corners + 0.1 * rng.standard_normal((n, bits))) @ q) @ e.T
    x += 3 * rng.standard_normal(dim) + 0.01 * rng.standard_normal((n, dim))
    return x.astype(np.float32), corners, q, e


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_quantisation_loss_never_increases(bits):
    x = clustered()
    model = fit_itq(x, bits, seed=3)
    losses = model.losses
    assert len(losses) == ITQ_ITERATIONS + 1
    # Each half-step minimises ||B - V R||^2_F over its variable, so the loss cannot go up.
    assert np.all(np.diff(losses) <= 1e-9 * losses[0]), np.diff(losses).max()
    assert losses[-1] < 0.97 * losses[0]
    # The recorded loss is the one of the returned rotation.
    v = (x - model.mean) @ model.projection
    z = v @ model.rotation
    assert np.square(np.where(z >= 0, 1, -1) - z).sum() == pytest.approx(losses[-1], rel=1e-5)


def test_rotation_undoes_a_planted_rotation():
    bits = 8
    x, corners, q, e = planted(bits)
    # ITQ is a local method: on hypercube corners some random starts stop at a saddle between axes
    # (about 4 in 10 here), so take the best of ten starts, as one would in practice.
    fits = [fit_itq(x, bits, seed=s) for s in range(10)]
    best = min(fits, key=lambda m: m.losses[-1])
    # At the planted rotation only the noise is left: 0.1^2 per coordinate.
    assert best.losses[-1] / len(x) < 0.15 * bits
    # Latent corners -> features -> codes is the map Q E^T W R: a signed permutation.
    m = q @ e.T @ best.projection @ best.rotation
    perm = np.abs(m).argmax(0)
    assert sorted(perm) == list(range(bits))
    np.testing.assert_allclose(np.abs(m), np.eye(bits)[perm].T, atol=0.05)
    # So each code bit is one planted coordinate's sign, up to a flip.
    code_bits = unpack_codes(best.encode(x), bits)
    signs = np.sign(m[perm, np.arange(bits)])
    planted_bits = (corners[:, perm] * signs) > 0
    assert (code_bits == planted_bits).mean(0).min() > 0.99


def test_pca_of_centred_features():
    x = clustered(n=1500, dim=48)
    bits = 12
    model = fit_itq(x, bits, seed=0)
    np.testing.assert_allclose(model.mean, x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    w = model.projection.astype(np.float64)
    np.testing.assert_allclose(w.T @ w, np.eye(bits), atol=1e-5)
    np.testing.assert_allclose(model.rotation.T @ model.rotation, np.eye(bits), atol=1e-10)
    # W spans the top principal subspace of the centred (not L2-normalised) features.
    xc = x - x.astype(np.float64).mean(0)
    _, vecs = np.linalg.eigh(xc.T @ xc)
    top = vecs[:, -bits:]
    np.testing.assert_allclose(w @ w.T, top @ top.T, atol=1e-4)
    # Codes: bit = (x - mean) W R >= 0, in hashsearch's packed layout; fit_baseline encodes the same.
    bits_direct = (xc @ w @ model.rotation) >= 0
    code_bits = unpack_codes(model.encode(x), bits)
    assert (code_bits == bits_direct).mean() > 0.9999      # float32 encoding may flip a bit sitting on 0
    np.testing.assert_array_equal(fit_baseline("itq", x, bits, seed=0)(x), model.encode(x))


def test_same_seed_same_codes():
    x = clustered(n=1000, dim=32)
    a, b = fit_itq(x, 16, seed=7), fit_itq(x, 16, seed=7)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    np.testing.assert_array_equal(fit_baseline("itq", x, 16, seed=7)(x), a.encode(x))
    # Another seed starts from another rotation (its codes may or may not end up the same).
    c = fit_itq(x, 16, seed=8)
    assert a.losses[0] != c.losses[0]
    assert not np.allclose(a.rotation, c.rotation)
