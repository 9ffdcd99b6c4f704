"""`hashsearch bench --exhaustive` at toy size: structure and correctness, never timings."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hashsearch import Collection
from hashsearch.bench.metrics import recall_at_k
from hashsearch.bench.speed import fastest_threads, format_report, plot_scaling, run_exhaustive_bench, run_scaling
from hashsearch.bench.synthetic import SyntheticSpec, generate_collection, make_queries
from hashsearch.engine.threads import MAX_THREADS
from hashsearch.shards import write_manifest

SMALL = dict(n=3000, dim=64, bits=32, queries=20, progress=False)
KEYS = ("n", "dim", "bits", "batch", "exhaustive_ms", "hierarchical_ms", "binary_ms", "speedup", "recall_at_10",
        "rss_mb", "exhaustive_p95_ms", "hierarchical_p95_ms", "binary_p95_ms", "exhaustive_qps", "hierarchical_qps",
        "binary_qps", "build_seconds", "open_seconds", "index_bytes", "collection_bytes", "coarse", "pool", "machine")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    result = run_exhaustive_bench(batch=8, pool=40, coarse="multihash", cache_dir=cache, exhaustive_queries=5, **SMALL)
    return cache, result


def test_result_has_every_reported_number(bench, tmp_path):
    _, r = bench
    for key in KEYS:
        assert key in r, key
    assert (r["n"], r["dim"], r["bits"], r["batch"], r["queries"]) == (3000, 64, 32, 8, 20)
    assert set(r["timings"]) == {"1", "8"}
    for batch in ("1", "8"):
        for method in ("exhaustive", "hierarchical", "binary"):
            t = r["timings"][batch][method]
            assert 0 < t["median_ms"] <= t["p95_ms"] and t["qps"] > 0
    assert r["timings"]["1"]["exhaustive"]["queries"] == 5       # capped by exhaustive_queries
    assert set(r["exhaustive_threads"]) == {"1", "8"}
    assert r["speedup"] == pytest.approx(r["exhaustive_ms"] / r["hierarchical_ms"])
    assert r["coarse"]["kind"] == "multihash" and r["coarse"]["nflip"] == 0
    # H's pool, the neighbour codes' pool and the cells' nearest 6 a result (engine/sketch.py), as build-index tuned
    assert 0 < r["mean_candidates"] <= 40 + r["neighbour_pool"] + (60 if r["neighbour_cells"] else 0)
    assert r["neighbour_bits"] == 64   # F7 is 64-d
    assert 0 < r["rss_mb"] < 2000 and r["open_seconds"] > 0 and r["index_bytes"] > 0
    assert r["collection_bytes"] > 3000 * 64 * 2                  # fp16 features alone
    text = format_report(r)
    m = r["machine"]
    assert f"machine: {m['cpu']}, {m['cores']} cores" in text and f"faiss {m['faiss']}" in text
    threads = r["exhaustive_threads"]
    assert f"{threads['1']} at batch 1, {threads['8']} at batch 8" in text   # which thread count each baseline got
    assert "speedup" in text and "recall@10" in text and "hierarchical" in text
    assert f"peak RSS: {r['rss_mb']:,.0f} MiB" in text          # peak_rss_mb counts MiB
    back = json.loads(json.dumps(r))         # what `bench --json` writes
    assert back["recall_at_10"] == r["recall_at_10"] and back["n"] == 3000


@pytest.mark.skipif(MAX_THREADS == 1, reason="one core: nothing to choose between")
@pytest.mark.parametrize("slow_at", ["one thread", "every thread"])
def test_the_exhaustive_baseline_gets_the_faster_thread_count(slow_at):
    import time

    import faiss
    slow = 1 if slow_at == "one thread" else MAX_THREADS

    def call():
        if faiss.omp_get_max_threads() == slow:
            time.sleep(0.02)
    assert fastest_threads(call, tries=2) == (MAX_THREADS if slow == 1 else 1)


def test_recall_is_the_overlap_with_the_exhaustive_top10(bench):
    _, r = bench
    top = r["top10"]
    truth, hds = np.array(top["exhaustive"]), np.array(top["hierarchical"])
    assert truth.shape == hds.shape == (20, 10)
    manual = np.mean([len(set(h) & set(t)) / 10 for h, t in zip(hds, truth)])
    assert r["recall_at_10"] == pytest.approx(manual)
    assert r["recall_at_10_binary"] == pytest.approx(recall_at_k(top["binary"], truth))


def test_cached_collection_is_reused_and_a_full_pool_gives_recall_one(bench):
    cache, _ = bench
    root = cache / SyntheticSpec(n=3000, dim=64, bits=32).name
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.h5")}
    assert before
    # flat with pool = N reranks every row: exactly the exhaustive answer
    r = run_exhaustive_bench(batch=1, pool=3000, coarse="flat", cache_dir=cache, exhaustive_queries=2, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.h5")} == before
    assert r["recall_at_10"] == 1.0 and set(r["timings"]) == {"1"}
    assert not list(cache.glob("bench-run-*"))                    # the temporary index is gone


def test_generation_is_deterministic_and_resumes_bit_for_bit(tmp_path):
    full = generate_collection(tmp_path / "a", 2500, 32, 16, seed=3, shard_size=1000)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    # as if killed after the first shard: the resumed run must produce the same rows
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for s in m["shards"][1:]:
        (tmp_path / "b" / s["file"]).unlink()
    m.update(complete=False, shards=m["shards"][:1], items=m["shards"][0]["rows"])
    write_manifest(tmp_path / "b", m)
    first = tmp_path / "b" / m["shards"][0]["file"]
    stamp = first.stat().st_mtime_ns
    resumed = generate_collection(tmp_path / "b", 2500, 32, 16, seed=3, shard_size=1000)
    assert first.stat().st_mtime_ns == stamp                      # continued, not started over
    rows = np.arange(2500)
    np.testing.assert_array_equal(full.raw_features(rows), resumed.raw_features(rows))
    np.testing.assert_array_equal(full.codes(), resumed.codes())
    assert resumed.raw_features([0]).dtype == np.float16
    other = generate_collection(tmp_path / "c", 2500, 32, 16, seed=4, shard_size=1000)
    assert not np.array_equal(full.codes(), other.codes())


def test_queries_are_held_out_but_have_near_neighbours(tmp_path):
    coll = generate_collection(tmp_path / "c", 4000, 64, 32, seed=0)
    codes, feats, groups = make_queries(coll, 30, seed=0)
    assert codes.shape == (30, 4) and feats.shape == (30, 64) and feats.dtype == np.float32
    db = coll.features(np.arange(coll.n))
    d = ((feats[:, None, :] - db[None]) ** 2).sum(-1)
    assert d.min() > 0                                            # no query is a database row
    # each query's nearest rows are mostly fellow members of its near-duplicate group
    spec = SyntheticSpec(**coll.manifest["synthetic"])
    from hashsearch.bench.synthetic import SyntheticModel
    row_group = SyntheticModel(spec).row_group
    same = row_group[np.argsort(d, 1)[:, :5]] == groups[:, None]
    assert same.mean() > 0.9
    again, _, _ = make_queries(coll, 30, seed=0)
    np.testing.assert_array_equal(codes, again)


def test_real_collection_queries_are_sampled_rows(bench):
    cache, _ = bench
    root = cache / SyntheticSpec(n=3000, dim=64, bits=32).name
    r = run_exhaustive_bench(collection=root, batch=1, pool=100, coarse="flat", cache_dir=cache,
                             exhaustive_queries=2, **{**SMALL, "n": 1})
    assert r["n"] == 3000 and "collection rows" in r["source"]
    rows = np.array(r["query_rows"])
    assert len(rows) == 20 and len(set(rows.tolist())) == 20
    np.testing.assert_array_equal(np.array(r["top10"]["exhaustive"])[:, 0], rows)   # each finds itself first
    assert Collection.open(root).n == 3000


def test_scaling_runs_each_size_and_plots(tmp_path):
    results = run_scaling(ns=(1000, 2000), dim=32, bits=16, queries=8, batch=4, pool=30, coarse="flat",
                          cache_dir=tmp_path, exhaustive_queries=2, progress=False)
    assert [r["n"] for r in results] == [1000, 2000]
    png = tmp_path / "scaling.png"
    plot_scaling(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_passes_the_coarse_index_settings_through(tmp_path):
    from conftest import cli
    out = tmp_path / "r.json"
    cli("bench", "--exhaustive", "--n", 2000, "--dim", 32, "--bits", 32, "--queries", 8, "--batch", 4,
        "--coarse", "multihash", "--hash-bits", 8, "--nhash", 3, "--nflip", 1, "--pool", 20,
        "--cache-dir", tmp_path, "--json", out)
    r = json.loads(out.read_text())
    assert r["coarse"] == {"kind": "multihash", "hash_bits": 8, "nhash": 3, "nflip": 1}
    assert (r["n"], r["queries"], r["batch"], r["pool"]) == (2000, 8, 4, 20)
    cli("bench", "--exhaustive", "--n", 2000, "--dim", 32, "--bits", 32, "--coarse", "multihash",
        "--hash-bits", 40, "--cache-dir", tmp_path, ok=False)


def test_pool_0_without_a_neighbour_source_is_refused_before_any_work(tmp_path):
    from conftest import cli
    for extra in (("--neighbour-pool", 0), ("--radius", 4), ("--neighbour-bits", 0)):
        result = cli("bench", "--exhaustive", "--n", 2000, "--dim", 32, "--bits", 32, "--pool", 0, *extra,
                     "--cache-dir", tmp_path, ok=False)
        assert "--pool 0 searches the neighbour codes or the cells alone" in result.stderr
    assert not list(tmp_path.iterdir())        # nothing generated


def test_radius_bounds_the_hierarchical_pool(tmp_path):
    from conftest import cli
    runs = {}
    for radius in (None, 6):
        out = tmp_path / f"r{radius}.json"
        cli("bench", "--exhaustive", "--n", 2000, "--dim", 32, "--bits", 32, "--queries", 8, "--batch", 1,
            "--coarse", "flat", "--pool", 50, "--neighbour-pool", 0, "--synthetic-codes", "projection", *(("--radius", radius) if radius is not None else ()),
            "--cache-dir", tmp_path, "--json", out)
        runs[radius] = json.loads(out.read_text())
    r = runs[6]
    assert r["radius"] == 6 and runs[None]["radius"] is None
    assert 0 < r["mean_candidates"] < runs[None]["mean_candidates"] == 50
    coll = Collection.open(r["collection"])
    codes, _, _ = make_queries(coll, 8, 0)
    hds = np.array(r["top10"]["hierarchical"])
    found = hds >= 0
    ham = np.unpackbits(codes[:, None, :] ^ coll.codes()[np.where(found, hds, 0)], axis=-1).sum(-1)
    assert found.any() and (ham[found] <= 6).all()
    # binary search is a plain top-10 Hamming ranking either way
    assert r["top10"]["binary"] == runs[None]["top10"]["binary"]


def test_encode_bench_times_model_and_pipeline_on_the_same_images(model, tmp_path):
    from conftest import cli
    out = tmp_path / "enc.json"
    r = cli("bench", "--encode", "synthetic:96", "--model", model, "--limit", 64, "--batch-size", 32,
            "--workers", 0, "--precision", "fp32", "--json", out)
    res = json.loads(out.read_text())
    assert res["images"] == 64 and res["precision"] == "fp32" and res["backbone"] == "small"
    assert res["model_images_per_s"] > 0 and res["pipeline_images_per_s"] > 0
    assert res["ratio"] == pytest.approx(res["pipeline_images_per_s"] / res["model_images_per_s"], rel=0.01)
    assert "pipeline / model" in r.output
