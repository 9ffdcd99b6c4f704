"""The on-disk collection: CollectionWriter and Collection, without a model."""
import json
import os

import h5py
import numpy as np
import pytest

from hashsearch.errors import HashsearchError
from hashsearch.shards import Collection, CollectionWriter, read_manifest, write_manifest
from hashsearch.shards import manifest as manifest_mod

BITS, DIM = 24, 6


def rows(n, seed=0, first=0):
    rng = np.random.default_rng(seed)
    ids = np.arange(first, first + n, dtype=np.int64)
    return {"codes": rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8),
            "features": rng.normal(size=(n, DIM)).astype(np.float32),
            "ids": ids, "labels": ids % 7, "paths": [f"dir/ïmg {i}.jpg" for i in ids]}


def write(root, data, *, shard_size=7, dtype="float16", batches=(5, 1, 9, 3), finish=True, **kw):
    w = CollectionWriter(root, bits=BITS, feature_dim=DIM, feature_dtype=dtype, shard_size=shard_size,
                         meta={"source": "test"}, **kw)
    n, a = len(data["ids"]), 0
    sizes = list(batches)
    while a < n:
        b = min(n, a + (sizes.pop(0) if sizes else 4))
        w.add(data["codes"][a:b], data["features"][a:b], data["ids"][a:b], data["labels"][a:b],
              data["paths"][a:b], source_end=int(data["ids"][b - 1]) + 1)
        a = b
    if finish:
        w.finish()
    return w


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    data = rows(23)
    write(tmp_path / "c", data, dtype=dtype)
    with Collection.open(tmp_path / "c") as coll:
        assert coll.n == 23 and len(coll) == 23 and coll.bits == BITS and coll.feature_dim == DIM
        assert coll.feature_dtype == np.dtype(dtype)
        assert [s["rows"] for s in coll.manifest["shards"]] == [7, 7, 7, 2]
        np.testing.assert_array_equal(coll.codes(), data["codes"])
        np.testing.assert_array_equal(coll.ids(), data["ids"])
        np.testing.assert_array_equal(coll.labels(), data["labels"])
        assert coll.paths(np.arange(23)) == data["paths"]
        expect = data["features"].astype(dtype).astype(np.float32)
        feats = coll.features(np.arange(23))
        assert feats.dtype == np.float32
        np.testing.assert_array_equal(feats, expect)
        assert coll.raw_features([3]).dtype == np.dtype(dtype)
        blocks = [(first, block.copy()) for first, block in coll.iter_feature_blocks(block_rows=4)]
        assert [first for first, _ in blocks] == [0, 4, 7, 11, 14, 18, 21]
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]).astype(np.float32), expect)
        assert coll.manifest["complete"] and coll.manifest["items"] == 23
        assert coll.verify() == []


def _raw_at_offset(shard, dtype, dim):
    """The features as the bytes at the shard's recorded offset say: what RowReader's pread reads."""
    with open(shard.path, "rb") as f:
        f.seek(shard.features_offset)
        return np.frombuffer(f.read(shard.rows * dim * np.dtype(dtype).itemsize), dtype).reshape(shard.rows, dim)


def test_features_are_read_by_byte_offset(tmp_path):
    write(tmp_path / "c", rows(23))
    with Collection.open(tmp_path / "c") as coll:
        for shard in coll.shards:
            assert shard.features_offset is not None
            with h5py.File(shard.path) as f:
                assert f["features"].chunks is None and f["features"].compression is None
                np.testing.assert_array_equal(_raw_at_offset(shard, coll.feature_dtype, DIM), f["features"][...])


def test_large_feature_datasets_start_on_a_page(tmp_path):
    # 4 KiB rows: a full 80-row shard and a trimmed 20-row one, both past the alignment threshold
    dim, n = 2048, 100
    w = CollectionWriter(tmp_path / "c", bits=BITS, feature_dim=dim, shard_size=80, meta={"source": "test"})
    data = rows(n)
    w.add(data["codes"], np.zeros((n, dim), np.float32) + np.arange(n)[:, None], data["ids"], data["labels"],
          data["paths"], source_end=n)
    w.finish()
    with Collection.open(tmp_path / "c") as coll:
        assert [s["rows"] for s in coll.manifest["shards"]] == [80, 20]
        for s, path in enumerate(coll.shard_files):
            with h5py.File(path) as f:
                assert f["features"].id.get_offset() % 4096 == 0
            got = _raw_at_offset(coll.shards[s], coll.feature_dtype, dim)
            assert got[:, 0].tolist() == list(range(80 * s, min(n, 80 * (s + 1))))


def test_last_partial_shard_is_trimmed(tmp_path):
    write(tmp_path / "c", rows(23), shard_size=10)
    m = read_manifest(tmp_path / "c")
    assert [s["rows"] for s in m["shards"]] == [10, 10, 3]
    with h5py.File(tmp_path / "c" / m["shards"][-1]["file"]) as f:
        for name in ("codes", "features", "ids", "labels", "paths"):
            assert f[name].shape[0] == 3, name
    with Collection.open(tmp_path / "c") as coll:
        assert coll.shards[2].features_offset is not None and coll.shards[2].rows == 3
    # the trim's temporary files are gone
    assert sorted(p.name for p in (tmp_path / "c" / "shards").iterdir()) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]


def test_capacity_hint_smaller_than_shard(tmp_path):
    data = rows(5)
    w = CollectionWriter(tmp_path / "c", bits=BITS, feature_dim=DIM, shard_size=100)
    w.add(data["codes"], data["features"], data["ids"], data["labels"], data["paths"], source_end=5, capacity_hint=5)
    w.finish()
    with Collection.open(tmp_path / "c") as coll:
        np.testing.assert_array_equal(coll.ids(), data["ids"])


def test_features_in_requested_order_across_shards(tmp_path):
    data = rows(23)
    write(tmp_path / "c", data, dtype="float32")
    want = np.array([22, 0, 7, 6, 13, 14, 0, 21, 6])      # shard boundaries at 7, 14, 21; with repeats
    with Collection.open(tmp_path / "c") as coll:
        np.testing.assert_array_equal(coll.features(want), data["features"][want])
        assert coll.paths(want) == [data["paths"][i] for i in want]
        assert coll.features([]).shape == (0, DIM)
        with pytest.raises(HashsearchError, match="out of range"):
            coll.features([23])
        with pytest.raises(HashsearchError, match="out of range"):
            coll.features([-1])


def test_features_of_unmappable_shards(tmp_path):
    """Shards written by another tool (chunked, compressed) are read through h5py, same answers."""
    data = rows(23)
    root = tmp_path / "c"
    write(root, data, dtype="float32")
    for entry in read_manifest(root)["shards"]:
        path = root / entry["file"]
        with h5py.File(path) as f:
            cols = {k: f[k][...] for k in f}
        with h5py.File(path, "w") as f:
            for k, v in cols.items():
                f.create_dataset(k, data=v, chunks=True, compression="gzip")
    want = np.array([22, 0, 7, 6, 13, 14, 0, 21, 6, 6])
    with Collection.open(root) as coll:
        assert coll.shards[0].features_offset is None
        np.testing.assert_array_equal(coll.features(want), data["features"][want])
        np.testing.assert_array_equal(coll.features(np.arange(23)), data["features"])


def test_ids_lookup(tmp_path):
    data = rows(10, first=100)
    write(tmp_path / "c", data)
    with Collection.open(tmp_path / "c") as coll:
        np.testing.assert_array_equal(coll.rows_for_ids([109, 100, 105]), [9, 0, 5])
        with pytest.raises(HashsearchError, match="id 5 is not in collection"):
            coll.rows_for_ids([100, 5])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_closed_collection_raises_a_hashsearch_error_and_keeps_what_it_holds(tmp_path, dtype):
    """Reads after close (of the collection, or of an Index opened on it) say so, not a TypeError from
    inside numpy or h5py; columns already in RAM still answer."""
    data = rows(23)
    write(tmp_path / "c", data, dtype=dtype)
    coll = Collection.open(tmp_path / "c")
    ids = coll.ids()
    coll.close()
    np.testing.assert_array_equal(coll.ids(), ids)
    for read in (lambda: coll.features([3]), lambda: coll.raw_features([3, 20]), lambda: coll.paths([3]),
                 lambda: coll.codes(), lambda: list(coll.iter_feature_blocks(4))):
        with pytest.raises(HashsearchError, match="is closed"):
            read()


def test_manifest_written_atomically(tmp_path, monkeypatch):
    root = tmp_path / "c"
    write(root, rows(23))
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    before = (root / "manifest.json").read_text()

    def crash(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(manifest_mod.os, "replace", crash)
    with pytest.raises(HashsearchError, match="cannot write .*manifest.json: disk gone"):
        write_manifest(root, {"format": "garbage"})
    # the old manifest is intact: a reader never sees half a file, and the temporary file is gone
    assert (root / "manifest.json").read_text() == before
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert read_manifest(root)["items"] == 23


def test_unfinished_collection(tmp_path):
    root = tmp_path / "c"
    w = write(root, rows(23), finish=False)
    with pytest.raises(HashsearchError, match="unfinished"):
        Collection.open(root)
    coll = Collection.open(root, require_complete=False)
    assert coll.n == 21                  # three full shards; the open fourth is not in the manifest
    w.abort()
    assert not list((root / "shards").glob(".*"))


def test_resume_continues_after_last_shard(tmp_path):
    data = rows(23)
    root = tmp_path / "c"
    w = write(root, {k: v[:10] for k, v in data.items()}, finish=False)
    w.abort()                                   # "crash" with 7 rows in a finished shard, 3 lost
    w = CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=7, meta={"source": "test"})
    assert w.resume_from == 7 and w.rows_written == 7
    rest = {k: v[7:] for k, v in data.items()}
    w.add(rest["codes"], rest["features"], rest["ids"], rest["labels"], rest["paths"], source_end=23)
    w.finish()
    write(tmp_path / "ref", data)
    with Collection.open(root) as a, Collection.open(tmp_path / "ref") as b:
        np.testing.assert_array_equal(a.ids(), b.ids())
        np.testing.assert_array_equal(a.codes(), b.codes())
        np.testing.assert_array_equal(a.features(np.arange(23)), b.features(np.arange(23)))
        assert a.paths(np.arange(23)) == b.paths(np.arange(23))


def test_rejects_truncated_on_resume(tmp_path):
    root = tmp_path / "c"
    data = rows(12)
    w = CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=5, meta={"source": "test"})
    keep = np.array([0, 1, 3, 4, 5, 6, 8, 9, 10, 11])            # source items 2 and 7 are rejected
    w.reject(2, "bad 2.jpg", "empty file")
    w.reject(7, "bad 7.jpg", "not an image")
    w.add(data["codes"][keep], data["features"][keep], keep, data["labels"][keep],
          [data["paths"][i] for i in keep], source_end=12)
    # shard 0 = items 0,1,3,4,5 (ends at source 6), shard 1 = 6,8,9,10,11: both closed, both rejects flushed
    m = read_manifest(root)
    assert [s["source_end"] for s in m["shards"]] == [6, 12] and m["rejected"] == 2
    w.abort()

    # crash between flushing rejects and recording shard 1: roll the manifest back to one shard
    m["shards"], m["items"] = m["shards"][:1], 5
    write_manifest(root, m)
    with open(root / "rejects.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"index": 9, "path": "x", "reason": "y"}) + "\n")
    w = CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=5, meta={"source": "test"})
    assert w.resume_from == 6
    lines = [json.loads(x) for x in (root / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"index": 2, "path": "bad 2.jpg", "reason": "empty file"}]
    assert w.manifest["rejected"] == 1 and read_manifest(root)["rejected"] == 1

    w.reject(7, "bad 7.jpg", "not an image")
    rest = keep[keep >= 6]
    w.add(data["codes"][rest], data["features"][rest], rest, data["labels"][rest],
          [data["paths"][i] for i in rest], source_end=12)
    w.finish()
    with Collection.open(root) as coll:
        assert coll.rejected == 2 and [r["index"] for r in coll.rejects()] == [2, 7]
        np.testing.assert_array_equal(coll.ids(), keep)


def test_rejects_after_the_last_shard_are_kept(tmp_path):
    root = tmp_path / "c"
    data = rows(3)
    w = CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=3)
    w.add(data["codes"], data["features"], data["ids"], data["labels"], data["paths"], source_end=3)
    w.reject(3, "late.jpg", "empty file")         # a trailing batch of nothing but rejects
    w.finish(4)
    with Collection.open(root) as coll:
        assert coll.n == 3 and coll.rejected == 1 and coll.rejects()[0]["path"] == "late.jpg"


def test_identity_mismatch_and_overwrite(tmp_path):
    root = tmp_path / "c"
    write(root, rows(8))
    with pytest.raises(HashsearchError, match="different bits .*--overwrite"):
        CollectionWriter(root, bits=32, feature_dim=DIM, shard_size=7, meta={"source": "test"})
    with pytest.raises(HashsearchError, match="different source"):
        CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=7, meta={"source": "other"})
    with pytest.raises(HashsearchError, match="different shard_size"):
        CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=8, meta={"source": "test"})
    w = CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=7, meta={"source": "test"})
    assert w.complete                      # same identity: the finished collection is recognised
    w.close()                              # one writer at a time, even in one process
    # a key added to the identity later (precision) is not held against older collections
    assert CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=7,
                            meta={"source": "test", "precision": "fp32"}).complete
    other = tmp_path / "bf"
    with CollectionWriter(other, bits=BITS, feature_dim=DIM, shard_size=7,
                          meta={"source": "test", "precision": "bf16"}) as w2:
        w2.finish()
    with pytest.raises(HashsearchError, match="different precision"):
        CollectionWriter(other, bits=BITS, feature_dim=DIM, shard_size=7, meta={"source": "test", "precision": "fp32"})
    w = CollectionWriter(root, bits=32, feature_dim=DIM, shard_size=7, meta={"source": "test"}, overwrite=True)
    assert not w.complete and w.resume_from == 0
    assert not list((root / "shards").iterdir())


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(HashsearchError, match="not a hashsearch collection"):
        CollectionWriter(tmp_path / "c", bits=BITS, feature_dim=DIM)
    assert (tmp_path / "c" / "holiday.jpg").exists()


def test_stale_partial_removed(tmp_path):
    root = tmp_path / "c"
    write(root, rows(10), finish=False).abort()
    stale = root / "shards" / ".shard-00001.h5.partial"
    stale.write_bytes(b"half a shard")
    CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=7, meta={"source": "test"})
    assert not stale.exists()


@pytest.mark.parametrize("kw, message", [
    ({"feature_dtype": "float64"}, "feature dtype"),
    ({"shard_size": 0}, "shard size must be positive"),
])
def test_bad_writer_arguments(tmp_path, kw, message):
    with pytest.raises(HashsearchError, match=message):
        CollectionWriter(tmp_path / "c", bits=BITS, feature_dim=DIM, **kw)


def test_output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HashsearchError, match="cannot create collection"):
        CollectionWriter(tmp_path / "file" / "c", bits=BITS, feature_dim=DIM)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux's /proc")
def test_unwritable_output_dir():
    # Root (tests run as root here and in CI) writes through permission bits, but nobody creates entries in /proc.
    out = f"/proc/hashsearch-{os.getpid()}/c"
    with pytest.raises(HashsearchError, match=f"cannot create collection {out}"):
        CollectionWriter(out, bits=BITS, feature_dim=DIM)


def test_open_errors(tmp_path):
    with pytest.raises(HashsearchError, match="collection not found"):
        Collection.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HashsearchError, match="no manifest.json"):
        Collection.open(tmp_path / "empty")
    root = tmp_path / "c"
    write(root, rows(10))
    (root / "shards" / "shard-00001.h5").unlink()
    with pytest.raises(HashsearchError, match="shard missing .*shard-00001.h5"):
        Collection.open(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(HashsearchError, match="unreadable manifest"):
        Collection.open(root)


def test_empty_collection(tmp_path):
    root = tmp_path / "c"
    CollectionWriter(root, bits=BITS, feature_dim=DIM).finish()
    with pytest.raises(HashsearchError, match="is empty"):
        Collection.open(root)
    coll = Collection.open(root, allow_empty=True)
    assert coll.n == 0 and coll.codes().shape == (0, BITS // 8)


def test_verify_finds_altered_shard(tmp_path):
    root = tmp_path / "c"
    write(root, rows(23))
    target = root / "shards" / "shard-00002.h5"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with Collection.open(root) as coll:
        assert coll.verify() == ["shard-00002.h5: checksum mismatch (truncated or altered)"]
