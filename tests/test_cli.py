"""The command line end to end: build-index, query, info, and how errors look."""
import json
import os

import numpy as np
import pytest

from conftest import COLL_N, cli, manifest, run_process, save_image

RESULT_KEYS = {"rank", "id", "path", "label", "hamming", "distance"}


def query_json(*args):
    report = json.loads(cli("query", *args, "--json").stdout)
    assert set(report) == {"mode", "k", "queries"}
    for q in report["queries"]:
        assert set(q) == {"query", "results"}
        for r in q["results"]:
            assert set(r) == RESULT_KEYS
        assert [r["rank"] for r in q["results"]] == list(range(1, len(q["results"]) + 1))
    return report


def pool_for(collection, *ids):
    """--pool large enough that the item itself is among its Hamming-0 ties.

    A 1-epoch 16-bit model puts many items on the same code; when more than
    the default pool of 200 tie at distance 0, which of them the coarse level
    returns is arbitrary, so the item could miss its own pool.
    """
    from hashsearch.engine import SearchConfig
    from hashsearch.shards import Collection
    with Collection.open(collection) as coll:
        codes = coll.codes()
        rows = coll.rows_for_ids(list(ids))
        ties = max(int((codes == codes[r]).all(1).sum()) for r in rows)
    return ["--pool", max(SearchConfig.pool, ties)]


# -- info ----------------------------------------------------------------------------------
def test_info_json(collection):
    report = json.loads(cli("info", collection, "--json").stdout)
    assert report["items"] == COLL_N and report["shards"] == 3
    assert report["bits"] == 16 and report["feature_dim"] == 512 and report["rejected"] == 0
    assert report["complete"] is True and report["index"] == "flat" and report["feature_dtype"] == "float16"
    assert report["source"] == "synthetic:300:32" and report["classes"] == 10 and report["backbone"] == "small"
    assert report["precision"] == "fp32"        # auto, on the CPU
    assert report["bytes_on_disk"] > 0


def test_info_table_and_verify_ok(collection):
    out = cli("info", collection, "--verify").stdout
    assert "items: 300" in out and "bits: 16" in out and "verified: True" in out
    assert "problem" not in out


def test_info_verify_finds_flipped_byte(collection_copy):
    target = collection_copy / "shards" / "shard-00001.h5"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    r = cli("info", collection_copy, "--verify", ok=None)
    assert r.exit_code != 0
    assert "shard-00001.h5" in r.stdout and "checksum mismatch" in r.stdout
    assert "shard-00000.h5" not in r.stdout
    r = cli("info", collection_copy, "--verify", "--json", ok=None)
    assert r.exit_code != 0
    report = json.loads(r.stdout)
    assert report["verified"] is False and len(report["problems"]) == 1 and "shard-00001.h5" in report["problems"][0]


def test_info_verify_missing_shard(collection_copy):
    (collection_copy / "shards" / "shard-00002.h5").unlink()
    r = cli("info", collection_copy, "--verify", ok=False)
    assert "shard-00002.h5" in r.stderr


# -- query ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["hds", "es"])
def test_query_by_id_finds_itself(collection, mode):
    report = query_json(collection, "--id", 17, "--id", 240, "-k", 5, "--mode", mode, *pool_for(collection, 17, 240))
    assert report["mode"] == mode and report["k"] == 5
    assert [q["query"] for q in report["queries"]] == ["id:17", "id:240"]
    for item, q in zip((17, 240), report["queries"]):
        assert len(q["results"]) == 5
        top = q["results"][0]
        assert top["id"] == item and top["hamming"] == 0 and top["distance"] == 0
        assert top["path"] == f"synthetic:{item}" and top["label"] == f"class{item % 10}"
        dists = [r["distance"] for r in q["results"]]
        assert dists == sorted(dists) and all(d >= 0 for d in dists)
        assert len({r["id"] for r in q["results"]}) == 5


def test_query_bcs_ranks_by_hamming(collection):
    q = query_json(collection, "--id", 3, "-k", 8, "--mode", "bcs")["queries"][0]
    assert len(q["results"]) == 8
    hams = [r["hamming"] for r in q["results"]]
    assert hams == sorted(hams) and hams[0] == 0
    assert all(r["distance"] is None for r in q["results"])


def test_hds_agrees_with_exhaustive_when_pool_is_everything(collection):
    hds = query_json(collection, "--id", 42, "-k", 10, "--pool", COLL_N)["queries"][0]["results"]
    es = query_json(collection, "--id", 42, "-k", 10, "--mode", "es")["queries"][0]["results"]
    assert [r["id"] for r in hds] == [r["id"] for r in es]
    np.testing.assert_allclose([r["distance"] for r in hds], [r["distance"] for r in es], rtol=1e-3, atol=1e-3)


def test_query_by_image(collection, synthetic_png):
    for mode in ("hds", "es"):
        q = query_json(collection, "--image", synthetic_png, "-k", 3, "--mode", mode,
                       *pool_for(collection, 5))["queries"][0]
        assert q["query"] == str(synthetic_png)
        assert q["results"][0]["id"] == 5 and q["results"][0]["hamming"] == 0
        assert q["results"][0]["distance"] < 1e-2          # the stored float16 copy of the same F7


def test_query_table(collection, synthetic_png):
    out = cli("query", collection, "--image", synthetic_png, "--id", 9, "-k", 4, *pool_for(collection, 9)).stdout
    lines = out.splitlines()
    assert lines[0] == f"query: {synthetic_png}"
    header = lines[1].split()
    assert header == ["rank", "id", "ham", "distance", "label", "path"]
    assert sum(line.startswith("query:") for line in lines) == 2
    assert "query: id:9" in lines
    first = lines[lines.index("query: id:9") + 2].split()
    assert first[:4] == ["1", "9", "0", "0.0000"] and first[4:] == ["class9", "synthetic:9"]


def test_query_k_larger_than_collection(collection):
    q = query_json(collection, "--id", 0, "-k", 1000, "--mode", "es")["queries"][0]
    assert len(q["results"]) == COLL_N


@pytest.mark.parametrize("kind, extra", [
    ("flat", []), ("hash", []), ("multihash", []), ("hash", ["--hash-bits", "8", "--nflip", "2"]),
    ("multihash", ["--hash-bits", "8", "--nhash", "2"]),
])
def test_build_index_kinds(collection, tmp_path, kind, extra):
    out = tmp_path / f"idx-{kind}"
    r = cli("build-index", collection, "--coarse", kind, *extra, "--out", out)
    assert f"built {kind} index over {COLL_N} codes" in r.stdout
    meta = json.loads((out / "index.json").read_text())
    assert meta["coarse"]["kind"] == kind and meta["ntotal"] == COLL_N and meta["bits"] == 16
    assert (out / meta["file"]).exists() and meta["file"].startswith("coarse-")
    for mode in ("hds", "bcs"):
        q = query_json(collection, "--index", out, "--id", 123, "-k", 5, "--mode", mode,
                       *pool_for(collection, 123))["queries"][0]
        assert q["results"] and q["results"][0]["hamming"] == 0
        if mode == "hds":
            assert q["results"][0]["id"] == 123 and q["results"][0]["distance"] == 0


def test_query_radius(collection):
    q = query_json(collection, "--id", 50, "-k", 5, "--radius", 0, *pool_for(collection, 50))["queries"][0]
    assert q["results"] and all(r["hamming"] == 0 for r in q["results"])
    assert q["results"][0]["id"] == 50


def test_stale_index_refused(collection_copy):
    m = manifest(collection_copy)
    m["shards"][0]["sha256"] = "0" * 64
    (collection_copy / "manifest.json").write_text(json.dumps(m))
    r = cli("query", collection_copy, "--id", 1, ok=False)
    assert "build-index" in r.stderr


def test_query_needs_index(collection_copy):
    import shutil
    shutil.rmtree(collection_copy / "index")
    r = cli("query", collection_copy, "--id", 1, ok=False)
    assert "coarse index" in r.stderr and "rebuild it with `hashsearch build-index`" in r.stderr


# -- errors --------------------------------------------------------------------------------
def test_query_with_model_of_other_bit_length(collection, model32, synthetic_png):
    r = cli("query", collection, "--image", synthetic_png, "--model", model32, ok=False)
    assert "32-bit" in r.stderr and "16-bit" in r.stderr


def test_query_image_needs_a_model(collection_copy, synthetic_png, model):
    (collection_copy / "model.pt").unlink()
    r = cli("query", collection_copy, "--image", synthetic_png, ok=False)
    assert "no model.pt; pass --model" in r.stderr
    q = query_json(collection_copy, "--image", synthetic_png, "--model", model, "-k", 1, "--mode", "es")
    assert q["queries"][0]["results"][0]["id"] == 5


def test_unreadable_query_image(collection, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a jpeg")
    r = cli("query", collection, "--image", fake, ok=False)
    assert "cannot read image" in r.stderr and "photo.jpg" in r.stderr


def test_missing_query_image(collection, tmp_path):
    r = cli("query", collection, "--image", tmp_path / "nope.jpg", ok=False)
    assert "query image not found" in r.stderr



def test_query_image_that_is_a_fifo(collection, tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)                                 # opening it for reading waits for a writer forever
    p = run_process("query", collection, "--image", fifo, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"hashsearch: error: cannot read image {fifo}: {fifo} is a FIFO"]

@pytest.mark.parametrize("k", ["0", "-3"])
def test_k_must_be_positive(collection, k):
    r = cli("query", collection, "--id", 1, "-k", k, ok=False)
    assert "k must be positive" in r.stderr


def test_query_unknown_id(collection):
    r = cli("query", collection, "--id", 99999, ok=False)
    assert "id 99999 is not in collection" in r.stderr


def test_query_needs_something(collection):
    r = cli("query", collection, ok=False)
    assert "give at least one image or id" in r.stderr


def test_missing_collection(tmp_path):
    for args in (["query", tmp_path / "nope", "--id", 1], ["info", tmp_path / "nope"],
                 ["build-index", tmp_path / "nope"]):
        r = cli(*args, ok=False)
        assert "collection not found" in r.stderr


def test_not_a_collection(tmp_path):
    r = cli("info", tmp_path, ok=False)
    assert "not a hashsearch collection" in r.stderr


def test_empty_collection(model, tmp_path):
    """A folder of nothing but bad images encodes to an empty, complete collection that can't be searched."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("text")
    coll = tmp_path / "coll"
    r = cli("encode", folder, "--model", model, "--out", coll, "--workers", 0, "--quiet")
    info = json.loads(cli("info", coll, "--json").stdout)
    assert info["items"] == 0 and info["rejected"] == 2 and info["complete"] is True
    r = cli("build-index", coll, ok=False)
    assert "is empty" in r.stderr
    r = cli("query", coll, "--id", 0, ok=False)
    assert "is empty" in r.stderr


def test_folder_without_images(model, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    r = cli("encode", folder, "--model", model, "--out", tmp_path / "coll", "--workers", 0, ok=False)
    assert "no images found" in r.stderr
    assert not (tmp_path / "coll").exists()
    r = cli("train", folder, "--workers", 0, "--out", tmp_path / "m.pt", ok=False)
    assert "no images found" in r.stderr


@pytest.mark.parametrize("source, message", [
    ("/no/such/dir", "source not found"),
    ("unknownkind:12", "source not found"),
    ("synthetic:abc", "bad synthetic source"),
])
def test_bad_source(model, tmp_path, source, message):
    r = cli("encode", source, "--model", model, "--out", tmp_path / "coll", "--workers", 0, ok=False)
    assert message in r.stderr
    assert not (tmp_path / "coll").exists()


def test_source_file_of_unknown_kind(model, tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"\0" * 10)
    r = cli("encode", f, "--model", model, "--out", tmp_path / "coll", ok=False)
    assert "unknown source" in r.stderr


def test_encode_missing_model(tmp_path):
    r = cli("encode", "synthetic:10", "--model", tmp_path / "none.pt", "--out", tmp_path / "c", ok=False)
    assert "model not found" in r.stderr


def test_encode_model_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not torch")
    r = cli("encode", "synthetic:10", "--model", bad, "--out", tmp_path / "c", ok=False)
    assert f"model {bad} is not a hashsearch checkpoint (not a torch file)" in r.stderr


def test_errors_in_a_real_process(tmp_path):
    """What a user sees in a terminal: one line, exit 1; --debug adds the traceback."""
    p = run_process("query", tmp_path / "nope", "--id", 1)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"hashsearch: error: collection not found: {tmp_path / 'nope'}"]
    assert p.stdout == ""
    p = run_process("--debug", "query", tmp_path / "nope", "--id", 1)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "HashsearchError: collection not found" in p.stderr


def test_debug_flag_reraises(tmp_path):
    from click.testing import CliRunner
    from hashsearch.cli import main
    from hashsearch.errors import HashsearchError
    r = CliRunner().invoke(main, ["--debug", "info", str(tmp_path / "nope")])
    assert isinstance(r.exception, HashsearchError)


def test_help_and_version():
    out = cli("--help").stdout
    for command in ("train", "encode", "build-index", "query", "info"):
        assert command in out
    assert "version" in cli("--version").stdout
    import hashsearch
    assert hashsearch.__version__ in cli("--version").stdout


def test_query_by_grayscale_image(collection, tmp_path):
    img = save_image(tmp_path / "grey.png", mode="L", size=(50, 70))
    q = query_json(collection, "--image", img, "-k", 2)["queries"][0]
    assert len(q["results"]) == 2
