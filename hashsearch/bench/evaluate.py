"""Retrieval quality of a query collection against a database collection.

Three rankings of the whole database per query, as in the paper:
  bcs  Hamming distance of the codes, ties by database id.
  es   exact squared L2 between F7 features.
  hds  the `pool` nearest codes by Hamming, reranked by L2 on F7, followed
       by the rest of the Hamming ranking.  The default pool, max(topk, 1000),
       is at least topk so that mAP@topk and P@topk are measured on reranked
       results only; with pool == topk, hds returns the same set as bcs and
       differs only in order, a larger pool lets F7 pull in items bcs missed.

With pool < topk (or with map_all) the ranking goes on past the pool in
Hamming order, so every mode ranks the same number of items.

baselines=("lsh", "itq") adds one row per unsupervised baseline
(hashsearch.bench.baselines): fitted on the database's F7 features, at the
database's code length unless baseline_bits says otherwise, it encodes both
sides and is ranked exactly like bcs, so its row is comparable with the
model's bcs row.  Its `seconds` includes fitting and encoding.

Rankings are computed exactly over in-RAM codes and features (numpy, and
faiss's fvec_L2sqr_by_idx for the pool distances) rather than through the
engine's indexes, so that hash-bucket misses cannot move the numbers and
ties are broken the same way every run.  `seconds` is evaluation time, not a
search benchmark.  Features are held in RAM as float32 (800 MB at
50k x 4096); queries are processed in blocks and each block's rankings are
dropped once scored, so map_all (full-length rankings) never needs an
[nq, n] array.
"""
from __future__ import annotations

import time

import faiss
import numpy as np

from ..config import EvalConfig
from ..errors import HashsearchError
from ..shards import Collection
from ..codes import check_bits
from .baselines import METHODS, fit_baseline, training_features
from .metrics import HammingScanner, QUERY_BLOCK, average_precision, pr_curve_hamming, precision_within_radius

MODES = ("bcs", "es", "hds")
DEFAULT_POOL = 1000


def evaluate(database: Collection, queries: Collection, modes=("bcs", "es", "hds"), topk: int = 1000,
             pool: int | None = None, map_all: bool = False, baselines=(), baseline_bits: int | None = None,
             baseline_seed: int = 0) -> list[dict]:
    """One dict per mode, then one per baseline: mode, map, precision_at_k
    {"1": P@1, ..., str(topk): P@topk}, precision_hamming2 (None for es, which
    uses no codes), n_queries, n_database, topk, bits, pool (hds only),
    map_all, seconds.  Baseline dicts have mode = method = "lsh" or "itq",
    plus seed and fit_seconds.

    `map` is mAP@topk (AP normalised by the relevant items within the top
    topk) or, with map_all, mAP over the full ranking.
    """
    modes, baselines = tuple(modes), tuple(baselines)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise HashsearchError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    unknown = [m for m in baselines if m not in METHODS]
    if unknown:
        raise HashsearchError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(METHODS)}")
    baseline_bits = database.bits if baseline_bits is None else check_bits(baseline_bits)
    if topk <= 0:
        raise HashsearchError(f"topk must be positive, got {topk}")
    if database.bits != queries.bits:
        raise HashsearchError(f"queries have {queries.bits}-bit codes, the database {database.bits}-bit")
    needs_features = any(m in ("es", "hds") for m in modes)
    if (needs_features or baselines) and database.feature_dim != queries.feature_dim:
        raise HashsearchError(f"queries have {queries.feature_dim}-d features, the database {database.feature_dim}-d")
    pool = max(topk, DEFAULT_POOL) if pool is None else int(pool)
    if pool <= 0:
        raise HashsearchError(f"pool must be positive, got {pool}")

    _check_comparable(database, queries)
    q_labels, db_labels = _labels(queries, "query"), _labels(database, "database")
    n, nq = database.n, queries.n
    topk = min(int(topk), n)
    depth = n if map_all else topk
    n_rel = _relevant_counts(q_labels, db_labels) if map_all else None

    q_codes, db_codes = queries.codes(), database.codes()
    scan = HammingScanner(db_codes, database.ids())
    q_feats = db_feats = db_sq = None
    if needs_features:
        q_feats, db_feats = _all_features(queries), _all_features(database)
        db_sq = np.einsum("ij,ij->i", db_feats, db_feats)
    p_h2 = precision_within_radius(q_codes, db_codes, q_labels, db_labels, 2) if set(modes) - {"es"} else None

    def rank_bcs(a, b):
        return scan.topk(q_codes[a:b], depth)[0]

    def rank_es(a, b):
        # |q|^2 is constant per query, so it does not change the order.
        key = q_feats[a:b] @ db_feats.T
        key *= -2
        key += db_sq
        return _smallest_k(key, depth)

    def rank_hds(a, b):
        cand = scan.topk(q_codes[a:b], max(pool, depth))[0]
        p = min(pool, cand.shape[1])
        head = np.ascontiguousarray(cand[:, :p])
        qf = np.ascontiguousarray(q_feats[a:b])
        # faiss reads each candidate's row in place; a numpy gather would copy pool x D floats per query.
        dist = np.empty(head.shape, np.float32)
        faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(dist), faiss.swig_ptr(qf), faiss.swig_ptr(db_feats),
                                faiss.swig_ptr(head), qf.shape[1], len(head), p)
        # Ties in L2 keep their Hamming order.
        order = np.lexsort((np.broadcast_to(np.arange(p), head.shape), dist), axis=1)
        cand[:, :p] = np.take_along_axis(head, order, 1)
        return cand[:, :depth]

    def score(mode, rank, start, p_h2, bits, **extra) -> dict:
        ap_sum, hits = 0.0, np.zeros(topk)
        for a in range(0, nq, QUERY_BLOCK):
            b = min(nq, a + QUERY_BLOCK)
            rel = db_labels[rank(a, b)] == q_labels[a:b, None]
            ap_sum += average_precision(rel, None if n_rel is None else n_rel[a:b]).sum()
            hits += np.cumsum(rel[:, :topk], axis=1).sum(0)
        p_at_k = hits / nq / np.arange(1, topk + 1)
        return {
            "mode": mode, "map": float(ap_sum / nq), "map_all": bool(map_all),
            "precision_at_k": {str(k + 1): float(v) for k, v in enumerate(p_at_k)},
            "precision_hamming2": p_h2,
            "n_queries": nq, "n_database": n, "topk": topk, "bits": bits,
            "pool": pool if mode == "hds" else None,
            "seconds": round(time.perf_counter() - start, 3), **extra,
        }

    rankers = {"bcs": rank_bcs, "es": rank_es, "hds": rank_hds}
    results = [score(mode, rankers[mode], time.perf_counter(), None if mode == "es" else p_h2, database.bits)
               for mode in modes]
    for method in baselines:
        start = time.perf_counter()
        encoder = fit_baseline(method, training_features(database, seed=baseline_seed, feats=db_feats),
                               baseline_bits, baseline_seed)
        b_db, b_q = _encode(encoder, database, db_feats), _encode(encoder, queries, q_feats)
        fit_seconds = round(time.perf_counter() - start, 3)
        b_scan = HammingScanner(b_db, database.ids())
        b_h2 = precision_within_radius(b_q, b_db, q_labels, db_labels, 2)
        results.append(score(method, lambda a, b: b_scan.topk(b_q[a:b], depth)[0], start, b_h2, baseline_bits,
                             method=method, seed=int(baseline_seed), fit_seconds=fit_seconds))
    return results


def _encode(encoder, coll: Collection, feats: np.ndarray | None) -> np.ndarray:
    """Baseline codes of every item of `coll`, from `feats` when in RAM, else block by block."""
    if feats is not None:
        return encoder(feats)
    return np.concatenate([encoder(np.asarray(block, np.float32)) for _, block in coll.iter_feature_blocks()])


def _smallest_k(key: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest keys per row, in increasing key order."""
    if k >= key.shape[1]:
        return np.argsort(key, axis=1, kind="stable").astype(np.int64)
    part = np.argpartition(key, k - 1, axis=1)[:, :k]
    # Equal keys (possible for float keys) are ordered by column, as the full sort would.
    order = np.lexsort((part, np.take_along_axis(key, part, 1)), axis=1)
    return np.take_along_axis(part, order, 1).astype(np.int64)


def _check_comparable(database: Collection, queries: Collection) -> None:
    """Codes from two models, or labels numbered from two class lists, would give meaningless scores."""
    a, b = database.manifest, queries.manifest
    if a.get("model_fingerprint") != b.get("model_fingerprint"):
        raise HashsearchError(f"{queries.root} and {database.root} were encoded by different models")
    if (a.get("class_names") or None) != (b.get("class_names") or None):
        raise HashsearchError(f"{queries.root} and {database.root} number their labels from different class lists")


def _labels(coll: Collection, role: str) -> np.ndarray:
    labels = coll.labels()
    missing = int((labels == -1).sum())
    if missing:
        raise HashsearchError(f"eval needs labels: {missing} of {coll.n} {role} items in {coll.root} "
                              f"have none (label -1)")
    return labels


def _relevant_counts(q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    values, counts = np.unique(db_labels, return_counts=True)
    pos = np.minimum(np.searchsorted(values, q_labels), len(values) - 1)
    return np.where(values[pos] == q_labels, counts[pos], 0)


def _all_features(coll: Collection) -> np.ndarray:
    # Filled block by block: features(arange(n)) would hold the stored copy and the float32 one at once.
    out = np.empty((coll.n, coll.feature_dim), np.float32)
    for first, block in coll.iter_feature_blocks():
        out[first:first + len(block)] = block
    return out


def format_table(results: list[dict]) -> str:
    """A plain-text table, one row per mode or baseline."""
    if not results:
        return ""
    topk = results[0]["topk"]
    ks = [k for k in (1, 10, 100) if k < topk] + [topk]
    map_name = "mAP@all" if results[0].get("map_all") else f"mAP@{topk}"
    header = ["mode", "bits", map_name] + [f"P@{k}" for k in ks] + ["P(H<=2)", "seconds"]
    rows = []
    for r in results:
        p = r["precision_at_k"]
        h2 = r["precision_hamming2"]
        rows.append([r["mode"], "-" if r["mode"] == "es" else r.get("bits", "-"), f"{r['map']:.4f}"] + [f"{p[str(k)]:.4f}" for k in ks]
                    + ["-" if h2 is None else f"{h2:.4f}", f"{r['seconds']:.1f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def evaluate_collections(database, queries, config: EvalConfig, *, pr_curve: bool = False):
    """`hashsearch eval`: open both collections, score them as `config` says; (rows, Hamming PR curve or None)."""
    db, q = Collection.open(database), Collection.open(queries)
    results = evaluate(db, q, modes=config.modes(), topk=config.topk, pool=config.pool, map_all=config.map_all,
                       baselines=config.baseline_methods())
    curve = pr_curve_hamming(q.codes(), db.codes(), q.labels(), db.labels()) if pr_curve else None
    return results, curve
