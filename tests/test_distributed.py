"""Scale-out on Ray: encoder actors and partitioned search, against the single-process results.

One local Ray cluster of 2 CPUs serves the module, started as `--ray` starts one: on 127.0.0.1 only.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

# As `--ray` does before it imports ray: a cluster started here is a loopback one (hashsearch.distributed.cluster).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

import live_writer as lw  # noqa: E402
from conftest import assert_same_collection, cli, hashsearch_cmd, manifest, run_process  # noqa: E402
from hashsearch import HashsearchError, Index  # noqa: E402
from hashsearch.config import NEIGHBOUR_POOL, RayEncodeConfig  # noqa: E402
from hashsearch.distributed import ShardedIndex, plan_partitions, ray_cluster  # noqa: E402
from hashsearch.distributed.encode import encode_on_ray  # noqa: E402
from hashsearch.bench.sysinfo import descendant_pids  # noqa: E402
from hashsearch.encoders.runner import encode_collection  # noqa: E402
from hashsearch.shards import delete_items  # noqa: E402

KINDS = [("flat", {}), ("hash", {"hash_bits": 8, "nflip": 1}), ("multihash", {"hash_bits": 8, "nflip": 0})]
# Features of a Ray actor (one torch thread) and of this process may differ in a float16's last bit.
FEATURE_ATOL = 2e-3
ENCODE_ARGS = dict(batch_size=32, workers=0, shard_size=96, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(num_cpus=2) as connected:
        yield connected.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def live_root(tmp_path_factory):
    """Shards of 200 rows from a build, then rows added and deleted since: base, delta and tombstones."""
    root = tmp_path_factory.mktemp("dist") / "c"
    lw.create(root, 1000)
    Index.build(root, "flat")
    lw.append(root, 2000, 300)
    delete_items(root, ids=list(range(0, 40)) + [450, 451, 1005, 1010])
    return root


def queries(n: int = 24):
    codes, feats, _, _ = lw.item_rows(0, 2300)
    pick = np.random.default_rng(3).choice(np.r_[0:1000, 2000:2300], n, replace=False)
    return codes[pick], feats[pick]


def assert_same_result(a, b, what):
    for field in ("ids", "rows", "hamming", "distances"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{what}: {field}")


# -- the cluster -----------------------------------------------------------------------------------
def test_the_local_cluster_listens_on_loopback_only(cluster):
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    ours = descendant_pids(os.getpid()) | {os.getpid()}
    addresses = []
    for line in listening:
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & ours:
            addresses.append(line.split()[3].rsplit(":", 1)[0])
    assert len(addresses) >= 3, listening          # the GCS, the raylet, a worker at least
    assert all(a in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]") for a in addresses), addresses
    assert cluster.startswith("127.0.0.1:")


def test_partitions_are_runs_of_shards_with_about_equal_rows():
    assert plan_partitions([100] * 10, 4, "c") == [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert plan_partitions([1000, 10, 10, 10], 3, "c") == [(0, 1), (1, 2), (2, 4)]
    assert plan_partitions([5, 5], 1, "c") == [(0, 2)]
    with pytest.raises(HashsearchError, match="3 partitions need at least 3 shards"):
        plan_partitions([5, 5], 3, "c")


# -- search --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("partitions", [1, 2, 3])
def test_sharded_search_equals_the_single_index_in_every_mode(cluster, live_root, partitions):
    codes, feats = queries()
    with Index.open(live_root) as single, ShardedIndex(live_root, partitions) as sharded:
        assert sharded.collection.items == single.collection.items == 1256
        # the neighbour pool a --ray search uses: partitions cannot search the sketch's cells, which a single
        # index's tuned default may (engine/tuning.py)
        npool = NEIGHBOUR_POOL
        for mode, pool, radius in (("hds", 20, None), ("hds", 30, 9), ("bcs", 20, None), ("bcs", 5, 9),
                                   ("es", 20, None)):
            for q in (slice(None), slice(0, 1), slice(5, 6)):      # a batch, and the batch-1 path
                a = single.search(codes[q], feats[q], 10, mode=mode, pool=pool, radius=radius, neighbour_pool=npool)
                b = sharded.search(codes[q], feats[q], 10, mode=mode, pool=pool, radius=radius)
                assert_same_result(a, b, f"P={partitions} {mode} pool={pool} radius={radius} {q}")
        # hds's two pools past the places the neighbour pool alone may take, and with H's pool alone
        for params in (dict(k=40, pool=20, neighbour_pool=30, neighbour_places=5), dict(k=10, neighbour_pool=0)):
            for q in (slice(None), slice(0, 1)):
                assert_same_result(single.search(codes[q], feats[q], **params),
                                   sharded.search(codes[q], feats[q], **params), f"P={partitions} {params} {q}")


@pytest.mark.parametrize("kind, params", KINDS[1:])
def test_sharded_hash_indexes_find_what_the_single_one_finds(cluster, tmp_path, kind, params):
    root = tmp_path / "c"
    lw.create(root, 800)
    Index.build(root, kind, **params)
    codes, feats = queries()
    with Index.open(root) as single, ShardedIndex(root, 2) as sharded:
        for mode in ("hds", "bcs"):
            # every probed candidate: the same buckets must give the same set; Hamming ties at the
            # k-th place come in bucket order from faiss, so bcs compares distances
            a = single.search(codes, feats, 10, mode=mode, pool=1000)
            b = sharded.search(codes, feats, 10, mode=mode, pool=1000)
            np.testing.assert_array_equal(a.hamming, b.hamming, err_msg=f"{kind} {mode}")
            if mode == "hds":
                assert_same_result(a, b, f"{kind} {mode}")


def test_refresh_moves_every_partition_to_the_newest_generation(cluster, tmp_path):
    root = tmp_path / "c"
    lw.create(root, 600)
    Index.build(root, "flat")
    codes, feats = queries()
    with ShardedIndex(root, 2) as sharded:
        assert not sharded.refresh()
        lw.append(root, 2000, 300)
        delete_items(root, ids=[1, 2, 3, 601])
        assert sharded.refresh()
        with Index.open(root) as single:
            assert sharded.generation == single.generation
            assert_same_result(single.search(codes, feats, 10, pool=40), sharded.search(codes, feats, 10, pool=40),
                               "after refresh")
        found = sharded.search(codes, feats, 50, pool=200).ids
        assert not {1, 2, 3, 601} & set(found.ravel().tolist())


def test_a_killed_partition_actor_is_restarted_and_the_query_retried(cluster, live_root):
    codes, feats = queries()
    with Index.open(live_root) as single, ShardedIndex(live_root, 2) as sharded:
        expected = single.search(codes, feats, 10, pool=30)
        assert_same_result(expected, sharded.search(codes, feats, 10, pool=30), "before the kill")
        for victim in sharded.actors:
            ray.kill(victim, no_restart=False)
            # the kill is asynchronous: wait until Ray has restarted the actor, empty, so the query must reload it
            deadline = time.monotonic() + 60
            while True:
                try:
                    if ray.get(victim.__ray_call__.remote(lambda actor: len(actor.indexes)), timeout=10) == 0:
                        break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
                assert time.monotonic() < deadline, "the actor was not restarted"
                time.sleep(0.1)
            assert_same_result(expected, sharded.search(codes, feats, 10, pool=30), "after a kill")


def test_a_partition_reloads_an_old_generation_beside_newer_ones(live_root):
    """A retry may load a generation older than two already there: it stays, the oldest other goes."""
    from hashsearch.distributed.search import PartitionSearcher
    from hashsearch.shards import read_manifest
    manifest = read_manifest(live_root)
    searcher = PartitionSearcher(str(live_root))
    for generation in (10, 11, 12):
        searcher.load(dict(manifest, generation=generation), 0, 2)
    assert sorted(searcher.indexes) == [11, 12]
    assert searcher.load(dict(manifest, generation=10), 0, 2) > 0
    assert sorted(searcher.indexes) == [10, 12]


def test_a_refresh_after_compaction_below_the_partition_count_uses_fewer_actors(cluster, tmp_path):
    from hashsearch.engine.compact import compact
    root = tmp_path / "c"
    lw.create(root, 600)                    # 3 shards
    Index.build(root, "flat")
    codes, feats = queries()
    with ShardedIndex(root, 3) as sharded:
        delete_items(root, ids=list(range(0, 400)))
        compact(root, 0.2)                  # the two emptied shards go
        assert sharded.refresh()
        with Index.open(root) as single:
            assert_same_result(single.search(codes, feats, 10, pool=40), sharded.search(codes, feats, 10, pool=40),
                               "after compaction")


def test_bad_partitions_and_queries_are_one_clear_error(cluster, live_root):
    with pytest.raises(HashsearchError, match="at least 99 shards"):
        ShardedIndex(live_root, 99)
    with ShardedIndex(live_root, 2) as sharded:
        codes, feats = queries(2)
        with pytest.raises(HashsearchError, match="query codes have shape"):
            sharded.search(codes[:, :2], feats, 5)
        with pytest.raises(HashsearchError, match="radius must be"):
            sharded.search(codes, feats, 5, radius=999)
        with pytest.raises(HashsearchError, match="unknown mode"):
            sharded.search(codes, feats, 5, mode="nope")
        with pytest.raises(HashsearchError, match="neighbour-cells is searched on one machine only"):
            sharded.search(codes, feats, 5, neighbour_cells=4)
        for mode in ("hds", "bcs", "es"):
            with pytest.raises(HashsearchError, match="pool 0 is for a search of one index"):
                sharded.search(codes, feats, 5, pool=0, mode=mode)


def test_query_and_serve_with_ray_answer_as_without(cluster, collection, tmp_path):
    plain = json.loads(cli("query", collection, "--id", 5, "--id", 77, "--json").stdout)
    # a separate driver process joining this cluster, as a user's would
    joined = run_process("query", collection, "--id", 5, "--id", 77, "--json", "--ray", "--address", cluster,
                         "--partitions", 3, timeout=120)
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout) == plain
    import httpx
    from conftest import LiveServer
    with LiveServer(collection, "--ray", "--address", cluster, "--partitions", 2) as server:
        served = httpx.post(server.url + "/search", params={"k": 10}, json={"id": 5}, timeout=60).json()
    expected = plain["queries"][0]["results"]
    assert [(r["id"], r["hamming"], r["distance"]) for r in served["results"]] == \
        [(r["id"], r["hamming"], r["distance"]) for r in expected]


# -- encode ------------------------------------------------------------------------------------------
def test_encode_on_ray_equals_a_single_process_encode(cluster, model, tmp_path):
    encode_collection(model, "synthetic:300", tmp_path / "one", **ENCODE_ARGS)
    encode_on_ray(model, "synthetic:300", tmp_path / "ray", ray=RayEncodeConfig(ray=True, actors=2), **ENCODE_ARGS)
    assert_same_collection(tmp_path / "one", tmp_path / "ray", features_atol=FEATURE_ATOL)
    assert manifest(tmp_path / "ray")["generation"] == manifest(tmp_path / "one")["generation"]


def _first_shard_published(root, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if manifest(root)["shards"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    raise AssertionError("no shard was published in time")


def test_a_killed_encoder_actor_is_retried_and_the_collection_is_the_same(cluster, model, tmp_path):
    encode_collection(model, "synthetic:1200", tmp_path / "one", **ENCODE_ARGS)
    out = tmp_path / "ray"
    errors = []

    def run():
        try:
            encode_on_ray(model, "synthetic:1200", out, ray=RayEncodeConfig(ray=True, actors=2), **ENCODE_ARGS)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    _first_shard_published(out, time.monotonic() + 120)
    assert not manifest(out)["complete"]          # chunks were still being encoded
    names = [a for a in ray.util.list_named_actors() if a.startswith("hashsearch-encoder-")]
    assert names
    ray.kill(ray.get_actor(sorted(names)[0]), no_restart=False)
    worker.join(timeout=180)
    assert not worker.is_alive() and not errors, errors
    assert_same_collection(tmp_path / "one", out, features_atol=FEATURE_ATOL)


def test_a_killed_driver_resumes_with_the_same_command(cluster, model, tmp_path):
    encode_collection(model, "synthetic:1200", tmp_path / "one", **ENCODE_ARGS)
    out = tmp_path / "ray"
    command = hashsearch_cmd() + ["encode", "synthetic:1200", "--model", str(model), "--out", str(out),
                                  "--batch-size", "32", "--workers", "0", "--shard-size", "96", "--device", "cpu",
                                  "--quiet", "--ray", "--address", cluster, "--actors", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _first_shard_published(out, time.monotonic() + 120)
    finally:
        driver.kill()
        driver.wait()
    assert not manifest(out)["complete"]
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_collection(tmp_path / "one", out, features_atol=FEATURE_ATOL)


def test_without_ray_installed_ray_options_say_how_to_install_it(collection):
    hide_ray = "import sys; sys.modules['ray'] = None; from hashsearch.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", hide_ray, "query", str(collection), "--id", "5", "--ray"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "hashsearch: error: --ray needs Ray, which is not installed: " \
                                    "pip install 'hashsearch[ray]'"
    plain = subprocess.run([sys.executable, "-c", hide_ray, "query", str(collection), "--id", "5"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr


def test_address_without_ray_is_refused(collection):
    cli("query", collection, "--id", 5, "--address", "auto", ok=False)


def test_an_address_where_no_ray_cluster_answers_fails_at_once(collection):
    """In a process of its own: this one is connected to the module's cluster, which a query here would reuse."""
    import socket

    def refused(address: str) -> str:
        result = run_process("query", collection, "--id", 5, "--ray", "--address", address, timeout=60)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))           # bound, never listening: refused
        assert "no Ray cluster answers" in refused(f"127.0.0.1:{closed.getsockname()[1]}")
    # something listening that is not Ray, which Ray itself would retry for minutes
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()

        def answer():
            conn, _ = other.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        threading.Thread(target=answer, daemon=True).start()
        began = time.monotonic()
        assert "is not a Ray cluster's head" in refused(f"127.0.0.1:{other.getsockname()[1]}")
        assert time.monotonic() - began < 30
    assert "must be auto or HOST:PORT" in refused("not-an-address")


def test_actors_the_cluster_cannot_place_are_refused_not_waited_for(cluster, model, tmp_path):
    with pytest.raises(HashsearchError, match="need 2 GPUs; the Ray cluster has 0"):
        encode_on_ray(model, "synthetic:50", tmp_path / "c", ray=RayEncodeConfig(ray=True, actors=2, gpus_per_actor=1),
                      **ENCODE_ARGS)
    cli("encode", "synthetic:50", "--model", model, "--out", tmp_path / "d", "--ray", "--gpus-per-actor", 1.5, ok=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
