"""The neighbour codes: hds finds an edited copy's original where H's class-level pool misses it,
and collections indexed before the neighbour codes existed still open and search."""
from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from conftest import cli, manifest
from hashsearch.bench.near_duplicates import EDITS
from hashsearch.config import SearchConfig
from hashsearch.encoders.images import load_image
from hashsearch.engine import Index
from hashsearch.engine.cells import cells_for
from hashsearch.engine.neighbours import fit_projection
from hashsearch.errors import HashsearchError
from hashsearch.retrieval import query_encoder

FMNIST = "/usr/share/datasets/fashion-mnist"
N_IMAGES = 1500
# Pools far below the collection's size, so that H's codes must really find the original.
SMALL_POOLS = SearchConfig(k=10, pool=15, neighbour_pool=15)


@pytest.fixture(scope="module")
def fashion_collection(tmp_path_factory, model):
    """1,500 Fashion-MNIST test images as PNG files, encoded by the session's 16-bit model and indexed."""
    if not os.path.isdir(FMNIST):
        pytest.skip("dataset-fashion-mnist not installed (make data installs it)")
    from hashsearch.encoders.sources import open_source
    base = tmp_path_factory.mktemp("fashion")
    source = open_source("fashion-mnist:test", limit=N_IMAGES)
    labels = source.labels()
    for i in range(N_IMAGES):
        folder = base / "photos" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        source.load(i).save(folder / f"{i:05d}.png")
    root = base / "coll"
    cli("encode", base / "photos", "--model", model, "--out", root, "--workers", 0, "--device", "cpu", "--quiet")
    cli("build-index", root)
    return root


def _edited_copies(index, n: int = 60):
    coll = index.collection
    rows = np.random.default_rng(0).choice(coll.n, n, replace=False)
    images = [load_image(p) for p in coll.paths(rows)]
    edits = ("jpeg", "brightness", "crop")
    codes, feats = query_encoder(coll).encode([EDITS[e](im) for e in edits for im in images])
    return codes, feats, np.tile(coll.ids()[rows], len(edits))


def test_an_edited_copy_is_found_as_exhaustive_search_finds_it(fashion_collection):
    with Index.open(fashion_collection) as index:
        assert index.meta["neighbour_bits"] == 256
        codes, feats, wanted = _edited_copies(index)
        top1 = {}
        for name, params in (("es", SearchConfig(k=10, mode="es")), ("hds", SMALL_POOLS),
                             ("H alone", SearchConfig(k=10, pool=15, neighbour_pool=0))):
            top1[name] = float((index.search(codes, feats, params).ids[:, 0] == wanted).mean())
    assert top1["es"] > 0.3, top1       # the session model is weak, but its F7 tells copies apart
    assert top1["hds"] >= top1["es"] - 0.03, top1
    assert top1["H alone"] < top1["hds"] - 0.1, top1       # what the neighbour pool is for


def test_hds_recall_of_the_exact_top_10(fashion_collection):
    with Index.open(fashion_collection) as index:
        rows = np.arange(0, N_IMAGES, 50)
        codes, feats = index.codes[rows], index.collection.features(rows)
        exact = index.search(codes, feats, SearchConfig(k=10, mode="es")).ids
        found = index.search(codes, feats, SearchConfig(k=10, pool=15, neighbour_pool=60)).ids
        alone = index.search(codes, feats, SearchConfig(k=10, pool=75, neighbour_pool=0)).ids     # as many rows
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    recall_alone = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(alone, exact)])
    assert recall >= 0.8 and recall > recall_alone + 0.1, (recall, recall_alone)


def test_eval_near_duplicates_reports_every_ranking_and_edit(fashion_collection, tmp_path):
    out = tmp_path / "nd.json"
    result = cli("eval", fashion_collection, "--near-duplicates", 40, "--json", out)
    report = json.loads(out.read_text())
    assert report["originals"] == 40 and report["edits"] == list(EDITS)
    assert set(report["rankings"]) == {"bcs", "es", "hds", "hds, H pool only"}
    for rates in report["rankings"].values():
        assert set(rates) == {"all", *EDITS} and all(0 <= r["top1"] <= r["top10"] <= 1 for r in rates.values())
    es, hds = report["rankings"]["es"]["all"], report["rankings"]["hds"]["all"]
    assert hds["top1"] >= es["top1"] - 0.05
    assert "| hds |" in result.stdout
    # the search takes eval's pools: with no neighbour pool, hds is H's pool alone
    cli("eval", fashion_collection, "--near-duplicates", 40, "--neighbour-pool", 0, "--pool", 50, "--json", out)
    report = json.loads(out.read_text())
    assert report["neighbour_pool"] == 0 and report["pool"] == 50
    assert report["rankings"]["hds"] == report["rankings"]["hds, H pool only"]


def test_eval_near_duplicates_needs_image_files(collection):
    # synthetic:N items have no image file to edit
    cli("eval", collection, "--near-duplicates", 5, ok=False)
    cli("eval", collection, "--near-duplicates", 5, "--queries", collection, ok=False)


def test_an_index_without_neighbour_codes_still_opens_and_searches(collection_copy):
    """Indexes built before the neighbour codes have none of their keys: hds is then H's pool alone."""
    cli("build-index", collection_copy, "--neighbour-bits", 0)
    m = manifest(collection_copy)
    assert not any(key.startswith(("neighbour", "projection")) for key in m["index"])
    with Index.open(collection_copy) as index:
        codes, feats = index.codes[:5], index.collection.features(np.arange(5))
        old = index.search(codes, feats, 10)
        paper = index.search(codes, feats, 10, neighbour_pool=0)
        np.testing.assert_array_equal(old.ids, paper.ids)
        assert (old.ids[:, 0] == index.ids[:5]).all()
    cli("eval", collection_copy, "--queries", collection_copy, "--topk", 20)
    # one command upgrades it, and the manifest records the new index's neighbour codes
    cli("build-index", collection_copy)
    assert manifest(collection_copy)["index"]["neighbour_bits"] == 256
    assert cli("query", collection_copy, "--id", 3, "--json").exit_code == 0


def test_later_builds_keep_the_projection_unless_refit(collection_copy):
    cli("build-index", collection_copy)
    first = manifest(collection_copy)["index"]["projection_sha256"]
    cli("add", collection_copy, "synthetic:360", "--workers", 0, "--quiet")
    cli("build-index", collection_copy)
    assert manifest(collection_copy)["index"]["projection_sha256"] == first
    cli("build-index", collection_copy, "--refit")
    assert manifest(collection_copy)["index"]["projection_sha256"] != first


def test_later_builds_and_compact_keep_the_cells_and_their_measured_sources_unless_refit(collection_copy,
                                                                                          monkeypatch):
    from hashsearch.engine import tuning
    monkeypatch.setattr(tuning, "MIN_TUNING_ROWS", 100)      # measure this 300-row collection
    cli("build-index", collection_copy, "--refit")
    first = manifest(collection_copy)["index"]
    assert first["tuned"]["queries"] == 200 and first["cells"] == cells_for(300)
    cli("add", collection_copy, "synthetic:360", "--workers", 0, "--quiet")
    cli("delete", collection_copy, "--id", 1, "--id", 3)
    for step in (("build-index", collection_copy), ("compact", collection_copy, "--threshold", 0)):
        cli(*step)
        kept = manifest(collection_copy)["index"]
        assert (kept["cells_sha256"], kept["tuned"]) == (first["cells_sha256"], first["tuned"]), step
    cli("build-index", collection_copy, "--refit")
    refit = manifest(collection_copy)["index"]
    live = manifest(collection_copy)["items"]
    assert refit["cells_sha256"] != first["cells_sha256"] and refit["cells"] == cells_for(live) != first["cells"]
    assert refit["tuned"]["measured"] != first["tuned"]["measured"]


def test_retune_measures_again_keeping_the_cells_and_drops_a_measurement_it_cannot_repeat(collection_copy,
                                                                                            monkeypatch):
    from hashsearch.engine import tuning
    monkeypatch.setattr(tuning, "MIN_TUNING_ROWS", 100)
    cli("build-index", collection_copy, "--refit")
    first = manifest(collection_copy)["index"]
    monkeypatch.setattr(tuning, "SETTINGS", ((0, 2), (250, 0)))
    cli("build-index", collection_copy, "--retune")
    again = manifest(collection_copy)["index"]
    assert again["cells_sha256"] == first["cells_sha256"] and again["projection_sha256"] == first["projection_sha256"]
    assert [(m["neighbour_pool"], m["neighbour_cells"]) for m in again["tuned"]["measured"]] == [(0, 2), (250, 0)]
    monkeypatch.setattr(tuning, "MIN_TUNING_ROWS", 10_000)     # now too small to measure: no stale choice stays
    cli("build-index", collection_copy, "--retune")
    assert "tuned" not in manifest(collection_copy)["index"]


def test_compact_after_every_item_is_deleted_from_a_collection_indexed_before_the_cells(collection_copy):
    m = manifest(collection_copy)
    m["index"] = {k: v for k, v in m["index"].items() if not k.startswith(("cells", "tuned"))}
    (collection_copy / "manifest.json").write_text(json.dumps(m))
    cli("delete", collection_copy, "--ids-file", _ids_file(collection_copy))
    cli("compact", collection_copy, "--threshold", 0)
    assert manifest(collection_copy)["items"] == 0 and "cells" not in manifest(collection_copy)["index"]


def _ids_file(root):
    with Index.open(root) as index:
        path = root.parent / "all-ids.txt"
        path.write_text("\n".join(map(str, index.ids.tolist())) + "\n")
    return path


def test_neighbour_bits_are_checked(collection_copy):
    cli("build-index", collection_copy, "--neighbour-bits", 12, ok=False)      # not whole bytes
    cli("build-index", collection_copy, "--neighbour-bits", 4096, ok=False)    # more than F7's 512 dimensions
    with pytest.raises(HashsearchError, match="neighbour bits"):
        fit_projection(np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32), 24)


def test_a_damaged_projection_is_refused(collection_copy):
    cli("build-index", collection_copy)
    path = collection_copy / manifest(collection_copy)["index"]["projection_file"]
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    result = cli("query", collection_copy, "--id", 3, ok=False)
    assert "neighbour projection" in result.stderr and "build-index" in result.stderr


def test_eval_ranks_hds_as_query_does(fashion_collection, tmp_path):
    """eval's hds adds the index's neighbour pool, and its top ranks are those of Index.search."""
    out = tmp_path / "eval.json"
    cli("eval", fashion_collection, "--queries", fashion_collection, "--mode", "hds", "--topk", 10, "--pool", 15,
        "--neighbour-pool", 15, "--json", out)
    row = json.loads(out.read_text())[0]
    assert row["mode"] == "hds" and row["neighbour_pool"] == 15
    from hashsearch.bench.evaluate import evaluate
    from hashsearch.shards import Collection
    with Collection.open(fashion_collection) as db:
        alone = evaluate(db, db, modes=("hds",), topk=10, pool=15, neighbour_pool=0)[0]
    assert alone["neighbour_pool"] == 0 and alone["map"] != row["map"]


def test_rows_of_the_neighbour_pool_alone_take_only_the_first_places(fashion_collection):
    with Index.open(fashion_collection) as index:
        rows = np.arange(0, N_IMAGES, 100)
        codes, feats = index.codes[rows], index.collection.features(rows)
        deep = index.search(codes, feats, SearchConfig(k=60, pool=15, neighbour_pool=60, neighbour_places=5))
        top = index.search(codes, feats, SearchConfig(k=5, pool=15, neighbour_pool=60, neighbour_places=5))
        _, h_pool = index.candidates(codes, 60)
    np.testing.assert_array_equal(deep.ids[:, :5], top.ids)
    for q in range(len(rows)):
        later = deep.rows[q, 5:]
        assert np.isin(later[later >= 0], h_pool[q]).all()
        assert (np.diff(deep.distances[q, 5:][later >= 0]) >= 0).all()     # still by L2
    assert (deep.rows[:, 5:20] >= 0).all()


def test_the_neighbour_index_kind_is_chosen_and_kept_by_compact(collection_copy):
    assert manifest(collection_copy)["index"]["neighbour_coarse"]["kind"] == "flat"       # the default
    cli("build-index", collection_copy, "--coarse", "multihash", "--neighbour-coarse", "multihash")
    cli("delete", collection_copy, "--id", 0, "--id", 2, "--id", 4)
    cli("compact", collection_copy, "--threshold", 0)
    index = manifest(collection_copy)["index"]
    assert index["coarse"]["kind"] == index["neighbour_coarse"]["kind"] == "multihash"
    with Index.open(collection_copy) as opened:
        assert opened.search(opened.codes[:3], opened.collection.features(np.arange(3)), 5).ids.shape == (3, 5)


def test_the_sketch_shortlist_answers_as_the_full_rerank_on_real_images(fashion_collection, monkeypatch):
    """hds reranks by L2 on F7 only the union's nearest rows in the sketch (engine/sketch.py), and finds what
    reranking the whole union finds; an index whose F7 stays on disk has no sketch and reranks it all."""
    from hashsearch.shards import RowReader
    gathered = []
    real_gather = RowReader.gather
    monkeypatch.setattr(RowReader, "gather", lambda self, rows, out, buffer: (gathered.append(len(rows)),
                                                                              real_gather(self, rows, out, buffer)))
    params = SearchConfig(k=10, pool=15, neighbour_pool=200)
    with Index.open(fashion_collection) as index, Index.open(fashion_collection, features_in_ram_mb=0) as whole:
        rows = np.arange(0, N_IMAGES, 5)
        codes, feats = index.codes[rows], index.collection.features(rows)
        gathered.clear()
        shortlisted = index.search(codes, feats, params)
        assert max(gathered) <= 60 and len(gathered) == len(rows), gathered[:5]
        gathered.clear()
        reranked = whole.search(codes, feats, params)
        assert min(gathered) > 60
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(shortlisted.ids, reranked.ids)])
    assert same >= 0.99, same
    assert (shortlisted.ids[:, 0] == reranked.ids[:, 0]).mean() >= 0.99


def test_the_sketch_holds_each_rows_projection_and_a_refresh_projects_only_new_shards(collection_copy):
    with Index.open(collection_copy) as index:
        before = index._current().sketch
        assert before is not None and before.usable() and len(before.parts) == 3
        cli("add", collection_copy, "synthetic:340", "--workers", 0, "--device", "cpu", "--quiet")
        index.refresh()
        gen = index._current()
        assert gen.sketch.usable() and len(gen.sketch.parts) == 4 and all(new is old for new, old in zip(gen.sketch.parts, before.parts))
        rows = np.random.default_rng(0).permutation(gen.collection.n)
        codes = np.empty((len(rows), gen.sketch.bits // 2), np.uint8)
        gen.sketch.gather(rows, codes)
        got = gen.sketch.values(codes)
        feats = gen.collection.features(rows).astype(np.float32)
    want = gen.neighbours.projection.project(feats)
    # 4 bits a value, in ranges fitted once: a value is within half a step of its range's nearest level
    assert gen.sketch.quantizer is before.quantizer
    low, width = faiss.vector_to_array(gen.sketch.quantizer.sq.trained).reshape(2, -1)
    assert (np.abs(got - np.clip(want, low, low + width)) <= width / 15 / 2 * 1.001 + 1e-5).all()
    # the projection is orthonormal: a sketch distance is the part of the F7 distance in its directions
    assert (((want[1:] - want[:-1]) ** 2).sum(1) <= ((feats[1:] - feats[:-1]) ** 2).sum(1) * 1.0001 + 1e-4).all()


def test_features_too_large_for_a_sketch_get_none_and_the_whole_pool_is_reranked(collection):
    from hashsearch.engine.neighbours import NeighbourProjection
    from hashsearch.engine.sketch import build_sketch
    with Index.open(collection) as index:
        gen = index._current()
        p = gen.neighbours.projection
        assert build_sketch(gen.collection, gen.reader, p, None).usable()
        huge = NeighbourProjection(p.matrix * 1e18, p.offset * 1e18)
        assert not build_sketch(gen.collection, gen.reader, huge, None).usable()


def test_the_cells_find_an_edited_copy_where_hs_pool_misses_it(fashion_collection):
    """The sketch's cells alone (no neighbour codes' pool) bring an edited copy's original into the pool."""
    with Index.open(fashion_collection) as index:
        assert index.meta["cells"] == 32        # the power of two nearest sqrt(1,500)
        codes, feats, wanted = _edited_copies(index)
        top1 = {}
        for name, params in (("es", SearchConfig(k=10, mode="es")),
                             ("cells", SearchConfig(k=10, pool=15, neighbour_cells=2)),
                             ("H alone", SearchConfig(k=10, pool=15, neighbour_pool=0))):
            top1[name] = float((index.search(codes, feats, params).ids[:, 0] == wanted).mean())
    assert top1["cells"] >= top1["es"] - 0.03, top1
    assert top1["H alone"] < top1["cells"] - 0.1, top1


def test_build_index_records_the_setting_it_measured_best_and_searches_use_it(fashion_collection):
    from hashsearch.engine.tuning import CELLS_ALONE_RECALL, SETTINGS, TUNED_RECALL
    with Index.open(fashion_collection) as index:
        tuned = index.meta["tuned"]
        measured = tuned["measured"]
        assert [(m["neighbour_pool"], m["neighbour_cells"]) for m in measured] == list(SETTINGS)
        chosen = next(m for m in measured if (m["neighbour_pool"], m["neighbour_cells"]) ==
                      (tuned["neighbour_pool"], tuned["neighbour_cells"]))
        # the fastest at TUNED_RECALL, or at CELLS_ALONE_RECALL for settings of cells alone
        passing = [m for m in measured
                   if m["recall"] >= (TUNED_RECALL if m["neighbour_pool"] else CELLS_ALONE_RECALL)]
        if passing:
            assert chosen["ms"] == min(m["ms"] for m in passing) and chosen in passing
        else:
            assert chosen["recall"] == max(m["recall"] for m in measured)
        rows = np.arange(0, N_IMAGES, 30)
        codes, feats = index.codes[rows], index.collection.features(rows)
        # unset, both sources come from the record; setting one leaves the other at 0
        index._current().meta["tuned"] = {**tuned, "neighbour_pool": 0, "neighbour_cells": 1}
        default = index.search(codes, feats, SearchConfig(k=10, pool=15))
        np.testing.assert_array_equal(default.ids, index.search(codes, feats, SearchConfig(
            k=10, pool=15, neighbour_pool=0, neighbour_cells=1)).ids)
        assert (default.ids != index.search(codes, feats, SearchConfig(k=10, pool=15, neighbour_pool=500)).ids).any()
        np.testing.assert_array_equal(
            index.search(codes, feats, SearchConfig(k=10, pool=15, neighbour_pool=0)).ids,
            index.search(codes, feats, SearchConfig(k=10, pool=15, neighbour_pool=0, neighbour_cells=0)).ids)


def test_the_cells_follow_adds_and_deletes(collection_copy):
    with Index.open(collection_copy) as index:
        before = index.collection.n
        gone = index.ids[:40:2].tolist()
        cli("delete", collection_copy, *[a for i in gone for a in ("--id", i)])
        cli("add", collection_copy, "synthetic:340", "--workers", 0, "--device", "cpu", "--quiet")
        assert index.refresh()
        gen = index._current()
        every = SearchConfig(k=5, pool=1, neighbour_cells=gen.meta["cells"])
        assert gen.sketch.usable() and gen.sketch.cells.ivf.ntotal == gen.collection.items
        added = np.arange(before, gen.collection.n)
        found = index.search(gen.codes[added], gen.collection.features(added), every)
        assert (found.rows[:, 0] == added).all()        # an added row is reached through its cell
        deleted = np.arange(0, 40, 2)
        found = index.search(gen.codes[deleted], gen.collection.features(deleted), every)
        assert not np.isin(found.ids, gone).any()


def test_an_index_without_cells_still_opens_and_searches_with_the_neighbour_codes(collection_copy):
    m = manifest(collection_copy)
    with Index.open(collection_copy) as index:
        codes, feats = index.codes[:8], index.collection.features(np.arange(8))
        pool500 = index.search(codes, feats, SearchConfig(k=10, neighbour_pool=500)).ids
    m["index"] = {k: v for k, v in m["index"].items() if not k.startswith(("cells", "tuned"))}
    (collection_copy / "manifest.json").write_text(json.dumps(m))
    with Index.open(collection_copy) as index:
        assert index._current().sketch.usable() and index._current().sketch.cells is None
        np.testing.assert_array_equal(index.search(codes, feats, SearchConfig(k=10)).ids, pool500)
    assert cli("query", collection_copy, "--id", 3, "--json").exit_code == 0


def test_a_damaged_cells_file_is_refused(collection_copy):
    path = collection_copy / manifest(collection_copy)["index"]["cells_file"]
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    result = cli("query", collection_copy, "--id", 3, ok=False)
    assert "cell centres" in result.stderr and "build-index" in result.stderr


@pytest.mark.parametrize("tuned", [{"neighbour_pool": -1, "neighbour_cells": 4}, {"neighbour_pool": 0},
                                   {"neighbour_pool": 0, "neighbour_cells": "8"}, ["pool", 500], "no cells"])
def test_a_tampered_tuned_entry_or_a_bad_cell_count_is_refused(collection_copy, tuned):
    m = manifest(collection_copy)
    if tuned == "no cells":     # a choice of sources with no cells to search
        del m["index"]["cells"]
        tuned = {"neighbour_pool": 0, "neighbour_cells": 4}
    m["index"]["tuned"] = tuned
    (collection_copy / "manifest.json").write_text(json.dumps(m))
    for command in (("query", collection_copy, "--id", 3), ("info", collection_copy)):
        result = cli(*command, ok=False)
        assert "tuned" in result.stderr and "build-index" in result.stderr


def test_a_negative_cell_count_is_refused(collection):
    assert "neighbour-cells" in cli("query", collection, "--id", 3, "--neighbour-cells", -1, ok=False).stderr
    with Index.open(collection) as index, pytest.raises(HashsearchError, match="neighbour-cells"):
        index.search(index.codes[:1], index.collection.features(np.arange(1)), 10, neighbour_cells=-1)


def test_pool_0_ranks_the_neighbour_pool_alone_in_every_place(fashion_collection):
    """H's pool off: every result comes from the neighbour codes' pool, by L2, even past --neighbour-places."""
    with Index.open(fashion_collection) as index:
        rows = np.arange(0, N_IMAGES, 100)
        codes, feats = index.codes[rows], index.collection.features(rows)
        params = SearchConfig(k=20, pool=0, neighbour_pool=40, neighbour_places=5)
        found = index.search(codes, feats, params)
        near = index.rerank_pool(codes, feats, params)
        for q in range(len(rows)):
            pool = near[q][near[q] >= 0]
            assert len(pool) == 40
            exact = np.sum((index.collection.features(pool).astype(np.float32) - feats[q]) ** 2, axis=1)
            np.testing.assert_array_equal(found.rows[q], pool[np.argsort(exact, kind="stable")[:20]])
        with_h = index.search(codes, feats, SearchConfig(k=20, pool=200, neighbour_pool=40, neighbour_places=5))
        assert not np.isin(with_h.rows, near).all()     # H's pool does add rows where it is searched


def test_pool_0_needs_a_neighbour_source(fashion_collection, collection_copy):
    with Index.open(fashion_collection) as index:
        codes, feats = index.codes[:2], index.collection.features(np.arange(2))
        for params in (SearchConfig(pool=0, neighbour_pool=0), SearchConfig(pool=0, radius=3)):
            with pytest.raises(HashsearchError, match="pool 0 leaves hds only"):
                index.search(codes, feats, params)
        with pytest.raises(HashsearchError, match="pool 0 is for a search of one index, not across --ray"):
            index.search_pool(codes, feats, SearchConfig(pool=0, neighbour_pool=10))
        assert index.search(codes, feats, SearchConfig(pool=0, mode="bcs")).rows.shape == (2, 10)
    cli("build-index", collection_copy, "--neighbour-bits", 0)
    result = cli("query", collection_copy, "--id", 0, "--pool", 0, ok=False)
    assert "pool 0 leaves hds only" in result.stderr


def test_wide_features_project_one_query_as_a_batch_does():
    """One query's projection uses the matrix stored transposed past BY_BIT_MIN_DIM features; it must give
    the batch's values, or a query's neighbour code would not be the one its own row was indexed with."""
    from hashsearch.engine.neighbours import BY_BIT_MIN_DIM
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, BY_BIT_MIN_DIM)).astype(np.float16)
    p = fit_projection(feats, 64)
    assert p.by_bit is not None and fit_projection(feats[:, :BY_BIT_MIN_DIM // 2], 64).by_bit is None
    batch = p.project(feats)
    one = np.vstack([p.project(feats[i:i + 1]) for i in range(len(feats))])
    np.testing.assert_allclose(one, batch, rtol=1e-4, atol=1e-3)
