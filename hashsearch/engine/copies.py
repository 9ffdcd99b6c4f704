"""Edited copies of one image, found from the items' miniatures (numpy in, numpy out).

F7 is trained to say what an image shows, so an edited copy of a photo can lie further from its original
than another photo of the same kind does (README, "Near-duplicate groups").  A copy keeps the original's
layout of light and dark instead, and that is what this compares: each item's miniature, the 16 x 16 grey
image the encoder stores beside F7 (shards.layout.MINIATURE_SIDE).

  descriptor  the miniature resampled to DESCRIPTOR_SIDE x DESCRIPTOR_SIDE, less its mean and weighted by a
              centred Gaussian window (corners and borders are what crops and rotations change), scaled to
              unit length: brightness and contrast drop out, and re-compression and rescaling change little.
  variants    a copy may also be mirrored, cropped or turned a little, so each item is also described as it
              would look so edited (VARIANTS: mirrored or not, cropped by CROP or not, turned by 0 or
              +-TURN degrees).  Every variant is a fixed linear map of the miniature, made once.
  join        each variant of each item is searched against the plain descriptors of all items; a pair's
              distance is the smallest over the variants, seen from either end, in units of the descriptors'
              length (0 alike, 2 opposite).  Up to EXACT_JOIN_ROWS items the search is exact (IndexFlatL2);
              past that, an IndexIVFFlat of cells of about JOIN_CELL_ROWS items, JOIN_PROBES probed.
  keep        a pair within the threshold that also stands out: within a ratio of one item's distance to
              its k-th nearest (copy_pairs).
"""
from __future__ import annotations

import functools
import itertools

import faiss
import numpy as np

from ..errors import HashsearchError
from ..shards.layout import MINIATURE_SIDE
from .duplicates import local_scales
from .threads import MAX_THREADS, faiss_threads

DESCRIPTOR_SIDE = 8
# The window's standard deviation, as a share of the side.
WINDOW = 0.3
# The edits each item is also described as: a 10 % crop of every side, and turns of 6 degrees either way
# (they find copies turned by 8 degrees too: README, "Near-duplicate groups").
CROP = 0.1
TURN = 6.0
VARIANTS = tuple(itertools.product((False, True), (0.0, CROP), (0.0, -TURN, TURN)))
# The exact join costs n^2: on this project's 2-core machine a whole `duplicates` of 11,965 items took 3.5 s, the
# exact join alone of 61,965 took 57 s.
EXACT_JOIN_ROWS = 20_000
# On those 61,965 CIFAR-10 images, with cells as fine as a million items get, 2 probes found the planted pairs
# the exact join found (0.948 against 0.947) and 1 probe lost 0.016 of them (docs/duplicates-more-images.py).
JOIN_CELL_ROWS = 1000
JOIN_PROBES = 2
JOIN_TRAIN_ROWS = 100_000
# Each variant's nearest items kept as candidates: a group of copies is small.
JOIN_NEIGHBOURS = 8
JOIN_BLOCK_ROWS = 16384


def _sample_matrix(mirror: bool, crop: float, turn: float) -> np.ndarray:
    """float64 [S*S, M*M]: bilinear samples of the miniature at the descriptor's grid, edited as given;
    outside the miniature counts as black, as a turned copy's corners are."""
    s, m = DESCRIPTOR_SIDE, MINIATURE_SIDE
    # Grid points in [-1, 1] coordinates (pixel centres), shrunk by the crop, turned, mirrored.
    u = ((np.arange(s) + 0.5) / s * 2 - 1) * (1 - 2 * crop)
    gy, gx = np.meshgrid(u, u, indexing="ij")
    t = np.deg2rad(turn)
    x = np.cos(t) * gx - np.sin(t) * gy
    y = np.sin(t) * gx + np.cos(t) * gy
    if mirror:
        x = -x
    # Back to the miniature's pixel coordinates; each grid point averages the miniature over its own cell
    # (a box of the cell's width, approximated by 3 x 3 bilinear taps), so shrinking does not alias.
    out = np.zeros((s * s, m * m))
    cell = (1 - 2 * crop) * 2 / s
    offsets = (np.arange(3) - 1) * cell / 3
    for oy, ox in itertools.product(offsets, offsets):
        px = ((x + ox + 1) / 2) * m - 0.5
        py = ((y + oy + 1) / 2) * m - 0.5
        x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
        fx, fy = px - x0, py - y0
        for dy, dx in itertools.product((0, 1), (0, 1)):
            xi, yi = x0 + dx, y0 + dy
            w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (xi >= 0) & (xi < m) & (yi >= 0) & (yi < m)
            rows = np.flatnonzero(inside.ravel())
            np.add.at(out, (rows, (yi * m + xi).ravel()[rows]), w.ravel()[rows] / 9)
    return out


@functools.lru_cache(maxsize=None)
def variant_maps() -> np.ndarray:
    """float32 [len(VARIANTS), M*M, S*S]: miniature (flattened, as a row) @ map = the variant's descriptor,
    before its length is scaled to 1.  The first is the plain one."""
    s = DESCRIPTOR_SIDE
    g = np.exp(-0.5 * ((np.arange(s) - (s - 1) / 2) / (WINDOW * s)) ** 2)
    window = np.outer(g, g).ravel()
    # The miniature less its mean (so a flat one describes nothing, and brightness drops out exactly, borders
    # included), sampled, less the window-weighted mean, then weighted: all linear, so folded into the map.
    m2 = MINIATURE_SIDE ** 2
    level = np.eye(m2) - np.full((m2, m2), 1 / m2)
    centre = np.eye(s * s) - np.outer(np.ones(s * s), window) / window.sum()
    maps = [(window[:, None] * (centre @ _sample_matrix(*v) @ level)).T for v in VARIANTS]
    return np.stack(maps).astype(np.float32)


def descriptors(miniatures: np.ndarray, variant: int = 0) -> np.ndarray:
    """float32 [n, S*S], unit length (a flat miniature, nothing to compare, gives zeros)."""
    x = np.asarray(miniatures, np.float32).reshape(len(miniatures), MINIATURE_SIDE ** 2) @ variant_maps()[variant]
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-3)


def _index(base: np.ndarray):
    d = base.shape[1]
    if len(base) <= EXACT_JOIN_ROWS:
        index = faiss.IndexFlatL2(d)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, max(1, len(base) // JOIN_CELL_ROWS))
        sample = np.random.default_rng(0).choice(len(base), min(len(base), JOIN_TRAIN_ROWS), replace=False)
        index.train(base[np.sort(sample)])
        index.nprobe = JOIN_PROBES
    index.add(base)
    return index


def _found(searched, usable: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A faiss search of an index over the `usable` positions, for the positions `q`, as (positions found,
    -1 where none or the query itself; L2 distances, inf there)."""
    sq, found = searched
    other = np.where(found >= 0, usable[np.maximum(found, 0)], -1)
    other[other == q[:, None]] = -1
    return other, np.where(other >= 0, np.sqrt(np.maximum(sq, 0)), np.inf)


def _nearest_blocks(index, usable: np.ndarray, miniatures: np.ndarray, positions: np.ndarray, k: int):
    """Yield, a block of `positions` at a time, (the block, the other items found by any of its variants
    [b, variants * k], each once a row, at its nearest variant, -1 where none, their distances, inf where
    none): `index` holds the plain descriptors of the `usable` positions."""
    for a in range(0, len(positions), JOIN_BLOCK_ROWS):
        q = positions[a:a + JOIN_BLOCK_ROWS]
        others, dists = [], []
        for v in range(len(VARIANTS)):
            other, dist = _found(index.search(descriptors(miniatures[q], v), k), usable, q)
            others.append(other)
            dists.append(dist)
        other, dist = np.concatenate(others, 1), np.concatenate(dists, 1)
        # Each other item once, at its nearest variant: sort a row by item, then distance; keep the firsts.
        order = np.lexsort((dist, other), axis=1)
        other, dist = np.take_along_axis(other, order, 1), np.take_along_axis(dist, order, 1)
        repeat = np.zeros(other.shape, bool)
        repeat[:, 1:] = other[:, 1:] == other[:, :-1]
        dist[repeat] = np.inf
        yield q, other, dist


def _pairs_within(q: np.ndarray, other: np.ndarray, dist: np.ndarray, max_distance: float):
    keep = dist <= max_distance
    mine = np.broadcast_to(q[:, None], other.shape)[keep]
    return np.stack([np.minimum(mine, other[keep]), np.maximum(mine, other[keep])], 1), dist[keep].astype(np.float32)


def copy_pairs(miniatures: np.ndarray, max_distance: float, ratio: float, neighbour: int,
               queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pairs int64 [m, 2], i < j, each once, sorted; distances float32 [m]): the items whose descriptors,
    in some variant, lie within `max_distance` and within `ratio` times the local scale of one of them: its
    distance to its `neighbour`-th nearest item.  Where many items look alike (garments photographed alike,
    say) their neighbours are close and a pair must be closer still; a copy stands out from the rest.  With
    fewer than `neighbour` other items there is no local scale, and the distance alone decides.  A flat
    miniature (nothing to compare; or an item stored without one) is never a copy.
    With `queries` (positions), only the pairs holding one, found as a run over every item would find them."""
    n = len(miniatures)
    if miniatures.ndim != 2 or miniatures.shape[1] != MINIATURE_SIDE ** 2:
        raise HashsearchError(f"miniatures must be [n, {MINIATURE_SIDE ** 2}], got {miniatures.shape}")
    base = descriptors(miniatures)
    usable = np.flatnonzero(base.any(axis=1))
    since = queries is not None
    queries = usable if not since else np.intersect1d(np.asarray(queries, np.int64), usable)
    if len(usable) < 2 or not len(queries):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    k = min(max(JOIN_NEIGHBOURS, neighbour) + 1, len(usable))
    local = np.full(n, np.nan, np.float32)
    found_pairs, found_dist = [], []
    with faiss_threads(MAX_THREADS):
        index = _index(base[usable])
        for q, other, dist in _nearest_blocks(index, usable, miniatures, queries, k):
            local[q] = local_scales(dist, neighbour)
            pairs, d = _pairs_within(q, other, dist, max_distance)
            found_pairs.append(pairs)
            found_dist.append(d)
        if since:
            # A variant edits one end only (a crop of the original finds its cropped copy; the copy cropped
            # again finds nothing), so an earlier item's variants must be searched for the new items too.
            for v in range(1, len(VARIANTS)):
                variant_index = _index(descriptors(miniatures[usable], v))
                other, dist = _found(variant_index.search(base[queries], k), usable, queries)
                pairs, d = _pairs_within(queries, other, dist, max_distance)
                found_pairs.append(pairs)
                found_dist.append(d)
            # Each partner's own scale, for the ratio seen from either end, as a run over every item has it.
            partners = np.setdiff1d(np.concatenate(found_pairs).ravel(), queries)
            for q, _, dist in _nearest_blocks(index, usable, miniatures, partners, k):
                local[q] = local_scales(dist, neighbour)
    pairs = np.concatenate(found_pairs)
    dist = np.concatenate(found_dist)
    if len(usable) > neighbour:
        # The scale of either end (nan, where an end has fewer candidates than `neighbour`, compares false).
        pairs_scale = np.fmax(local[pairs[:, 0]], local[pairs[:, 1]])
        stands_out = dist <= ratio * pairs_scale
        pairs, dist = pairs[stands_out], dist[stands_out]
    # Both ends, and several variants, may find a pair: keep its nearest.
    order = np.argsort(dist, kind="stable")
    pairs, dist = pairs[order], dist[order]
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs.astype(np.int64).reshape(-1, 2), dist[first]
