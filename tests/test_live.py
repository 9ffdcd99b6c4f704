"""Live collections: one writer at a time, generations, add / delete / compact, and the index that follows them."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import live_writer as lw
from conftest import cli, read_collection
from hashsearch import Collection, HashsearchError, Index
from hashsearch.engine.compact import compact
from hashsearch.shards import CollectionWriter, delete_items

WRITER = [sys.executable, str(Path(__file__).with_name("live_writer.py"))]
KINDS = [("flat", {}), ("hash", {"hash_bits": 8, "nflip": 1}), ("multihash", {"hash_bits": 8, "nflip": 0})]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(WRITER + [str(a) for a in args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent)


def finish(*args) -> subprocess.CompletedProcess:
    return subprocess.run(WRITER + [str(a) for a in args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)


_RNG = np.random.default_rng(7)
# Items of the first collection and of the ones tests append (1000-1600), so both parts of the index answer.
QUERY_ITEMS = np.concatenate([_RNG.integers(0, 400, 12), _RNG.integers(1000, 1600, 12)])


def queries(n=24):
    codes, feats, _, _ = lw.item_rows(0, 1600)
    pick = QUERY_ITEMS[:n] if n <= len(QUERY_ITEMS) else np.random.default_rng(n).integers(0, 400, n)
    return codes[pick], feats[pick]


def live_ids(root) -> set[int]:
    with Collection.open(root, allow_empty=True) as coll:
        return set(coll.ids()[coll.live_rows()].tolist())


def fresh_index(root, tmp_path, kind, params) -> Index:
    """A build-index from scratch over a copy of `root`: what the followed index must equal."""
    copy = tmp_path / f"fresh-{time.monotonic_ns()}"
    shutil.copytree(root, copy)
    return Index.build(copy, kind, **params)


def assert_same_search(live: Index, fresh: Index, kind: str):
    codes, feats = queries()
    for mode, pool, radius in (("hds", 20, None), ("bcs", 20, None), ("bcs", 3, None), ("hds", 30, 9)):
        if kind != "flat":
            pool = 1000           # every probed candidate: the same buckets must give the same set
        # a batch (split across threads), and single queries (their own code path)
        for q in [slice(None)] + [slice(i, i + 1) for i in range(0, len(codes), 3)]:
            a = live.search(codes[q], feats[q], 10, mode=mode, pool=pool, radius=radius)
            b = fresh.search(codes[q], feats[q], 10, mode=mode, pool=pool, radius=radius)
            if kind == "flat" or mode == "hds":
                np.testing.assert_array_equal(a.ids, b.ids, err_msg=f"{kind} {mode} radius={radius} {q}")
            # Hash kinds: Hamming ties at the k-th place may be broken differently by the buckets
            np.testing.assert_array_equal(a.hamming, b.hamming, err_msg=f"{kind} {mode} radius={radius} {q}")


# -- the index follows the collection ------------------------------------------------------
@pytest.mark.parametrize("kind, params", KINDS)
def test_after_adds_and_deletes_search_equals_a_fresh_build(tmp_path, kind, params):
    root = tmp_path / "c"
    lw.create(root, 400)
    Index.build(root, kind, **params)
    live = Index.open(root)
    rng = np.random.default_rng(1)
    deleted: set[int] = set()
    for step, op in enumerate(["delete", "append", "delete", "append", "append", "delete"]):
        if op == "append":
            lw.append(root, 1000 + 100 * step, 100)
        else:                       # half of them among the rows added since the build
            ids = np.array(sorted(live_ids(root)))
            doomed = rng.choice(ids[ids < 400], 15, replace=False).tolist() + \
                rng.choice(ids, 15, replace=False).tolist()
            doomed = list(set(doomed))
            delete_items(root, ids=doomed)
            deleted.update(doomed)
            # and added items that queries sit on, so the delta's own search must fetch past them
            with Collection.open(root) as coll:
                live_paths = coll.live_paths()
            near = [p for p in (f"item-{i}" for i in QUERY_ITEMS if i >= 1000) if p in live_paths][:4]
            if near:
                before = live_ids(root)
                delete_items(root, paths=near)
                deleted.update(before - live_ids(root))
        assert live.refresh()
        assert_same_search(live, fresh_index(root, tmp_path, kind, params), kind)
        codes, feats = queries()
        found = live.search(codes, feats, 10, pool=50).ids
        assert not deleted & set(found.ravel().tolist())
    assert not live.refresh()           # nothing newer


def test_build_index_folds_the_delta_in_and_drops_the_tombstones(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 300)
    Index.build(root, "flat")
    lw.append(root, 1000, 50)
    delete_items(root, ids=[3, 4, 5])
    info = cli("info", root, "--json").stdout
    assert '"index_delta": 50' in info and '"deleted": 3' in info
    index = Index.build(root, "flat")
    assert index.meta["ntotal"] == 347 and index._current().hamming.delta is None      # noqa: SLF001 - the fold itself
    assert '"index_delta": 0' in cli("info", root, "--json").stdout


def test_compact_keeps_ids_gives_space_back_and_rebuilds_the_index(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 600)                 # shards of 200
    Index.build(root, "multihash", hash_bits=8)
    before = read_collection(root)
    doomed = list(range(0, 150)) + [450]         # 75% of shard 0, one row of shard 2
    delete_items(root, ids=doomed)
    shard_bytes = sum(p.stat().st_size for p in (root / "shards").iterdir())
    report = compact(root, 0.2)
    assert report["rewritten"] == 1 and report["items"] == 449 and report["deleted"] == 1
    after = read_collection(root)
    keep = ~np.isin(before["ids"], doomed[:150])
    np.testing.assert_array_equal(after["ids"], before["ids"][keep])
    np.testing.assert_array_equal(after["features"], before["features"][keep])
    assert after["paths"] == [p for p, k in zip(before["paths"], keep) if k]
    assert sum(p.stat().st_size for p in (root / "shards").iterdir()) < shard_bytes - 100 * lw.DIM * 2
    live = Index.open(root)
    assert live.kind == "multihash" and live.meta["coarse"]["hash_bits"] == 8
    assert_same_search(live, fresh_index(root, tmp_path, "multihash", {"hash_bits": 8}), "multihash")
    assert cli("info", root, "--verify").exit_code == 0


# -- one writer at a time -----------------------------------------------------------------------
def test_two_writers_started_together_one_refuses_and_the_collection_is_a_single_runs(tmp_path):
    ref = tmp_path / "ref"
    lw.create(ref, 3000)
    expected = read_collection(ref)
    for trial in range(20):
        root = tmp_path / f"c{trial}"
        first = start("create", root, 3000, 0.01)       # about 0.5 s of writing, so the two overlap
        time.sleep(random.uniform(0, 0.1))
        second = start("create", root, 3000, 0.01)
        outs = [p.communicate(timeout=120) for p in (first, second)]
        codes = sorted(p.returncode for p in (first, second))
        assert codes == [0, 1], (trial, outs)
        err = next(e for p, (_, e) in zip((first, second), outs) if p.returncode == 1)
        assert err.strip().count("\n") == 0 and "is being written by another process" in err, err
        got = read_collection(root)
        for key in ("ids", "codes", "features", "labels"):
            np.testing.assert_array_equal(got[key], expected[key])
        assert got["paths"] == expected["paths"] and got["shard_rows"] == expected["shard_rows"]
        with Collection.open(root) as coll:
            assert coll.verify() == []


def test_every_writing_command_fails_at_once_while_another_process_writes(collection_copy, model, tmp_path):
    from conftest import COLL_N, hashsearch_cmd
    root = collection_copy
    (tmp_path / "new").mkdir()
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = start("hold", root)            # another process, holding the lock until told to stop
    assert [holder.stdout.readline().strip() for _ in range(2)] == ["ready", "holding"]
    try:
        for args in (["encode", f"synthetic:{COLL_N}", "--model", model, "--out", root, "--shard-size", 128,
                      "--batch-size", 64, "--workers", 0, "--device", "cpu"],
                     ["add", root, tmp_path / "new"], ["delete", root, "--id", 1], ["compact", root],
                     ["build-index", root]):
            began = time.monotonic()
            r = subprocess.run(hashsearch_cmd() + [str(a) for a in args], capture_output=True, text=True, timeout=120)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, (args, r.stderr)
            assert "is being written by another process" in r.stderr and str(root) in r.stderr
            assert time.monotonic() - began < 30          # at once, not after waiting
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_wait_waits_for_the_writer_instead_of_failing(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 300)
    holder = CollectionWriter.append(root)
    done = threading.Event()
    threading.Timer(0.5, lambda: (holder.finish(), done.set())).start()
    began = time.monotonic()
    delete_items(root, ids=[1], wait=True)
    assert done.is_set() and time.monotonic() - began >= 0.4
    assert 1 not in live_ids(root)


# -- kill -9 at random moments --------------------------------------------------------------------
def test_kill_9_during_add_delete_and_compact_then_rerun(tmp_path):
    base = tmp_path / "base"
    lw.create(base, 1200)
    Index.build(base, "flat")
    ops = [("append", 5000, 1500), ("delete", *range(100, 700, 2)), ("compact", 0.1)]

    def prepared(name):
        root = tmp_path / name
        shutil.copytree(base, root)
        if name.endswith("compact"):
            lw.delete(root, list(range(0, 400, 3)))
        return root

    # How long each operation works once its imports are done, so that the kills land inside it.
    seconds = {}
    for op in ops:
        proc = start(op[0], prepared(f"timing-{op[0]}"), *op[1:])
        assert proc.stdout.readline().strip() == "ready"
        began = time.monotonic()
        assert proc.stdout.readline().strip() == "done"
        seconds[op[0]] = time.monotonic() - began
        proc.communicate()
    killed_mid_op = 0
    for trial in range(24):
        op = ops[trial % 3]
        root = prepared(f"t{trial}-{op[0]}")
        proc = start(op[0], root, *op[1:])
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0, seconds[op[0]]))
        proc.kill()
        out, _ = proc.communicate()
        killed_mid_op += "done" not in out
        with Collection.open(root) as coll:             # opens, and every byte matches its manifest
            assert coll.verify() == [], trial
        Index.open(root).search(*queries(), 5)       # searchable as it is
        rerun = finish(op[0], root, *op[1:])
        assert rerun.returncode == 0, rerun.stderr
        assert_same_search(Index.open(root), fresh_index(root, tmp_path, "flat", {}), "flat")
    assert killed_mid_op >= 10, killed_mid_op


# -- readers never block, never see half a generation or a deleted id -------------------------------
def test_a_reader_in_a_loop_sees_whole_generations_and_never_a_deleted_item(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 400)
    Index.build(root, "flat")
    expected: dict[int, frozenset] = {}

    def record():
        with Collection.open(root) as coll:
            expected[coll.generation] = frozenset(coll.ids()[coll.live_rows()].tolist())

    record()
    codes, feats = queries(40)
    returned_deletes: set[int] = set()
    seen, errors, stop = [], [], threading.Event()

    def reader():
        try:
            index = Index.open(root)
            while not stop.is_set():
                gone = set(returned_deletes)             # deletes that had returned before this refresh
                index.refresh()
                gen = index._current()                  # noqa: SLF001 - one generation, read whole
                res = index.search(codes, feats, 10, pool=40)
                live = frozenset(gen.ids[gen.collection.live_rows()].tolist())
                seen.append((gen.collection.generation, live, gone & set(res.ids.ravel().tolist())))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    rng = np.random.default_rng(3)
    for step in range(5):
        lw.append(root, 2000 + 100 * step, 40)
        record()
        doomed = rng.choice(sorted(live_ids(root)), 25, replace=False).tolist()
        delete_items(root, ids=doomed)
        returned_deletes.update(doomed)
        record()
        compact(root, 0.05)
        record()
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=60)
    assert not errors, errors
    assert len({g for g, _, _ in seen}) >= 3, "the reader should have seen several generations"
    for gen, live, leaked in seen:
        assert not leaked, (gen, leaked)
        assert live == expected[gen], gen


# -- a collection cannot be turned against its reader ---------------------------------------------
def _tamper(root: Path, how: str, other: Path):
    import json
    m = json.loads((root / "manifest.json").read_text())
    # Shard 2 of `root` holds 100 rows; shard 3 of `other`, 100 other rows: a foreign shard that fits.
    foreign = other / json.loads((other / "manifest.json").read_text())["shards"][3]["file"]
    if how == "dotdot":
        m["shards"][2]["file"] = os.path.relpath(foreign, root)
    elif how == "absolute":
        m["shards"][2]["file"] = str(foreign)
    elif how == "symlink":
        target = root / m["shards"][2]["file"]
        target.unlink()
        target.symlink_to(foreign)
    elif how == "fifo":
        target = root / m["shards"][0]["file"]
        target.unlink()
        os.mkfifo(target)
    elif how == "dtype":
        m["feature_dtype"] = "float32"
    elif how == "width":
        m["feature_dim"] = m["feature_dim"] + 1
    elif how in ("rows", "bits", "object"):
        key, value = {"rows": ("rows", "abc"), "bits": ("bits", None), "object": ("feature_dtype", "object")}[how]
        (m["shards"][0] if key == "rows" else m)[key] = value
    elif how == "index":
        m["index"] = json.loads((other / "manifest.json").read_text())["index"]
        shutil.copytree(other / "index", root / "index", dirs_exist_ok=True)
    elif how == "zeroed-index":
        path = root / m["index"]["file"]
        path.write_bytes(bytes(path.stat().st_size))
    elif how == "duplicate-ids":
        import h5py
        with h5py.File(root / m["shards"][1]["file"], "r+") as f:
            f["ids"][0] = 5                         # already the id of a row in shard 0
        from hashsearch.shards.manifest import file_sha256
        m["shards"][1]["sha256"] = file_sha256(root / m["shards"][1]["file"])
    (root / "manifest.json").write_text(json.dumps(m))


HOSTILE = ["dotdot", "absolute", "symlink", "fifo", "dtype", "width", "rows", "bits", "object", "index",
           "zeroed-index", "duplicate-ids"]


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_collection_gives_one_line_and_no_answer(tmp_path, how):
    other = tmp_path / "other"
    lw.create(other, 700)
    Index.build(other, "flat")
    root = tmp_path / "c"
    lw.create(root, 500)
    Index.build(root, "flat")
    _tamper(root, how, other)
    from conftest import hashsearch_cmd
    for args in (["query", root, "--id", "5", "--json"], ["query", root, "--id", "5", "--mode", "es"],
                 ["info", root, "--verify"]):
        if how in ("index", "zeroed-index") and args[0] == "info":
            continue                                    # info does not read the index
        r = subprocess.run(hashsearch_cmd() + [str(a) for a in args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, (how, args, r.stdout)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hashsearch: error:") or \
            (args[0] == "info" and "problem" in r.stdout), (how, args, r.stderr)
        assert "Traceback" not in r.stderr and '"results"' not in r.stdout


def test_duplicate_ids_are_refused_when_written(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 100)
    writer = CollectionWriter.append(root)
    codes, feats, labels, paths = lw.item_rows(500, 3)
    with pytest.raises(HashsearchError, match="ids must be unique and increasing"):
        writer.add(codes, feats, np.array([100, 101, 99]), labels, paths, source_end=3)
    with pytest.raises(HashsearchError, match="ids must be unique and increasing"):
        writer.add(codes, feats, np.array([5, 6, 7]), labels, paths, source_end=3)
    writer.abort()


def test_delete_of_an_unknown_id_deletes_nothing(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 100)
    before = (root / "manifest.json").read_text()
    r = cli("delete", root, "--id", 3, "--id", 12345, ok=False)
    assert "id 12345 is not in collection" in r.stderr
    assert (root / "manifest.json").read_text() == before
    cli("delete", root, "--id", 3)
    r = cli("delete", root, "--id", 3, ok=False)
    assert "was deleted" in r.stderr
    cli("delete", root, "--id", "99999999999999999999999", ok=False)


def test_a_collection_written_before_generations_opens_and_takes_adds(tmp_path):
    import json
    root = tmp_path / "c"
    lw.create(root, 300)
    m = json.loads((root / "manifest.json").read_text())
    for key in ("generation", "next_id", "next_shard", "deleted"):
        del m[key]
    m["version"] = 1
    (root / "manifest.json").write_text(json.dumps(m))
    with Collection.open(root) as coll:
        assert coll.generation == 0 and coll.next_id == 300
    lw.append(root, 1000, 10)
    with Collection.open(root) as coll:
        assert coll.ids()[-10:].tolist() == list(range(300, 310)) and coll.generation == 1


def test_eval_refuses_deleted_items_until_compacted_and_baselines_take_no_generation_keys(tmp_path):
    root = tmp_path / "c"
    lw.create(root, 300)
    Index.build(root, "flat")
    delete_items(root, ids=[1, 2])
    r = cli("eval", root, "--queries", root, "--mode", "bcs", "--topk", 10, ok=False)
    assert "has deleted items" in r.stderr and "compact" in r.stderr
    compact(root, 0.0)
    cli("eval", root, "--queries", root, "--mode", "bcs", "--topk", 10)
    from hashsearch.bench.baselines import write_baseline_collection
    with Collection.open(root) as coll:
        out = write_baseline_collection(coll, tmp_path / "lsh", "lsh", 16)
    assert out.manifest.get("index") is None and out.manifest["generation"] >= 1 and out.items == 298
    assert out.verify() == []


def test_deleted_rows_of_the_delta_are_fetched_past(tmp_path):
    """50 added rows share one code; the first 45 are deleted: a pool of 10 must still find the other 5."""
    root = tmp_path / "c"
    lw.create(root, 200)
    Index.build(root, "flat")
    codes, feats, labels, _ = lw.item_rows(0, 1)
    writer = CollectionWriter.append(root)
    first = writer.manifest["next_id"]
    rng = np.random.default_rng(0)
    writer.add(np.repeat(codes, 50, 0), feats + rng.normal(size=(50, lw.DIM)).astype(np.float32),
               np.arange(first, first + 50), np.zeros(50), [f"twin-{i}" for i in range(50)], source_end=50)
    writer.finish()
    delete_items(root, ids=list(range(first, first + 45)))
    live = Index.open(root)
    fresh = fresh_index(root, tmp_path, "flat", {})
    for q in (codes, np.repeat(codes, 3, 0)):            # one query, and a batch
        a = live.search(q, None, 10, mode="bcs")
        b = fresh.search(q, None, 10, mode="bcs")
        np.testing.assert_array_equal(a.ids, b.ids)
        assert set(range(first + 45, first + 50)) <= set(a.ids[0].tolist())
