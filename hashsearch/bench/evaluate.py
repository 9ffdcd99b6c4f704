"""Retrieval quality of a query collection against a database collection.

Three rankings of the whole database per query, as in the paper:
  bcs  Hamming distance of the codes, ties by database id.
  es   exact squared L2 between F7 features.
  hds  the `pool` nearest codes by Hamming, reranked by L2 on F7, followed
       by the rest of the Hamming ranking.  The default pool
       (EvalConfig.hds_pool) is at least topk so that mAP@topk and P@topk are measured on reranked
       results only; with pool == topk, hds returns the same set as bcs and
       differs only in order, a larger pool lets F7 pull in items bcs missed.

With pool < topk (or with map_all) the ranking goes on past the pool in
Hamming order, so every mode ranks the same number of items.

baselines=("lsh", "itq") adds one row per unsupervised baseline
(hashsearch.bench.baselines): fitted on the database's F7 features, at the
database's code length unless baseline_bits says otherwise, it encodes both
sides and is ranked exactly like bcs, so its row is comparable with the
model's bcs row.  A baseline is fitted once per seed (EvalConfig.baseline_seeds,
as one seed's mAP is one draw from a spread) and its row gives the mean over the
seeds, with the sd, range and per-seed values of mAP.  Its `seconds` includes
fitting and encoding.

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
from dataclasses import dataclass

import faiss
import numpy as np

from ..codes import check_bits
from ..config import BASELINES, MODES, NEIGHBOUR_POOL, EvalConfig, SearchConfig
from ..engine.kernels import admitted
from ..errors import HashsearchError
from ..shards import Collection
from .baselines import fit_baseline, training_features
from .metrics import (HammingScanner, QUERY_BLOCK, average_precision, pr_curve_hamming, precision_at_k,
                      precision_within_radius)


def evaluate(database: Collection, queries: Collection, modes=MODES, topk: int = EvalConfig.topk,
             pool: int | None = EvalConfig.pool, map_all: bool = EvalConfig.map_all, baselines=(),
             baseline_bits: int | None = None, baseline_seeds: int = EvalConfig.baseline_seeds,
             baseline_seed: int = 0, neighbour_pool: int | None = EvalConfig.neighbour_pool) -> list[dict]:
    """One dict per mode, then one per baseline: mode, map, precision_at_k
    {"1": P@1, ..., str(topk): P@topk}, precision_hamming2 (None for es, which
    uses no codes), n_queries, n_database, topk, bits, pool (hds only),
    map_all, seconds.  Baseline dicts have mode = method = "lsh" or "itq",
    fitted with each of the seeds baseline_seed .. baseline_seed + baseline_seeds - 1:
    map, precision_at_k and precision_hamming2 are the means over the seeds, plus
    seeds (the list), map_per_seed, map_sd (sample sd, ddof 1; 0 for one seed),
    map_min, map_max and fit_seconds (all seeds' fits and encodes).

    `map` is mAP@topk (AP normalised by the relevant items within the top
    topk) or, with map_all, mAP over the full ranking.  hds adds the database index's neighbour pool
    of `neighbour_pool` rows [NEIGHBOUR_POOL], as `query` does at this depth, where that index has neighbour
    codes (its dict says how many it added: neighbour_pool).
    """
    for coll in (database, queries):
        if len(coll.deleted_rows):      # rankings and labels would count items that are gone
            raise HashsearchError(f"{coll.root} has deleted items; run `hashsearch compact {coll.root} --threshold 0` "
                                  "before evaluating it")
    modes, baselines = _known(modes, MODES, "mode"), _known(baselines, BASELINES, "baseline")
    # int() as before: numpy integers and whole floats from library callers stay accepted.
    settings = EvalConfig(topk=int(topk), pool=None if pool is None else int(pool), map_all=bool(map_all),
                          baseline_seeds=int(baseline_seeds))
    baseline_bits = database.bits if baseline_bits is None else check_bits(baseline_bits)
    needs_features = any(m in ("es", "hds") for m in modes)
    _check_comparable(database, queries, needs_features or bool(baselines))
    protocol = _Protocol.of(queries, database, settings)
    q_codes, db_codes = queries.codes(), database.codes()
    q_feats, db_feats = (_all_features(queries), _all_features(database)) if needs_features else (None, None)
    npool = NEIGHBOUR_POOL if neighbour_pool is None else neighbour_pool
    near = _neighbour_pools(database, db_feats, q_feats, npool) if "hds" in modes else None
    rankers = _rankers(q_codes, q_feats, HammingScanner(db_codes, database.ids()), db_feats,
                       settings.hds_pool(), protocol.depth, near)
    p_h2 = precision_within_radius(q_codes, db_codes, protocol.q_labels, protocol.db_labels, 2) \
        if set(modes) - {"es"} else None
    results = [_result(protocol, mode, rankers[mode], time.perf_counter(), database.bits,
                       None if mode == "es" else p_h2, settings.hds_pool() if mode == "hds" else None)
               for mode in modes]
    for r in results:
        if r["mode"] == "hds":
            r["neighbour_pool"] = 0 if near is None else near.shape[1]
    seeds = range(int(baseline_seed), int(baseline_seed) + settings.baseline_seeds)
    return results + [_baseline_result(protocol, method, database, queries, db_feats, q_feats, baseline_bits, seeds)
                      for method in baselines]


# -- the rankings: query arrays and database arrays in, database rows [nq, depth] out, nearest first -----------
def rank_bcs(query_codes: np.ndarray, scanner: HammingScanner, depth: int) -> np.ndarray:
    """Rows by Hamming distance of the codes; ties by database id (the scanner's order)."""
    return scanner.topk(query_codes, depth)[0]


def rank_es(query_feats: np.ndarray, db_feats: np.ndarray, depth: int,
            db_sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Rows by exact squared L2 on F7; ties by row.  Pass db_sq_norms to reuse them across query blocks."""
    if db_sq_norms is None:
        db_sq_norms = np.einsum("ij,ij->i", db_feats, db_feats)
    # |q|^2 is constant per query, so it does not change the order.
    key = query_feats @ db_feats.T
    key *= -2
    key += db_sq_norms
    return _smallest_k(key, depth)


def rank_hds(query_codes: np.ndarray, query_feats: np.ndarray, scanner: HammingScanner, db_feats: np.ndarray,
             pool: int, depth: int, near: np.ndarray | None = None,
             places: int = SearchConfig.neighbour_places) -> np.ndarray:
    """The `pool` nearest rows by Hamming, with the rows of `near` [nq, m] (the neighbour pool) where given,
    reranked by L2 on F7, each row once, rows of `near` alone taking at most the first `places` places, as
    Index.search ranks them; then the rest of the Hamming ranking."""
    rows = scanner.topk(query_codes, max(pool, depth))[0]
    head = np.ascontiguousarray(rows[:, :min(pool, rows.shape[1])])
    if near is None:
        rows[:, :head.shape[1]] = np.take_along_axis(head, _l2_order(query_feats, db_feats, head), 1)
        return rows[:, :depth]
    cand = np.ascontiguousarray(np.concatenate([head, near], axis=1))
    ranked = np.take_along_axis(cand, _l2_order(query_feats, db_feats, cand), 1)
    out = np.empty((len(rows), depth), np.int64)
    for q in range(len(rows)):
        first = ranked[q][np.sort(np.unique(ranked[q], return_index=True)[1])]     # each row once, in L2 order
        first = first[admitted(first, np.isin(first, head[q]), places)]
        rest = rows[q][~np.isin(rows[q], first)]
        out[q] = np.concatenate([first, rest])[:depth]
    return out


def _l2_order(query_feats: np.ndarray, db_feats: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Per query, the order of its candidate rows [nq, p] by squared L2; ties keep the given order."""
    qf = np.ascontiguousarray(query_feats, np.float32)
    dist = np.empty(candidates.shape, np.float32)
    # faiss reads each candidate's row in place; a numpy gather would copy pool x D floats per query.
    faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(dist), faiss.swig_ptr(qf), faiss.swig_ptr(db_feats),
                            faiss.swig_ptr(candidates), qf.shape[1], len(candidates), candidates.shape[1])
    return np.lexsort((np.broadcast_to(np.arange(candidates.shape[1]), candidates.shape), dist), axis=1)


def score(rows: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, topk: int,
          n_relevant: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(AP of each query float64 [nq], mean P@1..topk float64 [topk]) of ranked database rows [nq, depth].

    An item is relevant when it has the query's label.  AP is normalised by the
    relevant items within the depth, or by `n_relevant` [nq] (each query's
    relevant items in the whole database) for mAP over full-length rankings.
    """
    relevant = db_labels[rows] == query_labels[:, None]
    return average_precision(relevant, n_relevant), precision_at_k(relevant[:, :topk])


# -- the orchestration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Protocol:
    """What every ranking is scored against, whichever codes made it."""
    q_labels: np.ndarray
    db_labels: np.ndarray
    topk: int                       # capped at the database size
    depth: int                      # topk, or the whole database with map_all
    n_relevant: np.ndarray | None   # with map_all: AP's denominator per query
    map_all: bool

    @classmethod
    def of(cls, queries: Collection, database: Collection, settings: EvalConfig) -> _Protocol:
        q_labels, db_labels = _labels(queries, "query"), _labels(database, "database")
        topk = min(settings.topk, database.n)
        if not settings.map_all:
            return cls(q_labels, db_labels, topk, topk, None, False)
        return cls(q_labels, db_labels, topk, database.n, _relevant_counts(q_labels, db_labels), True)


def _neighbour_pools(database: Collection, db_feats, q_feats, npool: int) -> np.ndarray | None:
    """Each query's `npool` nearest database rows by the neighbour codes of the database's index, or None
    where it has none (no index, or one built without them)."""
    from ..engine.generation import collection_projection
    projection = collection_projection(database) if npool else None
    if projection is None:
        return None
    scanner = HammingScanner(projection.encode(db_feats), database.ids())
    return scanner.topk(projection.encode(q_feats), min(npool, database.n))[0]


def _rankers(q_codes, q_feats, scanner, db_feats, pool: int, depth: int, near=None) -> dict:
    """Per mode, rank(a, b): the rankings of queries a..b."""
    db_sq_norms = None if db_feats is None else np.einsum("ij,ij->i", db_feats, db_feats)
    return {"bcs": lambda a, b: rank_bcs(q_codes[a:b], scanner, depth),
            "es": lambda a, b: rank_es(q_feats[a:b], db_feats, depth, db_sq_norms),
            "hds": lambda a, b: rank_hds(q_codes[a:b], q_feats[a:b], scanner, db_feats, pool, depth,
                                         None if near is None else near[a:b])}


def _mean_scores(protocol: _Protocol, rank) -> tuple[float, np.ndarray]:
    """mAP and mean P@1..topk over all queries, ranked a block at a time: map_all never holds an [nq, n] array."""
    nq = len(protocol.q_labels)
    ap_sum, p_sum = 0.0, np.zeros(protocol.topk)
    for a in range(0, nq, QUERY_BLOCK):
        b = min(nq, a + QUERY_BLOCK)
        n_rel = None if protocol.n_relevant is None else protocol.n_relevant[a:b]
        ap, p = score(rank(a, b), protocol.q_labels[a:b], protocol.db_labels, protocol.topk, n_rel)
        ap_sum, p_sum = ap_sum + ap.sum(), p_sum + p * (b - a)
    return float(ap_sum / nq), p_sum / nq


def _result(protocol: _Protocol, mode: str, rank, start: float, bits: int, p_h2: float | None,
            pool: int | None, **extra) -> dict:
    map_, p_at_k = _mean_scores(protocol, rank)
    return _row(protocol, mode, map_, p_at_k, start, bits, p_h2, pool, **extra)


def _row(protocol: _Protocol, mode: str, map_: float, p_at_k: np.ndarray, start: float, bits: int,
         p_h2: float | None, pool: int | None, **extra) -> dict:
    return {
        "mode": mode, "map": map_, "map_all": protocol.map_all,
        "precision_at_k": {str(k + 1): float(v) for k, v in enumerate(p_at_k)},
        "precision_hamming2": p_h2,
        "n_queries": len(protocol.q_labels), "n_database": len(protocol.db_labels), "topk": protocol.topk,
        "bits": bits, "pool": pool, "seconds": round(time.perf_counter() - start, 3), **extra,
    }


def _baseline_result(protocol: _Protocol, method: str, database: Collection, queries: Collection,
                     db_feats: np.ndarray | None, q_feats: np.ndarray | None, bits: int, seeds) -> dict:
    """Per seed, fit `method` on the database's F7, encode both sides and rank like bcs; one row of the means
    over the seeds, with mAP's spread.  `seconds` includes the fits."""
    start, fit_seconds = time.perf_counter(), 0.0
    maps, p_at_ks, p_h2s = [], [], []
    for seed in seeds:
        fit_start = time.perf_counter()
        encoder = fit_baseline(method, training_features(database, seed=seed, feats=db_feats), bits, seed)
        b_db, b_q = _encode(encoder, database, db_feats), _encode(encoder, queries, q_feats)
        fit_seconds += time.perf_counter() - fit_start
        scanner = HammingScanner(b_db, database.ids())
        map_, p_at_k = _mean_scores(protocol, lambda a, b: rank_bcs(b_q[a:b], scanner, protocol.depth))
        maps.append(map_)
        p_at_ks.append(p_at_k)
        p_h2s.append(precision_within_radius(b_q, b_db, protocol.q_labels, protocol.db_labels, 2))
    per_seed = np.array(maps)
    return _row(protocol, method, float(per_seed.mean()), np.mean(p_at_ks, axis=0), start, bits,
                float(np.mean(p_h2s)), None, method=method, seeds=[int(s) for s in seeds],
                map_per_seed=maps, map_sd=float(per_seed.std(ddof=1)) if len(maps) > 1 else 0.0,
                map_min=float(per_seed.min()), map_max=float(per_seed.max()), fit_seconds=round(fit_seconds, 3))


def _known(names, allowed: tuple, what: str) -> tuple:
    names = tuple(names)
    unknown = [m for m in names if m not in allowed]
    if unknown:
        raise HashsearchError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(allowed)}")
    return names


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


def _check_comparable(database: Collection, queries: Collection, features: bool) -> None:
    """Codes from two models, or labels numbered from two class lists, would give meaningless scores."""
    if database.bits != queries.bits:
        raise HashsearchError(f"queries have {queries.bits}-bit codes, the database {database.bits}-bit")
    if features and database.feature_dim != queries.feature_dim:
        raise HashsearchError(f"queries have {queries.feature_dim}-d features, the database {database.feature_dim}-d")
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
    rows, seeds = [], 0
    for r in results:
        p = r["precision_at_k"]
        h2 = r["precision_hamming2"]
        map_ = f"{r['map']:.4f}"
        if len(r.get("seeds", ())) > 1:
            map_ += f" ± {r['map_sd']:.4f}"
            seeds = len(r["seeds"])         # one evaluate() fits every baseline with the same seeds
        rows.append([r["mode"], "-" if r["mode"] == "es" else r.get("bits", "-"), map_] + [f"{p[str(k)]:.4f}" for k in ks]
                    + ["-" if h2 is None else f"{h2:.4f}", f"{r['seconds']:.1f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    notes = [f"baselines: mean ± sd of {map_name} over {seeds} seeds; their other columns are means"] if seeds else []
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows] + notes)


def evaluate_collections(database, queries, config: EvalConfig, *, pr_curve: bool = False):
    """`hashsearch eval`: open both collections, score them as `config` says; (rows, Hamming PR curve or None)."""
    db, q = Collection.open(database), Collection.open(queries)
    results = evaluate(db, q, modes=config.modes(), topk=config.topk, pool=config.pool, map_all=config.map_all,
                       baselines=config.baseline_methods(), baseline_seeds=config.baseline_seeds,
                       baseline_bits=config.baseline_bits, neighbour_pool=config.neighbour_pool)
    curve = pr_curve_hamming(q.codes(), db.codes(), q.labels(), db.labels()) if pr_curve else None
    return results, curve
