"""The engine on small hand-made collections: no model, no torch."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from hashsearch import Collection, CollectionWriter, HashsearchError, Index
from hashsearch.codes import pack_codes, unpack_codes
from hashsearch.engine import load_flat_l2
from hashsearch.engine.index import nearest_of_ranges
from hashsearch.engine.rerank import Reranker
from hashsearch.shards import RowReader
from hashsearch.shards import read_manifest, write_manifest


def hamming_matrix(a, b):
    """Brute-force reference: Hamming distances between every row of a and of b."""
    return (unpack_codes(a)[:, None, :] != unpack_codes(b)[None, :, :]).sum(-1)


N, DIM, BITS, SHARD = 700, 24, 32, 256       # three shards: 256, 256, 188 rows


def make_collection(root, dtype="float16", n=N, seed=0) -> Collection:
    """Clustered features, codes from the sign of a random projection (so near rows have near codes)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, DIM)).astype(np.float32)
    feats = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM)).astype(np.float32)
    proj = rng.normal(size=(DIM, BITS)).astype(np.float32)
    codes = pack_codes(feats @ proj > 0)
    with CollectionWriter(root, bits=BITS, feature_dim=DIM, feature_dtype=dtype, shard_size=SHARD,
                          meta={"source": "test", "proj": proj.tolist()}) as w:
        ids = np.arange(n) + 1000
        w.add(codes, feats, ids, np.zeros(n), [f"x{i}" for i in range(n)], source_end=n)
        w.finish()
    return Collection.open(root)


def make_queries(coll: Collection, nq=12, seed=1):
    rng = np.random.default_rng(seed)
    proj = np.asarray(coll.manifest["proj"], np.float32)
    feats = coll.features(rng.integers(0, coll.n, nq)) + 0.05 * rng.normal(size=(nq, DIM)).astype(np.float32)
    return pack_codes(feats @ proj > 0), feats


@pytest.fixture(scope="module", params=["float16", "float32"])
def coll(request, tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp(request.param) / "coll", request.param)


@pytest.fixture(scope="module")
def flat(coll, tmp_path_factory):
    return Index.build(coll, "flat", out=tmp_path_factory.mktemp("flat"))


def test_hds_with_whole_collection_as_pool_equals_exhaustive(coll, flat):
    codes, feats = make_queries(coll)
    hds = flat.search(codes, feats, 10, mode="hds", pool=coll.n)
    es = flat.search(codes, feats, 10, mode="es")
    np.testing.assert_array_equal(hds.rows, es.rows)
    np.testing.assert_array_equal(hds.ids, es.rows + 1000)
    np.testing.assert_allclose(hds.distances, es.distances, rtol=1e-5, atol=1e-5)
    # and the distances are the true squared L2 to the stored (possibly fp16) rows
    stored = coll.features(es.rows.ravel()).reshape(len(feats), 10, DIM)
    np.testing.assert_allclose(es.distances, ((stored - feats[:, None]) ** 2).sum(-1), rtol=1e-4)


def test_batched_search_equals_one_query_at_a_time(coll, flat, monkeypatch):
    codes, feats = make_queries(coll, nq=40)
    # split the batch across the search threads whatever this machine's core count
    monkeypatch.setattr("hashsearch.engine.threads.threads_for_batch", lambda nq: 3)
    from concurrent.futures import ThreadPoolExecutor
    submitted = []
    submit = ThreadPoolExecutor.submit
    monkeypatch.setattr(ThreadPoolExecutor, "submit", lambda pool, *a: submitted.append(a) or submit(pool, *a))
    batch = flat.search(codes, feats, 7, pool=60)
    assert len(submitted) == 3                  # the batch really went to three search threads
    monkeypatch.undo()
    for q in range(len(codes)):
        one = flat.search(codes[q], feats[q], 7, pool=60)
        np.testing.assert_array_equal(one.rows[0], batch.rows[q])
        np.testing.assert_array_equal(one.distances[0], batch.distances[q])


def test_bcs_is_the_brute_force_hamming_ranking(coll, flat):
    codes, _ = make_queries(coll)
    res = flat.search(codes, None, 15, mode="bcs")
    ham = hamming_matrix(codes, coll.codes())
    for q in range(len(codes)):
        assert len(set(res.rows[q])) == 15
        np.testing.assert_array_equal(res.hamming[q], ham[q, res.rows[q]])
        np.testing.assert_array_equal(res.hamming[q], np.sort(ham[q])[:15])
    assert np.isnan(res.distances).all()


@pytest.mark.parametrize("mode,radius", [("hds", None), ("bcs", None), ("es", None), ("hds", 2), ("bcs", 2)])
@pytest.mark.parametrize("kind", ["flat", "multihash"])
def test_reported_hamming_is_each_results_true_distance(coll, flat, tmp_path, mode, radius, kind):
    index = flat if kind == "flat" else Index.build(coll, kind, out=tmp_path, hash_bits=8, nflip=0)
    codes, feats = make_queries(coll)
    res = index.search(codes, feats, 10, mode=mode, pool=30, radius=radius)
    ham = hamming_matrix(codes, coll.codes())
    found = res.rows >= 0
    assert found.sum() >= len(codes)
    np.testing.assert_array_equal(res.hamming[found], np.take_along_axis(ham, np.where(found, res.rows, 0), 1)[found])
    assert (res.hamming[~found] == -1).all() and (res.ids[~found] == -1).all()
    np.testing.assert_array_equal(res.ids[found], res.rows[found] + 1000)
    if radius is not None:
        assert (res.hamming[found] <= radius).all()


@pytest.mark.parametrize("kind,params", [("hash", {"hash_bits": 10, "nflip": 2}),
                                         ("multihash", {"hash_bits": 8, "nflip": 0}),
                                         ("multihash", {"hash_bits": 10, "nhash": 3, "nflip": 1})])
def test_hash_kinds_return_true_hamming_neighbours_found_by_flat(coll, flat, tmp_path, kind, params):
    index = Index.build(coll, kind, out=tmp_path, **params)
    codes, _ = make_queries(coll)
    ham = hamming_matrix(codes, coll.codes())
    d_hash, r_hash = index.candidates(codes, 50)
    d_flat, _ = flat.candidates(codes, 50)
    for q in range(len(codes)):
        found = r_hash[q] >= 0
        assert found.any()
        np.testing.assert_array_equal(d_hash[q][found], ham[q, r_hash[q][found]])
        assert (np.diff(d_hash[q][found]) >= 0).all()
        # a subset of the collection can only be as near as the exact scan, rank for rank
        assert (d_hash[q][found] >= d_flat[q][:found.sum()]).all()


@pytest.mark.parametrize("kind,params,radius", [("hash", {"hash_bits": 12, "nflip": 2}, 2),
                                                ("multihash", {"hash_bits": 8, "nflip": 0}, 3)])
def test_hash_kinds_are_exact_within_their_guaranteed_radius(coll, flat, tmp_path, kind, params, radius):
    # hash probes every key within nflip flips, so finds every code within nflip bits;
    # multihash with nflip=0 finds every code within nhash-1 bits (one slice must match).
    index = Index.build(coll, kind, out=tmp_path, **params)
    codes, _ = make_queries(coll)
    _, r_hash = index.candidates(codes, coll.n, radius=radius)
    _, r_flat = flat.candidates(codes, coll.n, radius=radius)
    for q in range(len(codes)):
        assert set(r_hash[q][r_hash[q] >= 0]) == set(r_flat[q][r_flat[q] >= 0])


def test_radius_returns_every_code_within_it_sorted_and_capped_by_pool(coll, flat):
    codes, _ = make_queries(coll)
    ham = hamming_matrix(codes, coll.codes())
    radius = 6
    dist, rows = flat.candidates(codes, coll.n, radius=radius)
    for q in range(len(codes)):
        found = rows[q] >= 0
        assert set(rows[q][found]) == set(np.flatnonzero(ham[q] <= radius))
        assert (np.diff(dist[q][found]) >= 0).all()
    capped, _ = flat.candidates(codes, 3, radius=radius)
    assert capped.shape[1] <= 3
    res = flat.search(codes, make_queries(coll)[1], 5, radius=0)
    assert (res.hamming[res.rows >= 0] == 0).all()


def test_reranker_ranks_candidates_by_exact_l2_and_refuses_a_query_of_another_width(coll):
    rr = Reranker(RowReader(coll))
    cand = np.array([5, 17, 300, 650, -1, -1])
    q = coll.features([17]) + 0.01
    dist, rows = np.full(3, np.inf, np.float32), np.full(3, -1, np.int64)
    pos = rr.search(q, cand, dist, rows)
    exact = ((coll.features(cand[:4]) - q) ** 2).sum(1)
    assert pos.tolist() == np.argsort(exact)[:3].tolist() and rows.tolist() == cand[pos].tolist()
    np.testing.assert_allclose(dist, np.sort(exact)[:3], rtol=1e-3)
    with pytest.raises(HashsearchError, match="features"):
        rr.search(q[:, :DIM - 1], cand, dist, rows)


def test_nearest_of_ranges_sorts_each_query_by_distance_then_row_and_caps_at_pool():
    # three queries' range-search results, as faiss lays them out: query 1 found nothing
    lims = np.array([0, 4, 4, 6], np.uint64)
    dist = np.array([3, 1, 3, 0, 2, 2], np.int32)
    labels = np.array([9, 7, 2, 5, 8, 1], np.int64)
    d, rows = nearest_of_ranges(lims, dist, labels, pool=3)
    assert rows.tolist() == [[5, 7, 2], [-1, -1, -1], [1, 8, -1]]
    assert d.tolist() == [[0, 1, 3], [-1, -1, -1], [2, 2, -1]]
    d, rows = nearest_of_ranges(lims, dist, labels, pool=10)
    assert rows.shape == (3, 4) and rows[0].tolist() == [5, 7, 2, 9]
    d, rows = nearest_of_ranges(np.zeros(3, np.uint64), dist[:0], labels[:0], pool=5)
    assert rows.tolist() == [[-1], [-1]]
    # one query alone takes a shorter path to the same answer
    d, rows = nearest_of_ranges(lims[:2], dist[:4], labels[:4], pool=3)
    assert rows.tolist() == [[5, 7, 2]] and d.tolist() == [[0, 1, 3]] and d.dtype == np.int32
    d, rows = nearest_of_ranges(lims[1:3] - 4, dist[4:4], labels[4:4], pool=3)
    assert rows.tolist() == [[-1]]


def test_query_with_no_candidates_is_padded(coll, tmp_path):
    index = Index.build(coll, "hash", out=tmp_path, hash_bits=16, nflip=0)
    # a query whose bucket key (its first 16 bits) no stored code has
    db = coll.codes().astype(np.int64)
    taken = set((db[:, 0] | db[:, 1] << 8).tolist())
    free = next(key for key in range(1 << 16) if key not in taken)
    far = np.zeros((1, BITS // 8), np.uint8)
    far[0, :2] = free & 255, free >> 8
    res = index.search(far, np.zeros((1, DIM), np.float32), 4, pool=10, neighbour_pool=0)   # H's buckets alone
    assert (res.rows == -1).all() and (res.ids == -1).all() and (res.hamming == -1).all()
    assert np.isinf(res.distances).all()


def test_open_finds_the_built_index_and_detects_stale_ones(tmp_path):
    coll = make_collection(tmp_path / "c")
    Index.build(coll, "multihash", hash_bits=8)
    index = Index.open(str(tmp_path / "c"))
    assert index.kind == "multihash" and index.meta["coarse"]["nhash"] == 4
    codes, feats = make_queries(coll)
    assert (index.search(codes, feats, 3).rows >= 0).all()
    # the same shard names with other contents: the fingerprint no longer matches
    manifest = read_manifest(tmp_path / "c")
    manifest["shards"] = [dict(s, sha256="0" * 64) for s in manifest["shards"]]
    write_manifest(tmp_path / "c", manifest)
    with pytest.raises(HashsearchError, match="rebuild"):
        Index.open(tmp_path / "c")
    with pytest.raises(HashsearchError, match="no index"):
        Index.open(coll, tmp_path / "elsewhere")


def test_bad_queries_raise(coll, flat):
    codes, feats = make_queries(coll)
    for k in (0, -3):
        with pytest.raises(HashsearchError, match="k must be positive"):
            flat.search(codes, feats, k)
    with pytest.raises(HashsearchError, match="bits"):
        flat.search(codes[:, :2], feats, 5)
    with pytest.raises(HashsearchError, match="bits"):
        flat.search(np.zeros((1, 8), np.uint8), feats[:1], 5, mode="bcs")
    with pytest.raises(HashsearchError, match="shape"):
        flat.search(codes, feats[:, :5], 5)
    with pytest.raises(HashsearchError, match="needs query features"):
        flat.search(codes, None, 5)
    with pytest.raises(HashsearchError, match="mode"):
        flat.search(codes, feats, 5, mode="nope")
    with pytest.raises(HashsearchError, match="pool must be 0 or more"):
        flat.search(codes, feats, 5, pool=-1)


def test_chunked_compressed_shards_give_the_same_answers(coll, flat, tmp_path):
    # shards written by another tool cannot be read by byte offset: h5py decodes them instead
    shutil.copytree(coll.root, tmp_path / "c")
    for path in (tmp_path / "c" / "shards").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            data = f["features"][...]
            del f["features"]
            f.create_dataset("features", data=data, chunks=(16, DIM), compression="gzip")
    other = Collection.open(tmp_path / "c")
    assert other.shards[0].features_offset is None
    index = Index.build(other, "flat", out=tmp_path / "i")
    codes, feats = make_queries(coll)
    for mode, pool in (("hds", 80), ("es", 1)):
        np.testing.assert_array_equal(index.search(codes, feats, 6, mode=mode, pool=pool).rows,
                                      flat.search(codes, feats, 6, mode=mode, pool=pool).rows)
    np.testing.assert_array_equal(load_flat_l2(other).reconstruct_n(0, other.n), coll.features(np.arange(N)))


def test_exhaustive_index_holds_every_row(coll):
    index = load_flat_l2(coll, block_rows=100)                    # a block size that does not divide a shard
    assert index.ntotal == N
    np.testing.assert_array_equal(index.reconstruct_n(0, N), coll.features(np.arange(N)))


def test_feature_reader_reads_rows_across_shards_in_the_order_asked(coll):
    rows = np.array([0, 255, 256, 699, 3, 511, 512, 300], np.int64)
    reader = RowReader(coll)
    out = np.zeros((len(rows), DIM), coll.feature_dtype)
    reader.gather(rows, [[memoryview(r).cast("B")] for r in out], out)
    np.testing.assert_array_equal(out, coll.raw_features(rows))


def test_features_in_ram_rerank_as_reads_from_the_shards_do(coll, flat, tmp_path):
    in_ram = Index.open(coll, flat._index_dir)
    from_disk = Index.open(Collection.open(coll.root), flat._index_dir, features_in_ram_mb=0)   # its own shards
    assert in_ram._current().reader.in_ram is not None and from_disk._current().reader.in_ram is None
    codes, feats = make_queries(coll, nq=30)
    for mode, pool in (("hds", 90), ("hds", coll.n), ("es", 1)):
        a, b = (i.search(codes, feats, 8, mode=mode, pool=pool) for i in (in_ram, from_disk))
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.distances, b.distances)
    rows = np.array([0, 255, 256, 699, 3, 511, 512, 300, 3], np.int64)     # across the three shards, repeated
    out = np.zeros((len(rows), DIM), coll.feature_dtype)
    in_ram._current().reader.read(rows, out)
    np.testing.assert_array_equal(out, from_disk._current().collection.raw_features(rows))


def test_a_shard_truncated_under_a_reader_is_refused_when_its_features_are_read_into_ram(coll, tmp_path):
    shutil.copytree(coll.root, tmp_path / "c")
    other = Collection.open(tmp_path / "c")         # its shards checked, then one is cut short under it
    shard = other.shards[-1]
    with open(shard.path, "r+b") as f:
        f.truncate(shard.features_offset + 10 * DIM)
    with pytest.raises(HashsearchError, match="truncated"):
        RowReader(other, in_ram=True)


@pytest.mark.parametrize("bits", [12, 48, 96, 200])
def test_flat_coarse_search_of_any_code_width_is_the_brute_force_ranking(bits):
    from hashsearch.engine.coarse import FAST_FLAT_WIDTHS, Coarse, build_coarse
    rng = np.random.default_rng(bits)
    codes = pack_codes(rng.random((3000, bits)) < 0.5)
    codes[100:140] = codes[7]                                   # ties, which rank by row
    coarse = Coarse(build_coarse(codes, bits, "flat"))
    assert coarse.index.code_size in FAST_FLAT_WIDTHS           # searched with a specialised kernel
    queries = np.concatenate([codes[[7, 2999]], pack_codes(rng.random((5, bits)) < 0.5)])
    dist, rows = coarse.search(queries, 60)
    ham = hamming_matrix(queries, codes)
    for q in range(len(queries)):
        expect = np.lexsort((np.arange(len(codes)), ham[q]))[:60]
        np.testing.assert_array_equal(rows[q], expect)
        np.testing.assert_array_equal(dist[q], ham[q, expect])
    lims, dist, rows = coarse.range_search(queries, bits // 3)
    for q in range(len(queries)):
        np.testing.assert_array_equal(np.sort(rows[lims[q]:lims[q + 1]]), np.flatnonzero(ham[q] < bits // 3))
