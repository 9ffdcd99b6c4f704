import numpy as np
import pytest

from hashsearch.bench.baselines import fit_baseline, itq_codes, lsh_codes, write_baseline_collection
from hashsearch.bench.evaluate import evaluate, format_table
from hashsearch.bench.metrics import mean_average_precision, pr_curve_hamming, precision_within_radius, rank_by_hamming
from hashsearch.bench.plots import plot_precision_at_k, plot_pr_curve
from hashsearch.codes import pack_codes
from hashsearch.errors import HashsearchError
from hashsearch.shards import Collection, CollectionWriter

DIM, BITS, CLASSES = 32, 16, 8


def clustered(n, seed, centers):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    feats = centers[labels] + rng.normal(size=(n, DIM))
    return np.maximum(feats, 0).astype(np.float32), labels     # non-negative, like post-ReLU F7


def write(root, codes, feats, labels, first_id=0):
    n = len(feats)
    ids = np.arange(first_id, first_id + n)
    w = CollectionWriter(root, bits=codes.shape[1] * 8, feature_dim=feats.shape[1], feature_dtype="float32",
                         shard_size=max(1, n // 2 + 1), meta={"source": "synthetic"})
    w.add(codes, feats, ids, labels, [f"img{i}.jpg" for i in ids], source_end=n)
    w.finish()
    return Collection.open(root)


@pytest.fixture(scope="module")
def data():
    centers = np.random.default_rng(0).normal(scale=2.5, size=(CLASSES, DIM)) + 2
    db_f, db_l = clustered(400, 1, centers)
    q_f, q_l = clustered(60, 2, centers)
    return db_f, db_l, q_f, q_l


@pytest.fixture(scope="module")
def pair(tmp_path_factory, data):
    """Codes from the sign of a random projection of centred features."""
    db_f, db_l, q_f, q_l = data
    proj = np.random.default_rng(5).normal(size=(DIM, BITS))
    mean = db_f.mean(0)
    enc = lambda f: pack_codes((f - mean) @ proj > 0)
    root = tmp_path_factory.mktemp("pair")
    return write(root / "db", enc(db_f), db_f, db_l), write(root / "q", enc(q_f), q_f, q_l, first_id=10_000)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory, data):
    db_f, db_l, q_f, q_l = data
    rng = np.random.default_rng(9)
    root = tmp_path_factory.mktemp("random")
    rand = lambda n: rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)
    return write(root / "db", rand(len(db_f)), db_f, db_l), write(root / "q", rand(len(q_f)), q_f, q_l)


def test_evaluate_keys_and_ordering(pair, random_pair):
    db, q = pair
    results = evaluate(db, q, topk=50)
    assert [r["mode"] for r in results] == ["bcs", "es", "hds"]
    for r in results:
        assert {"mode", "map", "precision_at_k", "precision_hamming2", "n_queries", "n_database",
                "topk", "seconds"} <= set(r)
        assert r["n_queries"] == 60 and r["n_database"] == 400 and r["topk"] == 50
        assert list(r["precision_at_k"]) == [str(k) for k in range(1, 51)]
        assert r["map"] > 2 / CLASSES                  # every mode retrieves by class, well above chance
    by = {r["mode"]: r for r in results}
    assert by["es"]["precision_hamming2"] is None
    assert by["bcs"]["precision_hamming2"] == by["hds"]["precision_hamming2"]
    assert by["bcs"]["precision_hamming2"] == pytest.approx(
        precision_within_radius(q.codes(), db.codes(), q.labels(), db.labels(), 2))
    rand = {r["mode"]: r for r in evaluate(*random_pair, modes=("bcs",), topk=50)}
    # Clustered F7 retrieves by class; random codes are at chance (about 1/8).
    assert by["es"]["map"] > 0.9
    assert rand["bcs"]["map"] < 0.4 < by["bcs"]["map"]
    assert by["es"]["map"] > rand["bcs"]["map"]
    table = format_table(results)
    assert "mAP@50" in table and "P@10" in table and "hds" in table


def test_bcs_matches_direct_computation(pair):
    db, q = pair
    (res,) = evaluate(db, q, modes=("bcs",), topk=30)
    rows, _ = rank_by_hamming(q.codes(), db.codes(), 30, db.ids())
    rel = db.labels()[rows] == q.labels()[:, None]
    assert res["map"] == pytest.approx(mean_average_precision(rel))
    assert res["precision_at_k"]["30"] == pytest.approx(rel.mean())


def test_hds_with_full_pool_is_exhaustive(pair):
    db, q = pair
    es, hds = evaluate(db, q, modes=("es", "hds"), topk=40, pool=db.n)
    assert hds["map"] == pytest.approx(es["map"])
    assert hds["precision_at_k"] == pytest.approx(es["precision_at_k"])


def test_hds_pool_equal_topk_keeps_bcs_set(pair):
    db, q = pair
    bcs, hds = evaluate(db, q, modes=("bcs", "hds"), topk=40, pool=40)
    # Same 40 items per query, reordered: P@40 agrees, mAP may not.
    assert hds["precision_at_k"]["40"] == pytest.approx(bcs["precision_at_k"]["40"])


def test_hds_continues_in_hamming_order_past_the_pool(pair):
    db, q = pair
    bcs, hds = evaluate(db, q, modes=("bcs", "hds"), topk=40, pool=1)
    # Reranking a pool of one changes nothing.
    assert hds["map"] == pytest.approx(bcs["map"])
    assert hds["precision_at_k"] == pytest.approx(bcs["precision_at_k"])


def test_map_all_matches_brute_force(pair):
    db, q = pair
    (res,) = evaluate(db, q, modes=("bcs",), topk=10, map_all=True)
    rows, _ = rank_by_hamming(q.codes(), db.codes(), db.n, db.ids())
    rel = db.labels()[rows] == q.labels()[:, None]
    assert res["map_all"] and res["map"] == pytest.approx(mean_average_precision(rel, rel.sum(1)))
    assert len(res["precision_at_k"]) == 10
    assert "mAP@all" in format_table([res])


def test_unlabeled_collection_is_refused(tmp_path, pair, data):
    db, _ = pair
    db_f, _, q_f, q_l = data
    labels = q_l.copy()
    labels[3] = -1
    q = write(tmp_path / "q", np.zeros((len(q_f), BITS // 8), np.uint8), q_f, labels)
    with pytest.raises(HashsearchError, match="eval needs labels"):
        evaluate(db, q)


def test_bad_arguments(pair):
    db, q = pair
    with pytest.raises(HashsearchError, match="unknown mode"):
        evaluate(db, q, modes=("fast",))
    with pytest.raises(HashsearchError, match="topk must be positive, got 0"):
        evaluate(db, q, topk=0)
    with pytest.raises(HashsearchError, match="pool must be positive, got -1"):
        evaluate(db, q, pool=-1)


def test_lsh_and_itq_codes(data):
    db_f, db_l, q_f, q_l = data
    lsh = lsh_codes(db_f, q_f, 16, seed=1)
    itq = itq_codes(db_f, q_f, 16, seed=1)
    assert lsh.shape == itq.shape == (len(q_f), 2) and lsh.dtype == itq.dtype == np.uint8
    np.testing.assert_array_equal(lsh, lsh_codes(db_f, q_f, 16, seed=1))
    assert not np.array_equal(lsh, lsh_codes(db_f, q_f, 16, seed=2))
    with pytest.raises(HashsearchError, match="itq needs bits <= feature dimension, got 64 > 32"):
        itq_codes(db_f, q_f, 64)

    def map_of(method):
        enc = fit_baseline(method, db_f, 16, seed=1)
        rows, _ = rank_by_hamming(enc(q_f), enc(db_f), 50)
        return mean_average_precision(db_l[rows] == q_l[:, None])

    chance = 1 / CLASSES
    assert map_of("itq") > map_of("lsh") > chance
    assert map_of("itq") > 2 * chance


def test_lsh_bits_are_balanced(data):
    db_f = data[0]
    bits = np.unpackbits(lsh_codes(db_f, db_f, 16), axis=1)
    # Median thresholds: each bit is set on about half the training set.
    assert np.all(np.abs(bits.mean(0) - 0.5) < 0.05)


def test_write_baseline_collection_round_trip(tmp_path, pair):
    db, q = pair
    enc = fit_baseline("itq", db.features(np.arange(db.n)), 16)
    out_db = write_baseline_collection(db, tmp_path / "itq-db", "itq", 16, encoder=enc)
    out_q = write_baseline_collection(q, tmp_path / "itq-q", "itq", 16, train_coll=db)
    assert out_db.n == db.n and out_db.bits == 16
    np.testing.assert_array_equal(out_db.ids(), db.ids())
    np.testing.assert_array_equal(out_db.labels(), db.labels())
    np.testing.assert_array_equal(out_db.features(np.arange(db.n)), db.features(np.arange(db.n)))
    assert out_db.paths([0, db.n - 1]) == db.paths([0, db.n - 1])
    assert out_db.manifest["baseline"]["method"] == "itq"
    assert out_db.manifest["source"] == "synthetic"
    # Refit on the same database gives the same query codes as the shared encoder.
    np.testing.assert_array_equal(out_q.codes(), enc(q.features(np.arange(q.n))))
    (res,) = evaluate(out_db, out_q, modes=("bcs",), topk=20)
    assert res["map"] > 2 / CLASSES


def test_write_baseline_collection_resumes_mid_block(tmp_path, pair):
    import json

    from hashsearch.shards import write_manifest
    db, _ = pair
    enc = fit_baseline("lsh", db.features(np.arange(db.n)), 16)
    full = write_baseline_collection(db, tmp_path / "full", "lsh", 16, encoder=enc, block_rows=64)
    # As if killed after the first shard: its end (201) lies inside a 64-row block.
    (tmp_path / "cut").mkdir()
    m = json.loads((tmp_path / "full" / "manifest.json").read_text())
    keep = m["shards"][0]
    assert keep["source_end"] % 64
    (tmp_path / "cut" / "shards").mkdir()
    (tmp_path / "cut" / keep["file"]).write_bytes((tmp_path / "full" / keep["file"]).read_bytes())
    m.update(complete=False, shards=[keep], items=keep["rows"])
    write_manifest(tmp_path / "cut", m)
    resumed = write_baseline_collection(db, tmp_path / "cut", "lsh", 16, encoder=enc, block_rows=64)
    assert resumed.n == db.n
    np.testing.assert_array_equal(resumed.ids(), full.ids())
    np.testing.assert_array_equal(resumed.codes(), full.codes())
    assert resumed.paths(np.arange(db.n)) == full.paths(np.arange(db.n))


def test_plots_write_png(tmp_path, pair):
    db, q = pair
    results = evaluate(db, q, topk=20)
    path = plot_precision_at_k(results, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    curve = pr_curve_hamming(q.codes(), db.codes(), q.labels(), db.labels())
    path = plot_pr_curve({"ours 16 bits": curve}, tmp_path / "pr.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_with_baselines(pair):
    db, q = pair
    results = evaluate(db, q, modes=("bcs",), topk=50, baselines=("lsh", "itq"), baseline_seed=1, baseline_seeds=1)
    assert [r["mode"] for r in results] == ["bcs", "lsh", "itq"]
    by = {r["mode"]: r for r in results}
    for name in ("lsh", "itq"):
        r = by[name]
        assert r["method"] == name and r["bits"] == BITS and r["pool"] is None and r["fit_seconds"] >= 0
        assert set(by["bcs"]) <= set(r) and list(r["precision_at_k"]) == list(by["bcs"]["precision_at_k"])
        assert r["precision_hamming2"] is not None
        assert r["seeds"] == [1] and r["map_per_seed"] == [r["map"]] and r["map_sd"] == 0
    # Same codes, same numbers as the direct computation with the same fitted encoder.
    enc = fit_baseline("itq", db.features(np.arange(db.n)), BITS, seed=1)
    rows, _ = rank_by_hamming(enc(q.features(np.arange(q.n))), enc(db.features(np.arange(db.n))), 50, db.ids())
    assert by["itq"]["map"] == pytest.approx(mean_average_precision(db.labels()[rows] == q.labels()[:, None]))
    chance = 1 / CLASSES
    assert by["itq"]["map"] >= by["lsh"]["map"] > chance
    assert by["itq"]["map"] > 2 * chance
    table = format_table(results)
    assert "lsh" in table.splitlines()[3] and "itq" in table.splitlines()[4]
    assert "±" not in table and len(table.splitlines()) == 5     # one seed: a plain number, no note


def test_baseline_rows_over_seeds(pair):
    db, q = pair
    seeds = 4
    results = evaluate(db, q, modes=("bcs",), topk=50, baselines=("lsh", "itq"), baseline_seeds=seeds)
    db_f, q_f = db.features(np.arange(db.n)), q.features(np.arange(q.n))
    for r in results[1:]:
        assert r["seeds"] == list(range(seeds)) and len(r["map_per_seed"]) == seeds
        per_seed = np.array(r["map_per_seed"])
        assert r["map"] == pytest.approx(per_seed.mean())
        assert r["map_sd"] == pytest.approx(np.std(per_seed, ddof=1))
        assert (r["map_min"], r["map_max"]) == (per_seed.min(), per_seed.max())
        # Each seed's number is that seed's fit, ranked like bcs; the other columns are means over the seeds.
        p_at_50, p_h2 = [], []
        for seed, expected in zip(r["seeds"], per_seed):
            enc = fit_baseline(r["method"], db_f, BITS, seed=seed)
            b_q, b_db = enc(q_f), enc(db_f)
            rows, _ = rank_by_hamming(b_q, b_db, 50, db.ids())
            relevant = db.labels()[rows] == q.labels()[:, None]
            assert expected == pytest.approx(mean_average_precision(relevant))
            p_at_50.append(relevant.mean())
            p_h2.append(precision_within_radius(b_q, b_db, q.labels(), db.labels(), 2))
        assert r["precision_at_k"]["50"] == pytest.approx(np.mean(p_at_50))
        assert r["precision_hamming2"] == pytest.approx(np.mean(p_h2))
        # The seeds give different codes.
        codes = [fit_baseline(r["method"], db_f, BITS, seed=s)(db_f) for s in r["seeds"]]
        assert all(not np.array_equal(codes[0], c) for c in codes[1:])
    # LSH's seeds score differently here; ITQ separates these clusters from every start (mAP 1, sd 0).
    lsh = results[1]
    assert lsh["map_sd"] > 0 and lsh["map_min"] < lsh["map_max"]
    table = format_table(results).splitlines()
    assert f"{lsh['map']:.4f} ± {lsh['map_sd']:.4f}" in table[3] and "±" not in table[2]
    assert table[-1] == "baselines: mean ± sd of mAP@50 over 4 seeds; their other columns are means"
    with pytest.raises(HashsearchError, match="baseline-seeds must be positive, got 0"):
        evaluate(db, q, modes=(), baselines=("lsh",), baseline_seeds=0)


def test_baselines_with_features_loaded_and_other_bits(pair):
    db, q = pair
    # es loads the features; the baselines reuse them and give the same codes as a block-wise encode.
    with_es = evaluate(db, q, modes=("es",), topk=20, baselines=("lsh",), baseline_bits=8)
    alone = evaluate(db, q, modes=(), topk=20, baselines=("lsh",), baseline_bits=8)
    assert [r["mode"] for r in with_es] == ["es", "lsh"] and [r["mode"] for r in alone] == ["lsh"]
    assert with_es[1]["bits"] == 8 and with_es[1]["map"] == pytest.approx(alone[0]["map"])
    with pytest.raises(HashsearchError, match="unknown baseline"):
        evaluate(db, q, baselines=("pq",))
    twelve = evaluate(db, q, modes=(), baselines=("lsh", "itq"), baseline_bits=12)
    assert [r["bits"] for r in twelve] == [12, 12] and all(r["map"] > 1 / CLASSES for r in twelve)
    with pytest.raises(HashsearchError, match="bit length"):
        evaluate(db, q, modes=(), baselines=("lsh",), baseline_bits=0)


def test_cli_eval_with_baselines(tmp_path, pair):
    import json

    from click.testing import CliRunner

    from hashsearch.cli import main
    db, q = pair
    out, png, pr = tmp_path / "out.json", tmp_path / "p.png", tmp_path / "pr.png"
    args = ["eval", str(db.root), "--queries", str(q.root), "--mode", "bcs", "--baselines", "lsh,itq",
            "--baseline-seeds", "3", "--topk", "50", "--json", str(out), "--plot", str(png), "--pr-plot", str(pr)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(out.read_text())
    assert isinstance(data, list) and [r["mode"] for r in data] == ["bcs", "lsh", "itq"]
    # the same numbers as the library call with the same settings
    library = {r["mode"]: r for r in evaluate(db, q, modes=("bcs",), topk=50, baselines=("lsh", "itq"),
                                              baseline_seeds=3)}
    assert [r.get("seeds") for r in data] == [None, [0, 1, 2], [0, 1, 2]]
    assert [r.get("map_sd") for r in data[1:]] == pytest.approx([library[m]["map_sd"] for m in ("lsh", "itq")])
    for r in data:
        assert {"mode", "map", "precision_at_k", "precision_hamming2", "n_queries", "n_database"} <= set(r)
        assert r["n_queries"] == q.n and r["n_database"] == db.n
        assert r["map"] == pytest.approx(library[r["mode"]]["map"])
        assert r["precision_at_k"] == pytest.approx(library[r["mode"]]["precision_at_k"])
    assert png.read_bytes()[:4] == b"\x89PNG" and pr.read_bytes()[:4] == b"\x89PNG"
    assert "itq" in result.output and "lsh" in result.output
    bad = CliRunner().invoke(main, args[:6] + ["--baselines", "lsh,pq"])
    assert bad.exit_code == 1 and "unknown baseline 'pq'" in bad.output
