"""A seeded synthetic collection that looks enough like F7 features to benchmark search.

Three levels of structure, so that near neighbours exist at every scale:
  clusters   `cluster_size` rows around a random centre (a "class");
  groups     near-duplicate sets of `group_min`..`group_max` rows that share an
             offset from their cluster centre, drawn from a low-rank latent
             space (real CNN features vary along few directions);
  members    a group's offset plus small isotropic noise.
Features are ReLU'd like F7.  Codes stand in for H's, in one of two ways
(`codes`):
  class       (the default) as a layer trained with softmax on the clusters
              as classes makes them: the code of a row's cluster centre under
              a fixed random hash layer, sigmoid(W c + b) > 0.5, with a few
              bits flipped per row.  Rows of one cluster share nearly one
              code, whatever their F7 distance, as real class-trained codes
              do (the README's "Faithful coarse search"), so H's pool holds
              class-mates rather than neighbours;
  projection  the sign of the same random projection of each row's own
              features: near rows get near codes.  Benchmarks before the
              neighbour codes used these, which keep F7's neighbours by
              construction.
b is set so each bit is on for half of a calibration sample.

Rows are laid out in random order (groups are not contiguous on disk) and
every block of rows has its own random stream, so a collection can be
regenerated, or an interrupted one resumed, bit for bit.  Queries are fresh
noisy members of existing groups: held out, never database rows.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from ..codes import check_bits, pack_codes
from ..config import SYNTHETIC_CODES
from ..errors import HashsearchError
from ..shards import Collection, CollectionWriter
from ..shards.writer import rows_to_write
from ..shards.manifest import read_manifest

# 2: shards are page-aligned (shards.writer), so caches written before are regenerated and timed as
# the engine writes collections now; the rows themselves are unchanged.  3: class codes.
VERSION = 3
# Per-row noise of class codes, relative to the spread of the centres' projections: flips ~10 % of bits.
_CLASS_CODE_NOISE = 0.15
BLOCK_ROWS = 8192
# Streams of the seed's SeedSequence, so that each part stays fixed when another changes.
_MODEL, _LAYOUT, _CALIBRATION, _QUERIES, _BLOCKS, _FLIPS, _MINIATURES = range(7)
_NOISE_ROWS = 2048


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))


def default_cache_root() -> Path:
    return Path(os.environ.get("HASHSEARCH_CACHE", Path.home() / ".cache" / "hashsearch")) / "bench"


@dataclass(frozen=True)
class SyntheticSpec:
    n: int
    dim: int = 4096
    bits: int = 128
    seed: int = 0
    cluster_size: int = 1000
    group_min: int = 8
    group_max: int = 32
    latent: int = 64
    center_scale: float = 1.0
    group_scale: float = 0.5
    noise_scale: float = 0.1
    codes: str = "class"
    # Also a miniature for each row (bench duplicates' timing): a group's rows share an 8 x 8 layout of light
    # and dark, drawn from its latent offset and its cluster's, with a little noise per row.
    miniatures: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.codes not in SYNTHETIC_CODES:
            raise HashsearchError(f"synthetic codes must be one of {', '.join(SYNTHETIC_CODES)}, got {self.codes!r}")
        if self.n <= 0 or self.dim <= 0:
            raise HashsearchError(f"synthetic collection needs n > 0 and dim > 0, got n={self.n}, dim={self.dim}")
        if not 1 <= self.group_min <= self.group_max:
            raise HashsearchError(f"group sizes must satisfy 1 <= min <= max, got {self.group_min}..{self.group_max}")

    @property
    def name(self) -> str:
        kind = "" if self.codes == "class" else f"-{self.codes}"
        return f"synthetic-n{self.n}-d{self.dim}-b{self.bits}-s{self.seed}{kind}"

    @property
    def source(self) -> str:
        """Everything that determines the rows: a cache with another source is stale."""
        # Without miniatures the rows are those of the caches generated before they came.
        fields = ",".join(f"{k}={v}" for k, v in asdict(self).items() if k != "miniatures" or v)
        return f"synthetic-v{VERSION}({fields})"

    def rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *stream]))


class SyntheticModel:
    """The generator's fixed parts, rebuilt from the spec alone (a second or so at 1M)."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = s = spec
        rng = s.rng(_MODEL)
        n_clusters = max(1, round(s.n / s.cluster_size))
        latent = min(s.latent, s.dim)
        self.centers = rng.standard_normal((n_clusters, s.dim), np.float32) * np.float32(s.center_scale)
        # Rows of A scaled so each feature's group offset has std group_scale.
        self.mixing = rng.standard_normal((latent, s.dim), np.float32) * np.float32(s.group_scale / np.sqrt(latent))
        self.hash_w = rng.standard_normal((s.dim, s.bits), np.float32)

        rng = s.rng(_LAYOUT)
        sizes = rng.integers(s.group_min, s.group_max + 1, size=s.n // s.group_min + 1)
        n_groups = int(np.searchsorted(np.cumsum(sizes), s.n) + 1)
        self.group_sizes = sizes[:n_groups].copy()
        self.group_sizes[-1] -= int(self.group_sizes.sum()) - s.n
        self.group_cluster = rng.integers(0, n_clusters, size=n_groups).astype(np.int32)
        self.group_latent = rng.standard_normal((n_groups, latent), np.float32)
        self.row_group = rng.permutation(np.repeat(np.arange(n_groups, dtype=np.int32), self.group_sizes))

    @cached_property
    def hash_b(self) -> np.ndarray:
        if self.spec.codes == "class":
            return -np.median(self.center_logits, axis=0).astype(np.float32)
        probe = self._features((_CALIBRATION,), self.row_group[:4096])
        return -np.median(probe @ self.hash_w, axis=0).astype(np.float32)

    @cached_property
    def center_logits(self) -> np.ndarray:
        return np.maximum(self.centers, 0) @ self.hash_w

    def _features(self, stream: tuple, groups: np.ndarray) -> np.ndarray:
        x = np.empty((len(groups), self.spec.dim), np.float32)

        def noise(a):
            # Drawing normals is most of the cost: fixed chunks with their own streams
            # use both cores yet give the same numbers on any machine.
            self.spec.rng(*stream, a).standard_normal(out=x[a:a + _NOISE_ROWS], dtype=np.float32)

        list(_pool().map(noise, range(0, len(x), _NOISE_ROWS)))
        x *= np.float32(self.spec.noise_scale)
        x += self.centers[self.group_cluster[groups]]
        x += self.group_latent[groups] @ self.mixing
        return np.maximum(x, 0, out=x)

    def encode(self, features: np.ndarray, groups: np.ndarray, stream: tuple) -> np.ndarray:
        """The codes of rows with these features, of these groups; `stream` draws class codes' flips."""
        if self.spec.codes == "projection":
            return pack_codes(features @ self.hash_w + self.hash_b > 0)
        logits = self.center_logits[self.group_cluster[groups]] + self.hash_b
        spread = np.float32(_CLASS_CODE_NOISE * self.center_logits.std())
        noise = self.spec.rng(_FLIPS, *stream).standard_normal(logits.shape, np.float32) * spread
        return pack_codes(logits + noise > 0)

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of block b: (features float32, codes, cluster labels)."""
        groups = self.row_group[b * BLOCK_ROWS:(b + 1) * BLOCK_ROWS]
        x = self._features((_BLOCKS, b), groups)
        return x, self.encode(x, groups, (_BLOCKS, b)), self.group_cluster[groups].astype(np.int64)

    @cached_property
    def miniature_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """(group latent -> 8 x 8 layout, each cluster's 8 x 8 layout): the group's part dominates, so groups of
        one cluster are alike but not copies."""
        rng = self.spec.rng(_MINIATURES)
        latent = self.group_latent.shape[1]
        return (rng.standard_normal((latent, 64), np.float32) * np.float32(40 / np.sqrt(latent)),
                rng.standard_normal((len(self.centers), 64), np.float32) * np.float32(20))

    def block_miniatures(self, b: int) -> np.ndarray:
        """uint8 [rows, MINIATURE_SIDE ** 2] of block b's rows (MINIATURE_SIDE is 16: each cell is 2 x 2)."""
        groups = self.row_group[b * BLOCK_ROWS:(b + 1) * BLOCK_ROWS]
        by_group, by_cluster = self.miniature_maps
        layout = 128 + self.group_latent[groups] @ by_group + by_cluster[self.group_cluster[groups]]
        image = layout.reshape(-1, 8, 8).repeat(2, 1).repeat(2, 2).reshape(len(groups), -1)
        image += self.spec.rng(_MINIATURES, b).normal(0, 3, image.shape).astype(np.float32)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def queries(self, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Held-out queries: (codes, features float32, group of each), groups drawn by size."""
        groups = self.row_group[self.spec.rng(_QUERIES, seed).integers(0, self.spec.n, size=nq)]
        x = self._features((_QUERIES, seed, 1), groups)
        return self.encode(x, groups, (_QUERIES, seed, 2)), x, groups


def generate_collection(root, n: int, dim: int = 4096, bits: int = 128, seed: int = 0, *,
                        feature_dtype: str = "float16", shard_size: int = 100_000,
                        progress: bool = False, **spec_params) -> Collection:
    """Generate (or reuse, or resume) a synthetic collection at `root`.

    A complete collection of the same spec is reused untouched; one of another
    spec is replaced; an interrupted one is continued from its last shard.
    """
    spec = SyntheticSpec(n=n, dim=dim, bits=bits, seed=seed, **spec_params)
    root = Path(root)
    overwrite = False
    if (root / "manifest.json").exists():
        old = read_manifest(root)
        same = old.get("source") == spec.source and old.get("feature_dtype") == feature_dtype \
            and old.get("shard_size") == shard_size
        if same and old.get("complete"):
            return Collection.open(root)
        overwrite = not same
    model = SyntheticModel(spec)
    writer = CollectionWriter(root, bits=bits, feature_dim=dim, feature_dtype=feature_dtype,
                              shard_size=shard_size, overwrite=overwrite,
                              meta={"source": spec.source, "synthetic": asdict(spec)})
    start, t0 = writer.resume_from, time.perf_counter()
    with writer:
        for b in range(start // BLOCK_ROWS, -(-n // BLOCK_ROWS)):
            first = b * BLOCK_ROWS
            x, codes, labels = model.block(b)
            ids = np.arange(first, first + len(x), dtype=np.int64)
            todo = rows_to_write(ids, start)
            writer.add(codes[todo], x[todo], ids[todo], labels[todo], [f"synthetic:{i}" for i in ids[todo]],
                       source_end=first + len(x), capacity_hint=n - writer.rows_written,
                       miniatures=model.block_miniatures(b)[todo] if spec.miniatures else None)
            if progress:
                done = first + len(x)
                rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
                print(f"\rgenerating {spec.name}: {done}/{n} rows ({rate:,.0f} rows/s)",
                      end="" if done < n else "\n", file=sys.stderr, flush=True)
        writer.finish(source_end=n)
    return Collection.open(root)


def make_queries(spec_or_collection, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`nq` held-out queries for a synthetic spec or a collection generated from one."""
    spec = spec_or_collection
    if isinstance(spec, Collection):
        params = spec.manifest.get("synthetic")
        if params is None:
            raise HashsearchError(f"{spec.root} is not a synthetic collection")
        spec = SyntheticSpec(**params)
    return SyntheticModel(spec).queries(nq, seed)
