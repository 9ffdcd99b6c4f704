"""Hostile input to the engine, the writer and the CLI: no hang, no crash, no silent wrong answer (issue 12)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import live_writer as lw
from conftest import COLL_N, cli, run_process
from hashsearch import HashsearchError, Index


@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    """A live_writer collection with a hash index of 8-bit keys (nflip 1)."""
    root = tmp_path_factory.mktemp("hashed") / "c"
    lw.create(root, 600)
    Index.build(root, "hash", hash_bits=8, nflip=1)
    return root


def one_line_failure(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hashsearch: error:"), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- hangs ---------------------------------------------------------------------------------------
def test_nflip_beyond_the_hash_key_is_refused_not_a_hang(hashed, tmp_path):
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 3)
    for nflip in (9, 1000, -1):
        with pytest.raises(HashsearchError, match="nflip must be an integer from 0 to 8"):
            index.search(codes, feats, 5, nflip=nflip)
    one_line_failure(run_process("query", hashed, "--id", 3, "--nflip", 1000, timeout=60), "nflip")
    one_line_failure(run_process("build-index", hashed, "--coarse", "hash", "--hash-bits", 8, "--nflip", 1000,
                                 "--out", tmp_path / "i", timeout=60), "nflip")


# -- crashes -----------------------------------------------------------------------------------------
def test_a_huge_k_is_capped_at_the_collection_before_anything_is_allocated(hashed):
    r = run_process("query", hashed, "--id", 3, "-k", 10**9, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["queries"][0]["results"]
    assert 0 < len(results) <= 600 and results[0]["id"] == 3
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 2)
    res = index.search(codes, feats, 10**12, mode="bcs", pool=10**12)
    assert res.ids.shape == (2, 600)


def test_a_shard_write_that_fills_the_disk_fails_cleanly_and_resumes(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        script = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
            import live_writer as lw
            from hashsearch.errors import HashsearchError
            try:
                lw.create({str(mount / "c")!r}, 6000)
            except HashsearchError as exc:
                print("error:", exc)
        """)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.returncode, r.stderr)      # -11 was the segfault in the abort path
        assert r.stdout.startswith("error: cannot") and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert not [p for p in (mount / "c").rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
        from hashsearch import Collection
        with Collection.open(mount / "c", require_complete=False, allow_empty=True) as coll:
            assert coll.verify() == [] and 0 < coll.n < 6000         # the finished shards are intact
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_file_name_that_is_not_utf8_is_stored_losslessly_and_shown_readably(tmp_path, model, synthetic_png):
    folder = tmp_path / "photos"
    folder.mkdir()
    raw_name = b"caf\xe9 \xff.png"                    # Latin-1, not UTF-8
    (folder / "plain.png").write_bytes(synthetic_png.read_bytes())
    with open(os.path.join(os.fsencode(folder), raw_name), "wb") as f:
        f.write(synthetic_png.read_bytes())
    out = tmp_path / "coll"
    cli("encode", folder, "--model", model, "--out", out, "--workers", 0, "--device", "cpu", "--quiet")
    cli("build-index", out)
    from hashsearch import Collection
    with Collection.open(out) as coll:
        stored = coll.paths(np.arange(coll.n))
    assert os.fsencode(folder) + b"/" + raw_name in [os.fsencode(p) for p in stored]
    table = run_process("query", out, "--image", synthetic_png, "-k", 2, timeout=120)
    assert table.returncode == 0 and "caf\\xe9 \\xff.png" in table.stdout, table.stderr
    as_json = run_process("query", out, "--image", synthetic_png, "-k", 2, "--json", timeout=120)
    paths = [r["path"] for r in json.loads(as_json.stdout)["queries"][0]["results"]]
    assert any(os.fsencode(p).endswith(raw_name) for p in paths)


# -- tracebacks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--radius", 2147483647], "radius must be an integer from 0 to the code length (32)"),
    (["--radius", 33], "radius must be an integer from 0 to the code length"),
    (["--id", "99999999999999999999999"], "does not fit in 64 bits"),
    (["--id", "12abc"], "is not an integer"),
])
def test_out_of_range_numbers_are_one_line(hashed, args, needle):
    if args[0] != "--id":
        args = ["--id", 3] + args
    r = cli("query", hashed, *args, ok=False)
    assert needle in r.stderr


def test_library_radius_is_checked_too(hashed):
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 1)
    for radius in (-1, 33, 2**31 - 1, 2.5):
        with pytest.raises(HashsearchError, match="radius must be an integer"):
            index.search(codes, feats, 5, radius=radius)


# -- silent wrong answers --------------------------------------------------------------------------------
def test_es_with_a_nan_or_inf_query_is_refused(hashed):
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 2)
    for bad in (np.nan, np.inf):
        feats = feats.copy()
        feats[1, 3] = bad
        for mode in ("es", "hds"):
            with pytest.raises(HashsearchError, match="finite"):
                index.search(codes, feats, 5, mode=mode)


def test_per_call_nflip_never_leaks_into_other_threads(hashed):
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 64)
    expected = {nflip: [index.search(codes[q:q + 1], None, 10, mode="bcs", pool=10, nflip=nflip).ids
                        for q in range(64)] for nflip in (None, 0)}
    assert any(not np.array_equal(a, b) for a, b in zip(expected[None], expected[0]))   # the setting matters
    mismatches, errors = [], []

    def worker(nflip):
        try:
            for _ in range(15):
                for q in range(64):
                    got = index.search(codes[q:q + 1], None, 10, mode="bcs", pool=10, nflip=nflip).ids
                    if not np.array_equal(got, expected[nflip][q]):
                        mismatches.append((nflip, q))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(None if t % 2 else 0,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches, (errors, mismatches[:5], len(mismatches))


def test_a_closed_index_refuses_every_call(hashed):
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 300)
    index.search(codes, feats, 5)                  # starts the thread pool
    index.close()
    for call in (lambda: index.search(codes[:1], feats[:1], 5), lambda: index.search(codes, feats, 5, mode="es"),
                 lambda: index.candidates(codes, 5), index.refresh, lambda: index.collection):
        with pytest.raises(HashsearchError, match="closed"):
            call()
    index.close()                                  # twice is harmless


# -- smaller -------------------------------------------------------------------------------------------------
def test_a_refused_encode_out_leaves_the_directory_as_it_was(tmp_path, model):
    out = tmp_path / "photos-and-notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("encode", f"synthetic:{COLL_N}", "--model", model, "--out", out, "--workers", 0, ok=False)
    assert "not a hashsearch collection" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_outputs_are_checked_before_the_work(tmp_path, collection):
    (tmp_path / "adir").mkdir()
    r = cli("eval", collection, "--queries", collection, "--json", tmp_path / "adir", ok=False)
    assert "is a directory" in r.stderr
    (tmp_path / "afile").write_text("x")
    r = cli("eval", collection, "--queries", collection, "--plot", tmp_path / "afile" / "p.png", ok=False)
    assert "is not a directory" in r.stderr
    r = cli("bench", "--exhaustive", "--n", 100, "--dim", 8, "--json", tmp_path / "adir", ok=False)
    assert "is a directory" in r.stderr
    assert not list(tmp_path.glob("**/.*.tmp"))


# -- issue 29: a damaged manifest never turns a writer against live data --------------------------------
def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _edit_manifest(root: Path, **changes) -> None:
    m = json.loads((root / "manifest.json").read_text())
    m.update(changes)
    (root / "manifest.json").write_text(json.dumps(m))


def test_a_lowered_next_shard_never_overwrites_a_live_shard(tmp_path):
    from hashsearch.engine.compact import compact
    from hashsearch.shards import delete_items
    root = tmp_path / "c"
    lw.create(root, 400)
    delete_items(root, ids=[7, 250])
    compact(root, 0.0)                  # both shards rewritten: shards 2 and 3 live, 0 and 1 retired
    assert [s["file"] for s in json.loads((root / "manifest.json").read_text())["shards"]] == \
        ["shards/shard-00002.h5", "shards/shard-00003.h5"]
    _edit_manifest(root, next_shard=3)
    before = _files(root)
    with pytest.raises(HashsearchError, match="next_shard is 3, but it names shard number 3"):
        lw.append(root, 400, 10)
    assert _files(root) == before


def test_a_lowered_generation_never_rewrites_a_live_tombstone_file(tmp_path):
    from hashsearch.shards import delete_items
    root = tmp_path / "c"
    lw.create(root, 400)
    delete_items(root, ids=[7])
    tombstones = json.loads((root / "manifest.json").read_text())["tombstones"]["file"]
    named = int(tombstones.rsplit("-", 1)[1].split(".")[0])       # tombstones/deleted-GGGGGG.npy
    _edit_manifest(root, generation=named - 1)          # the next delete would write a file of that name
    before = _files(root)
    with pytest.raises(HashsearchError, match="but it names a file of generation"):
        delete_items(root, ids=[3])
    assert _files(root) == before


@pytest.mark.parametrize("where", ["other/index", "other/shards/deeper", "other", "own/elsewhere"])
def test_build_index_out_inside_a_collection_is_refused(tmp_path, where):
    from hashsearch.shards import Collection
    for name in ("own", "other"):
        lw.create(tmp_path / name, 300)
        Index.build(tmp_path / name, "flat").close()
    before = {name: _files(tmp_path / name) for name in ("own", "other")}
    r = cli("build-index", tmp_path / "own", "--out", tmp_path / where, ok=False)
    assert "inside collection" in r.stderr
    assert {name: _files(tmp_path / name) for name in ("own", "other")} == before
    with Collection.open(tmp_path / "other") as coll:
        assert coll.verify() == []
    with Index.open(tmp_path / "other") as index:
        codes, _, _, _ = lw.item_rows(5, 1)
        assert index.search(codes, None, 1, mode="bcs").ids[0, 0] == 5


def test_build_index_out_beside_collections_is_written(tmp_path):
    lw.create(tmp_path / "c", 300)
    cli("build-index", tmp_path / "c", "--out", tmp_path / "indexes" / "c")
    assert (tmp_path / "indexes" / "c" / "index.json").is_file()


def test_an_image_listed_twice_is_added_once(collection_copy, tmp_path):
    from hashsearch.encoders.runner import add_to_collection
    from hashsearch.shards import Collection, delete_items
    from conftest import save_image
    a, b = save_image(tmp_path / "a.png", seed=7), save_image(tmp_path / "b.png", seed=8)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{a}\n{b}\n./a.png\n{a}\n")         # ./a.png is a too, once made absolute
    report = add_to_collection(collection_copy, str(listing), workers=0, device="cpu", quiet=True)
    assert (report["added"], report["skipped"]) == (2, 2)
    with Collection.open(collection_copy) as coll:
        paths = coll.paths(coll.live_rows())
        assert paths.count(str(a)) == 1 and paths.count(str(b)) == 1 and coll.items == COLL_N + 2
    delete_items(collection_copy, paths=[str(a)])
    with Collection.open(collection_copy) as coll:
        assert str(a) not in coll.live_paths() and coll.items == COLL_N + 1


def test_library_misuse_raises_a_hashsearch_error(hashed):
    index = Index.open(hashed)
    codes, feats, _, _ = lw.item_rows(0, 2)
    wide = codes.astype(np.int64)
    for bad in ("abc", wide + 256, wide - 256, codes + 0.5, codes.astype(np.float32), [[1, 2], [3]], [[2**70] * 4]):
        with pytest.raises(HashsearchError, match="query codes"):
            index.search(bad, feats, 5)
    for bad in ("abc", [["x"] * lw.DIM] * 2):
        with pytest.raises(HashsearchError, match="query features"):
            index.search(codes, bad, 5)
    # bytes held in a wider integer type are the same codes
    np.testing.assert_array_equal(index.search(wide, feats, 5).ids, index.search(codes, feats, 5).ids)
    coll = index.collection
    for bad in ([1.7], np.array([1.0]), ["1"], [True], [2**64], "abc"):
        for read in (coll.features, coll.raw_features, coll.paths):
            with pytest.raises(HashsearchError, match="rows must be integers"):
                read(bad)
        with pytest.raises(HashsearchError, match="ids must be integers"):
            coll.rows_for_ids(bad)
    np.testing.assert_array_equal(coll.features(np.array([1], np.uint16)), coll.features([1]))
    assert coll.paths([]) == [] and coll.features([]).shape == (0, lw.DIM)


def test_control_characters_in_stored_names_are_escaped_in_tables(tmp_path):
    from hashsearch.shards import CollectionWriter
    root, n = tmp_path / "c", 20
    codes, feats, labels, paths = lw.item_rows(0, n)
    paths[3], paths[4] = "item-3\n   99  forged row", "item-4\x1b[2J"
    meta = {"source": "x", "source_spec": "list\n          forged: line", "class_names": [f"c{i}\r" for i in range(16)]}
    with CollectionWriter(root, bits=lw.BITS, feature_dim=lw.DIM, shard_size=lw.SHARD, meta=meta) as w:
        w.add(codes, feats, np.arange(n), labels, paths, source_end=n)
        w.finish(n)
    Index.build(root, "flat").close()
    table = cli("query", root, "--id", 3, "-k", n, "--mode", "bcs").stdout
    assert len(table.splitlines()) == 2 + n, table             # the query, the header, a row a result
    assert "item-3\\n   99  forged row" in table and "item-4\\x1b[2J" in table and "c3\\r" in table
    assert not any(c in table for c in "\r\x1b")
    info = cli("info", root).stdout
    assert all(re.fullmatch(r" *[a-z_]+: .*", line) for line in info.splitlines()), info
    assert "list\\n          forged: line" in info
    report = json.loads(cli("query", root, "--id", 3, "-k", n, "--mode", "bcs", "--json").stdout)
    assert {r["path"] for r in report["queries"][0]["results"]} >= {paths[3], paths[4]}     # JSON keeps them whole


class _NeverStartingRay:
    """A connected Ray whose actors never start, as when its worker processes cannot (plasma's mmap failing
    under `ulimit -v`): a wait returns nothing ready, and an unbounded get would never return."""

    class exceptions:
        class RayError(Exception):
            pass
        RayTaskError = RayActorError = ActorUnavailableError = RayError

    def __init__(self):
        self.waits = []

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 2.0}

    def remote(self, *args, **kw):      # ray.remote(cls), actor_class.remote(...), actor.method.remote(...)
        return self

    def options(self, **kw):
        return self

    def __getattr__(self, name):        # actor methods, and their .remote()
        return self

    def wait(self, refs, *, num_returns, timeout):
        self.waits.append(timeout)      # what Ray's wait returns once the timeout has passed
        return [], list(refs)

    def get(self, refs, timeout=None):
        raise AssertionError("an actor that never starts was waited on without a bound")

    def kill(self, actor, no_restart=True):
        pass


def test_ray_actors_that_never_start_are_one_error_in_bounded_time(hashed, model, tmp_path, monkeypatch):
    from hashsearch.config import RayConfig
    from hashsearch.distributed import cluster, encode, search
    ray = _NeverStartingRay()
    for module in (cluster, encode, search):
        monkeypatch.setattr(module, "import_ray", lambda **kw: ray)
    r = cli("query", hashed, "--id", 3, "--ray", ok=False)
    assert "2 of 2 partition actors did not start within 120 s" in r.stderr
    r = cli("query", hashed, "--id", 3, "--ray", "--start-timeout", 0.2, ok=False)
    assert "2 of 2 partition actors did not start within 0.2 s" in r.stderr
    r = cli("encode", "synthetic:4", "--model", model, "--out", tmp_path / "c", "--ray", "--start-timeout", 0.2,
            "--device", "cpu", "--quiet", ok=False)
    assert "2 of 2 encoder actors did not start within 0.2 s" in r.stderr and not (tmp_path / "c").exists()
    assert ray.waits == [RayConfig.start_timeout, 0.2, 0.2] and RayConfig.start_timeout == 120
